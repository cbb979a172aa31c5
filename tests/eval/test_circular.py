"""Circular evaluation (the *_circular tasks) and letter bias: rotations on hand-written docs of each hub
format, their aggregation, and scripted models through the real lmms-eval CLI (with a resumed run)."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import datasets
import lmms_cli
import pytest
from reliability import user_text
from servers import ScriptedServer

from p2r_recipe.lmms import tasks
from p2r_recipe.lmms.benchmarks import HRBENCH, MMEREALWORLD, VSTAR
from p2r_recipe.lmms.registration import tasks_dir
from p2r_recipe.report import leaderboard

WORDS = ["red", "blue", "green", "white", "black", "grey"]
_ASKED_OPTION = re.compile(r"^(?:\(([A-F])\)|([A-F])\.) (.*)$", re.MULTILINE)


def vstar_doc(n: int, truth: int) -> dict:
    lines = "".join(f"\n({'ABCDEF'[i]}) {WORDS[i]}" for i in range(n))
    return {
        "question_id": f"q{n}{truth}",
        "text": f"What colour is the cup?{lines}\nAnswer with the option's letter from the given choices directly.",
        "label": "ABCDEF"[truth],
        "category": "direct_attributes",
    }


def mme_doc(n: int, truth: int) -> dict:
    return {
        "index": 10 * n + truth,
        "question": "Which colour?",
        "multi-choice options": [f"({'ABCDEF'[i]}) {WORDS[i]}" for i in range(n)],
        "answer": "ABCDEF"[truth],
        "category": "Perception/Monitoring",
    }


def hrbench_doc(present: str, truth: str) -> dict:
    """Options only in the `present` letters; the others None, NaN or blank, as hub rows may hold."""
    blanks = [None, float("nan"), "  "]
    doc = {"index": 3, "question": "Which colour?", "answer": truth, "category": "single", "cycle_category": "c"}
    for i, letter in enumerate("ABCD"):
        doc[letter] = WORDS[i] if letter in present else blanks[i % len(blanks)]
    return doc


def asked_options(text: str) -> dict[str, str]:
    """letter -> option text, as a question lists them ("(A) red" or "A. red", one a line or inline)."""
    return {m.group(1) or m.group(2): m.group(3) for m in _ASKED_OPTION.finditer(text.replace(" (", "\n("))}


def inline(doc: dict) -> dict:
    """The V* doc with its options on the question's line: "Which? (A) red (B) blue"."""
    return {**doc, "text": doc["text"].replace("\n(", " (")}


CASES = [
    *((VSTAR, vstar_doc(n, t)) for n in range(2, 7) for t in (0, n - 1)),
    *((VSTAR, inline(vstar_doc(n, t))) for n, t in ((2, 1), (4, 2))),
    *((MMEREALWORLD, mme_doc(n, t)) for n in range(2, 7) for t in (0, n // 2)),
    *((HRBENCH, hrbench_doc(present, truth)) for present, truth in [("AB", "B"), ("ACD", "C"), ("BD", "D"), ("ABCD", "A")]),
]


@pytest.mark.parametrize("benchmark, doc", CASES)
def test_every_rotation_keeps_letters_options_and_ground_truth_consistent(benchmark, doc):
    stored = asked_options(tasks.doc_to_text(benchmark, doc))
    truth_text = stored[benchmark.answer(doc)]
    n = benchmark.rotations(doc)
    assert n == len(stored) >= 2 and "nan" not in stored.values() and "None" not in stored.values()
    assert benchmark.rotate(doc, 0) is doc  # rotation 0 is the release's question itself
    truths = []
    for shift in range(n):
        rotated = benchmark.rotate(doc, shift)
        options = asked_options(tasks.doc_to_text(benchmark, rotated))
        assert list(options) == list(stored)  # the same letters in the same order (blank ones still left out)
        assert sorted(options.values()) == sorted(stored.values())
        assert options[benchmark.answer(rotated)] == truth_text  # the ground truth moved with its text
        assert list(options.values()) == [*stored.values()][shift:] + [*stored.values()][:shift]
        truths.append(benchmark.answer(rotated))
    assert sorted(truths) == sorted(stored)  # over the rotations the truth sits behind every letter once
    assert benchmark.rotate(doc, n) is doc


def test_rotation_refuses_a_ground_truth_that_is_no_option():
    with pytest.raises(ValueError, match="ground truth 'D' is not one of its options"):
        HRBENCH.rotate(hrbench_doc("AB", "D"), 1)
    with pytest.raises(ValueError, match="not one of its options"):
        tasks.circular_docs(HRBENCH, datasets.Dataset.from_list([hrbench_doc("AB", "D")]))
    assert HRBENCH.rotations(hrbench_doc("", "A")) == 1  # no options: asked once, as stored


def score(benchmark, docs: list[dict], answer) -> dict:
    """Every metric of a circular task over `docs`, aggregated as its YAML does; `answer(question)` replies."""
    rows = tasks.circular_docs(benchmark, datasets.Dataset.from_list(docs))
    samples = [tasks.process_results(benchmark, row, [answer(tasks.doc_to_text(benchmark, row))]) for row in rows]
    metrics = {name: [s.get(name) for s in samples] for name in samples[0]}
    return {
        "overall": tasks.mean_known(metrics["overall"]),
        "overall_circular": tasks.circular_accuracy(metrics["overall_circular"]),
        "attr_circular": tasks.circular_accuracy(metrics["attr_circular"]),
        "letter_bias": tasks.letter_bias(metrics["letter_bias"]),
        "requests": len(rows),
    }


def test_always_a_scores_the_release_accuracy_on_all_a_answers_and_zero_circular():
    docs = [vstar_doc(n, 0) for n in (2, 3, 4, 6)]
    got = score(VSTAR, docs, lambda question: "A")
    assert (got["overall"], got["overall_circular"], got["attr_circular"], got["requests"]) == (100.0, 0.0, 0.0, 15)
    assert got["letter_bias"] == {
        "n": 15, "predicted": {**dict.fromkeys("ABCDEF", 0), "A": 15, "-": 0}, "truth": {"A": 4, "B": 4, "C": 3, "D": 2, "E": 1, "F": 1},
    }  # fmt: skip


@pytest.mark.parametrize(
    "benchmark, docs",
    [(VSTAR, [vstar_doc(n, t) for n, t in ((2, 1), (3, 2), (4, 0), (4, 3))]),  # V* letters are A-D
     (MMEREALWORLD, [mme_doc(n, t) for n, t in ((5, 4), (6, 5), (6, 0))]),  # MME-RealWorld's A-F
     (HRBENCH, [{**hrbench_doc("ABC", "C"), "index": 1}, {**hrbench_doc("AB", "A"), "index": 2}])],
)  # fmt: skip
def test_an_oracle_scores_100_under_both(benchmark, docs):
    truth = {benchmark.doc_id(d): asked_options(tasks.doc_to_text(benchmark, d))[benchmark.answer(d)] for d in docs}
    samples = []
    for row in tasks.circular_docs(benchmark, datasets.Dataset.from_list(docs)):
        options = asked_options(tasks.doc_to_text(benchmark, row))  # what the model sees, nothing else
        letter = next(letter for letter, text in options.items() if text == truth[benchmark.doc_id(row)])
        samples.append(tasks.process_results(benchmark, row, [letter]))
    assert len(samples) == sum(benchmark.rotations(d) for d in docs)
    assert tasks.mean_known([s["overall"] for s in samples]) == 100.0
    assert tasks.circular_accuracy([s["overall_circular"] for s in samples]) == 100.0
    bias = tasks.letter_bias([s["letter_bias"] for s in samples])
    assert bias["predicted"] == {**bias["truth"], "-": 0}


def test_a_question_with_a_rotation_missing_is_left_out_of_circular_accuracy():
    rotation = {"rotations": 3, "correct": 1.0}
    values = [{"id": "a", "rotation": r, **rotation} for r in range(3)] + [{"id": "b", "rotation": 0, **rotation}, None]
    assert tasks.circular_accuracy(values) == 100.0  # "b" answered once of three times: not counted
    assert tasks.circular_accuracy([None, {"id": "b", "rotation": 1, **rotation}]) is None
    wrong_once = [{"id": "a", "rotation": r, "rotations": 3, "correct": float(r != 2)} for r in range(3)]
    assert tasks.circular_accuracy(wrong_once) == 0.0


# --- through the real lmms-eval CLI -------------------------------------------------------------


def all_a_vstar(folder: Path) -> tuple[Path, dict[str, str]]:
    """The demo's V* rows rotated so every answer is A (as in the released V*), as a task folder holding
    `alla_vstar` and `alla_vstar_circular`; and each question's first line -> its correct option text."""
    demo = tasks_dir() / "p2r_demo" / "data" / "vstar.parquet"
    stored = tasks.undecoded_images(datasets.load_dataset("parquet", data_files={"test": str(demo)})["test"])
    rows = [VSTAR.rotate(doc, "ABCD".index(VSTAR.answer(doc))) for doc in stored]
    rows = [{**row, "text": f"Q{row['question_id']}. {row['text']}"} for row in rows]  # one stem per question
    assert {VSTAR.answer(row) for row in rows} == {"A"}
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "alla_vstar.parquet"
    datasets.Dataset.from_list(rows, features=stored.features).to_parquet(str(data))
    for name, template in (("alla_vstar", "_template_yaml"), ("alla_vstar_circular", "_circular_template_yaml")):
        (folder / f"{name}.yaml").write_text(
            f"include: {tasks_dir() / 'vstar' / template}\ntask: {name}\ndataset_path: parquet\n"
            f"dataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        )
    truth = {row["text"].splitlines()[0]: asked_options(row["text"])["A"] for row in rows}
    assert len(truth) == len(rows)
    return folder, truth


def model_args_for(server) -> str:
    return f"backend=openai,base_url={server.base_url},served_model=scripted,mode=default,concurrency=2"


def evaluate(tmp_path, server, folder, name: str, tasks_arg: str, extra_args: str = "") -> lmms_cli.Outputs:
    model_args = model_args_for(server) + extra_args
    out = tmp_path / name
    lmms_cli.run(
        "--model", "p2r", "--model_args", model_args, "--tasks", tasks_arg, "--include_path", str(folder),
        "--output_path", str(out), "--log_samples", cwd=tmp_path,
    )  # fmt: skip
    return lmms_cli.read_outputs(out)


def oracle_reply(truth: dict[str, str]):
    def reply(body: dict) -> str:
        text = user_text(body)
        wanted = next(t for stem, t in truth.items() if stem in text)
        return next(letter for letter, option in asked_options(text).items() if option == wanted)

    return reply


@pytest.mark.slow
def test_always_a_and_an_oracle_through_the_lmms_eval_cli(tmp_path):
    folder, truth = all_a_vstar(tmp_path / "tasks")
    n = len(truth)
    with ScriptedServer(lambda body: "A") as always_a:
        a = evaluate(tmp_path, always_a, folder, "always_a", "alla_vstar,alla_vstar_circular")
        assert always_a.calls == n + 4 * n  # the release's order once, then every rotation of 4 options
    with ScriptedServer(oracle_reply(truth)) as oracle:
        o = evaluate(tmp_path, oracle, folder, "oracle", "alla_vstar,alla_vstar_circular")

    release, circular = a.metrics("alla_vstar"), a.metrics("alla_vstar_circular")
    assert release["overall"] == circular["overall"] == 100.0  # the release's accuracy, in both tasks
    assert circular["overall_circular"] == circular["attr_circular"] == circular["spatial_circular"] == 0.0
    assert "overall_circular" not in release
    assert release["letter_bias"] == {"n": n, "predicted": {"A": n, "-": 0}, "truth": {"A": n}}
    assert circular["letter_bias"]["predicted"] == {"A": 4 * n, "B": 0, "C": 0, "D": 0, "-": 0}
    assert circular["letter_bias"]["truth"] == dict.fromkeys("ABCD", n)
    assert a.results["n-samples"]["alla_vstar_circular"]["effective"] == 4 * n

    for metric in ("overall", "attr", "spatial"):
        assert o.metrics("alla_vstar")[metric] == 100.0
    assert {o.metrics("alla_vstar_circular")[m] for m in ("overall", "overall_circular", "attr_circular")} == {100.0}
    # Rotation 0 of the circular task is the release's question, byte for byte (rotations are adjacent, 4 each).
    asked = {s["doc_id"]: s["input"] for s in o.samples["alla_vstar"]}
    rotation0 = {s["doc_id"] // 4: s["input"] for s in o.samples["alla_vstar_circular"] if s["doc_id"] % 4 == 0}
    assert asked == rotation0 and len(asked) == n


@pytest.mark.slow
def test_a_killed_circular_run_resumes_every_rotation_it_answered_from_record_cache(tmp_path):
    folder, truth = all_a_vstar(tmp_path / "tasks")
    total = 4 * len(truth)
    journal = tmp_path / "journal.jsonl"
    with ScriptedServer(oracle_reply(truth), latency_s=0.2) as server:
        model_args = f"{model_args_for(server)},record_cache={journal}"
        process = lmms_cli.start(
            "--model", "p2r", "--model_args", model_args, "--tasks", "alla_vstar_circular", "--include_path", str(folder),
            "--output_path", str(tmp_path / "killed"), cwd=tmp_path,
        )  # fmt: skip
        deadline = time.monotonic() + 240
        while not (journal.exists() and journal.read_text().count("\n") >= 8):
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.communicate()
        saved = journal.read_text().count("\n")
        assert 8 <= saved < total
        calls = server.calls
        resumed = evaluate(tmp_path, server, folder, "resumed", "alla_vstar_circular", f",record_cache={journal}")
        assert server.calls - calls == total - saved  # every rotation already answered came from the journal
    metrics = resumed.metrics("alla_vstar_circular")
    assert metrics["overall_circular"] == metrics["overall"] == 100.0 and metrics["errors"] == 0
    assert sorted(s["doc_id"] for s in resumed.samples["alla_vstar_circular"]) == list(range(total))


def test_the_leaderboard_shows_circular_scores_and_letter_bias(tmp_path, capsys):
    bias = {"n": 4, "predicted": {"A": 4, "B": 0, "-": 0}, "truth": {"A": 1, "B": 3}}
    results = {
        "vstar": {"overall,none": 75.0, "attr,none": 50.0, "spatial,none": 100.0, "letter_bias,none": bias, "samples": 4},
        "vstar_circular": {
            "overall,none": 75.0, "overall_circular,none": 25.0, "attr_circular,none": 0.0, "spatial_circular,none": 50.0,
            "letter_bias,none": {**bias, "n": 8, "predicted": {"A": 8, "B": 0, "-": 0}, "truth": {"A": 4, "B": 4}}, "samples": 8,
        },
    }  # fmt: skip
    run = tmp_path / "runs" / "m" / "20260101_000000_results.json"
    run.parent.mkdir(parents=True)
    run.write_text(json.dumps({"results": results, "config": {"model_args": "pretrained=org/Model-X,mode=p2r"}}))
    assert leaderboard.main([str(tmp_path / "runs"), "--no-published", "--out-dir", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "leaderboard.md").read_text()
    circular = text[text.index("### V* and HR-Bench, circular evaluation") :]
    assert "V* circ" in circular and "V* Attr circ" in circular
    assert re.search(r"\| Model-X +\| p2r +\| run +\| +75\.0 \| +0\.0 \| +50\.0 \| +25\.0 \|", circular)
    assert re.search(r"\| main +\| Model-X +\| p2r +\| vstar +\| A 100 B 0 - 0 +\| A 25 B 75 +\|", text)
    assert re.search(r"\| main_circular +\| Model-X +\| p2r +\| vstar_circular +\| A 100 B 0 - 0 +\| A 50 B 50 +\|", text)


@pytest.mark.slow
def test_the_demo_circular_group_on_the_hf_backend_with_the_tiny_model(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    lmms_cli.run(
        "--model", "p2r", "--model_args", f"pretrained={tiny_model_dir},mode=default,max_pixels=65536",
        "--tasks", "p2r_demo_circular", "--limit", "8", "--output_path", str(out), "--log_samples", cwd=tmp_path,
    )  # fmt: skip
    outputs = lmms_cli.read_outputs(out)
    for task, categories in (("p2r_demo_vstar_circular", ("attr", "spatial")), ("p2r_demo_hrbench_4k_circular", ("fsp", "fcp"))):
        metrics = outputs.metrics(task)
        assert {"overall", "overall_circular", *(f"{c}_circular" for c in categories), "letter_bias"} <= set(metrics)
        assert metrics["letter_bias"]["n"] == 8 and sum(metrics["letter_bias"]["truth"].values()) == 8
        # --limit 8 takes the first two questions' four rotations each: whole questions, none left out.
        assert metrics["overall_circular"] in (0.0, 50.0, 100.0) and metrics["overall_circular"] <= metrics["overall"]
        assert [s["doc_id"] for s in outputs.samples[task]] == list(range(8))
    group = outputs.metrics("p2r_demo_circular")
    assert group["overall_circular"] is not None and group["errors"] == 0
