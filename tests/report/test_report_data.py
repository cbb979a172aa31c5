"""The evidence report's data, without a browser: evidence pixels, dropped boxes, summary numbers, flips, errors."""

from __future__ import annotations

import io
import json
import re

import pytest
from conftest import DEMO_RUNS, build_report, jsonl_lines, record_of
from PIL import Image
from synthetic_runs import envelope_text, write_run

from p2r_recipe.evidence import annotate, crop_rect, parse_boxes
from p2r_recipe.lmms import tasks
from p2r_recipe.lmms.benchmarks import VSTAR
from p2r_recipe.report.evidence_report import published
from p2r_recipe.report.runs import find_runs, task_metrics
from p2r_recipe.report.thumbs import CROP_SIDE, JPEG_QUALITY, THUMB_SIDE, RotatedDocs
from p2r_recipe.toy.demo import load_records


def report_data(folder) -> dict:
    text = (folder / "data.js").read_text(encoding="utf-8")
    return json.loads(re.fullmatch(r"window\.P2R_REPORT = (.*);\n", text, re.DOTALL).group(1))


def _jpeg(image: Image.Image, side: int) -> bytes:
    scale = min(1.0, side / max(image.size))
    size = (round(image.width * scale), round(image.height * scale))
    buffer = io.BytesIO()
    image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0).save(
        buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True
    )
    return buffer.getvalue()


def test_thumbnails_are_the_evidence_codes_pixels(demo_report):
    """A p2r card's picture is evidence.annotate's image and its crop the release's crop, only scaled down."""
    data = report_data(demo_report)
    card = next(s for s in data["samples"] if s["task"] == "p2r_demo_vstar" and s["boxes"] == 1)
    line = next(
        line for task, line in jsonl_lines(DEMO_RUNS["p2r"]) if task == card["task"] and line["doc_id"] == card["doc"]
    )
    output = record_of(line)["perceiver_output"]
    image = VSTAR.images(load_records("vstar")[card["doc"]])[0]
    boxes = parse_boxes(output)
    assert (demo_report / card["img"]).read_bytes() == _jpeg(annotate(image, boxes), THUMB_SIDE)
    crop = image.crop(crop_rect(boxes[0], image.width, image.height))
    assert (demo_report / card["crops"][0]["src"]).read_bytes() == _jpeg(crop, CROP_SIDE)
    assert card["ov"] == [[*boxes[0].bbox_2d, boxes[0].label, "valid", "red"]]


def test_summary_numbers_are_the_results_files(demo_report):
    data = report_data(demo_report)
    for row in data["summary"]:
        mode = ("default", "p2r")[row["run"]]
        results = json.loads(next(DEMO_RUNS[mode].rglob("*_results.json")).read_text())["results"][row["task"]]
        want = task_metrics(results)
        assert row["metrics"] == {k: want[k] for k in row["metrics"]} and "overall" in row["metrics"]
        assert row["check"] == ""  # the logged samples give the same overall
    assert {(p["task"], p["model"]) for p in data["published"]} == set()  # the demo has no published numbers


def test_flip_counts_per_category(demo_report):
    data = report_data(demo_report)
    base = {(t, line["doc_id"]): line for t, line in jsonl_lines(DEMO_RUNS["default"])}
    other = {(t, line["doc_id"]): line for t, line in jsonl_lines(DEMO_RUNS["p2r"])}
    gained = sum(base[k]["overall"] < 100 <= other[k]["overall"] for k in base)
    lost = sum(other[k]["overall"] < 100 <= base[k]["overall"] for k in base)
    (flips,) = data["flips"]
    assert (flips["gained"], flips["lost"]) == (gained, lost)
    assert sum(g + lo for g, lo in flips["categories"].values()) == gained + lost


def test_dropped_and_duplicate_boxes_are_marked(tmp_path):
    config = json.loads(next(DEMO_RUNS["p2r"].rglob("*_results.json")).read_text())["configs"]["p2r_demo_vstar"]
    output = json.dumps([
        {"bbox_2d": [100, 100, 200, 200], "label": "a"}, {"bbox_2d": [105, 100, 200, 200], "label": "a again"},
        {"bbox_2d": [500, 500, 400, 600], "label": "reversed"}, {"bbox_2d": [1, 2, 3], "label": "three numbers"},
    ])  # fmt: skip
    valid = [{"bbox_2d": list(b.bbox_2d), "label": b.label} for b in parse_boxes(output)]
    question = next(
        line["input"] for t, line in jsonl_lines(DEMO_RUNS["p2r"]) if t == "p2r_demo_vstar" and line["doc_id"] == 2
    )
    line = {"doc_id": 2, "target": "B", "input": question, "overall": 100.0, "attr": 100.0, "spatial": None,
            "filtered_resps": envelope_text(id="x", mode="p2r", perceiver_output=output, boxes=valid, box_count=2,
                                            has_evidence=True, raw_answer="<answer>B</answer>", answer="B")}  # fmt: skip
    run = write_run(tmp_path / "run", "pretrained=p2r-tiny,mode=p2r",
                    {"p2r_demo_vstar": {"lines": [line], "metrics": {"overall,none": 100.0}, "config": config}})  # fmt: skip
    (card,) = report_data(build_report(tmp_path / "report", run))["samples"]
    assert [o[5] for o in card["ov"]] == ["valid", "duplicate", "dropped"]
    assert card["ov"][2][:4] == [400.0, 500.0, 500.0, 600.0]
    assert card["dropped"] == ['{"bbox_2d": [1, 2, 3], "label": "three numbers"}']


def test_no_run_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no lmms-eval results file"):
        build_report(tmp_path / "out", tmp_path)
    runs, problems = find_runs([DEMO_RUNS["thinking"]])
    assert len(runs) == 1 and problems == [] and len(runs[0].samples) == 24


def test_published_p2r_numbers_sit_beside_ours():
    rows = {
        (r["task"], r["model"]): r["values"] for r in published(["vstar", "mmerealworld_lite_p2r", "p2r_demo_vstar"])
    }
    assert rows[("vstar", "P2R-4B")] == {"attr": 92.2, "spatial": 94.7, "overall": 93.2}
    assert rows[("mmerealworld_lite_p2r", "P2R-8B")]["overall"] == 57.4
    assert all(model.startswith("P2R") and task != "p2r_demo_vstar" for task, model in rows)


def test_circular_documents_are_numbered_as_lmms_eval_numbers_them():
    """A circular run's doc_id k is the k-th doc of `tasks.circular_docs`: the report's rotated view agrees."""
    datasets = pytest.importorskip("datasets")
    rows = load_records("vstar")
    view = RotatedDocs(rows, VSTAR)
    docs = tasks.circular_docs(VSTAR, datasets.Dataset.from_list(rows))
    assert len(view) == len(docs) == sum(VSTAR.rotations(row) for row in rows) > len(rows)
    for k in range(len(docs)):
        assert VSTAR.question(view[k]) == VSTAR.question(tasks.asked(VSTAR, docs[k]))
        assert VSTAR.answer(view[k]) == VSTAR.answer(tasks.asked(VSTAR, docs[k]))
