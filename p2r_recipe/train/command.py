"""Builds the `python -m openrlhf.cli.train_ppo_ray` command (arguments and environment) for one PRA-GRPO role."""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import AGENT_FILE, REWARD_FILE
from .config import TURN_CAP_VARS, TrainConfig
from .schema import OPENRLHF_DATA_FLAGS
from .services import ServiceConfig

# The frozen services each role's reward calls: stage 1 asks the frozen reasoner, every role may ask the verifier.
NEEDED_SERVICES = {"perceiver": ("reasoner", "verifier"), "reasoner": ("verifier",), "joint": ("verifier",)}
# Set by deepspeed's launcher for its per-GPU processes; the Ray driver and its workers must not inherit them.
LAUNCHER_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_SIZE",
    "CROSS_RANK",
    "CROSS_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@dataclass(frozen=True)
class Command:
    """An argument list, the variables the reward code needs in every Ray worker, and files to write first.

    `files` (path -> text) hold what must not travel in argv, e.g. a Ray runtime env with service keys;
    `write_files` creates them with mode 600.
    """

    argv: list[str]
    env: dict[str, str]
    files: dict[Path, str] = field(default_factory=dict)

    def shell(self) -> str:
        """One copy-pasteable line, API keys masked."""
        shown = [f"{k}=***" if k.endswith("API_KEY") else f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join([*shown, shlex.join(self.argv)])

    def process_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The driver's environment: `base` (default os.environ) without deepspeed's rank variables, plus `env`."""
        base = os.environ if base is None else base
        return {**{k: v for k, v in base.items() if k not in LAUNCHER_VARS}, **self.env}

    def write_files(self) -> None:
        """Write `files`, readable by their owner only (mode 600, also when the file existed)."""
        for path, text in self.files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(text)


def _local(path: str) -> str:
    """An absolute path when `path` exists here (Ray workers may not share our working directory), else `path` as is (a hub id)."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def openrlhf_args(config: TrainConfig, agent: bool = True) -> list[str]:
    """`train_ppo_ray` flags for `config`: the agent file by default, the reward file with `agent=False` (not for joint).

    The agent is the default because OpenRLHF 0.11.2 swallows a reward file's exceptions (logged at
    INFO, the reward left empty), while the agent lets our "service is down" error stop training.
    """
    group = config.n_samples_per_prompt
    output = Path(config.output_dir).resolve()
    values = {
        "--actor.model_name_or_path": _local(config.pretrain),
        "--data.prompt_dataset": _local(config.dataset),
        "--data.max_images_per_prompt": config.max_images_per_prompt,
        # OpenRLHF has no prompt-length flag: max_len caps prompt + response and is vLLM's max_model_len.
        "--data.max_len": config.rollout_max_len,
        "--rollout.max_new_tokens": config.response_max_len,
        "--rollout.n_samples_per_prompt": group,
        "--rollout.batch_size": config.rollout_batch_size,
        "--rollout.micro_batch_size": config.micro_rollout_batch_size,
        "--rollout.temperature": config.temperature,
        # OpenRLHF counts the training batch in samples, the rollout batch in prompts.
        "--train.batch_size": config.train_batch_size * group,
        "--train.micro_batch_size": config.micro_train_batch_size,
        "--train.num_episodes": config.epochs,
        "--train.max_epochs": config.update_epochs,
        "--train.seed": config.seed,
        "--algo.advantage.estimator": "group_norm",
        "--algo.kl.estimator": config.kl_estimator,
        "--algo.kl.init_coef": config.kl_loss_coef,
        "--actor.adam.lr": config.learning_rate,
        "--actor.lr_scheduler": config.lr_scheduler,
        "--actor.lr_warmup_ratio": config.lr_warmup_ratio,
        "--actor.adam.weight_decay": config.weight_decay,
        "--actor.max_norm": config.max_norm,
        "--actor.entropy_coef": config.entropy_coef,
        "--actor.num_nodes": config.num_nodes,
        "--actor.num_gpus_per_node": config.gpus_per_node,
        "--ref.num_nodes": config.num_nodes,
        "--ref.num_gpus_per_node": config.gpus_per_node,
        "--vllm.num_engines": config.num_gpus // config.vllm_tensor_parallel_size,
        "--vllm.tensor_parallel_size": config.vllm_tensor_parallel_size,
        "--vllm.gpu_memory_utilization": config.vllm_gpu_memory_utilization,
        "--ds.zero_stage": config.zero_stage,
        "--ckpt.output_dir": output,
        "--ckpt.path": output / "checkpoints",
        "--ckpt.save_steps": config.save_steps,
        "--logger.tensorboard_dir": output / "tensorboard",
    }
    if config.eval_dataset:
        values |= {
            "--eval.dataset": _local(config.eval_dataset),
            "--eval.steps": config.eval_steps,
            "--eval.temperature": config.eval_temperature,
            "--eval.n_samples_per_prompt": config.eval_n_samples_per_prompt,
        }
    if agent or config.role == "joint":
        values["--train.agent_func_path"] = AGENT_FILE.resolve()
    else:
        values["--reward.remote_url"] = REWARD_FILE.resolve()
    switches = {
        "--algo.kl.use_loss": True,  # KL in the loss (k3), not in the reward
        "--train.colocate_all": True,
        "--vllm.enable_sleep": True,
        "--ds.enable_sleep": True,
        "--ckpt.save_hf": True,
        "--ckpt.load_enable": True,  # re-running the same command resumes from output_dir/checkpoints
        "--actor.gradient_checkpointing_enable": config.gradient_checkpointing,
        "--actor.freeze_visual_encoder": config.freeze_visual_encoder,
    }
    argv = [part for flag, value in values.items() for part in (flag, str(value))]
    argv += ["--actor.adam.betas", str(config.adam_beta1), str(config.adam_beta2)]
    # The dataset's column flags come from the module that writes the dataset.
    argv += [part for flag, value in OPENRLHF_DATA_FLAGS.items() for part in (flag, value) if part is not None]
    return argv + [flag for flag, on in switches.items() if on] + list(config.extra_args)


def service_env(names: tuple[str, ...], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The resolved `{NAME}_HOST/_PORT/_MODEL` of each service, so every worker calls the one we checked, and its
    key: the path when it came from `{NAME}_API_KEY_FILE` (only the path travels), else `{NAME}_API_KEY`."""
    env = os.environ if env is None else env
    out = {}
    for name in names:
        service = ServiceConfig.from_env(name, env)
        prefix = name.upper()
        out |= {f"{prefix}_HOST": service.host, f"{prefix}_PORT": str(service.port), f"{prefix}_MODEL": service.model}
        if env.get(f"{prefix}_API_KEY_FILE"):
            out[f"{prefix}_API_KEY_FILE"] = str(Path(env[f"{prefix}_API_KEY_FILE"]).resolve())
        elif service.api_key:
            out[f"{prefix}_API_KEY"] = service.api_key
    return out


def turn_cap_env(config: TrainConfig) -> dict[str, str]:
    """The agent's response cap for this role's turns (the joint agent's perceive turn), from response_max_len:
    OpenRLHF 0.11.2's multi-turn executor ignores --rollout.max_new_tokens."""
    role = "reasoner" if config.role == "reasoner" else "perceiver"
    return {TURN_CAP_VARS[role][0]: str(config.response_max_len)}


def role_env(role: str, agent: bool) -> dict[str, str]:
    """P2R_ROLE for the reward code, and P2R_AGENT for the agent file."""
    if role == "joint":  # the joint agent scores the final answer as the reasoner role does
        return {"P2R_ROLE": "reasoner", "P2R_AGENT": "joint"}
    return {"P2R_ROLE": role, "P2R_AGENT": "role"} if agent else {"P2R_ROLE": role}


def runtime_env_path(config: TrainConfig) -> Path:
    """Where a Ray cluster run's runtime env (its variables, keys included) is written, mode 600."""
    return Path(config.output_dir).resolve() / "ray_runtime_env.json"


def build_command(
    config: TrainConfig, agent: bool = True, env: Mapping[str, str] | None = None, python: str = sys.executable
) -> Command:
    """The OpenRLHF run for `config`: P2R_ROLE, the needed services and every P2R_* setting travel with it.

    With no RAY_ADDRESS (or RAY_ADDRESS=local) the driver starts a fresh local Ray cluster, whose
    workers inherit the driver's environment. With RAY_ADDRESS naming a running cluster (its dashboard
    URL, http://HEAD:8265, of a cluster made with `ray start --head` and `ray start --address`) the run
    is submitted with `ray job submit`, since that cluster's workers never see our environment: the
    variables go in its runtime env, written to a mode-600 file (`runtime_env_path`), never in argv.
    """
    env = os.environ if env is None else env
    variables = {k: v for k, v in env.items() if k.startswith("P2R_")}
    variables |= role_env(config.role, agent) | turn_cap_env(config) | service_env(NEEDED_SERVICES[config.role], env)
    argv = [python, "-m", "openrlhf.cli.train_ppo_ray", *openrlhf_args(config, agent)]
    address = env.get("RAY_ADDRESS", "")
    if address in ("", "local"):
        return Command(argv, {**variables, "RAY_ADDRESS": "local"})
    ray = Path(python).with_name("ray")
    runtime_env = runtime_env_path(config)
    submit = [str(ray) if ray.exists() else "ray", "job", "submit", "--address", address, "--runtime-env", str(runtime_env)]
    return Command([*submit, "--", *argv], {}, {runtime_env: json.dumps({"env_vars": variables}, indent=1)})
