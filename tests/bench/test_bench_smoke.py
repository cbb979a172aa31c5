"""Every benchmark in tests/bench/ in --quick mode, each in its own process: it exits cleanly, prints one JSON
line equal to the report it writes, and its figures are sane (right counts, no errors, latency really waited)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from paths import BENCH


def bench(name: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{name}.json"
    command = [sys.executable, str(BENCH / f"bench_{name}.py"), "--quick", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == report
    return report


def test_quick_runs_write_to_the_temp_folder_and_keep_given_options(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import common

    def parse(*argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        parser.add_argument("--samples", type=int, default=1000)
        parser.add_argument("--latency", type=float, default=0.2)
        return common.parse_args(parser, list(argv), "name", quick={"samples": 8})

    full, quick, given = parse(), parse("--quick"), parse("--quick", "--samples", "3")
    assert (full.samples, full.out) == (1000, common.RESULTS / "name.json")
    assert (quick.samples, quick.latency, quick.out) == (8, 0.2, common.QUICK_RESULTS / "name.json")
    assert given.samples == 3 and not common.QUICK_RESULTS.is_relative_to(common.RESULTS)


def test_evidence(tmp_path):
    report = bench("evidence", tmp_path)  # the bench itself fails when our data URLs differ from the reference's
    (size,) = [key for key in report if "x" in key and key[0].isdigit()]
    row = report[size]
    for way in ("ours", "ours_with_decode", "reference", "reference_fitted"):
        assert row[f"{way}_ms"] > 0 and len(row["ms_by_box_count"][way]) == len(report["boxes"])
    assert row["ours_over_reference_fitted"] == round(row["ours_ms"] / row["reference_fitted_ms"], 3)


def test_reward(tmp_path):
    report = bench("reward", tmp_path)
    one_by_one = report["rollouts"] * report["latency_s"]
    assert report["blocking"]["wall_s"] >= one_by_one  # each call waited for the server's latency
    for path in ("batch", "openrlhf", "agent"):
        figures = report[path]
        assert figures["wall_s"] >= report["ideal_s"] and figures["wall_over_ideal"] >= 1
        assert figures["speedup_over_blocking"] > 1


def test_precompute(tmp_path):
    report = bench("precompute", tmp_path)
    first, second, samples = report["first"], report["second"], report["samples"]
    assert first["server_calls"] == samples and first["cached_before"] == 0
    assert second["server_calls"] == 0 and second["cached_before"] == samples
    assert first["wall_s"] >= first["perceive_phase_s"] >= report["ideal_s"]
    assert first["wall_over_ideal"] >= 1 and second["wall_s"] < first["wall_s"]
    assert sum(report["box_count_histogram"].values()) == samples


def test_serve(tmp_path):
    report = bench("serve", tmp_path)
    assert report["errors"] == 0 and report["client_retries"] == 0, report["first_errors"]
    assert 0 < report["latency_p50_s"] <= report["latency_p99_s"] <= report["latency_max_s"] <= report["wall_s"]
    assert report["requests_per_s"] > 0 and report["rss_before_mb"] > 100  # the model is loaded
    assert report["rss_growth_mb"] < 40  # after a full warm-up round; a leak per request grows far more


def test_eval(tmp_path):
    report = bench("eval", tmp_path)
    tokens = report["tokens"]
    expected = {"default": tokens["default"], "thinking": tokens["thinking"], "p2r": tokens["perceive"] + tokens["p2r"]}
    for variant in ("fast", "straightforward"):
        configs = report["variants"][variant]["configs"]
        assert {row["mode"] for row in configs} == set(expected)
        for row in configs:
            assert row["errors"] == 0 and row["output_tokens_per_sample"] == expected[row["mode"]]
            assert 0 < row["preprocess_share"] < 1
        assert next(r for r in configs if r["mode"] == "p2r")["evidence_samples"] == 1
        assert report["summary"][variant]["p2r_over_thinking"]["1"] > 0
    assert report["summary"]["decode_speedup"]["1"] > 0


def test_run(tmp_path):
    report = bench("run", tmp_path)  # 5 samples at batch 2: batches of 2, 2 and 1
    (row,) = report["runs"]
    assert (row["batches"], row["batches_timed"], row["samples"], row["errors"]) == (3, 3, 5, 0)
    assert sorted(row["outputs"]) == [f"s{i}" for i in range(5)] and not row["extrapolated"]
    assert row["batches_s"] >= row["first_batch_s"] > 0 and report["load_s"] > 0
