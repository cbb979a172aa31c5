"""One readable PRA-GRPO training config: the release's hyper-parameters as defaults, YAML files and `key=value` overrides on top."""

from __future__ import annotations

import shlex
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from p2r_recipe import release

ROLES = ("perceiver", "reasoner", "joint")
BASE_MODEL = "Qwen/Qwen3-VL-4B-Instruct"
# The agent's per-turn response caps (p2r_recipe.train.agent.TurnCaps): the variable each role's cap travels
# in, and the release's value (S1 1024, S2 2048 tokens).
TURN_CAP_VARS = {
    "perceiver": ("P2R_PERCEIVE_MAX_TOKENS", release.PERCEIVER_RESPONSE_MAX_LEN),
    "reasoner": ("P2R_REASON_MAX_TOKENS", release.REASONER_RESPONSE_MAX_LEN),
}


@dataclass
class TrainConfig:
    """Stage-1 (perceiver) training of the release's example: Qwen3-VL-4B-Instruct on 4 GPUs.

    Batch sizes count prompts; each prompt yields `n_samples_per_prompt` rollouts (the GRPO group).
    Fields marked "ours" are not given by the release.
    """

    role: str = "perceiver"
    pretrain: str = BASE_MODEL
    dataset: str = "data/p2r10k/perceiver.jsonl"
    output_dir: str = "runs/perceiver_4b"
    # The release: GRPO, group 8, 64 prompts per rollout and per update, KL k3 as a loss.
    n_samples_per_prompt: int = release.GROUP_SIZE
    rollout_batch_size: int = release.ROLLOUT_BATCH_PROMPTS
    train_batch_size: int = release.UPDATE_BATCH_PROMPTS
    # AdamW at a constant learning rate, no warm-up; gradients clipped to norm 1.0.
    learning_rate: float = release.LEARNING_RATE
    lr_scheduler: str = release.LR_SCHEDULER
    lr_warmup_ratio: float = release.LR_WARMUP_RATIO
    adam_beta1: float = release.ADAM_BETAS[0]
    adam_beta2: float = release.ADAM_BETAS[1]
    weight_decay: float = release.WEIGHT_DECAY
    max_norm: float = release.MAX_GRAD_NORM
    kl_loss_coef: float = release.KL_LOSS_COEF
    kl_estimator: str = release.KL_ESTIMATOR
    entropy_coef: float = release.ENTROPY_COEF
    epochs: int = release.EPOCHS
    save_steps: int = release.SAVE_STEPS
    prompt_max_len: int = release.PERCEIVER_PROMPT_MAX_LEN
    response_max_len: int = release.PERCEIVER_RESPONSE_MAX_LEN
    rollout_max_len: int = release.PERCEIVER_ROLLOUT_MAX_LEN
    temperature: float = release.ROLLOUT_TEMPERATURE
    # Micro-batches per GPU (the release's 8 for the update, the rollout log-probs and the reference).
    micro_train_batch_size: int = release.MICRO_BATCH_PER_GPU
    micro_rollout_batch_size: int = release.MICRO_BATCH_PER_GPU
    # Validation every `eval_steps` on the held-out slice `p2r_recipe.train.prepare` writes ("" = none), greedy, one rollout.
    eval_dataset: str = "data/p2r10k/perceiver_val.jsonl"
    eval_steps: int = release.EVAL_STEPS
    eval_temperature: float = release.EVAL_TEMPERATURE
    eval_n_samples_per_prompt: int = release.EVAL_SAMPLES_PER_PROMPT
    # Hardware: one node, every GPU shared by the policy, the reference and one vLLM engine.
    num_nodes: int = release.NUM_NODES
    gpus_per_node: int = release.GPUS_PER_NODE
    vllm_tensor_parallel_size: int = release.ROLLOUT_TENSOR_PARALLEL
    vllm_gpu_memory_utilization: float = release.ROLLOUT_GPU_MEMORY
    # The perceiver sees one image; the reasoner the annotated image and up to 3 crops.
    max_images_per_prompt: int = 1
    # Ours: memory and throughput settings.
    update_epochs: int = 1
    zero_stage: int = 3
    gradient_checkpointing: bool = True
    freeze_visual_encoder: bool = False
    seed: int = 42
    # Passed verbatim to `openrlhf.cli.train_ppo_ray`, after everything above (so they win).
    extra_args: list[str] = field(default_factory=list)

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    def validate(self) -> TrainConfig:
        """Raise ValueError on settings OpenRLHF would reject late (after loading models) or silently misuse."""
        problems = []
        if self.role not in ROLES:
            problems.append(f"role={self.role!r}: expected one of {ROLES}")
        if self.n_samples_per_prompt < 2:
            problems.append("n_samples_per_prompt must be >= 2: GRPO normalises rewards within a group")
        if self.prompt_max_len + self.response_max_len > self.rollout_max_len:
            problems.append(
                f"prompt_max_len + response_max_len ({self.prompt_max_len} + {self.response_max_len}) "
                f"exceeds rollout_max_len ({self.rollout_max_len})"
            )
        if self.rollout_batch_size % self.train_batch_size:
            problems.append(f"rollout_batch_size {self.rollout_batch_size} is not a multiple of train_batch_size")
        samples_per_update = self.train_batch_size * self.n_samples_per_prompt
        if samples_per_update % (self.micro_train_batch_size * self.num_gpus):
            problems.append(
                f"train_batch_size x n_samples_per_prompt ({samples_per_update}) is not a multiple of "
                f"micro_train_batch_size x GPUs ({self.micro_train_batch_size} x {self.num_gpus})"
            )
        if self.num_gpus % self.vllm_tensor_parallel_size:
            problems.append(
                f"{self.num_gpus} GPUs cannot hold engines of tensor parallel size {self.vllm_tensor_parallel_size}"
            )
        if self.kl_estimator not in ("k1", "k2", "k3"):
            problems.append(f"kl_estimator={self.kl_estimator!r}: expected k1, k2 or k3")
        if self.lr_scheduler == "constant" and self.lr_warmup_ratio:
            problems.append("lr_scheduler=constant ignores lr_warmup_ratio; use constant_with_warmup for a warm-up")
        if self.max_images_per_prompt < 1:
            problems.append("max_images_per_prompt must be >= 1 for a vision-language policy")
        if problems:
            raise ValueError("invalid training config:\n  " + "\n  ".join(problems))
        return self


_TYPES = typing.get_type_hints(TrainConfig)


def _coerce(key: str, value: object) -> object:
    """Check one value against its field's type; YAML 1.1 reads `1e-6` as a string, so numbers may arrive as text."""
    kind = _TYPES[key]
    bad = ValueError(f"{key}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if kind in (int, float):
        if isinstance(value, bool):
            raise bad
        try:
            number = kind(value)
        except (TypeError, ValueError):
            raise bad from None
        if kind is int and number != float(value):
            raise bad
        return number
    if kind is str:
        if isinstance(value, (dict, list)) or value is None:
            raise bad
        return str(value)
    if isinstance(value, str):  # list[str]: a shell-quoted string or a YAML list
        return shlex.split(value)
    if isinstance(value, list):
        return [str(item) for item in value]
    raise bad


def _update(config: TrainConfig, values: dict, source: str) -> None:
    unknown = sorted(set(values) - set(_TYPES))
    if unknown:
        raise ValueError(f"{source}: unknown config key(s) {unknown}; valid keys: {sorted(_TYPES)}")
    for key, value in values.items():
        try:
            setattr(config, key, _coerce(key, value))
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None


def parse_override(text: str) -> tuple[str, object]:
    """`key=value`, the value read as YAML (`lr=2e-6`, `gradient_checkpointing=false`, `extra_args=[--a, 1]`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r}: expected key=value")
    return key.strip(), yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> TrainConfig:
    """Defaults, then the YAML file (keys it leaves out keep their defaults), then `key=value` overrides; validated."""
    config = TrainConfig()
    if path is not None:
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of config keys")
        _update(config, values, str(path))
    for text in overrides:
        key, value = parse_override(text)
        _update(config, {key: value}, f"override {text!r}")
    return config.validate()
