"""Our reward file and agents inside OpenRLHF 0.11.2's own executors, with the real tiny Qwen3-VL processor.

The policy's generation is scripted (vLLM cannot run on CPU); everything after it is
OpenRLHF's code and ours: tokenization with images, the reward or agent step, and (in a
subprocess with tests/stubs standing in for vllm/flash_attn) OpenRLHF's agent loader and
its conversion of a rollout into an Experience.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys

import pytest
import rollouts
from openrlhf.utils.agent import MultiTurnAgentExecutor, SingleTurnAgentExecutor
from paths import ROOT, STUBS, SUPPORT
from rollouts import BOX, ScriptedPolicy, configure, reasoner, sampling_params
from servers import ScriptedServer

from p2r_recipe import prompts
from p2r_recipe.client import ServiceUnavailable
from p2r_recipe.train import AGENT_FILE, REWARD_FILE
from p2r_recipe.train.data import perceiver_row


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def rollout(
    executor, processor, sample, replies: list[str], max_length: int = 4096, max_new_tokens: int = 64
) -> tuple[dict, ScriptedPolicy]:
    """One rollout of `executor` on the sample's perceive prompt, as OpenRLHF's rollout actor runs it."""
    prompt = processor.apply_chat_template(perceiver_row(sample)["prompt"], tokenize=False, add_generation_prompt=True)
    policy = ScriptedPolicy(processor.tokenizer, replies)
    params = sampling_params(max_new_tokens)
    result = asyncio.run(
        executor.execute(prompt, sample.to_label(), params, max_length, processor, policy, images=[sample.image])
    )
    return result, policy


def test_openrlhf_loads_our_reward_file_and_scores_a_vlm_rollout(tmp_path, monkeypatch, processor):
    sample = rollouts.sample(tmp_path, form="mca")
    with ScriptedServer(reasoner("A", "C")) as server:
        configure(monkeypatch, "perceiver", reasoner=server)
        executor = SingleTurnAgentExecutor(str(REWARD_FILE))
        result, policy = rollout(executor, processor, sample, [BOX])
    assert policy.calls[0][1]["image"][0].size == (320, 240)
    assert result["reward"].tolist() == [1.0] and result["scores"].tolist() == [1.0]
    assert result["extra_logs"]["box_count"].tolist() == [1.0] and result["extra_logs"]["iou_penalty"].tolist() == [0.0]
    assert rollouts.image_count(server.requests[0]) == 2


def test_openrlhf_reward_path_leaves_no_reward_on_an_outage(tmp_path, monkeypatch, processor, caplog):
    """OpenRLHF catches reward_func's exception: the rollout gets no reward (never 0) and our ERROR names the service."""
    sample = rollouts.sample(tmp_path, form="mca")
    configure(monkeypatch, "perceiver")
    with caplog.at_level(logging.ERROR, logger="p2r_recipe.train.reward"):
        result, _ = rollout(SingleTurnAgentExecutor(str(REWARD_FILE)), processor, sample, [BOX])
    assert result["reward"] is None and result["scores"] is None
    assert any("reasoner service at http://127.0.0.1" in r.getMessage() for r in caplog.records)


def test_role_agent_scores_like_reward_func(tmp_path, monkeypatch, processor):
    from p2r_recipe.train.agent import AgentExecutor, RoleAgent

    sample = rollouts.sample(tmp_path, form="mca")
    with ScriptedServer(reasoner("A", "C")) as server:
        configure(monkeypatch, "perceiver", reasoner=server)
        monkeypatch.setenv("P2R_AGENT", "role")
        executor = AgentExecutor()
        assert isinstance(executor, MultiTurnAgentExecutor) and executor.agent_instance_cls is RoleAgent
        good, _ = rollout(executor, processor, sample, [BOX])
        fallback, _ = rollout(executor, processor, sample, ["[]"])
    assert (good["reward"], good["extra_logs"]["box_count"], good["extra_logs"]["no_evidence"]) == (1.0, 1.0, 0.0)
    assert (fallback["reward"], fallback["extra_logs"]["no_evidence"]) == (0.0, 1.0)
    assert len(good["action_ranges"]) == 1


def test_role_agent_stops_the_rollout_on_an_outage(tmp_path, monkeypatch, processor):
    from p2r_recipe.train.agent import AgentExecutor

    sample = rollouts.sample(tmp_path, form="mca")
    configure(monkeypatch, "perceiver")
    with pytest.raises(ServiceUnavailable, match="reasoner service"):
        rollout(AgentExecutor(), processor, sample, [BOX])


def test_joint_agent_shows_the_evidence_and_scores_the_final_answer(tmp_path, monkeypatch, processor):
    sample = rollouts.sample(tmp_path, form="mca")
    configure(monkeypatch, "perceiver", P2R_AGENT="joint")
    from p2r_recipe.train.agent import AgentExecutor

    answer = "<think>The square is red.</think><answer>A</answer>"
    result, policy = rollout(AgentExecutor(), processor, sample, [BOX, answer])
    assert result["reward"] == 1.0 and len(result["action_ranges"]) == 2
    assert result["extra_logs"]["box_count"] == 1.0 and result["extra_logs"]["no_evidence"] == 0.0
    assert result["extra_logs"]["perceive_iou_penalty"] == 0.0
    # The second turn sees the original image, then the annotated image and one crop.
    images = policy.calls[1][1]["image"]
    assert len(images) == 3 and images[0].size == (320, 240)
    grid = result["mm_train_inputs"]["image_grid_thw"]
    assert grid.shape[0] == 3
    pads = result["observation_tokens"].count(processor.image_token_id)
    assert pads == int(grid.prod(-1).sum()) // processor.image_processor.merge_size**2
    text = processor.tokenizer.decode(result["observation_tokens"])
    turn = prompts.reason_text(sample.question, "mca", True, training=True)
    assert f"{BOX}<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>" in text
    assert text.endswith(f"<|vision_end|>\n{turn}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>")


def test_joint_agent_without_boxes_reasons_on_the_original_image(tmp_path, monkeypatch, processor):
    sample = rollouts.sample(tmp_path, form="mca")
    configure(monkeypatch, "perceiver", P2R_AGENT="joint")
    from p2r_recipe.train.agent import AgentExecutor

    result, policy = rollout(AgentExecutor(), processor, sample, ["[]", "<answer>B</answer>"])
    assert result["reward"] == 0.0 and result["extra_logs"]["no_evidence"] == 1.0
    assert len(policy.calls[1][1]["image"]) == 2  # the prompt's image and the original again
    assert prompts.reason_text(sample.question, "mca", False, training=True) in processor.tokenizer.decode(
        result["observation_tokens"]
    )


def test_openrlhf_executor_alone_ignores_the_response_cap(tmp_path, monkeypatch, processor):
    """Why TurnCaps exists: OpenRLHF 0.11.2's multi-turn executor asks vLLM for max_len - len(prompt) tokens."""
    from p2r_recipe.train.agent import RoleAgent

    sample = rollouts.sample(tmp_path, form="mca")
    configure(monkeypatch, "reasoner")  # scores its own answer: no service needed
    _, policy = rollout(MultiTurnAgentExecutor(RoleAgent), processor, sample, ["<answer>A</answer>"], max_new_tokens=1024)
    prompt_tokens = len(policy.calls[0][0])
    assert policy.max_tokens == [4096 - prompt_tokens] and policy.max_tokens[0] > 1024


@pytest.mark.parametrize(
    "role, max_len, env, cap",
    [
        ("perceiver", 4096, {}, 1024),  # the release's S1 cap
        ("reasoner", 12288, {}, 2048),  # the release's S2 cap
        ("perceiver", 4096, {"P2R_PERCEIVE_MAX_TOKENS": "300"}, 300),  # what train/command.py sets from the config
        ("reasoner", 12288, {"P2R_REASON_MAX_TOKENS": "700"}, 700),
    ],
)
def test_role_agent_caps_the_generation_budget(tmp_path, monkeypatch, processor, role, max_len, env, cap):
    from p2r_recipe.train.agent import AgentExecutor

    sample = rollouts.sample(tmp_path, form="mca")
    with ScriptedServer(reasoner("A", "A")) as server:
        configure(monkeypatch, role, reasoner=server, P2R_AGENT="role", **env)
        result, policy = rollout(AgentExecutor(), processor, sample, ["<answer>A</answer>"], max_len, max_new_tokens=cap)
    assert policy.max_tokens == [cap] and result["reward"] == 1.0


def test_joint_agent_caps_each_turn_for_its_role(tmp_path, monkeypatch, processor):
    from p2r_recipe.train.agent import AgentExecutor

    sample = rollouts.sample(tmp_path, form="mca")
    configure(monkeypatch, "perceiver", P2R_AGENT="joint")
    _, policy = rollout(AgentExecutor(), processor, sample, [BOX, "<answer>A</answer>"], 12288, max_new_tokens=1024)
    assert policy.max_tokens == [1024, 2048]  # perceive turn, then reason turn


def test_cap_never_exceeds_the_executors_own_budget(tmp_path, monkeypatch, processor):
    from p2r_recipe.train.agent import AgentExecutor

    sample = rollouts.sample(tmp_path, form="mca")
    configure(monkeypatch, "perceiver", P2R_AGENT="joint")
    prompt_tokens = len(rollout(AgentExecutor(), processor, sample, ["[]", "<answer>A</answer>"])[1].calls[0][0])
    _, policy = rollout(AgentExecutor(), processor, sample, ["[]", "<answer>A</answer>"], prompt_tokens + 100, 50)
    assert policy.max_tokens[0] == 100  # less room left than the 1024 cap


def test_unknown_agent_is_refused(monkeypatch):
    from p2r_recipe.train.agent import AgentExecutor

    monkeypatch.setenv("P2R_AGENT", "solo")
    with pytest.raises(ValueError, match="P2R_AGENT"):
        AgentExecutor()


def test_openrlhf_loader_and_experience_conversion(tmp_path, tiny_model_dir):
    """OpenRLHF's own `_load_agent_executor` and `_process_response_into_experience`, in a subprocess with stubs."""
    sample = rollouts.sample(tmp_path, form="mca")
    with ScriptedServer(reasoner("A", "C")) as server:
        env = {
            **os.environ, "PYTHONPATH": os.pathsep.join([str(STUBS), str(SUPPORT), str(ROOT)]),
            "P2R_ROLE": "perceiver", "REASONER_PORT": str(server.port), "REASONER_MODEL": "scripted",
            "VERIFIER_PORT": str(server.port), "P2R_RETRIES": "1",
        }  # fmt: skip
        args = [str(tiny_model_dir), sample.to_label(), str(AGENT_FILE), str(REWARD_FILE)]
        done = subprocess.run(
            [sys.executable, str(SUPPORT / "openrlhf_rollout.py"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    infos = json.loads(done.stdout.strip().splitlines()[-1])
    for kind in ("reward_file", "role_agent", "joint_agent"):
        info = infos[kind]
        assert info["reward"] == [1.0] and info["box_count"] == [1.0] and info["no_evidence"] == [0.0], (kind, info)
        assert info["label_penalty"] == [0.0]
    # What reached the vLLM engine's generate: --rollout.max_new_tokens on the reward path, the caps on the agents'.
    assert infos["max_tokens"] == {"reward_file": [1024], "role_agent": [1024], "joint_agent": [1024, 2048]}
