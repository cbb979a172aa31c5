"""Driver for test_vllm: OpenRLHF 0.11.2's rollout path on a real (CPU) vLLM engine with our agent file and real services.

argv: MODEL_DIR WORK_DIR; the services' environment (ports, key) comes from the caller. Prints one JSON line.

- `RolloutRayActor`, OpenRLHF's Ray actor around `vllm.AsyncLLMEngine`, built with the
  arguments `create_vllm_engines` gives it (dtype float32, no GPU and vLLM's default memory
  share instead of bf16 on one GPU), loads our agent file and runs `generate_responses` for the perceiver role: vLLM
  generates, our RoleAgent scores through the real reasoner server.
- The reasoner role and the joint agent run OpenRLHF's executors here against the same
  actor's `generate` (the call the executors make), since an actor's environment is fixed.
- Each rollout goes through `SamplesGenerator._process_response_into_experience`.
- What needs CUDA is shown, not run: `create_vllm_engines` waits on a placement group of
  {"GPU": 1, "CPU": 1} bundles, which never becomes ready on a machine without GPUs.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import ray
import rollouts
from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator
from openrlhf.trainer.ray.vllm_engine import RolloutRayActor, _load_agent_executor
from ray.util.placement_group import placement_group, remove_placement_group
from transformers import AutoProcessor
from vllm import SamplingParams

from p2r_recipe.engines.vllm import cpu_overrides
from p2r_recipe.train import AGENT_FILE
from p2r_recipe.train.data import perceiver_row

MAX_NEW_TOKENS = 32  # --rollout.max_new_tokens; the agent's per-role caps (P2R_*_MAX_TOKENS) are lower
MAX_LEN = 4096


class RemoteEngine:
    """The actor's `generate` as the executors call it: `await llm_engine.generate(...)`."""

    def __init__(self, actor):
        self.actor = actor

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        return await self.actor.generate.remote(prompt_token_ids, sampling_params, multi_modal_data)


def summary(response: dict) -> dict:
    experience = SamplesGenerator._process_response_into_experience(None, response, max_len=MAX_LEN)
    info = {key: value.tolist() for key, value in experience.info.items()}
    turns = [end - start for start, end in response["action_ranges"]]
    return {**info, "turns": turns}


def main(model_dir: str, work: str) -> None:
    processor = AutoProcessor.from_pretrained(model_dir)
    sample = rollouts.sample(Path(work), 0, form="mca")
    prompt = processor.apply_chat_template(perceiver_row(sample)["prompt"], tokenize=False, add_generation_prompt=True)
    sampling = SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=MAX_NEW_TOKENS, min_tokens=1, seed=0)

    actor_env = {key: os.environ[key] for key in os.environ if key.endswith(("_PORT", "_API_KEY")) or key.startswith(("P2R_", "VLLM_"))}
    actor_env |= {"P2R_AGENT": "role", "P2R_ROLE": "perceiver", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, runtime_env={"env_vars": actor_env})

    gpu_bundles = placement_group([{"GPU": 1, "CPU": 1}], strategy="PACK")
    placement_ready = gpu_bundles.wait(timeout_seconds=5)
    remove_placement_group(gpu_bundles)

    pads = {processor.image_token_id, processor.video_token_id}
    actor = RolloutRayActor.options(num_cpus=1, num_gpus=0).remote(
        model=model_dir, enforce_eager=True, worker_extension_cls="openrlhf.trainer.ray.vllm_worker_wrap.WorkerWrap",
        tensor_parallel_size=1, seed=0, distributed_executor_backend="uni", max_model_len=MAX_LEN,
        enable_prefix_caching=False, dtype="float32", trust_remote_code=True, full_determinism=False,
        bundle_indices=None, num_gpus=0, enable_sleep_mode=False,
        agent_func_path=str(AGENT_FILE), remote_rm_url=None, mm_pad_token_ids=pads,
        limit_mm_per_prompt={"image": 4}, hf_overrides=cpu_overrides(model_dir),
    )  # fmt: skip
    [perceiver] = ray.get(
        actor.generate_responses.remote(prompt, sample.to_label(), sampling, MAX_LEN, processor, images=[sample.image])
    )
    result = {"placement_ready": placement_ready, "perceiver": summary(perceiver)}

    engine = RemoteEngine(actor)
    for name, agent, role in (("reasoner", "role", "reasoner"), ("joint", "joint", "perceiver")):
        os.environ.update(P2R_AGENT=agent, P2R_ROLE=role)
        executor = _load_agent_executor(str(AGENT_FILE))
        rollout = executor.execute(prompt, sample.to_label(), sampling, MAX_LEN, processor, engine, images=[sample.image])
        result[name] = summary(asyncio.run(rollout))
    ray.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
