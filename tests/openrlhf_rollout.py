"""Driver for test_agent: OpenRLHF's agent loader and Experience conversion over our reward file and agents.

Run in a subprocess with tests/stubs and tests on PYTHONPATH (OpenRLHF's trainer modules import
vllm and flash_attn at module top). argv: TINY_MODEL_DIR LABEL AGENT_FILE REWARD_FILE.
Prints one JSON line: for each path, the Experience's `info` as lists.
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

from p2r_recipe.train.data import TrainSample, perceiver_row


def main(model_dir: str, label: str, agent_file: str, reward_file: str) -> None:
    processor = AutoProcessor.from_pretrained(model_dir)
    sample = TrainSample.from_label(label)
    prompt = processor.apply_chat_template(perceiver_row(sample)["prompt"], tokenize=False, add_generation_prompt=True)

    def run(executor, replies: list[str]) -> dict:
        policy = ScriptedPolicy(processor.tokenizer, replies)
        rollout = executor.execute(prompt, label, sampling_params(), 4096, processor, policy, images=[sample.image])
        response = asyncio.run(rollout)
        # A method that reads nothing from `self`: called unbound, as the trainer would call it.
        experience = SamplesGenerator._process_response_into_experience(None, response, max_len=4096)
        return {key: value.tolist() for key, value in experience.info.items()}

    infos = {"reward_file": run(SingleTurnAgentExecutor(reward_file), [BOX])}
    os.environ["P2R_AGENT"] = "role"
    infos["role_agent"] = run(_load_agent_executor(agent_file), [BOX])
    os.environ["P2R_AGENT"] = "joint"
    infos["joint_agent"] = run(_load_agent_executor(agent_file), [BOX, "<answer>A</answer>"])
    print(json.dumps(infos))


if __name__ == "__main__":
    main(*sys.argv[1:5])
