"""The Pipeline end to end in all three modes on the tiny Qwen3-VL through the hf engine, bad inputs included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cases import BAD, BUDGET, MCA, SQUARES, check_bad, png_bytes, samples, scene

from p2r_recipe import prompts
from p2r_recipe.engines.base import Generation, GenParams
from p2r_recipe.engines.hf import HFEngine
from p2r_recipe.evidence import gather_evidence, parse_boxes
from p2r_recipe.images import fit_to_budget
from p2r_recipe.pipeline import Pipeline
from p2r_recipe.records import Sample
from p2r_recipe.scoring import extract_choice

PARAMS = GenParams(max_new_tokens=8, min_new_tokens=2)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> HFEngine:
    return HFEngine(str(tiny_model_dir), device="cpu", batch_size=4)


@pytest.mark.parametrize("mode", prompts.MODES)
def test_every_mode_answers_good_samples_and_isolates_bad_ones(engine: HFEngine, tmp_path: Path, mode: str) -> None:
    batch = samples(tmp_path)
    records = Pipeline(engine, mode, PARAMS, budget=BUDGET).run(batch)
    assert [r.id for r in records] == [s.id for s in batch]
    passes = 2 if mode == "p2r" else 1
    for sample, record in zip(batch, records):
        assert record.mode == mode
        if sample.id in BAD:
            check_bad(record)
            continue
        assert record.error is None, record.error
        assert record.output_tokens >= passes * PARAMS.min_new_tokens and record.input_tokens > 64
        assert record.latency_s > 0
        q, form = sample.question, sample.answer_form
        if mode == "default":
            assert record.prompts == [prompts.direct_text(q, form)]
            assert record.answer == record.raw_answer.strip()
            expected = extract_choice(record.answer, sample.letters) if form == "mca" else record.answer
            assert record.prediction == expected
        elif mode == "thinking":
            assert record.prompts == [prompts.thinking_text(q, form)]
        else:
            boxes = parse_boxes(record.perceiver_output)  # random weights: almost surely no box
            assert record.box_count == len(boxes) and record.has_evidence == bool(boxes)
            assert record.prompts == [prompts.perceive_text(q), prompts.reason_text(q, form, record.has_evidence)]
        assert (record.perceiver_output is not None) == (mode == "p2r")
        assert record.raw_answer.strip() or record.output_tokens > 0


class ScriptedPerceiver:
    """Stands in for a trained perceiver: perceive prompts get scripted boxes, reason prompts go to the real engine."""

    name = "scripted+hf"

    def __init__(self, engine: HFEngine, replies: dict[str, str]):
        self.engine, self.replies = engine, {prompts.perceive_text(q): reply for q, reply in replies.items()}
        self.reason_batches: list[list[prompts.Prompt]] = []

    def generate(self, batch: list[prompts.Prompt], params: GenParams) -> list[Generation]:
        if all(prompts.PERCEIVE_INSTRUCTION in p.text for p in batch):
            assert all(len(p.images) == 1 for p in batch)
            return [
                Generation(self.replies[p.text], input_tokens=1, output_tokens=len(self.replies[p.text])) for p in batch
            ]
        self.reason_batches.append(batch)
        return self.engine.generate(batch, params)


def box_around(colour: str, label: str) -> dict:
    x, y = SQUARES[colour]
    return {
        "bbox_2d": [round(x / 1.92), round(y / 1.08), round((x + 40) / 1.92), round((y + 40) / 1.08)],
        "label": label,
    }


def test_p2r_evidence_path_with_scripted_boxes(engine: HFEngine, tmp_path: Path) -> None:
    many = [box_around(c, f"{c} square") for c in SQUARES] + [{"bbox_2d": [0, 0, 500, 500], "label": "top left"}] * 2
    batch = [
        Sample("two", MCA, [scene()], "mca", "A"),
        Sample("bad", "What is this?", [b"not an image"], "free_form"),
        Sample("none", "How many squares are there?", [png_bytes(scene(1))], "na", "3"),
        Sample("invalid", "Is there a blue square?", [scene(2)], "yes_no", "yes"),
        Sample("five", "Which colours appear?", [scene(3)], "free_form", "red, green, blue"),
    ]
    replies = {
        MCA: json.dumps([box_around("red", "red square"), box_around("green", "green square")]),
        "How many squares are there?": "[]",
        "Is there a blue square?": 'Here: ```json\n[{"bbox_2d": [600, 20, 500, 40], "label": "x"}]``` and {"bbox_2d": [1, 2]',
        "Which colours appear?": json.dumps(many),
    }
    perceiver = ScriptedPerceiver(engine, replies)
    records = Pipeline(perceiver, "p2r", PARAMS, budget=BUDGET).run(batch)
    assert records[1].error.startswith("image: unreadable image") and records[1].prompts == []
    assert len(perceiver.reason_batches) == 1 and len(perceiver.reason_batches[0]) == 4  # one batched reason pass
    reason_prompts = dict(zip(["two", "none", "invalid", "five"], perceiver.reason_batches[0]))
    expected = {"two": (2, 2), "none": (0, 0), "invalid": (0, 0), "five": (5, 3)}  # boxes, crops
    for sample, record in zip(batch, records):
        if sample.id == "bad":
            continue
        boxes, crops = expected[sample.id]
        reply = replies[sample.question]
        assert record.error is None and record.perceiver_output == reply
        assert record.box_count == boxes and record.has_evidence == (crops > 0)
        assert record.boxes == [{"bbox_2d": list(b.bbox_2d), "label": b.label} for b in parse_boxes(reply)]
        q, form = sample.question, sample.answer_form
        assert record.prompts == [prompts.perceive_text(q), prompts.reason_text(q, form, crops > 0)]
        # The reason pass saw exactly the evidence images (annotated + crops, or the original), fitted to the budget.
        original = scene({"two": 0, "none": 1, "invalid": 2, "five": 3}[sample.id])
        evidence = gather_evidence(original, reply)
        assert record.mean_box_area == pytest.approx(evidence.mean_box_area)
        fitted = [fit_to_budget(im, BUDGET.for_image(i), BUDGET.min_pixels) for i, im in enumerate(evidence.images)]
        seen = reason_prompts[sample.id].images
        assert len(seen) == 1 + crops
        assert [im.tobytes() for im in seen] == [im.tobytes() for im in fitted]
        assert record.output_tokens >= PARAMS.min_new_tokens + len(reply)  # scripted perceive + real reason tokens
