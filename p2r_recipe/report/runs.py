"""Read lmms-eval output folders written with `--log_samples`: each run's summary and its per-sample rows.

A run is one `<stamp>_results.json` with the `<stamp>_samples_<task>.jsonl` files beside it. Both the
current schema (`"metric,filter"` keys, `filtered_resps`, `configs`) and older ones (bare metric keys,
`resps` only, no `configs`) are read; what cannot be read becomes a line in `Run.problems`, never a crash.
Summary numbers are taken from the results file as lmms-eval wrote them, never recomputed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..lmms import envelope
from ..lmms.benchmarks import BENCHMARKS, Benchmark
from .leaderboard import parse_model_args, run_model

# Summary metrics shown for every task, besides its categories, in this order.
COST_METRICS = ("boxes", "output_tokens", "seconds_per_sample", "errors")


class RunError(ValueError):
    """A path that holds no readable lmms-eval results file."""


@dataclass
class SampleRow:
    """One logged sample of one run. `correct` is None where the task logs no 0/100 `overall` metric."""

    task: str
    doc_id: int
    question: str
    target: str
    reply: str
    correct: bool | None
    category: str | None
    record: dict | None = None
    error: str | None = None


@dataclass
class Run:
    """One results file and its samples; `config` is the task's lmms-eval config (absent in older schemas)."""

    path: Path
    label: str
    model: str
    mode: str
    results: dict[str, dict[str, float]]
    configs: dict[str, dict]
    samples: list[SampleRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def benchmark_for(task: str) -> Benchmark | None:
    """This project's record adapter for a task name (ours and the demo's), None for lmms-eval's own tasks."""
    for key in ("mmerealworld", "hrbench", "vstar"):
        if key in task.lower():
            return BENCHMARKS[key]
    return None


def task_metrics(entry: Any) -> dict[str, float]:
    """A task's numeric metrics from its results entry: `"name,filter"` (the `none` filter preferred)
    or a bare `name` (older schema); stderr values and non-numbers are left out."""
    found: dict[str, float] = {}
    if not isinstance(entry, dict):
        return found
    for key, value in entry.items():
        name, _, filter_name = str(key).partition(",")
        if name.endswith("_stderr") or "_stderr_" in name or isinstance(value, bool):
            continue
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if name not in found or filter_name == "none":
            found[name] = value
    return found


def _reply_text(line: dict) -> str:
    """The model's reply: `filtered_resps`, else `resps` (older schema); lists are unwrapped to the first text."""
    value = line.get("filtered_resps", line.get("resps", ""))
    while isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, str) else ""


def _category(line: dict, benchmark: Benchmark | None) -> str | None:
    """The sample's category: the one category metric the task logged a value for (others are null)."""
    if benchmark is None:
        return None
    return next((c for c in benchmark.categories if line.get(c) is not None), None)


def read_sample(task: str, line: dict) -> SampleRow:
    """One JSONL line as a SampleRow; an unreadable P2R envelope becomes the row's error."""
    reply = _reply_text(line)
    record, error = None, None
    try:
        record = envelope.unwrap(reply)
    except ValueError as exc:
        error = str(exc)
    if record is not None:
        error = record.get("error")
    overall = line.get("overall")
    correct = None if not isinstance(overall, (int, float)) or isinstance(overall, bool) else overall >= 100.0
    doc = line.get("doc") if isinstance(line.get("doc"), dict) else {}
    return SampleRow(
        task=task,
        doc_id=int(line["doc_id"]),
        question=str(line.get("input") or doc.get("question") or ""),
        target=str(line.get("target", "")),
        reply=reply,
        correct=correct,
        category=_category(line, benchmark_for(task)),
        record=record,
        error=error,
    )


def _read_samples(path: Path, task: str, problems: list[str]) -> list[SampleRow]:
    rows, bad = [], 0
    with path.open(encoding="utf-8", errors="replace") as handle:
        for text in handle:
            if not text.strip():
                continue
            try:
                rows.append(read_sample(task, json.loads(text)))
            except (ValueError, KeyError, TypeError):
                bad += 1
    if bad:
        problems.append(f"{path.name}: {bad} unreadable line(s) skipped")
    return rows


def read_run(results_path: Path) -> Run:
    """A run from its results file; RunError if the file is not an lmms-eval results file."""
    try:
        data = json.loads(results_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunError(f"{results_path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise RunError(f"{results_path}: no 'results' object, so not an lmms-eval results file")
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    args = parse_model_args(config.get("model_args"))
    # The leaderboard's naming, so a mixed-roles run is `PERCEIVER -> REASONER` here too.
    model = run_model(args, str(args.get("pretrained") or data.get("model_name") or config.get("model") or "model"))
    mode = args.get("mode", "")
    configs = data.get("configs") if isinstance(data.get("configs"), dict) else {}
    groups = set(data.get("group_subtasks") or {}) - set(configs)
    results = {t: task_metrics(e) for t, e in data["results"].items() if t not in groups}
    run = Run(
        results_path,
        f"{model} · {mode}" if mode else model,
        model,
        mode,
        results,
        configs,
    )
    if not configs:
        run.problems.append("results file has no 'configs' (older lmms-eval schema): images cannot be located")
    stamp = results_path.name.removesuffix("results.json")
    for task in results:
        path = results_path.with_name(f"{stamp}samples_{task}.jsonl")
        if not path.exists():
            run.problems.append(f"{task}: no {path.name} (was the run made with --log_samples?)")
            continue
        run.samples += _read_samples(path, task, run.problems)
    return run


def find_runs(paths: list[Path]) -> tuple[list[Run], list[str]]:
    """Every run under `paths` (results files, or folders searched for `*results.json`), in the order given,
    each folder's files sorted; and a line for each path or file that could not be read."""
    runs, problems = [], []
    for root in paths:
        files = [root] if root.is_file() else sorted(root.rglob("*results.json")) if root.is_dir() else []
        if not files:
            problems.append(f"{root}: no lmms-eval results file found")
        for path in files:
            try:
                runs.append(read_run(path))
            except RunError as exc:
                problems.append(str(exc))
    labels = [run.label for run in runs]
    for run in runs:
        if labels.count(run.label) > 1:  # same model and mode twice: the folder tells them apart
            run.label = f"{run.label} ({run.path.parent.parent.name}/{run.path.parent.name})"
    return runs, problems
