"""K rounds of PRA-GRPO (the paper runs one): each round trains the perceiver, then the reasoner, from the last model.

Round k, with M = the base model (k = 1) or round k-1's reasoner:
  1. serve M as the frozen reasoner; train the perceiver role from M         -> ROUND/perceiver
  2. serve ROUND/perceiver as the frozen perceiver; precompute the evidence   -> ROUND/stage2/reasoner.jsonl
  3. train the reasoner role from ROUND/perceiver on that evidence            -> ROUND/reasoner
The verifier service is yours to start first (launch/start_verifier_server.sh); this driver starts and
stops the reasoner and perceiver services (logs in RUN_DIR/services/). A stage whose output exists is
skipped, so re-running the same command resumes. Each training stage is a plain launcher run, which
checks its services, data and GPUs before starting.

  python launch/alternate.py --rounds 2 --run-dir runs/alt_4b --train-gpus 0,1,2,3 --service-gpus 4 --dry-run
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from p2r_recipe.train.config import load_config
from p2r_recipe.train.launch import config_path
from p2r_recipe.train.schema import val_path


@dataclass
class Stage:
    """One step of the plan: skipped when `done` exists; `service` (role, model) runs around it."""

    title: str
    argv: list[str]
    done: Path
    env: dict[str, str] = field(default_factory=dict)
    service: tuple[str, str] | None = None


@dataclass
class Services:
    """How this driver starts and stops the frozen-role services: their environment, and vLLM or p2r-serve."""

    env: dict[str, str]
    launch: Path  # the folder of the start_*_server.sh scripts
    dev: bool = False

    def start(self, role: str, model: str) -> list[str]:
        return [str(self.launch / f"start_{role}_server.sh"), *(["--dev"] if self.dev else []), model]

    def stop(self, role: str) -> list[str]:
        return [str(self.launch / f"start_{role}_server.sh"), "--stop"]


def plan(args: argparse.Namespace, launch: Path) -> list[Stage]:
    """The stages of `args.rounds` rounds; `launch` holds the launcher scripts and their configs/ folder."""
    perceiver = load_config(config_path(args.perceiver_config, launch / "configs"), args.overrides)
    reasoner = load_config(config_path(args.reasoner_config, launch / "configs"), args.overrides)  # fail now, not after stage 1
    if (perceiver.role, reasoner.role) != ("perceiver", "reasoner"):
        raise ValueError(f"expected a perceiver and a reasoner config, got {perceiver.role} and {reasoner.role}")
    base = args.base or perceiver.pretrain
    data = args.data or perceiver.dataset
    train_env = {"CUDA_VISIBLE_DEVICES": args.train_gpus} if args.train_gpus else {}
    common = [f"--set={o}" for o in args.overrides] + (["--reward-func"] if args.reward_func else [])
    stages, model = [], base
    for k in range(1, args.rounds + 1):
        # One stage-2 folder per round: the precompute cache keys on the served name, which stays "perceiver".
        round_dir = Path(args.run_dir) / f"round{k}"
        stage1, stage2, evidence = round_dir / "perceiver", round_dir / "reasoner", round_dir / "stage2"
        tag = f"round {k}/{args.rounds}"
        stages += [
            Stage(
                f"{tag}: train the perceiver from {model} (frozen reasoner: {model})",
                [sys.executable, str(launch / "train_perceiver.py"), "--config", args.perceiver_config,
                 f"--set=eval_dataset={val_path(data)}", *common,
                 "--pretrain", str(model), "--dataset", str(data), "--output-dir", str(stage1)],
                stage1 / "config.json", train_env, ("reasoner", str(model)),
            ),
            Stage(
                f"{tag}: precompute stage-2 evidence with the frozen perceiver {stage1}",
                [sys.executable, "-m", "p2r_recipe.train.precompute", "--input", str(data), "--out", str(evidence)],
                evidence / "reasoner.jsonl", {}, ("perceiver", str(stage1)),
            ),
            Stage(
                f"{tag}: train the reasoner from {stage1}",
                [sys.executable, str(launch / "train_reasoner.py"), "--config", args.reasoner_config,
                 f"--set=eval_dataset={val_path(evidence / 'reasoner.jsonl')}", *common,
                 "--pretrain", str(stage1), "--dataset", str(evidence / "reasoner.jsonl"), "--output-dir", str(stage2)],
                stage2 / "config.json", train_env,
            ),
        ]  # fmt: skip
        model = stage2
    return stages


def _line(argv: list[str], env: dict[str, str]) -> str:
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(argv)])


def show(stages: list[Stage], services: Services) -> None:
    for stage in stages:
        state = " [done, skipped]" if stage.done.exists() else ""
        print(f"# {stage.title}{state}")
        if stage.service:
            print(_line(services.start(*stage.service), services.env))
        print(_line(stage.argv, stage.env))
        if stage.service:
            print(_line(services.stop(stage.service[0]), services.env))


def execute(stages: list[Stage], services: Services) -> int:
    """Run the stages in order; a failed stage stops the run, and the service it started is always stopped."""
    service_vars = {**os.environ, **services.env}
    for number, stage in enumerate(stages, 1):
        if stage.done.exists():
            print(f"[{number}/{len(stages)}] {stage.title}: done ({stage.done} exists), skipped", flush=True)
            continue
        print(f"[{number}/{len(stages)}] {stage.title}", flush=True)
        if stage.service and subprocess.run(services.start(*stage.service), check=False, env=service_vars).returncode:
            print(f"stopped: could not start the {stage.service[0]} service for: {stage.title}", file=sys.stderr)
            return 1
        try:
            code = subprocess.run(stage.argv, check=False, env={**os.environ, **stage.env}).returncode
        finally:
            if stage.service:
                subprocess.run(services.stop(stage.service[0]), check=False, env=service_vars)
        if code:
            print(
                f"stopped: {stage.title} failed (exit {code}); fix it, then re-run the same command to resume",
                file=sys.stderr,
            )
            return code
    print(f"all {len(stages)} stages done; final model: {stages[-1].done.parent}")
    return 0


def main(launch: Path, argv: list[str] | None = None) -> int:
    """`launch/alternate.py`; `launch` is the folder of the launcher scripts."""
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--rounds", type=int, default=2, help="alternation rounds K (default 2; the paper: 1)")
    cli.add_argument("--run-dir", default="runs/alternate", help="round folders and service logs go here")
    cli.add_argument("--perceiver-config", default="perceiver_4b", help="stage-1 config (YAML path or name)")
    cli.add_argument("--reasoner-config", default="reasoner_4b", help="stage-2 config (YAML path or name)")
    cli.add_argument(
        "--base", help="round 1's starting model and frozen reasoner (default: the perceiver config's pretrain)"
    )
    cli.add_argument("--data", help="stage-1 dataset, perceiver.jsonl (default: the perceiver config's dataset)")
    cli.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override for both stages"
    )
    cli.add_argument(
        "--reward-func", action="store_true", help="both stages reward through reward_func instead of the agent"
    )
    cli.add_argument("--train-gpus", help="CUDA_VISIBLE_DEVICES for training (default: inherited)")
    cli.add_argument(
        "--service-gpus", help="CUDA_VISIBLE_DEVICES for the served reasoner/perceiver (default: inherited)"
    )
    cli.add_argument(
        "--dev-services", action="store_true", help="serve with p2r-serve (CPU) instead of vLLM: a rehearsal"
    )
    cli.add_argument("--dry-run", action="store_true", help="print the whole plan and exit")
    args = cli.parse_args(argv)
    if args.rounds < 1:
        cli.error("--rounds must be >= 1")
    try:
        stages = plan(args, launch)
    except (OSError, ValueError) as exc:
        cli.error(str(exc))
    services = Services({"P2R_RUN_DIR": args.run_dir}, launch, args.dev_services)
    if args.service_gpus:
        services.env["CUDA_VISIBLE_DEVICES"] = args.service_gpus
    if args.dry_run:
        show(stages, services)
        return 0
    return execute(stages, services)

