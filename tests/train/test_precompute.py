"""Stage-2 evidence precompute against a real scripted perceiver service: prompts, cache, resume after SIGKILL, outages."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import p2r10k
import pytest
from PIL import Image
from rollouts import image_count, user_text
from servers import ScriptedServer

from p2r_recipe import prompts
from p2r_recipe.images import TRAIN_BUDGET, encode_image, fit_to_budget, load_image
from p2r_recipe.train import data, precompute, prepare, schema
from p2r_recipe.train.precompute import PERCEIVE_PARAMS
from p2r_recipe.train.schema import TrainSample
from p2r_recipe.train.services import ServiceConfig

BOXES = [
    "[]",
    '[{"bbox_2d": [100, 100, 400, 400], "label": "square"}]',
    'Here: [{"bbox_2d": [100, 100, 400, 400], "label": "a"}, {"bbox_2d": [600, 500, 900, 900], "label": "b"}]',
    json.dumps([{"bbox_2d": [i * 200, 0, i * 200 + 150, 300], "label": f"r{i}"} for i in range(4)]),
]


def perceiver(body: dict) -> str:
    """Boxes chosen by the sample index in the question: 0, 1, 2 or 4 boxes."""
    index = int(re.search(r"(?:square|picture) (\d+)", user_text(body)).group(1))
    return BOXES[index % 4]


def samples(tmp_path, n: int) -> list[TrainSample]:
    source = p2r10k.write_parquet(tmp_path / "train.parquet", p2r10k.embedded_rows(n))
    return data.convert(str(source), tmp_path / "data").samples


def config(server, **fields) -> ServiceConfig:
    base = ServiceConfig.from_env("perceiver", {})
    return replace(base, **{"port": server.port, "model": "scripted", "retries": 1, "backoff_s": 0.02, **fields})


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "reasoner.jsonl").read_text().splitlines()]


def test_reasoner_prompts_and_evidence_files(tmp_path):
    items = samples(tmp_path, 8)
    items.append(replace(items[1], id="dup"))  # same image and question: one request
    with ScriptedServer(perceiver) as server:
        summary = precompute.run(items, tmp_path / "out", config(server))
    assert server.calls == 8 and summary["service_calls"] == 8
    assert summary["box_count_histogram"] == {"0": 2, "1": 3, "2": 2, "4": 2}
    assert (summary["written"], summary["no_evidence"], summary["failed"]) == (9, 2, 0)

    request = server.requests[0]
    # The release's request, all of it: system as a string, the original fitted to 4,096..2,097,152 pixels, JPEG q75.
    assert set(request) == {"model", "messages", "max_tokens", "temperature"}
    assert {k: request[k] for k in PERCEIVE_PARAMS} == {"max_tokens": 2048, "temperature": 0}
    assert request["messages"][0] == {"role": "system", "content": prompts.SYSTEM_PROMPT}
    assert image_count(request) == 1
    sent = request["messages"][1]["content"][0]["image_url"]["url"]
    first = next(s for s in items if s.question in user_text(request))
    expected = fit_to_budget(load_image(first.image), TRAIN_BUDGET.max_pixels, 4096)
    assert sent == "data:image/jpeg;base64," + base64.b64encode(encode_image(expected, quality=75)).decode()
    asked = {user_text(r) for r in server.requests}
    assert asked == {prompts.perceive_text(s.question, training=True) for s in items}

    for row, sample, index in zip(rows(tmp_path / "out"), items, [*range(8), 1]):
        label = TrainSample.from_label(row["label"])
        boxes = [0, 1, 2, 4][index % 4]
        assert (label.box_count, label.has_evidence) == (boxes, boxes > 0)
        assert len(row["images"]) == (1 + min(boxes, 3) if boxes else 1)
        if not boxes:
            assert row["images"] == [sample.fitted_image]
        text = prompts.reason_text(sample.question, sample.answer_form, boxes > 0, training=True)
        assert row["prompt"] == schema.policy_messages(text, len(row["images"]))
        for path in row["images"] if boxes else []:
            with Image.open(path) as image:
                assert image.width * image.height <= TRAIN_BUDGET.max_pixels and image.width % 32 == image.height % 32 == 0


def test_second_run_makes_no_service_calls(tmp_path):
    items = samples(tmp_path, 6)
    with ScriptedServer(perceiver) as server:
        precompute.run(items, tmp_path / "out", config(server))
        first = (tmp_path / "out" / "reasoner.jsonl").read_bytes()
        summary = precompute.run(items, tmp_path / "out", config(server))
    assert server.calls == 6 and summary["service_calls"] == 0 and summary["cached_before"] == 6
    assert (tmp_path / "out" / "reasoner.jsonl").read_bytes() == first
    # the key is the perceiver model too: another model means new requests
    with ScriptedServer(perceiver) as server:
        precompute.run(items, tmp_path / "out", config(server, model="other"))
    assert server.calls == 6


def test_resume_after_sigkill_loses_and_duplicates_nothing(tmp_path):
    items = samples(tmp_path, 24)
    source = schema.write_jsonl(tmp_path / "perceiver.jsonl", map(data.perceiver_row, items))
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    cache = killed / "perceiver_cache.jsonl"
    with ScriptedServer(perceiver, latency_s=0.2) as server:
        env = {**os.environ, "PERCEIVER_PORT": str(server.port), "PERCEIVER_MODEL": "scripted", "P2R_RETRIES": "1"}
        command = [sys.executable, "-m", "p2r_recipe.train.precompute", "--input", str(source), "--concurrency", "2"]
        process = subprocess.Popen([*command, "--out", str(killed)], env=env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not (cache.exists() and cache.read_text().count("\n") >= 6):
            assert process.poll() is None and time.monotonic() < deadline, "precompute ended before it could be killed"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
        saved = cache.read_text().count("\n")
        assert 6 <= saved < 24 and not (killed / "reasoner.jsonl").exists()

        calls_before = server.calls
        assert subprocess.run([*command, "--out", str(killed)], env=env, stderr=subprocess.DEVNULL, check=False).returncode == 0
        assert server.calls - calls_before == 24 - saved
        precompute.run(items, whole, config(server))

    keys = [json.loads(line)["key"] for line in cache.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 24
    resumed = (killed / "reasoner.jsonl").read_text().replace(str(killed), str(whole))
    assert resumed == (whole / "reasoner.jsonl").read_text()
    for row in rows(whole):
        for path in row["images"]:
            if path.startswith(str(whole)):
                assert Path(path).read_bytes() == Path(path.replace(str(whole), str(killed))).read_bytes()
    summary = json.loads((killed / "summary_precompute.json").read_text())
    assert summary["cached_before"] == saved and summary["written"] == 24


def test_perceiver_down_stops_with_a_clear_message_and_resumes(tmp_path, capsys):
    items = samples(tmp_path, 12)
    source = schema.write_jsonl(tmp_path / "perceiver.jsonl", map(data.perceiver_row, items))
    out = tmp_path / "out"
    with ScriptedServer(lambda body: perceiver(body) if len(server.requests) <= 5 else 503) as server:
        env = {"PERCEIVER_PORT": str(server.port), "PERCEIVER_MODEL": "scripted", "P2R_RETRIES": "1", "P2R_BACKOFF_S": "0.01"}
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            assert precompute.main(["--input", str(source), "--out", str(out), "--concurrency", "1"]) == 1
    message = capsys.readouterr().err
    assert "perceiver service" in message and f"127.0.0.1:{server.port}" in message
    assert f"5/12 samples have their perceiver output saved in {out / 'perceiver_cache.jsonl'}" in message
    assert not (out / "reasoner.jsonl").exists()

    with ScriptedServer(perceiver) as healthy:
        summary = precompute.run(items, out, config(healthy))
    assert healthy.calls == 7 and summary["written"] == 12


def test_per_sample_failures_are_reported_and_retried_next_time(tmp_path):
    items = samples(tmp_path, 6)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    items[2] = replace(items[2], image=str(broken))
    items[3] = replace(items[3], image=str(tmp_path / "missing.png"))
    rejects = items[4].question

    def reply(body: dict):
        return 400 if user_text(body).startswith(f"Question: {rejects}\n") else perceiver(body)

    with ScriptedServer(reply) as server:
        summary = precompute.run(items, tmp_path / "out", config(server))
        assert summary["written"] == 4 and summary["failed"] == 2 and summary["perceiver_refused"] == 1
        reasons = {f["id"]: f["reason"] for f in summary["failures"]}
        assert reasons["2"].startswith("image: unreadable image") and reasons["3"].startswith("image: ")
        # As in the release, a refused request keeps the sample: original image, no-evidence prompt.
        kept = next(TrainSample.from_label(r["label"]) for r in rows(tmp_path / "out") if r["label"].find('"4"') > 0)
        assert (kept.box_count, kept.has_evidence) == (0, False)
        again = precompute.run(items, tmp_path / "out", config(server))
    assert again["service_calls"] == 1 and again["failed"] == 2  # the refused request is asked again


def test_empty_perceiver_answer_keeps_the_sample_without_evidence(tmp_path):
    items = samples(tmp_path, 3)
    with ScriptedServer(lambda body: "" if "square 0?" in user_text(body) else perceiver(body)) as server:
        summary = precompute.run(items, tmp_path / "out", config(server))
    assert (summary["written"], summary["failed"], summary["perceiver_empty"]) == (3, 0, 1)
    row = rows(tmp_path / "out")[0]
    text = prompts.reason_text(items[0].question, items[0].answer_form, False, training=True)
    assert row["images"] == [items[0].fitted_image] and row["prompt"] == schema.policy_messages(text, 1)


def test_data_cli_builds_the_reasoner_dataset(tmp_path, monkeypatch):
    source = p2r10k.write_parquet(tmp_path / "train.parquet", p2r10k.embedded_rows(4))
    with ScriptedServer(perceiver) as server:
        monkeypatch.setenv("PERCEIVER_PORT", str(server.port))
        monkeypatch.setenv("PERCEIVER_MODEL", "scripted")
        assert prepare.main(["--role", "reasoner", "--source", str(source), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary_reasoner.json").read_text())
    assert summary["conversion"]["samples"] == 4 and summary["evidence"]["written"] == 4
    assert len(rows(tmp_path / "out")) == 4


def test_cli_turns_the_held_out_slice_into_reasoner_val(tmp_path, monkeypatch):
    items = samples(tmp_path, 5)
    source = schema.write_jsonl(tmp_path / "perceiver.jsonl", map(data.perceiver_row, items[:3]))
    schema.write_jsonl(tmp_path / "perceiver_val.jsonl", map(data.perceiver_row, items[3:]))
    with ScriptedServer(perceiver) as server:
        monkeypatch.setenv("PERCEIVER_PORT", str(server.port))
        monkeypatch.setenv("PERCEIVER_MODEL", "scripted")
        assert precompute.main(["--input", str(source), "--out", str(tmp_path / "out")]) == 0
    held_out = [TrainSample.from_label(json.loads(line)["label"]).id for line in (tmp_path / "out" / "reasoner_val.jsonl").open()]
    assert held_out == ["3", "4"] and len(rows(tmp_path / "out")) == 3
