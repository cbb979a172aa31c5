"""Benchmark adapters on hand-written records in each hub format, scored through p2r_recipe.scoring, and aggregation."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from p2r_recipe.engines.base import Generation, GenParams
from p2r_recipe.images import ImageError
from p2r_recipe.lmms.benchmarks import BENCHMARKS, HRBENCH, MMEREALWORLD, VSTAR, aggregate
from p2r_recipe.pipeline import Pipeline


def _png(colour=(200, 10, 10), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def vstar_doc(category="direct_attributes", label="A") -> dict:
    return {
        "question_id": "0",
        "image": {"bytes": _png(), "path": None},
        "text": "What is the material of the glove?\n(A) rubber\n(B) cotton\n(C) kevlar\n(D) leather\n"
        "Answer with the option's letter from the given choices directly.",
        "label": label,
        "category": category,
    }


def hrbench_doc(category="single", answer="C", **options) -> dict:
    return {
        "index": 17,
        "question": "What is the color of the umbrella?",
        "answer": answer,
        "category": category,
        "A": "red",
        "B": "blue",
        "C": "green",
        "D": "white",
        "cycle_category": "cycle_0",
        "image": base64.b64encode(_png((10, 200, 10), (64, 48))).decode(),
        **options,
    }


def mme_doc(category="Perception/OCR with Complex Context", answer="E") -> dict:
    return {
        "index": 1234,
        "question": "What is the number on the bus?",
        "multi-choice options": ["(A) 12", "(B) 15", "(C) 18", "(D) 21", "(E) The image does not feature the object."],
        "answer": answer,
        "category": category,
        "l2-category": "text_recognition",
        "bytes": base64.b64encode(_png((10, 10, 200))).decode(),
    }


def test_vstar_question_strips_the_trailing_instruction_only():
    assert (
        VSTAR.question(vstar_doc())
        == "What is the material of the glove?\n(A) rubber\n(B) cotton\n(C) kevlar\n(D) leather"
    )
    bare = {**vstar_doc(), "text": "Is the cup on the left or right side of the dog?\n(A) left\n(B) right"}
    assert VSTAR.question(bare) == bare["text"]


def test_hrbench_question_appends_options_from_columns():
    assert HRBENCH.question(hrbench_doc()) == (
        "What is the color of the umbrella?\nOptions:\nA. red\nB. blue\nC. green\nD. white"
    )
    # Missing options (None, or NaN as pandas reads them) are left out.
    assert HRBENCH.question(hrbench_doc(D=None)).endswith("\nC. green")
    assert HRBENCH.question(hrbench_doc(D=float("nan"))).endswith("\nC. green")


def test_mme_question_appends_its_option_lines():
    assert MMEREALWORLD.question(mme_doc()) == (
        "What is the number on the bus?\nOptions:\n(A) 12\n(B) 15\n(C) 18\n(D) 21\n"
        "(E) The image does not feature the object."
    )


def test_categories_map_to_the_agreed_metric_names():
    assert VSTAR.category(vstar_doc("direct_attributes")) == "attr"
    assert VSTAR.category(vstar_doc("relative_position")) == "spatial"
    assert HRBENCH.category(hrbench_doc("single")) == "fsp"
    assert HRBENCH.category(hrbench_doc("cross")) == "fcp"
    expected = {
        "Perception/OCR with Complex Context": "perception_ocr",
        "Perception/Remote Sensing": "perception_rs",
        "Perception/Diagram and Table": "perception_dt",
        "Perception/Monitoring": "perception_mo",
        "Perception/Autonomous_Driving": "perception_ad",
        "Reasoning/OCR with Complex Context": "reasoning_ocr",
        "Reasoning/Diagram and Table": "reasoning_dt",
        "Reasoning/Monitoring": "reasoning_mo",
        "Reasoning/Autonomous_Driving": "reasoning_ad",
    }
    assert {MMEREALWORLD.category(mme_doc(c)) for c in expected} == set(MMEREALWORLD.categories)
    for category, key in expected.items():
        assert MMEREALWORLD.category(mme_doc(category)) == key


@pytest.mark.parametrize(
    ("benchmark", "doc"),
    [(VSTAR, vstar_doc("counting")), (HRBENCH, hrbench_doc("both")), (MMEREALWORLD, mme_doc("Perception/Weather"))],
)
def test_unknown_category_fails_loudly(benchmark, doc):
    with pytest.raises(ValueError, match="unknown"):
        benchmark.category(doc)


def test_images_decode_from_each_storage_format():
    (vstar,) = VSTAR.images(vstar_doc())
    assert vstar.size == (40, 30) and vstar.getpixel((0, 0)) == (200, 10, 10)
    pil_doc = {**vstar_doc(), "image": Image.new("RGBA", (5, 5), (0, 0, 0, 0))}  # datasets hands PIL images
    assert VSTAR.images(pil_doc)[0].mode == "RGB"
    (hr,) = HRBENCH.images(hrbench_doc())
    assert hr.size == (64, 48) and hr.getpixel((3, 3)) == (10, 200, 10)
    (mme,) = MMEREALWORLD.images(mme_doc())
    assert mme.getpixel((0, 0)) == (10, 10, 200)


def test_corrupt_images_raise_image_error():
    with pytest.raises(ImageError, match="bad data URL"):
        HRBENCH.images(hrbench_doc(image="not base64 at all!"))
    with pytest.raises(ImageError, match="unreadable"):
        MMEREALWORLD.images({**mme_doc(), "bytes": base64.b64encode(b"GIF89a garbage").decode()})
    with pytest.raises(ImageError):
        VSTAR.images({**vstar_doc(), "image": {"bytes": b"", "path": None}})


@pytest.mark.parametrize(
    ("benchmark", "doc", "answer", "correct"),
    [
        (VSTAR, vstar_doc(label="A"), "A", 1.0),
        (VSTAR, vstar_doc(label="A"), "The answer is (A) rubber", 1.0),
        (VSTAR, vstar_doc(label="A"), "B", 0.0),
        (VSTAR, vstar_doc(label="A"), "rubber", 0.0),  # no option letter: empty prediction
        (VSTAR, vstar_doc(label="A"), None, 0.0),  # no <answer> tags
        (HRBENCH, hrbench_doc(answer="C"), "C. green", 1.0),
        (HRBENCH, hrbench_doc(answer="C"), "Best answer: C", 1.0),
        (HRBENCH, hrbench_doc(answer="C"), "E", 0.0),  # outside A-D
        (MMEREALWORLD, mme_doc(answer="E"), "(E) The image does not feature the object.", 1.0),
        (MMEREALWORLD, mme_doc(answer="E"), "The best answer is E", 1.0),
        (MMEREALWORLD, mme_doc(answer="F"), "F", 1.0),  # the release's MME scorer reads A-F
        (MMEREALWORLD, mme_doc(answer="E"), "D", 0.0),
    ],
)
def test_items_score_through_the_release_rule(benchmark, doc, answer, correct):
    item = benchmark.item(doc, answer)
    assert item["correct"] == correct
    assert item["answer"] == benchmark.answer(doc)
    assert item["category"] == benchmark.category(doc)


def test_errored_item_is_wrong_even_with_the_right_answer():
    item = VSTAR.item(vstar_doc(label="A"), "A", error="image: unreadable image")
    assert item["correct"] == 0.0 and item["error"]


def _items() -> list[dict]:
    attr, spatial = vstar_doc("direct_attributes", "A"), vstar_doc("relative_position", "B")
    return [
        VSTAR.item(attr, "A", boxes=2, output_tokens=100, seconds=1.0),
        VSTAR.item(attr, "C", boxes=1, output_tokens=50, seconds=2.0),
        VSTAR.item(attr, "A", boxes=3, output_tokens=30, seconds=3.0),
        VSTAR.item(spatial, "B", boxes=0, output_tokens=20, seconds=2.0),
        VSTAR.item(spatial, "B", error="openai: service down", seconds=4.0),
    ]


def test_aggregate_matches_hand_computed_values():
    # lmms-eval logs items as JSON; aggregate must work on what comes back.
    items = json.loads(json.dumps(_items()))
    metrics = VSTAR.aggregate(items)
    assert set(metrics) == set(VSTAR.metrics)
    assert metrics["attr"] == pytest.approx(200 / 3)
    assert metrics["spatial"] == pytest.approx(50.0)  # the errored sample counts as wrong
    assert metrics["overall"] == pytest.approx(60.0)
    assert metrics["boxes"] == pytest.approx(1.5)  # (2 + 1 + 3 + 0) / 4: the errored one had none
    assert metrics["boxes_attr"] == pytest.approx(2.0)
    assert metrics["boxes_spatial"] == pytest.approx(0.0)
    assert metrics["output_tokens"] == pytest.approx(50.0)
    assert metrics["seconds_per_sample"] == pytest.approx(2.4)
    assert metrics["errors"] == 1
    assert metrics["letter_bias"] == {"n": 5, "predicted": {"A": 2, "B": 2, "C": 1, "-": 0}, "truth": {"A": 3, "B": 2, "C": 0}}


def test_aggregate_writes_none_where_nothing_applies():
    items = [VSTAR.item(vstar_doc(), "A", output_tokens=5, seconds=0.5)]  # default mode: no boxes
    metrics = VSTAR.aggregate(items)
    assert metrics["overall"] == 100.0 and metrics["attr"] == 100.0
    assert metrics["spatial"] is None  # no sample in that category
    assert metrics["boxes"] is None and metrics["boxes_attr"] is None and metrics["boxes_spatial"] is None
    assert metrics["errors"] == 0
    empty = MMEREALWORLD.aggregate([])
    assert set(empty) == set(MMEREALWORLD.metrics) and empty["overall"] is None and empty["errors"] == 0
    assert empty["letter_bias"] == {"n": 0, "predicted": {"-": 0}, "truth": {}}


def test_aggregate_without_declared_categories_uses_the_items_categories():
    items = [HRBENCH.item(hrbench_doc("single", "C"), "C"), HRBENCH.item(hrbench_doc("cross", "C"), "A")]
    assert aggregate(items) == {
        "overall": 50.0, "fsp": 100.0, "fcp": 0.0, "boxes": None, "boxes_fsp": None, "boxes_fcp": None,
        "output_tokens": None, "seconds_per_sample": None, "errors": 0,
        "letter_bias": {"n": 2, "predicted": {"A": 1, "C": 1, "-": 0}, "truth": {"A": 0, "C": 2}},
    }  # fmt: skip


def test_mme_overall_is_the_mean_over_all_samples_not_over_categories():
    items = [MMEREALWORLD.item(mme_doc("Perception/Remote Sensing", "A"), "A") for _ in range(3)]
    items.append(MMEREALWORLD.item(mme_doc("Reasoning/Monitoring", "A"), "B"))
    metrics = MMEREALWORLD.aggregate(items)
    assert metrics["overall"] == 75.0
    assert metrics["perception_rs"] == 100.0 and metrics["reasoning_mo"] == 0.0
    assert metrics["perception_ocr"] is None


def test_registry_names_the_hub_datasets():
    assert set(BENCHMARKS) == {"vstar", "hrbench", "mmerealworld"}
    # Ours (the id the P2R reference names) first, then lmms-eval 0.7.3's copy of it.
    assert BENCHMARKS["vstar"].datasets == ("lmms-lab-encoder/vstar-bench", "lmms-lab/vstar-bench")
    assert BENCHMARKS["hrbench"].datasets == ("DreamMr/HR-Bench",)
    assert "yifanzhang114/MME-RealWorld-lite-lmms-eval" in BENCHMARKS["mmerealworld"].datasets
    assert VSTAR.letters == HRBENCH.letters == "ABCD" and MMEREALWORLD.letters == "ABCDEF"


class ScriptedEngine:
    """Answers each question with a fixed reply, so the pipeline's output is known."""

    name = "scripted"

    def __init__(self, replies: dict[str, str]):
        self.replies = replies

    def generate(self, prompts, params):
        out = []
        for prompt in prompts:
            reply = next(r for q, r in self.replies.items() if q in prompt.text)
            out.append(Generation(text=reply, output_tokens=len(reply)))
        return out


def test_samples_run_through_the_pipeline_and_score():
    docs = [(VSTAR, vstar_doc(label="A")), (HRBENCH, hrbench_doc(answer="C")), (MMEREALWORLD, mme_doc(answer="E"))]
    docs.append((HRBENCH, hrbench_doc(answer="C", image="corrupt!")))
    samples = [benchmark.sample(doc) for benchmark, doc in docs]
    assert samples[2].letters == "ABCDEF" and samples[0].question == VSTAR.question(docs[0][1])
    engine = ScriptedEngine(
        {
            "glove": "<think>rubber</think><answer>A</answer>",
            "umbrella": "<think>it is green</think><answer>C</answer>",
            "bus": "<answer>(E) The image does not feature the object.</answer>",
        }
    )
    records = Pipeline(engine, mode="thinking", params=GenParams(max_new_tokens=16)).run(samples)
    items = [
        benchmark.item(doc, r.answer, output_tokens=r.output_tokens, error=r.error)
        for (benchmark, doc), r in zip(docs, records)
    ]
    assert [i["correct"] for i in items] == [1.0, 1.0, 1.0, 0.0]
    assert records[3].error.startswith("image: bad data URL")
    hr = HRBENCH.aggregate([items[1], items[3]])
    assert hr["fsp"] == 50.0 and hr["errors"] == 1
