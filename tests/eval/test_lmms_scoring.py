"""Scoring of our lmms-eval tasks on hand-written docs and replies, the record envelope, and the task YAMLs."""

import base64
import io

import datasets
import pytest
from lmms_eval.api.reasoning import strip_reasoning_tags
from lmms_eval.utils import load_yaml_config
from PIL import Image

from p2r_recipe import prompts
from p2r_recipe.lmms import benchmarks, envelope, tasks
from p2r_recipe.lmms.registration import tasks_dir
from p2r_recipe.records import Record


def _png_base64() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), "white").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


VSTAR_DOC = {
    "question_id": "sa_1",
    "text": "What is the color of the cup?\n(A) red\n(B) blue\n(C) green\n(D) white\n"
    "Answer with the option's letter from the given choices directly.",
    "label": "B",
    "category": "direct_attributes",
}
HRBENCH_DOC = {
    "index": 7,
    "question": "What is written on the small sign?",
    "A": "STOP",
    "B": "GO",
    "C": "EXIT",
    "D": "OPEN",
    "answer": "C",
    "category": "cross",
    "cycle_category": "cycle_0",
    "image": _png_base64(),
}
MME_DOC = {
    "index": 3,
    "question": "What is the speed limit on the sign?",
    "multi-choice options": ["(A) 30", "(B) 40", "(C) 50", "(D) 60", "(E) The image does not feature the speed limit."],
    "answer": "E",
    "category": "Perception/Autonomous_Driving",
    "l2-category": "traffic_sign",
    "bytes": _png_base64(),
}


def reply(mode="p2r", answer="B", boxes=2, error=None, perceived=True) -> str:
    record = Record(id="t/0", mode=mode, answer=answer, output_tokens=40, latency_s=0.5, error=error)
    if mode == "p2r" and perceived:
        record.perceiver_output = '[{"bbox_2d": [1, 2, 30, 40], "label": "cup"}]'
        record.box_count = boxes
    return envelope.wrap(record)


def test_envelope_survives_lmms_eval_reasoning_tag_stripping():
    record = Record(id="vstar/1", mode="p2r", raw_answer="<think>the cup is blue</think><answer>B</answer>", answer="B")
    record.prompts.append("Question: ...")
    text = envelope.wrap(record)
    assert "<" not in text and ">" not in text
    stripped = strip_reasoning_tags(text, [["<think>", "</think>"], ["<analysis>", "</analysis>"]])
    restored = envelope.unwrap(stripped)
    assert restored["raw_answer"] == record.raw_answer and restored["answer"] == "B"
    assert "prompts" not in restored
    assert envelope.unwrap("B") is None
    with pytest.raises(ValueError, match="unreadable p2r record"):
        envelope.unwrap('{"p2r_record": {"answer": "B"')


def test_vstar_p2r_reply():
    metrics = tasks.process_results(benchmarks.VSTAR, VSTAR_DOC, [reply(answer="B", boxes=2)])
    assert metrics == {
        "overall": 100.0, "attr": 100.0, "spatial": None, "errors": 0,
        "boxes": 2, "boxes_attr": 2, "boxes_spatial": None, "output_tokens": 40, "seconds_per_sample": 0.5,
        "letter_bias": {"predicted": "B", "truth": "B"},
    }  # fmt: skip


def test_vstar_other_model_plain_reply_has_no_cost_metrics():
    assert tasks.process_results(benchmarks.VSTAR, VSTAR_DOC, ["The answer is (B)."]) == {
        "overall": 100.0, "attr": 100.0, "spatial": None, "errors": 0, "letter_bias": {"predicted": "B", "truth": "B"},
    }  # fmt: skip
    wrong = tasks.process_results(benchmarks.VSTAR, VSTAR_DOC, ["It is blue."])
    assert wrong["overall"] == 0.0 and wrong["letter_bias"] == {"predicted": "-", "truth": "B"}


def test_thinking_reply_without_answer_tags_is_wrong_and_has_no_boxes():
    metrics = tasks.process_results(benchmarks.VSTAR, VSTAR_DOC, [reply(mode="thinking", answer=None)])
    assert metrics["overall"] == 0.0 and metrics["output_tokens"] == 40
    assert not any(key.startswith("boxes") for key in metrics)


def test_errors_are_wrong_and_counted():
    errored = tasks.process_results(
        benchmarks.VSTAR, VSTAR_DOC, [reply(answer="B", error="image: unreadable image", perceived=False)]
    )
    assert errored["overall"] == 0.0 and errored["errors"] == 1
    assert errored["boxes"] is None  # the perceiver never ran
    corrupt = tasks.process_results(benchmarks.VSTAR, VSTAR_DOC, ['{"p2r_record": {"answer": "B", '])
    assert corrupt["overall"] == 0.0 and corrupt["errors"] == 1


def test_hrbench_option_format_and_release_letter_rule():
    question = "What is written on the small sign?\nOptions:\nA. STOP\nB. GO\nC. EXIT\nD. OPEN"
    assert tasks.doc_to_text(benchmarks.HRBENCH, HRBENCH_DOC, {"direct_prompt": False}) == question
    assert tasks.doc_to_text(benchmarks.HRBENCH, HRBENCH_DOC, {"direct_prompt": True}) == prompts.direct_text(
        question, "mca"
    )
    assert tasks.doc_to_visual(benchmarks.HRBENCH, HRBENCH_DOC)[0].size == (64, 48)

    def score(answer):
        return tasks.process_results(benchmarks.HRBENCH, HRBENCH_DOC, [reply(answer=answer)])

    assert score("C. EXIT")["fcp"] == 100.0 and score("C. EXIT")["fsp"] is None
    assert score("EXIT")["overall"] == 0.0  # no option letter A-D in it
    assert score("Definitely C")["overall"] == 0.0  # the release's lenient rule reads the stray capital D
    assert score("E")["overall"] == 0.0  # HR-Bench letters are A-D


def test_mme_realworld_option_format_and_letters_a_to_f():
    question = tasks.doc_to_text(benchmarks.MMEREALWORLD, MME_DOC)
    assert question.endswith(
        "\nOptions:\n(A) 30\n(B) 40\n(C) 50\n(D) 60\n(E) The image does not feature the speed limit."
    )
    metrics = tasks.process_results(
        benchmarks.MMEREALWORLD, MME_DOC, [reply(answer="(E) The image does not feature it")]
    )
    assert metrics["overall"] == metrics["perception_ad"] == 100.0
    assert set(metrics) >= {f"boxes_{c}" for c in benchmarks.MME_CATEGORIES}
    sixth = {**MME_DOC, "answer": "F", "category": "Reasoning/Monitoring"}
    metrics = tasks.process_results(benchmarks.MMEREALWORLD, sixth, [reply(answer="F")])
    assert metrics["reasoning_mo"] == 100.0 and metrics["perception_ad"] is None


def test_aggregations():
    assert tasks.mean_known([100.0, None, 0.0, None]) == 50.0
    assert tasks.mean_known([None, None]) is None
    assert tasks.total([0, 1, 1]) == 2
    assert tasks.group_mean([50.0, 100.0, None], [2, 6, 4]) == 87.5
    assert tasks.group_mean([50.0, 100.0], [2, 6], weight_by_size=False) == 75.0
    assert tasks.group_mean([None], [3]) is None
    assert tasks.group_total([1, 2], [10, 10]) == 3


TASKS = {
    "vstar/vstar.yaml": benchmarks.VSTAR,
    "vstar/vstar_circular.yaml": benchmarks.VSTAR,
    "hrbench/hrbench_4k_circular.yaml": benchmarks.HRBENCH,
    "hrbench/hrbench_8k_circular.yaml": benchmarks.HRBENCH,
    "mmerealworld/mmerealworld_p2r_circular.yaml": benchmarks.MMEREALWORLD,
    "mmerealworld/mmerealworld_lite_p2r_circular.yaml": benchmarks.MMEREALWORLD,
    "p2r_demo/p2r_demo_vstar_circular.yaml": benchmarks.VSTAR,
    "p2r_demo/p2r_demo_hrbench_4k_circular.yaml": benchmarks.HRBENCH,
    "p2r_demo/p2r_demo_hrbench_8k_circular.yaml": benchmarks.HRBENCH,
    "hrbench/hrbench_4k.yaml": benchmarks.HRBENCH,
    "hrbench/hrbench_8k.yaml": benchmarks.HRBENCH,
    "mmerealworld/mmerealworld_p2r.yaml": benchmarks.MMEREALWORLD,
    "mmerealworld/mmerealworld_lite_p2r.yaml": benchmarks.MMEREALWORLD,
    "p2r_demo/p2r_demo_vstar.yaml": benchmarks.VSTAR,
    "p2r_demo/p2r_demo_hrbench_4k.yaml": benchmarks.HRBENCH,
    "p2r_demo/p2r_demo_hrbench_8k.yaml": benchmarks.HRBENCH,
}


@pytest.mark.parametrize("path", sorted(TASKS))
def test_task_yaml_has_the_agreed_metrics(path):
    config = load_yaml_config(str(tasks_dir() / path), mode="full")
    benchmark, circular = TASKS[path], path.endswith("_circular.yaml")
    metrics = [m["metric"] for m in config["metric_list"]]
    assert metrics == list(benchmark.circular_metrics if circular else benchmark.metrics)
    assert config["task"] == path.rpartition("/")[2].removesuffix(".yaml")
    doc = {"vstar": VSTAR_DOC, "hrbench": HRBENCH_DOC, "mmerealworld": MME_DOC}[benchmark.name]
    if circular:
        rows = config["process_docs"](datasets.Dataset.from_list([doc]))
        assert [row[tasks.ROTATION] for row in rows] == list(range(benchmark.rotations(doc)))
        doc = rows[1]
    # Every metric the YAML lists is one the sample returns, and only those.
    assert set(config["process_results"](doc, ["B"])) <= set(metrics) and config["process_results"](doc, ["B"])["errors"] == 0
    if config["dataset_path"] == "parquet":
        assert all(tasks_dir().joinpath(f).is_file() for f in config["dataset_kwargs"]["data_files"].values())
    else:
        assert config["dataset_path"] in benchmark.datasets
    assert config["model_specific_generation_kwargs"]["p2r"]["p2r_answer_form"] == benchmark.answer_form


@pytest.mark.parametrize(
    "path, subtasks",
    [("hrbench/hrbench.yaml", ["hrbench_4k", "hrbench_8k"]),
     ("p2r_demo/p2r_demo.yaml", ["p2r_demo_vstar", "p2r_demo_hrbench_4k", "p2r_demo_hrbench_8k"]),
     ("hrbench/hrbench_circular.yaml", ["hrbench_4k_circular", "hrbench_8k_circular"]),
     ("p2r_demo/p2r_demo_circular.yaml",
      ["p2r_demo_vstar_circular", "p2r_demo_hrbench_4k_circular", "p2r_demo_hrbench_8k_circular"])],
)  # fmt: skip
def test_group_yaml(path, subtasks):
    config = load_yaml_config(str(tasks_dir() / path), mode="full")
    assert config["task"] == subtasks
    aggregations = {m["metric"]: m["aggregation"] for m in config["aggregate_metric_list"]}
    assert aggregations.pop("errors") is tasks.group_total
    assert {"overall", "boxes", "output_tokens", "seconds_per_sample"} <= set(aggregations)
    assert all(agg is tasks.group_mean for agg in aggregations.values())


@pytest.mark.parametrize(
    "options, expected",
    [({"A": "STOP", "B": None, "C": float("nan"), "D": "  "}, " Sign? \nOptions:\nA. STOP"),
     ({"A": "", "B": None, "C": float("nan"), "D": "\t"}, " Sign? "),  # none left: no "Options:" header either
     ({"A": 0, "B": "GO"}, " Sign? \nOptions:\nA. 0\nB. GO")],
)  # fmt: skip
def test_hrbench_leaves_out_missing_and_blank_options_and_keeps_the_question_as_stored(options, expected):
    doc = {**HRBENCH_DOC, "question": " Sign? ", "A": None, "B": None, "C": None, "D": None, **options}
    assert tasks.doc_to_text(benchmarks.HRBENCH, doc) == expected


def test_mme_question_without_options_has_no_header():
    for options in ([], None):
        assert tasks.doc_to_text(benchmarks.MMEREALWORLD, {**MME_DOC, "question": " Q?", "multi-choice options": options}) == " Q?"


@pytest.mark.parametrize(
    "text, expected",
    [("  Which?\n(A) x\n(B) y\nAnswer with the option's letter from the given choices directly.", "Which?\n(A) x\n(B) y"),
     ("Which?\n(A) x Answer with the options letter from the given choices directly \n", "Which?\n(A) x"),
     # Only at the end: an instruction followed by more text stays.
     ("Which? Answer with the option's letter from the given choices directly. Really?", None)],
)  # fmt: skip
def test_vstar_question_rule_is_the_releases(text, expected):
    assert tasks.doc_to_text(benchmarks.VSTAR, {**VSTAR_DOC, "text": text}) == (expected or text)
