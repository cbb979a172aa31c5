"""Service faults: the service behind an lmms-eval run, a reward batch, the stage-2 precompute (and
p2r-serve itself) is SIGKILLed mid-work and started again a few seconds later. The work finishes with
the right result for every sample and the retries are reported; a service that never returns stops
the run with a message naming it and what was done, and no scores."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import replace
from functools import partial

import httpx
import lmms_cli
import p2r10k
import pytest
import reliability
import rollouts
from reliability import ScriptedProcess, sample_answer
from servers import free_port, start_p2r_serve

from p2r_recipe.client import ServiceUnavailable
from p2r_recipe.engines.base import GenParams
from p2r_recipe.engines.openai import OpenAIEngine
from p2r_recipe.lmms import envelope
from p2r_recipe.prompts import Prompt
from p2r_recipe.train import data, precompute
from p2r_recipe.train.precompute import PrecomputeStopped
from p2r_recipe.train.reward import reward_func, rewarder
from p2r_recipe.train.services import ServiceConfig

DOWN_S = 3.0  # how long the service stays dead


def wait_for_requests(service: ScriptedProcess, count: int, running=lambda: True, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while len(service.requests()) < count:
        assert running() and time.monotonic() < deadline, "the work ended before the fault could be injected"
        time.sleep(0.02)


def restart_later(service: ScriptedProcess) -> threading.Thread:
    """Start the killed service again after DOWN_S, as a supervisor would."""
    thread = threading.Thread(target=lambda: (time.sleep(DOWN_S), service.start()), daemon=True)
    thread.start()
    return thread


def kill_during(service: ScriptedProcess, work, after: int, restart: bool) -> dict:
    """Run `work()` in a thread, SIGKILL the service once it has had `after` requests (and start it again
    DOWN_S later when `restart`); `work`'s return value as "result", or what it raised as "error"."""
    outcome = {}

    def run():
        try:
            outcome["result"] = work()
        except Exception as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    wait_for_requests(service, after, running=worker.is_alive)
    service.kill()
    if restart:
        restart_later(service).join()
    worker.join(timeout=120)
    return outcome


# --- (a) an lmms-eval run with backend=openai ------------------------------------------------------

SAMPLES = 24


def eval_task(tmp_path):
    docs = [{"question": f"sample {i}", "image": reliability.png(colour=(i * 9, 80, 160))} for i in range(SAMPLES)]
    return reliability.write_hrbench_task(tmp_path / "tasks", "p2r_faults", docs)


def start_eval(tmp_path, service: ScriptedProcess, name: str, retries: int, *extra_args: str):
    model_args = (
        f"backend=openai,base_url={service.base_url},served_model=scripted,mode=p2r,max_pixels=65536,"
        f"concurrency=2,retries={retries},backoff_s=0.25,timeout_s=10,record_cache={tmp_path / 'records.jsonl'}"
    )
    return lmms_cli.start(
        "--model", "p2r", "--model_args", model_args, "--tasks", "p2r_faults", "--include_path", str(eval_task(tmp_path)),
        "--output_path", str(tmp_path / name), "--log_samples", *extra_args, cwd=tmp_path,
    )  # fmt: skip


def check_every_sample_right(outputs: lmms_cli.Outputs) -> None:
    records = {s["doc_id"]: envelope.unwrap(s["filtered_resps"]) for s in outputs.samples["p2r_faults"]}
    assert sorted(records) == list(range(SAMPLES))
    assert all(r["error"] is None and r["answer"] == sample_answer(i) and r["box_count"] == 1 for i, r in records.items())
    expected = 100 * sum(sample_answer(i) == "A" for i in range(SAMPLES)) / SAMPLES
    assert outputs.metrics("p2r_faults")["overall"] == pytest.approx(expected)
    assert outputs.metrics("p2r_faults")["errors"] == 0


@pytest.mark.slow
def test_lmms_eval_run_survives_its_service_being_killed_and_restarted(tmp_path):
    with ScriptedProcess(free_port(), latency_s=0.2, log=tmp_path / "requests.log") as service:
        process = start_eval(tmp_path, service, "out", retries=8)
        wait_for_requests(service, 8, running=lambda: process.poll() is None)
        service.kill()
        restarter = restart_later(service)
        output = lmms_cli.finish(process)
        restarter.join()
    check_every_sample_right(lmms_cli.read_outputs(tmp_path / "out"))
    assert service.starts == 2
    assert "p2r: scripted service at" in output and "retries and" in output and "it recovered each time" in output


@pytest.mark.slow
def test_lmms_eval_run_stops_clearly_when_its_service_never_returns(tmp_path):
    with ScriptedProcess(free_port(), latency_s=0.2, log=tmp_path / "requests.log") as service:
        process = start_eval(tmp_path, service, "out", retries=2)
        wait_for_requests(service, 8, running=lambda: process.poll() is None)
        service.kill()
        output, _ = process.communicate(timeout=300)
    assert process.returncode == 1
    assert f"scripted service at {service.base_url}/v1/ unavailable after 3 attempts" in output
    journal = tmp_path / "records.jsonl"
    assert f"of {SAMPLES} samples, no scores written; the finished samples are kept in {journal}" in output
    assert not list((tmp_path / "out").glob("**/*_results.json"))  # never a made-up score


# --- (b) a batch of reward calls -------------------------------------------------------------------


def reward_batch(tmp_path, n: int):
    samples = [rollouts.sample(tmp_path, i, form="mca") for i in range(n)]
    prompts = [rollouts.chat_prompt(s) for s in samples]
    return [rollouts.query(p, rollouts.BOX) for p in prompts], prompts, [s.to_label() for s in samples]


def test_reward_batch_survives_its_reasoner_being_killed_and_restarted(tmp_path, monkeypatch, caplog):
    batch = reward_batch(tmp_path, 48)
    with ScriptedProcess(free_port(), latency_s=0.3, log=tmp_path / "requests.log") as service:
        rollouts.configure(monkeypatch, "perceiver", P2R_CONCURRENCY="8", P2R_RETRIES="8", P2R_BACKOFF_S="0.25")
        monkeypatch.setenv("REASONER_PORT", str(service.port))
        with caplog.at_level(logging.WARNING, logger="p2r_recipe.train.reward"):
            result = kill_during(service, partial(reward_func, *batch), after=8, restart=True)["result"]
    # The frozen reasoner answers A, the right letter, for every rollout: any lost or mixed-up request shows.
    assert result["rewards"].tolist() == [1.0] * 48 and result["extra_logs"]["box_count"].tolist() == [1.0] * 48
    stats = rewarder().reasoner.stats
    assert stats["retries"] > 0 and stats["failures"] == 0 and stats["waited_s"] >= DOWN_S / 2
    assert any("needed" in r.getMessage() and "every rollout was scored" in r.getMessage() for r in caplog.records)


def test_reward_batch_raises_naming_the_reasoner_when_it_never_returns(tmp_path, monkeypatch):
    batch = reward_batch(tmp_path, 24)
    with ScriptedProcess(free_port(), latency_s=0.3, log=tmp_path / "requests.log") as service:
        rollouts.configure(monkeypatch, "perceiver", P2R_CONCURRENCY="4", P2R_RETRIES="2", P2R_BACKOFF_S="0.1")
        monkeypatch.setenv("REASONER_PORT", str(service.port))
        outcome = kill_during(service, partial(reward_func, *batch), after=4, restart=False)
    assert "result" not in outcome and isinstance(outcome["error"], ServiceUnavailable)  # no rewards, not zeros
    assert f"reasoner service at http://127.0.0.1:{service.port}/v1/ unavailable after 3 attempts" in str(outcome["error"])


# --- (c) stage-2 evidence precompute ---------------------------------------------------------------


def train_samples(tmp_path, n: int):
    source = p2r10k.write_parquet(tmp_path / "train.parquet", p2r10k.embedded_rows(n))
    return data.convert(str(source), tmp_path / "data").samples


def perceiver(service: ScriptedProcess, **fields) -> ServiceConfig:
    base = ServiceConfig.from_env("perceiver", {"PERCEIVER_PORT": str(service.port), "PERCEIVER_MODEL": "scripted"})
    return replace(base, **{"concurrency": 2, "retries": 8, "backoff_s": 0.25, **fields})


def test_precompute_survives_its_perceiver_being_killed_and_restarted(tmp_path):
    items = train_samples(tmp_path, 24)
    with ScriptedProcess(free_port(), latency_s=0.15, log=tmp_path / "requests.log") as service:
        work = partial(precompute.run, items, tmp_path / "faulted", perceiver(service))
        summary = kill_during(service, work, after=6, restart=True)["result"]
        whole = precompute.run(items, tmp_path / "whole", perceiver(service))
    assert summary["written"] == whole["written"] == 24 and summary["failed"] == 0
    assert summary["service_stats"]["retries"] > 0 and whole["service_stats"]["retries"] == 0
    assert summary["box_count_histogram"] == {"1": 24}
    faulted = (tmp_path / "faulted" / "reasoner.jsonl").read_text().replace(str(tmp_path / "faulted"), "OUT")
    assert faulted == (tmp_path / "whole" / "reasoner.jsonl").read_text().replace(str(tmp_path / "whole"), "OUT")
    keys = [json.loads(line)["key"] for line in (tmp_path / "faulted" / "perceiver_cache.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 24


def test_precompute_stops_clearly_when_its_perceiver_never_returns(tmp_path):
    items = train_samples(tmp_path, 12)
    with ScriptedProcess(free_port(), latency_s=0.15, log=tmp_path / "requests.log") as service:
        work = partial(precompute.run, items, tmp_path / "out", perceiver(service, retries=2, backoff_s=0.1))
        outcome = kill_during(service, work, after=4, restart=False)
    assert isinstance(outcome["error"], PrecomputeStopped)
    message = str(outcome["error"])
    assert f"perceiver service at http://127.0.0.1:{service.port}/v1/ unavailable" in message
    saved = len((tmp_path / "out" / "perceiver_cache.jsonl").read_text().splitlines())
    assert f"{saved}/12 samples have their perceiver output saved" in message and 4 <= saved < 12
    assert not (tmp_path / "out" / "reasoner.jsonl").exists()


# --- p2r-serve itself ------------------------------------------------------------------------------


@pytest.mark.slow
def test_requests_to_p2r_serve_survive_its_restart(tiny_model_dir):
    port, count = free_port(), 64
    engine = OpenAIEngine(f"http://127.0.0.1:{port}", "tiny", concurrency=4, retries=10, backoff_s=0.5, timeout_s=60)
    prompts = [Prompt(f"question {i}") for i in range(count)]
    params = GenParams(max_new_tokens=16, min_new_tokens=16)
    generations = []
    with start_p2r_serve(tiny_model_dir, port=port) as serve:
        worker = threading.Thread(target=lambda: generations.extend(engine.generate(prompts, params)))
        worker.start()
        while httpx.get(f"{serve.base_url}/health").json()["requests"] < 8:
            assert worker.is_alive()
            time.sleep(0.01)
        serve.process.kill()  # SIGKILL: the requests in flight break, the rest find nothing listening
    with start_p2r_serve(tiny_model_dir, port=port):
        worker.join(timeout=300)
    engine.close()
    assert [g.error for g in generations] == [None] * count and all(g.output_tokens == 16 for g in generations)
    assert engine.client.stats["retries"] > 0 and engine.client.stats["failures"] == 0
