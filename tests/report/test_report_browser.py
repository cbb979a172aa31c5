"""The evidence report in a real headless Chromium: cards, box overlays, flips, filters, console, odd runs, hostile text."""

from __future__ import annotations

import json

import pytest
from conftest import (
    DEMO_RUNS,
    build_report,
    console_errors,
    jsonl_lines,
    open_report,
    record_of,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait
from synthetic_runs import envelope_text, mme_lite_run, write_run

from p2r_recipe.report.runs import task_metrics

VISIBLE = "return [...document.querySelectorAll('article.card')].filter(c => !c.hidden).length"
HOSTILE = (
    '<script>window.__pwned = 1</script></textarea>"\'&amp; \u202eRTL\u202c <img src=x onerror="window.__pwned=1">'
)


def demo_records() -> dict[tuple[int, str, int], dict]:
    """(run index, task, doc_id) -> JSONL line for the demo report's runs (0 = default, 1 = p2r)."""
    return {
        (i, task, line["doc_id"]): line
        for i, mode in enumerate(("default", "p2r"))
        for task, line in jsonl_lines(DEMO_RUNS[mode])
    }


def test_cards_equal_records_and_no_console_errors(browser, demo_report):
    open_report(browser, demo_report)
    cards = browser.find_elements(By.CSS_SELECTOR, "article.card")
    assert len(cards) == len(demo_records()) == 48
    assert console_errors(browser) == []


def test_box_overlays_match_records_within_a_pixel(browser, demo_report):
    open_report(browser, demo_report)
    found = browser.execute_script("""
      return [...document.querySelectorAll('article.card')].map(c => {
        const t = c.querySelector('.thumb'); const r = t ? t.getBoundingClientRect() : null;
        return {run: +c.dataset.run, task: c.dataset.task, doc: +c.dataset.doc, thumb: r && [r.left, r.top, r.width, r.height],
          boxes: [...c.querySelectorAll('.box.valid, .box.duplicate')].map(b => {
            const q = b.getBoundingClientRect(); return [q.left, q.top, q.right, q.bottom]; })};
      });""")
    records, drawn = demo_records(), 0
    for card in found:
        line = records[(card["run"], card["task"], card["doc"])]
        record = record_of(line)
        expected = record["boxes"] if record["mode"] == "p2r" else []
        assert len(card["boxes"]) == len(expected), card
        assert card["thumb"], "every demo card shows its image"
        left, top, width, height = card["thumb"]
        for box, want in zip(card["boxes"], expected):
            x1, y1, x2, y2 = want["bbox_2d"]
            scaled = [
                left + x1 / 1000 * width,
                top + y1 / 1000 * height,
                left + x2 / 1000 * width,
                top + y2 / 1000 * height,
            ]
            assert all(abs(a - b) <= 1.0 for a, b in zip(box, scaled)), (
                card,
                box,
                scaled,
            )
            drawn += 1
    assert drawn == 24  # the tiny model drew one box per p2r sample


def test_flip_count_equals_jsonl(browser, demo_report):
    open_report(browser, demo_report)
    right = {(i, task, doc): line["overall"] == 100.0 for (i, task, doc), line in demo_records().items()}
    expected = sum(right[(0, t, d)] != right[(1, t, d)] for (i, t, d) in right if i == 0)
    cell = browser.find_element(By.CSS_SELECTOR, "#flip-table tr[data-other='1'] td.flip-count")
    assert int(cell.get_attribute("data-value")) == int(cell.text) == expected > 0
    # flipped cards come first, both runs' cards of each flipped document
    flags = browser.execute_script(
        "return [...document.querySelectorAll('article.card')].map(c => c.classList.contains('flipped'))"
    )
    assert flags == [True] * (2 * expected) + [False] * (len(flags) - 2 * expected)


def test_summary_equals_results_json(browser, demo_report):
    open_report(browser, demo_report)
    checked = 0
    for i, mode in enumerate(("default", "p2r")):
        results = json.loads(next(DEMO_RUNS[mode].rglob("*_results.json")).read_text())["results"]
        for task in ("p2r_demo_vstar", "p2r_demo_hrbench_4k", "p2r_demo_hrbench_8k"):
            want = task_metrics(results[task])
            cells = browser.find_elements(
                By.CSS_SELECTOR,
                f"table[data-task='{task}'] tr[data-run='{i}'] td[data-metric]",
            )
            for cell in cells:
                metric, value = (
                    cell.get_attribute("data-metric"),
                    cell.get_attribute("data-value"),
                )
                if metric in ("samples", "no_evidence"):
                    continue
                assert (value is None) == (metric not in want), (task, metric)
                if value is not None:
                    assert float(value) == want[metric], (task, metric)
                    checked += 1
    assert checked >= 6 * 5


def test_filters_change_visible_cards(browser, demo_report):
    open_report(browser, demo_report)
    records = demo_records()
    assert browser.execute_script(VISIBLE) == 48
    Select(browser.find_element(By.ID, "f-ok")).select_by_value("wrong")
    assert browser.execute_script(VISIBLE) == sum(line["overall"] != 100.0 for line in records.values())
    Select(browser.find_element(By.ID, "f-ok")).select_by_value("")
    browser.find_element(By.ID, "f-flip").click()
    flipped = browser.execute_script(VISIBLE)
    assert 0 < flipped < 48
    browser.find_element(By.ID, "f-flip").click()
    Select(browser.find_element(By.ID, "f-task")).select_by_value("p2r_demo_vstar")
    assert browser.execute_script(VISIBLE) == sum(t == "p2r_demo_vstar" for _, t, _ in records)
    Select(browser.find_element(By.ID, "f-cat")).select_by_value("attr")
    assert browser.execute_script(VISIBLE) == sum(t == "p2r_demo_vstar" and line.get("attr") is not None
                                                  for (_, t, _), line in records.items())  # fmt: skip
    Select(browser.find_element(By.ID, "f-task")).select_by_value("")
    Select(browser.find_element(By.ID, "f-cat")).select_by_value("")
    Select(browser.find_element(By.ID, "f-boxes")).select_by_value("1")
    assert browser.execute_script(VISIBLE) == 24
    Select(browser.find_element(By.ID, "f-boxes")).select_by_value("none")
    assert browser.execute_script(VISIBLE) == 24
    Select(browser.find_element(By.ID, "f-boxes")).select_by_value("")
    Select(browser.find_element(By.ID, "f-err")).select_by_value("yes")
    assert browser.execute_script(VISIBLE) == 0
    Select(browser.find_element(By.ID, "f-err")).select_by_value("")
    browser.find_element(By.ID, "f-q").send_keys("purple")
    assert browser.execute_script(VISIBLE) == sum("purple" in line["input"] for line in records.values()) > 0
    assert console_errors(browser) == []


def _odd_runs(root):
    """A run with failed samples, a run in an older results schema, and a task whose dataset is not cached."""
    failed = [
        {"doc_id": 0, "target": "A", "input": "Q0?", "overall": 0.0, "errors": 1, "attr": 0.0, "spatial": None,
         "filtered_resps": envelope_text(id="v/0", mode="p2r", error="ImageError: truncated image", raw_answer="")},
        {"doc_id": 1, "target": "B", "input": "Q1?", "overall": 0.0, "errors": 1, "attr": None, "spatial": 0.0,
         "filtered_resps": '{"p2r_record": {"broken'},
    ]  # fmt: skip
    demo_config = json.loads(next(DEMO_RUNS["p2r"].rglob("*_results.json")).read_text())["configs"]["p2r_demo_vstar"]
    metrics = {
        "overall,none": 0.0,
        "errors,none": 2,
        "attr,none": 0.0,
        "spatial,none": 0.0,
    }
    write_run(root / "failed", "pretrained=p2r-tiny,mode=p2r",
              {"p2r_demo_vstar": {"lines": failed, "metrics": metrics, "config": demo_config}})  # fmt: skip
    old = [
        {
            "doc_id": 0,
            "target": "A",
            "input": "Old question?",
            "resps": [["A"]],
            "overall": 100.0,
        }
    ]
    write_run(
        root / "old",
        "pretrained=some-model",
        {"vstar_old": {"lines": old, "metrics": {"overall": 100.0}, "config": None}},
    )
    missing_config = {
        "task": "vstar_bench",
        "dataset_path": "no-such-org/not-cached-anywhere",
        "test_split": "test",
    }
    missing = [{"doc_id": 3, "target": "C", "input": "Where is it?", "overall": 100.0, "attr": 100.0, "spatial": None,
                "filtered_resps": envelope_text(id="v/3", mode="default", raw_answer="C", answer="C", prediction="C")}]  # fmt: skip
    write_run(root / "missing", "pretrained=p2r-tiny,mode=default",
              {"vstar_bench": {"lines": missing, "metrics": {"overall,none": 100.0}, "config": missing_config}})  # fmt: skip
    return [root / "failed", root / "old", root / "missing"]


def test_failed_old_and_missing_runs_say_what_is_missing(browser, tmp_path):
    out = build_report(tmp_path / "report", *_odd_runs(tmp_path / "runs"))
    open_report(browser, out)
    text = browser.find_element(By.TAG_NAME, "body").text
    assert "older lmms-eval schema" in text
    assert "not available offline" in text and "no-such-org/not-cached-anywhere" in text
    assert "ImageError: truncated image" in text and "unreadable p2r record" in text
    assert "is not the logged question" in text  # doc 0 of the demo's data does not hold "Q0?"
    assert len(browser.find_elements(By.CSS_SELECTOR, "article.card")) == 4
    assert len(browser.find_elements(By.CSS_SELECTOR, ".tag.err")) == 2
    assert console_errors(browser) == []


def test_hostile_strings_are_shown_never_run(browser, tmp_path):
    demo_config = json.loads(next(DEMO_RUNS["p2r"].rglob("*_results.json")).read_text())["configs"]["p2r_demo_vstar"]
    boxes = [{"bbox_2d": [100, 100, 300, 300], "label": HOSTILE}]
    question = next(
        line["input"] for t, line in jsonl_lines(DEMO_RUNS["p2r"]) if t == "p2r_demo_vstar" and line["doc_id"] == 0
    )
    line = {"doc_id": 0, "target": HOSTILE, "input": question + HOSTILE, "overall": 0.0, "errors": 0, "attr": 0.0, "spatial": None,
            "filtered_resps": envelope_text(id="x", mode="p2r", perceiver_output=json.dumps(boxes), boxes=boxes,
                                            box_count=1, has_evidence=True, raw_answer=f"<think>{HOSTILE}</think>{HOSTILE}",
                                            answer=HOSTILE, prediction=HOSTILE)}  # fmt: skip
    run = tmp_path / "hostile" / "run"
    write_run(run, "pretrained=p2r-tiny,mode=p2r" + HOSTILE.replace(",", ""),
              {"p2r_demo_vstar": {"lines": [line], "metrics": {"overall,none": 0.0}, "config": demo_config}})  # fmt: skip
    out = build_report(tmp_path / "report", run)
    open_report(browser, out)
    assert browser.execute_script("return window.__pwned === undefined")
    card = browser.find_element(By.CSS_SELECTOR, "article.card")
    shown = browser.execute_script("return arguments[0].textContent", card)
    assert shown.count(HOSTILE) >= 6  # question, truth, prediction, box label, think, reply
    assert len(card.find_elements(By.CSS_SELECTOR, ".box.valid")) == 1
    assert browser.execute_script("return document.querySelectorAll('script').length") == 2
    assert browser.execute_script("return [...document.images].every(i => !i.src.endsWith('/x'))")
    assert console_errors(browser) == []


@pytest.mark.slow
def test_two_thousand_samples_fit_and_load(browser, tmp_path):
    """Scale: 2,000 MME-RealWorld-lite-schema samples; size asserted, load time printed (bench: bench_report.py)."""
    out = build_report(
        tmp_path / "report",
        mme_lite_run(tmp_path / "mme", 2000, size=(1280, 960)).parent,
    )
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert size <= 60e6, f"{size / 1e6:.1f} MB"
    open_report(browser, out)
    WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.body.dataset.paintMs"))
    timing = browser.execute_script(
        "const n = performance.getEntriesByType('navigation')[0];"
        "return {load: n.loadEventEnd, render: +document.body.dataset.renderMs, paint: +document.body.dataset.paintMs,"
        " loaded: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length, images: document.images.length}"
    )
    print(
        f"\n2,000 samples: {size / 1e6:.1f} MB; load event {timing['load']:.0f} ms, first frame {timing['paint']} ms "
        f"(script {timing['render']} ms); {timing['loaded']} of {timing['images']} images loaded on the first screen"
    )
    assert len(browser.find_elements(By.CSS_SELECTOR, "article.card")) == 2000
    assert 0 < timing["loaded"] < timing["images"] / 10, "lazy loading: the first screen must not load every thumbnail"
    assert console_errors(browser) == []
