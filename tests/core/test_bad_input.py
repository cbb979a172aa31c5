"""The bad-input corpus (tests/data): every broken image and hostile model output has its defined outcome,
alone and inside a batch, through images, evidence, scoring, the pipeline, rewards and the real lmms-eval CLI."""

from __future__ import annotations

import filecmp
import json

import lmms_cli
import pytest
import reliability
import rollouts
from PIL import Image, ImageFile
from reliability import BAD_IMAGES, p2r_reply
from servers import ScriptedServer

from p2r_recipe.engines.base import GenParams
from p2r_recipe.engines.openai import OpenAIEngine
from p2r_recipe.evidence import gather_evidence, parse_boxes
from p2r_recipe.images import ImageError, PixelBudget, fit_to_budget, load_image
from p2r_recipe.lmms import envelope, tasks
from p2r_recipe.lmms.benchmarks import HRBENCH
from p2r_recipe.pipeline import Pipeline
from p2r_recipe.records import Sample
from p2r_recipe.scoring import answer_text, extract_choice
from p2r_recipe.train.reward import FAILURES, reward_func

IMAGES = reliability.bad_images()
HOSTILE = reliability.hostile_outputs()
ERRORS = {name for name, e in IMAGES.items() if "error" in e}


def test_corpus_is_large_enough_and_regenerates_identically(tmp_path):
    assert len(IMAGES) >= 12 and len(ERRORS) >= 6 and len(HOSTILE) >= 40
    assert len({h.id for h in HOSTILE}) == len(HOSTILE)
    reliability.corpus.main(tmp_path)
    names = [*IMAGES, "expected.json"]
    assert filecmp.cmpfiles(BAD_IMAGES, tmp_path / "bad_images", names, shallow=False)[0] == names
    assert filecmp.cmp(reliability.DATA / "hostile_outputs.jsonl", tmp_path / "hostile_outputs.jsonl", shallow=False)


@pytest.mark.parametrize("name", IMAGES)
def test_each_bad_image_has_its_outcome(name):
    expected, budget = IMAGES[name], PixelBudget()
    if "error" in expected:
        with pytest.raises(ImageError, match=expected["error"]):
            fit_to_budget(load_image(BAD_IMAGES / name), budget.max_pixels, budget.min_pixels)
        return
    image = load_image(BAD_IMAGES / name)
    assert image.mode == "RGB" and list(image.size) == expected["size"]
    for x, y, colour in expected["pixels"]:
        assert all(abs(a - b) <= 12 for a, b in zip(image.getpixel((x, y)), colour)), (x, y, image.getpixel((x, y)))
    assert list(fit_to_budget(image, budget.max_pixels, budget.min_pixels).size) == expected["fitted"]


@pytest.mark.parametrize("name", IMAGES)
def test_release_mode_keeps_every_guarantee_and_converts_as_the_release(name):
    """The same errors; a usable image is exactly PIL's plain convert("RGB") of what is stored (no EXIF, alpha dropped)."""
    if "error" in IMAGES[name]:
        budget = PixelBudget()
        with pytest.raises(ImageError, match=IMAGES[name]["error"]):
            fit_to_budget(load_image(BAD_IMAGES / name, "release"), budget.max_pixels, budget.min_pixels)
        return
    image = load_image(BAD_IMAGES / name, "release")
    assert image.mode == "RGB" and image.tobytes() == Image.open(BAD_IMAGES / name).convert("RGB").tobytes()


def test_truncated_images_fail_even_where_lmms_eval_made_pil_tolerant(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # what `import lmms_eval.api.task` does
    for name in ("truncated.jpg", "truncated.png", "corrupt.png"):
        with pytest.raises(ImageError, match="unreadable image"):
            load_image(BAD_IMAGES / name)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # lmms-eval's own loaders keep their setting


# Linear parsing: a catastrophic backtrack would run for hours, so the cap is generous (no wall-time assert).
@pytest.mark.timeout(120)
@pytest.mark.parametrize("item", HOSTILE, ids=lambda h: h.id)
def test_each_hostile_output_has_its_outcome_in_bounded_time(item):
    assert len(parse_boxes(item.text)) == item.boxes
    assert gather_evidence(Image.new("RGB", (1000, 1000)), item.text).has_evidence == item.evidence
    answer = answer_text(item.text, "p2r")
    assert answer == item.answer
    assert extract_choice(answer or "") == item.choice


def _sample(tmp_path, item: reliability.Hostile):
    return rollouts.sample(tmp_path, 0, form=item.form, answer=item.gold)


@pytest.mark.parametrize("role", ["perceiver", "reasoner"])
def test_rewards_for_all_hostile_outputs_in_one_batch(tmp_path, monkeypatch, role):
    log = tmp_path / "rollouts.jsonl"
    samples = [_sample(tmp_path, item) for item in HOSTILE]
    prompts = [rollouts.chat_prompt(s) for s in samples]
    queries = [rollouts.query(p, item.text) for p, item in zip(prompts, HOSTILE)]
    with ScriptedServer(rollouts.reasoner("A", "C")) as reasoner:
        rollouts.configure(monkeypatch, role, reasoner=reasoner, P2R_REWARD_LOG=str(log))
        result = reward_func(queries, prompts, [s.to_label() for s in samples])
    expected = [getattr(item, role) for item in HOSTILE]
    reasons = [next((code for code in FAILURES if result["extra_logs"][code][i]), "") for i in range(len(HOSTILE))]
    assert list(zip(result["rewards"].tolist(), reasons)) == [tuple(e) for e in expected]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == len(HOSTILE)  # the log took every text, lone surrogates included


def _batch() -> tuple[list[Sample], dict[str, str]]:
    """Every hostile output and bad image in one batch with good samples between them."""
    good = Image.new("RGB", (320, 240), (90, 120, 150))
    samples = [Sample(f"sample {i}", f"sample {i}\nA. x\nB. y", [good]) for i in range(3)]
    samples += [Sample(f"hostile {h.id}", f"hostile {h.id}\nA. x\nB. y", [good]) for h in HOSTILE]
    samples += [Sample(f"image {name}", f"image {name}\nA. x\nB. y", [BAD_IMAGES / name]) for name in IMAGES]
    samples.append(Sample("sample 3", "sample 3\nA. x\nB. y", [good]))
    return samples, {h.id: h for h in HOSTILE}


def test_one_pipeline_batch_holds_every_bad_input_and_the_rest_is_unaffected():
    samples, hostile = _batch()
    with ScriptedServer(p2r_reply) as server:
        engine = OpenAIEngine(server.base_url, "scripted", concurrency=16, backoff_s=0.01)
        records = Pipeline(engine, "p2r", GenParams(max_new_tokens=64)).run(samples)
        engine.close()
    by_id = {r.id: r for r in records}
    assert [r.id for r in records] == [s.id for s in samples]
    for i in range(4):
        good = by_id[f"sample {i}"]
        assert (good.error, good.box_count, good.prediction) == (None, 1, reliability.sample_answer(i))
    for item in hostile.values():
        record = by_id[f"hostile {item.id}"]
        assert record.error is None, item.id
        assert (record.box_count, record.has_evidence) == (item.boxes, item.evidence), item.id
        assert record.answer == item.answer and record.prediction == (item.choice if item.answer else ""), item.id
    for name, expected in IMAGES.items():
        record = by_id[f"image {name}"]
        if "error" in expected:
            assert record.error.startswith("image: ") and expected["error"] in record.error, name
            assert record.prompts == []  # never sent
        else:
            assert (record.error, record.prediction) == (None, "A"), name
    sent = {reliability.subject(body)[1] for body in server.requests}
    assert not sent & ERRORS and len(server.requests) == 2 * (len(samples) - len(ERRORS))

    # What the lmms-eval task reports for these records: errors counted, errored samples wrong.
    metrics = [tasks.process_results(HRBENCH, _doc(r.id), [envelope.wrap(r)]) for r in records]
    assert sum(m["errors"] for m in metrics) == len(ERRORS)
    assert sum(m["overall"] for m in metrics) == 100 * expected_correct(samples, hostile)


def test_a_crop_beyond_the_aspect_ratio_limit_is_only_its_samples_error():
    """A 4000x20 panorama is usable (ratio 200), but a crop of a full-width strip of it is 4000x6."""

    def reply(body: dict) -> str:
        if reliability.is_perceive(body):
            return '[{"bbox_2d": [0, 450, 1000, 550], "label": "strip"}]'
        return "<answer>A</answer>"

    sizes = {"panorama": (4000, 20), "photo": (320, 240)}
    samples = [Sample(name, f"{name}?\nA. x\nB. y", [Image.new("RGB", size)]) for name, size in sizes.items()]
    with ScriptedServer(reply) as server:
        engine = OpenAIEngine(server.base_url, "scripted")
        panorama, photo = Pipeline(engine, "p2r", GenParams(max_new_tokens=8)).run(samples)
        engine.close()
    assert panorama.box_count == 1 and "aspect ratio 667 exceeds 200" in panorama.error
    assert (photo.error, photo.prediction) == (None, "A") and server.calls == 3


def _doc(sample_id: str) -> dict:
    return {"index": sample_id, "answer": "A", "category": "single"}


def expected_correct(samples: list[Sample], hostile: dict) -> int:
    """Samples scored right: good samples answering A, hostile outputs whose choice is A, images that load."""
    correct = 0
    for sample in samples:
        kind, name = sample.id.split(" ", 1)
        if kind == "sample":
            correct += reliability.sample_answer(int(name)) == "A"
        elif kind == "hostile":
            correct += bool(hostile[name].answer) and hostile[name].choice == "A"
        else:
            correct += name not in ERRORS
    return correct


@pytest.mark.slow
def test_the_lmms_eval_report_counts_bad_inputs(tmp_path):
    """The real CLI over one task holding every bad input: per-sample errors counted, scores exact, no crash."""
    samples, hostile = _batch()
    def image(sample_id: str) -> bytes:
        kind, name = sample_id.split(" ", 1)
        return (BAD_IMAGES / name).read_bytes() if kind == "image" else reliability.png()

    docs = [{"question": sample.id, "image": image(sample.id)} for sample in samples]
    folder = reliability.write_hrbench_task(tmp_path / "tasks", "p2r_bad_inputs", docs)
    with ScriptedServer(p2r_reply) as server:
        model_args = (
            f"backend=openai,base_url={server.base_url},served_model=scripted,mode=p2r,"
            f"record_cache={tmp_path / 'records.jsonl'}"
        )
        lmms_cli.run(
            "--model", "p2r", "--model_args", model_args, "--tasks", "p2r_bad_inputs", "--include_path", str(folder),
            "--output_path", str(tmp_path / "out"), "--log_samples", "--use_cache", str(tmp_path / "cache"), cwd=tmp_path,
        )  # fmt: skip
    outputs = lmms_cli.read_outputs(tmp_path / "out")
    metrics = outputs.metrics("p2r_bad_inputs")
    assert metrics["errors"] == len(ERRORS)
    assert metrics["overall"] == pytest.approx(100 * expected_correct(samples, hostile) / len(samples))
    logged = outputs.samples["p2r_bad_inputs"]
    assert sorted(s["doc_id"] for s in logged) == list(range(len(samples)))
    errors = {envelope.unwrap(s["filtered_resps"])["id"] for s in logged if envelope.unwrap(s["filtered_resps"])["error"]}
    assert len(errors) == len(ERRORS)
