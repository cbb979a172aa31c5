"""Driver for test_agent: OpenRLHF's agent loader and Experience conversion over our reward file and agents.

Run in a subprocess with tests/stubs and tests on PYTHONPATH (OpenRLHF's trainer modules import
vllm and flash_attn at module top). argv: TINY_MODEL_DIR LABEL AGENT_FILE REWARD_FILE.
Prints one JSON line: for each path, the Experience's `info` as lists, and under "max_tokens"
the max_tokens each generate call of the path received.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator
from openrlhf.trainer.ray.vllm_engine import _load_agent_executor
from openrlhf.utils.agent import SingleTurnAgentExecutor
from rollouts import BOX, ScriptedPolicy, sampling_params
from transformers import AutoProcessor

from p2r_recipe.train.data import perceiver_row
from p2r_recipe.train.schema import TrainSample


def main(model_dir: str, label: str, agent_file: str, reward_file: str) -> None:
    processor = AutoProcessor.from_pretrained(model_dir)
    sample = TrainSample.from_label(label)
    prompt = processor.apply_chat_template(perceiver_row(sample)["prompt"], tokenize=False, add_generation_prompt=True)

    max_tokens = {}

    def run(name: str, executor, replies: list[str], max_len: int) -> dict:
        policy = ScriptedPolicy(processor.tokenizer, replies)
        # --rollout.max_new_tokens 1024 and --data.max_len, as the perceiver and joint configs set them.
        rollout = executor.execute(prompt, label, sampling_params(1024), max_len, processor, policy, images=[sample.image])
        response = asyncio.run(rollout)
        max_tokens[name] = policy.max_tokens
        # A method that reads nothing from `self`: called unbound, as the trainer would call it.
        experience = SamplesGenerator._process_response_into_experience(None, response, max_len=max_len)
        return {key: value.tolist() for key, value in experience.info.items()}

    infos = {"reward_file": run("reward_file", SingleTurnAgentExecutor(reward_file), [BOX], 4096)}
    os.environ["P2R_AGENT"] = "role"
    infos["role_agent"] = run("role_agent", _load_agent_executor(agent_file), [BOX], 4096)
    os.environ["P2R_AGENT"] = "joint"
    infos["joint_agent"] = run("joint_agent", _load_agent_executor(agent_file), [BOX, "<answer>A</answer>"], 12288)
    print(json.dumps({**infos, "max_tokens": max_tokens}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
