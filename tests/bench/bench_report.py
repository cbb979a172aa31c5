"""Evidence report at scale: build a report of N synthetic MME-RealWorld-lite-schema samples, then open it in headless
Chromium (Debian's, via Selenium) and time the load.

Figures: build seconds, report size (issue 23: at most 60 MB for 2,000 samples), and per page load (median of
--repeats, fresh tab each) the navigation's loadEventEnd, the first frame with the first cards (issue 23: under 3 s)
and the time until every card is built, plus how many thumbnails the first screen loaded (lazy loading).
Prints one JSON line, writes results/bench/report.json.

    python tests/bench/bench_report.py [--samples 2000] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, parse_args, write_result

sys.path.insert(0, str(ROOT / "tests" / "report"))  # synthetic_runs.py and the browser options live with the tests

from conftest import chromium_options
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait
from synthetic_runs import mme_lite_run

from p2r_recipe.report.evidence_report import build

LOAD = (
    "const n = performance.getEntriesByType('navigation')[0];"
    "return {load_ms: n.loadEventEnd, first_frame_ms: +document.body.dataset.paintMs,"
    " script_ms: +document.body.dataset.renderMs, ready: document.body.dataset.ready,"
    " images_loaded: [...document.images].filter(i => i.complete && i.naturalWidth > 0).length,"
    " images: document.images.length, cards: document.querySelectorAll('article.card').length}"
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parse_args(parser, argv, "report", quick={"samples": 40, "repeats": 1})
    with tempfile.TemporaryDirectory() as tmp:
        run = mme_lite_run(Path(tmp) / "mme", args.samples, size=(1280, 960))
        start = time.perf_counter()
        build([run.parent], Path(tmp) / "report", progress=False)
        build_s = time.perf_counter() - start
        out = Path(tmp) / "report"
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        driver = webdriver.Chrome(
            options=chromium_options(Path(tmp) / "profile"),
            service=Service("/usr/bin/chromedriver"),
        )
        try:
            loads = []
            for _ in range(args.repeats):
                driver.switch_to.new_window("tab")
                driver.get((out / "index.html").resolve().as_uri())
                WebDriverWait(driver, 120).until(
                    lambda d: d.execute_script("return document.body.dataset.ready") == "1"
                )
                loads.append(driver.execute_script(LOAD))
        finally:
            driver.quit()
    if any(load["ready"] != "1" or load["cards"] != args.samples for load in loads):
        raise SystemExit(f"the report did not render all {args.samples} cards: {loads}")
    report = {
        "benchmark": "report",
        "machine": machine(),
        "samples": args.samples,
        "build_s": round(build_s, 2),
        "size_mb": round(size / 1e6, 2),
        "size_limit_mb": 60,
        "load_ms_median": round(statistics.median(load["load_ms"] for load in loads), 1),
        "first_frame_ms_median": statistics.median(load["first_frame_ms"] for load in loads),
        "script_ms_median": statistics.median(load["script_ms"] for load in loads),
        "load_goal_ms": 3000,
        "first_screen_images_loaded": loads[0]["images_loaded"],
        "images": loads[0]["images"],
        "loads": loads,
    }
    return write_result(report, args.out)


if __name__ == "__main__":
    main()
