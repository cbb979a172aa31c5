"""Runs the real `lmms-eval` CLI in a subprocess, fails a run that wrote no results, and reads what it wrote.

Every test that runs lmms-eval goes through `start`/`finish` (or `run`): lmms-eval 0.7.3 logs a model's
exception and still exits 0, so a zero exit status alone would pass a run that scored nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

LMMS_EVAL = str(Path(sys.executable).with_name("lmms-eval"))
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
RESULTS_GLOB = "*/*_results.json"  # <output_path>/<model name>/<date>_results.json


def results_files(output_path: Path) -> set[Path]:
    return set(output_path.glob(RESULTS_GLOB))


class LmmsProcess(subprocess.Popen):
    """A running lmms-eval (a Popen): where its results must appear, and the results files already there."""

    def __init__(self, command: list[str], *, cwd: Path, env: dict, output_path: Path | None):
        self.output_path = output_path
        self.results_before = results_files(output_path) if output_path else set()
        super().__init__(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def start(*args: str, cwd: Path, launcher: Sequence[str] = (LMMS_EVAL,), unset_env: Sequence[str] = ()) -> LmmsProcess:
    """Start `launcher ARGS` (default: the `lmms-eval` script; e.g. `accelerate launch ... -m lmms_eval`) offline,
    without the variables in `unset_env`; stdout and stderr go to one text pipe. An `--output_path` is made
    absolute (relative to `cwd`), so `finish` can look for the results there."""
    args = list(args)
    if any(arg.startswith("--output_path=") for arg in args):
        raise ValueError("pass --output_path and its value as two arguments, so finish can check the results")
    output_path = None
    if "--output_path" in args:
        at = args.index("--output_path") + 1
        output_path = Path(cwd, args[at])
        args[at] = str(output_path)
    env = {**os.environ, **OFFLINE_ENV}
    for name in unset_env:
        env.pop(name, None)
    return LmmsProcess([*launcher, *args], cwd=cwd, env=env, output_path=output_path)


def finish(process: LmmsProcess, timeout_s: float = 300) -> str:
    """Its output. Fails, with the output's tail, when it runs past `timeout_s` (it is killed), exits non-zero,
    or was given an `--output_path` and wrote no new results file there."""
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"lmms-eval ran past {timeout_s:g} s and was killed:\n{output[-6000:]}") from None
    if process.returncode != 0:
        raise AssertionError(f"lmms-eval exited with {process.returncode}:\n{output[-6000:]}")
    if process.output_path is not None and not results_files(process.output_path) - process.results_before:
        raise AssertionError(
            f"lmms-eval exited 0 but wrote no results under {process.output_path} "
            f"(it logs a model's exception and exits 0):\n{output[-6000:]}"
        )
    return output


def run(
    *args: str, cwd: Path, timeout_s: float = 300, launcher: Sequence[str] = (LMMS_EVAL,), unset_env: Sequence[str] = ()
) -> str:
    """`start` then `finish`."""
    return finish(start(*args, cwd=cwd, launcher=launcher, unset_env=unset_env), timeout_s)


@dataclass
class Outputs:
    """One run's results JSON and logged samples (by task), as lmms-eval wrote them under --output_path."""

    results: dict
    samples: dict[str, list[dict]]
    log: str = ""

    def metrics(self, task: str) -> dict:
        """A task's (or group's) metrics without lmms-eval's ",none" filter suffix and stderr entries."""
        row = self.results["results"].get(task) or self.results["groups"][task]
        return {k.removesuffix(",none"): v for k, v in row.items() if k.endswith(",none") and "_stderr" not in k}


def read_outputs(output_path: Path) -> Outputs:
    [results_file] = output_path.glob(RESULTS_GLOB)
    samples = {}
    for path in results_file.parent.glob("*_samples_*.jsonl"):
        task = path.stem.split("_samples_", 1)[1]
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return Outputs(json.loads(results_file.read_text()), samples)
