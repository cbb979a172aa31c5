"""Runs the real `lmms-eval` console script in a subprocess and reads what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

LMMS_EVAL = str(Path(sys.executable).with_name("lmms-eval"))


def start(*args: str, cwd: Path) -> subprocess.Popen:
    """Start `lmms-eval ARGS`; stdout and stderr go to one text pipe."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [LMMS_EVAL, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen, timeout_s: float = 300) -> str:
    """Its output; fails with the output's tail when it exits non-zero."""
    output, _ = process.communicate(timeout=timeout_s)
    if process.returncode != 0:
        raise AssertionError(f"lmms-eval exited with {process.returncode}:\n{output[-6000:]}")
    return output


def run(*args: str, cwd: Path, timeout_s: float = 300) -> str:
    return finish(start(*args, cwd=cwd), timeout_s)


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
    [results_file] = output_path.glob("*/*_results.json")
    samples = {}
    for path in results_file.parent.glob("*_samples_*.jsonl"):
        task = path.stem.split("_samples_", 1)[1]
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return Outputs(json.loads(results_file.read_text()), samples)
