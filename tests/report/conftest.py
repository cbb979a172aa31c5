"""Fixtures for the evidence report's tests: Debian's headless Chromium driven by Selenium, and demo reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2r_recipe.lmms import envelope
from p2r_recipe.report.evidence_report import main as report_main

ROOT = Path(__file__).resolve().parents[2]
DEMO_RUNS = {mode: ROOT / "results" / "p2r-tiny" / mode for mode in ("default", "thinking", "p2r")}
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--window-size=1400,1000")  # fmt: skip


def chromium_options(profile: Path):
    """Selenium options for Debian's chromium: headless, no network services, a fresh profile, console logged."""
    # Imported here: selenium is a dev-only dependency, and the browser fixture skips cleanly without it.
    from selenium.webdriver.chrome.options import Options

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return options


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """One headless Chromium for the session; skipped, saying why, where it or its driver is not installed."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver): "
                    "apt-get install chromium chromium-driver, as tests/run.sh does")  # fmt: skip
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (the dev extra)")
    from selenium.webdriver.chrome.service import Service

    driver = webdriver.Chrome(
        options=chromium_options(tmp_path_factory.mktemp("profile")),
        service=Service(str(CHROMEDRIVER)),
    )
    yield driver
    driver.quit()


def open_report(driver, folder: Path) -> None:
    """Load a report from file:// and wait until every card is built; the console log is read (and cleared) first."""
    from selenium.webdriver.support.ui import WebDriverWait  # selenium is a dev-only dependency

    driver.get_log("browser")
    driver.get((folder / "index.html").resolve().as_uri())
    WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.body.dataset.ready") == "1")


def console_errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def build_report(out: Path, *runs: Path) -> Path:
    """p2r-report over runs into out, through its CLI entry."""
    assert report_main([*map(str, runs), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def demo_report(tmp_path_factory) -> Path:
    """The demo's default and p2r runs (real lmms-eval outputs in results/), default as baseline."""
    return build_report(tmp_path_factory.mktemp("demo-report"), DEMO_RUNS["default"], DEMO_RUNS["p2r"])


def jsonl_lines(run: Path) -> list[tuple[str, dict]]:
    """(task, line) for every logged sample of a run folder, read straight from the JSONL files."""
    out = []
    for path in sorted(run.rglob("*_samples_*.jsonl")):
        task = path.stem.split("_samples_", 1)[1]
        out += [(task, json.loads(text)) for text in path.read_text(encoding="utf-8").splitlines() if text.strip()]
    return out


def record_of(line: dict) -> dict | None:
    return envelope.unwrap(line["filtered_resps"])
