"""The PRA-GRPO launchers' logic (`launch/train_*.py` are thin entry points): flags, the deepspeed rank gate,
pre-flight checks, and handing over to OpenRLHF."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

import httpx

from p2r_recipe.prompts import PERCEIVE_INSTRUCTION_TRAIN
from p2r_recipe.train.command import NEEDED_SERVICES, build_command
from p2r_recipe.train.config import load_config
from p2r_recipe.train.schema import TrainSample
from p2r_recipe.train.services import ServiceConfig


def config_path(name: str, configs: Path) -> Path:
    """A YAML path, or a bare name from the `configs` folder (launch/configs: `reasoner_8b`)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return configs / f"{name}.yaml"


def parser(role: str, doc: str) -> argparse.ArgumentParser:
    default = f"{role}_4b"
    cli = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--config", default=None, help=f"YAML file or name in launch/configs (default {default})")
    cli.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field (repeatable), e.g. --set learning_rate=2e-6",
    )
    cli.add_argument("--pretrain", help="model to start from (hub id or HF checkpoint dir); wins over --set")
    cli.add_argument("--dataset", help="prompt dataset (JSONL); wins over --set")
    cli.add_argument(
        "--output-dir", help="final HF checkpoint dir (checkpoints/ and tensorboard/ inside); wins over --set"
    )
    cli.add_argument(
        "--nodes", type=int, help="nodes of the Ray cluster to train on (num_nodes); more than 1 needs RAY_ADDRESS"
    )
    cli.add_argument("--gpus-per-node", type=int, help="GPUs used on each node (gpus_per_node)")
    cli.add_argument(
        "--reward-func",
        action="store_true",
        help="reward through reward_func (p2r_recipe/train/reward.py, --reward.remote_url) instead of the agent "
        "(p2r_recipe/train/agent.py). The agent is the default because OpenRLHF 0.11.2 logs a reward_func's "
        "exception at INFO and goes on without a reward, so a service outage ends training with an unrelated "
        "error; the agent stops it with our message naming the service",
    )
    cli.add_argument(
        "--dry-run", action="store_true", help="print the OpenRLHF command and exit; checks nothing, starts nothing"
    )
    cli.add_argument("--skip-checks", action="store_true", help="start without checking services, data and GPUs")
    # deepspeed's launcher appends --local_rank=N to every process it starts.
    cli.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return cli


def launcher_rank(args: argparse.Namespace) -> int:
    """This process's rank under `deepspeed` (0 when started with plain `python`)."""
    ranks = [args.local_rank, *(int(os.environ.get(var, "-1")) for var in ("RANK", "LOCAL_RANK"))]
    return max(0, *ranks)


def _prompt_texts(row: dict) -> str:
    texts = []
    for message in row.get("prompt") or []:
        content = message.get("content")
        parts = [content] if isinstance(content, str) else [p.get("text") or "" for p in content or []]
        texts.extend(parts)
    return "\n".join(texts)


def dataset_problem(config) -> str | None:
    """Why `config.dataset` cannot feed this role, or None. Stage 2 needs the precomputed evidence prompts."""
    path = Path(config.dataset)
    stage1 = config.role in ("perceiver", "joint")
    make = (
        "python -m p2r_recipe.train.prepare --role perceiver --out DIR"
        if stage1
        else "launch/start_perceiver_server.sh STAGE1_DIR, then python -m p2r_recipe.train.precompute "
        "--input DIR/perceiver.jsonl --out DIR2"
    )
    if not path.is_file():
        return f"dataset {path} not found; make it with: {make}"
    with path.open(encoding="utf-8") as lines:
        first = next((line for line in lines if line.strip()), None)
    if first is None:
        return f"dataset {path} is empty"
    try:
        row = json.loads(first)
        TrainSample.from_label(row["label"])
    except (ValueError, KeyError, TypeError) as exc:
        return f"dataset {path} is not a P2R training dataset ({exc}); make it with: {make}"
    perceive = PERCEIVE_INSTRUCTION_TRAIN in _prompt_texts(row)
    if stage1 and not perceive:
        return f"dataset {path} holds reasoner prompts; the {config.role} role trains on perceive prompts: {make}"
    if not stage1 and perceive:
        return f"dataset {path} holds perceive prompts; stage 2 needs the precomputed evidence prompts: {make}"
    return None


def service_problem(name: str, env=None) -> str | None:
    """Why the `name` service cannot be used (down, key refused, model not served), or None."""
    service = ServiceConfig.from_env(name, env)
    where = f"{name} service at {service.base_url} ({name.upper()}_HOST/{name.upper()}_PORT)"
    start = f"start it with launch/start_{name}_server.sh"
    headers = {"Authorization": f"Bearer {service.api_key}"} if service.api_key else {}
    try:
        reply = httpx.get(f"{service.base_url}/models", headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        return f"{where} is not answering ({type(exc).__name__}: {exc}); {start}"
    if reply.status_code in (401, 403):
        return f"{where} refused our API key ({name.upper()}_API_KEY)"
    if reply.status_code != 200:
        return f"{where} answered /models with HTTP {reply.status_code}"
    try:
        served = [m.get("id") for m in reply.json()["data"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{where} answered /models with something that is not an OpenAI model list"
    if service.model not in served:
        return f"{where} serves {served}, not {service.model!r} ({name.upper()}_MODEL)"
    return None


def pretrain_problem(config) -> str | None:
    """Stage 2 starts from the stage-1 checkpoint directory; stage 1 from a checkpoint directory or a hub id."""
    path = Path(config.pretrain)
    if (path / "config.json").is_file():
        return None
    if config.role == "reasoner":
        return f"pretrain {path} is not an HF checkpoint directory; stage 2 starts from the stage-1 output_dir"
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", config.pretrain):
        return f"pretrain {path} is neither an HF checkpoint directory nor a hub id"
    return None


def gpu_problem(config) -> str | None:
    """A local run needs the config's GPUs visible here; Ray would otherwise wait for them forever."""
    if os.environ.get("RAY_ADDRESS", "local") not in ("", "local") or config.num_nodes > 1:
        return None  # the GPUs are the cluster's
    import torch  # here: a --dry-run or a remote cluster need not pay for importing it

    visible = torch.cuda.device_count()
    if visible < config.num_gpus:
        return f"the config needs {config.num_gpus} GPUs (gpus_per_node), {visible} visible (CUDA_VISIBLE_DEVICES)"
    return None


def reach_problem(name: str, config, env=None) -> str | None:
    """On several nodes every Ray worker calls the service: it must listen on an address they all reach."""
    service = ServiceConfig.from_env(name, env)
    if config.num_nodes == 1 or not service.local_only:
        return None
    prefix = name.upper()
    return (
        f"{name} service at {service.base_url} is reachable from this node only, and {config.num_nodes} nodes train: "
        f"start it with {prefix}_HOST=<an address every node reaches> and {prefix}_API_KEY_FILE (or {prefix}_API_KEY), "
        f"and set the same {prefix}_HOST here"
    )


def cluster_problem(config, env=None) -> str | None:
    """Training on several nodes needs a running Ray cluster, named by its dashboard URL (for `ray job submit`)."""
    env = os.environ if env is None else env
    address = env.get("RAY_ADDRESS", "local")
    if address in ("", "local"):
        if config.num_nodes > 1:
            return (
                f"{config.num_nodes} nodes need a Ray cluster: `ray start --head` on one node, "
                "`ray start --address HEAD:6379` on the others, then RAY_ADDRESS=http://HEAD:8265 here"
            )
        return None
    if not re.match(r"https?://", address):
        return f"RAY_ADDRESS={address}: give the cluster's dashboard URL (http://HEAD:8265), which `ray job submit` uses"
    return None


def preflight(config) -> list[str]:
    """Every reason not to start, so one look fixes them all."""
    problems = [pretrain_problem(config), dataset_problem(config)]
    if config.eval_dataset and not Path(config.eval_dataset).is_file():
        problems.append(
            f"eval_dataset {config.eval_dataset} not found; p2r_recipe.train.prepare (stage 1) and "
            "p2r_recipe.train.precompute (stage 2) write it beside the training file, or --set eval_dataset= to skip validation"
        )
    problems.extend(service_problem(name) for name in NEEDED_SERVICES[config.role])
    problems.extend(reach_problem(name, config) for name in NEEDED_SERVICES[config.role])
    problems.append(gpu_problem(config))
    return [p for p in problems if p]


def main(role: str, doc: str, configs: Path, argv: list[str] | None = None, joint: bool = False) -> int:
    """Parse flags (`configs`: the folder of named configs); only rank 0 goes on: it checks, then becomes the one Ray driver for every visible GPU.

    `deepspeed launch/train_*.py` starts this script once per GPU, each seeing all the node's GPUs.
    OpenRLHF's trainer is a single Ray driver that places the policy, reference and vLLM engines
    on all GPUs itself, so the other ranks exit 0 at once (a non-zero exit would make deepspeed
    kill rank 0); a second driver would start a second Ray cluster fighting for the same GPUs.
    """
    cli = parser(role, doc)
    if joint:
        cli.add_argument(
            "--joint",
            action="store_true",
            help="train the joint P2R agent (config joint_4b): one policy perceives, then reasons over its own evidence",
        )
    args = cli.parse_args(argv)
    rank = launcher_rank(args)
    if rank != 0:
        print(f"rank {rank}: exiting; rank 0 drives Ray for every GPU", file=sys.stderr)
        return 0

    use_joint = getattr(args, "joint", False)
    name = args.config or ("joint_4b" if use_joint else f"{role}_4b")
    try:
        hardware = [f"{key}={value}" for key, value in (("num_nodes", args.nodes), ("gpus_per_node", args.gpus_per_node))
                    if value is not None]  # fmt: skip
        config = load_config(config_path(name, configs), [*args.overrides, *hardware])
    except (OSError, ValueError) as exc:
        cli.error(str(exc))
    paths = {key: getattr(args, key) for key in ("pretrain", "dataset", "output_dir") if getattr(args, key) is not None}
    config = dataclasses.replace(config, **paths)  # taken verbatim: a path is not YAML
    expected = "joint" if use_joint else role
    if config.role != expected:
        cli.error(f"{name} is a {config.role} config; this launcher trains the {expected} role")
    if args.reward_func and config.role == "joint":
        cli.error("--reward-func: the joint role is a two-turn agent; it has no reward_func form")

    problem = cluster_problem(config)
    if problem:
        cli.error(problem)
    try:
        command = build_command(config, agent=not args.reward_func)
    except ValueError as exc:  # a malformed key file or setting
        cli.error(str(exc))
    if args.dry_run:
        print(command.shell())
        return 0
    problems = [] if args.skip_checks else preflight(config)
    if problems:
        print(f"not starting {expected} training:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 1
    command.write_files()
    print(f"starting: {command.shell()}", flush=True)
    os.execvpe(command.argv[0], command.argv, command.process_env())
