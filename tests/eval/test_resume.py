"""Resume: an lmms-eval run and the stage-2 precompute, SIGKILLed mid-way and run again, lose no sample,
duplicate none, redo only what was unfinished, and end with the numbers of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import lmms_cli
import p2r10k
import pytest
import reliability
from reliability import p2r_reply, sample_answer
from servers import ScriptedServer

from p2r_recipe.lmms import envelope
from p2r_recipe.train import data, schema

SAMPLES = 24


def wait_for_lines(path, count: int, process: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not (path.exists() and path.read_text().count("\n") >= count):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)


def sigkill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.communicate()


def records(outputs: lmms_cli.Outputs) -> dict[int, dict]:
    return {s["doc_id"]: envelope.unwrap(s["filtered_resps"]) for s in outputs.samples["p2r_resume"]}


@pytest.mark.slow
def test_lmms_eval_killed_mid_run_resumes_from_its_journal(tmp_path):
    docs = [{"question": f"sample {i}", "image": reliability.png(colour=(i * 9, 80, 160))} for i in range(SAMPLES)]
    tasks = reliability.write_hrbench_task(tmp_path / "tasks", "p2r_resume", docs)

    def start(server, name: str, journal: str):
        model_args = (
            f"backend=openai,base_url={server.base_url},served_model=scripted,mode=p2r,max_pixels=65536,"
            f"concurrency=2,record_cache={tmp_path / journal}"
        )
        return lmms_cli.start(
            "--model", "p2r", "--model_args", model_args, "--tasks", "p2r_resume", "--include_path", str(tasks),
            "--output_path", str(tmp_path / name), "--log_samples", "--use_cache", str(tmp_path / f"cache_{journal}"),
            cwd=tmp_path,
        )  # fmt: skip

    journal = tmp_path / "killed.jsonl"
    with ScriptedServer(p2r_reply, latency_s=0.15) as server:
        process = start(server, "first", "killed.jsonl")
        wait_for_lines(journal, 6, process)
        sigkill(process)
        saved = journal.read_text().count("\n")
        assert 6 <= saved < SAMPLES and not list((tmp_path / "first").glob("**/*_results.json"))
        calls = server.calls
        lmms_cli.finish(start(server, "resumed", "killed.jsonl"))
        resumed_calls = server.calls - calls
        lmms_cli.finish(start(server, "whole", "whole.jsonl"))

    assert resumed_calls == 2 * (SAMPLES - saved)  # perceive + reason for the unfinished samples only
    keys = [json.loads(line)["key"] for line in journal.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == SAMPLES
    resumed, whole = lmms_cli.read_outputs(tmp_path / "resumed"), lmms_cli.read_outputs(tmp_path / "whole")
    assert sorted(records(resumed)) == list(range(SAMPLES))
    for metric in ("overall", "fsp", "boxes", "errors", "output_tokens"):
        assert resumed.metrics("p2r_resume")[metric] == whole.metrics("p2r_resume")[metric], metric
    same = ("answer", "boxes", "perceiver_output", "raw_answer", "error", "output_tokens")
    for i, record in records(resumed).items():
        assert record["answer"] == sample_answer(i)
        assert {k: record[k] for k in same} == {k: records(whole)[i][k] for k in same}


def test_precompute_killed_twice_resumes_and_matches_an_uninterrupted_run(tmp_path):
    source = p2r10k.write_parquet(tmp_path / "train.parquet", p2r10k.embedded_rows(SAMPLES))
    items = data.convert(str(source), tmp_path / "data").samples
    rows = schema.write_jsonl(tmp_path / "perceiver.jsonl", map(data.perceiver_row, items))
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    cache = killed / "perceiver_cache.jsonl"
    with ScriptedServer(p2r_reply, latency_s=0.1) as server:
        env = {**os.environ, "PERCEIVER_PORT": str(server.port), "PERCEIVER_MODEL": "scripted", "P2R_RETRIES": "1"}

        def start(out) -> subprocess.Popen:
            command = [sys.executable, "-m", "p2r_recipe.train.precompute", "--input", str(rows), "--concurrency", "2"]
            return subprocess.Popen([*command, "--out", str(out)], env=env, stderr=subprocess.DEVNULL)

        for at_least in (5, 12):
            process = start(killed)
            wait_for_lines(cache, at_least, process)
            sigkill(process)
            assert not (killed / "reasoner.jsonl").exists()
        saved = cache.read_text().count("\n")
        calls = server.calls
        assert start(killed).wait(timeout=240) == 0
        resumed_calls = server.calls - calls
        assert start(whole).wait(timeout=240) == 0

    assert resumed_calls == SAMPLES - saved
    keys = [json.loads(line)["key"] for line in cache.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == SAMPLES
    summary = json.loads((killed / "summary_precompute.json").read_text())
    assert (summary["written"], summary["failed"], summary["cached_before"]) == (SAMPLES, 0, saved)
    resumed_rows = (killed / "reasoner.jsonl").read_text().replace(str(killed), "OUT")
    assert resumed_rows == (whole / "reasoner.jsonl").read_text().replace(str(whole), "OUT")
