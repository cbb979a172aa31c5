"""OpenRLHF agents: the role reward as a one-step environment, and the two-turn joint P2R agent.

Use with `--train.agent_func_path <this file>`. OpenRLHF 0.11.2 loads the file with
importlib and builds `AgentExecutor()` with no arguments, so the agent is chosen by
`P2R_AGENT` (the rest of the environment is the reward's, see `p2r_recipe.train.reward`):

- `role` (default): one step. The policy's reply is scored exactly as `reward_func` scores
  it for `P2R_ROLE` (perceiver: box rules, evidence, frozen reasoner; reasoner: its own
  answer). Unlike the `--reward.remote_url` path, a service outage raises out of the
  rollout, so training stops with the message naming the service.
- `joint`: one model plays both roles in one trajectory (an option beyond the paper). Turn 1,
  on the perceiver dataset: the policy perceives. The environment answers with a user turn
  holding the evidence images (annotated + crops, or the original image when no box is
  usable) and the training reasoning prompt. Turn 2: the policy reasons; the reward is the
  score of its final answer (the box rules are logged, not applied).

Where to customise. A new agent: an `AgentInstanceBase` subclass named in `AGENTS` and picked in
`AgentExecutor`; what the joint agent's environment shows after the perceive turn: `JointAgent`
(the evidence comes from `Rewarder.evidence`, the prompt from `prompts.reason_text`); per-turn
token caps: `turn_caps`. Scoring is the reward's (`p2r_recipe.train.reward`).

Multimodal observations: OpenRLHF 0.11.2's multi-turn executor tokenizes
`environment_feedback` together with `environment_images` through the VLM processor, so the
feedback text carries one image placeholder per image. Limitations: the feedback turn is
written in Qwen's ChatML with Qwen-VL image placeholders (the family P2R trains), so other
chat formats need their own template; and the executor silently drops the evidence images
when the trajectory would exceed `--data.max_len` (size it for the reasoner, e.g. 12288).

Length caps. OpenRLHF 0.11.2's multi-turn executor sets every turn's `max_tokens` to
`max_len - len(tokens so far)` just before generating, over `--rollout.max_new_tokens` and
over any `sampling_params` a step returned, so a perceive turn could run to 3,000+ tokens.
`AgentExecutor.execute` therefore hands the executor the engine wrapped in `TurnCaps`,
which lowers each turn's `max_tokens` to the release's cap for the role that turn plays:
`P2R_PERCEIVE_MAX_TOKENS` (default 1024) and `P2R_REASON_MAX_TOKENS` (default 2048), set
from the config's `response_max_len` by `p2r_recipe.train.command`. A turn never gets more
than the executor's own budget either.
"""

from __future__ import annotations

import asyncio
import os

import torch
from openrlhf.utils.agent import AgentInstanceBase, MultiTurnAgentExecutor

from p2r_recipe.evidence import parse_boxes
from p2r_recipe.images import ImageError
from p2r_recipe.prompts import reason_text
from p2r_recipe.train.config import TURN_CAP_VARS
from p2r_recipe.train.reward import Outcome, RewardConfig, box_rule, rewarder, strip_end_tokens
from p2r_recipe.train.schema import TrainSample
from p2r_recipe.train.services import env_number

AGENTS = ("role", "joint")
END_OF_TURN = "<|im_end|>"
# Each image followed by a newline, as the release's stage-2 prompt writes "<image>\n" per image.
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>\n"
USER_TURN = "\n<|im_start|>user\n{images}{text}<|im_end|>\n<|im_start|>assistant\n"


def turn_caps(agent: str, role: str, env=None) -> list[int]:
    """max_tokens of each turn, in order: the role's cap (role agent), or perceive then reason (joint)."""
    env = os.environ if env is None else env
    roles = ("perceiver", "reasoner") if agent == "joint" else (role,)
    return [env_number(env, *TURN_CAP_VARS[r], int) for r in roles]


class TurnCaps:
    """The rollout engine of one trajectory, seen through the release's per-turn response caps.

    `generate` receives the executor's own copy of the sampling parameters for that turn,
    so lowering its max_tokens affects that request only.
    """

    def __init__(self, engine, caps: list[int]):
        self.engine, self.caps, self.turn = engine, caps, 0

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        cap = self.caps[min(self.turn, len(self.caps) - 1)]
        self.turn += 1
        sampling_params.max_tokens = min(sampling_params.max_tokens, cap)
        return await self.engine.generate(prompt_token_ids, sampling_params, multi_modal_data=multi_modal_data)


def _final(outcome: Outcome, states: dict, extra: dict[str, float] | None = None) -> dict:
    score = torch.tensor(outcome.score)
    return {
        "rewards": score,
        "scores": score,
        "environment_feedback": "",
        "done": True,
        "sampling_params": states.get("sampling_params"),
        "extra_logs": {**outcome.logs(), **(extra or {})},
    }


class RoleAgent(AgentInstanceBase):
    """One step: the reply is scored for P2R_ROLE by the same code as `reward_func`."""

    def __init__(self, *args, **kwargs):
        self.rewarder = rewarder()

    async def step(self, states: dict, **kwargs) -> dict:
        sample = TrainSample.from_label(states["label"])
        return _final(await self.rewarder.score(strip_end_tokens(states["action_text"]), sample), states)


class JointAgent(AgentInstanceBase):
    """Perceive, see the evidence, reason: one policy, one trajectory, rewarded on the final answer."""

    def __init__(self, *args, **kwargs):
        # The reasoner role's scoring: the policy's own answer, free-form through the verifier.
        self.rewarder = rewarder(RewardConfig.from_env(role="reasoner"))
        self.perceived: Outcome | None = None
        self.box_flags: dict[str, float] = {}

    async def step(self, states: dict, **kwargs) -> dict:
        sample = TrainSample.from_label(states["label"])
        if self.perceived is not None:
            reply = strip_end_tokens(states["action_text"])
            outcome = await self.rewarder.judge(reply, sample)
            outcome.box_count, outcome.has_evidence = self.perceived.box_count, self.perceived.has_evidence
            self.rewarder.log(sample, reply, outcome)
            return _final(outcome, states, self.box_flags)
        boxes = parse_boxes(strip_end_tokens(states["action_text"]))
        self.box_flags = {f"perceive_{code}": float(box_rule(boxes) == code) for code in ("iou_penalty", "label_penalty")}
        try:
            images, has_evidence = await asyncio.to_thread(self.rewarder.evidence, sample, boxes)
        except ImageError:
            return _final(Outcome(0.0, "image_error", len(boxes)), states, self.box_flags)
        self.perceived = Outcome(0.0, box_count=len(boxes), has_evidence=has_evidence)
        # A reply cut at the length limit has no end-of-turn token yet; close the turn first.
        close = "" if states["action_text"].rstrip().endswith(END_OF_TURN) else END_OF_TURN
        text = reason_text(sample.question, sample.answer_form, has_evidence, training=True)
        return {
            "rewards": torch.tensor(0.0),
            "scores": torch.tensor(0.0),
            "environment_feedback": close + USER_TURN.format(images=IMAGE_PLACEHOLDER * len(images), text=text),
            "environment_images": images,
            "done": False,
            "sampling_params": states.get("sampling_params"),
            "extra_logs": {},
        }


class AgentExecutor(MultiTurnAgentExecutor):
    """What OpenRLHF instantiates: the agent named by P2R_AGENT (role | joint), each turn held to its cap."""

    def __init__(self):
        kind = os.environ.get("P2R_AGENT", "role")
        if kind not in AGENTS:
            raise ValueError(f"P2R_AGENT={kind!r}: set it to one of {AGENTS}")
        self.caps = turn_caps(kind, RewardConfig.from_env().role if kind == "role" else "reasoner")
        super().__init__(RoleAgent if kind == "role" else JointAgent)

    async def execute(self, prompt, label, sampling_params, max_length, hf_tokenizer, llm_engine, images=None):
        engine = TurnCaps(llm_engine, self.caps)
        return await super().execute(prompt, label, sampling_params, max_length, hf_tokenizer, engine, images)
