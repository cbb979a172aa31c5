"""Leaderboard tables (Markdown, CSV, LaTeX, JSON) and a bar chart from lmms-eval result files."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from tabulate import tabulate

from . import letter_bias
from .published import published_scores

# The one place task names live: lmms-eval task -> (leaderboard table, benchmark).
TASKS = {
    "vstar": ("main", "V*"),
    "hrbench_4k": ("main", "HR4K"),
    "hrbench_8k": ("main", "HR8K"),
    "p2r_demo_vstar": ("demo", "V*"),
    "p2r_demo_hrbench_4k": ("demo", "HR4K"),
    "p2r_demo_hrbench_8k": ("demo", "HR8K"),
    "mmerealworld_lite_p2r": ("mme_lite", "MME"),
    "mmerealworld_p2r": ("mme", "MME"),
}
# benchmark -> {metric: column}, columns named as in the paper's tables
METRICS = {
    "V*": {"attr": "V* Attr", "spatial": "V* Spatial", "overall": "V*"},
    "HR4K": {"fsp": "HR4K FSP", "fcp": "HR4K FCP", "overall": "HR4K"},
    "HR8K": {"fsp": "HR8K FSP", "fcp": "HR8K FCP", "overall": "HR8K"},
    "MME": {"overall": "overall"}
    | {f"perception_{c}": f"P-{c.upper()}" for c in ("ocr", "rs", "dt", "mo", "ad")}
    | {f"reasoning_{c}": f"R-{c.upper()}" for c in ("ocr", "dt", "mo", "ad")},
}
TITLES = {
    "main": "V* and HR-Bench (accuracy %)",
    "demo": "Embedded demo (accuracy % on small embedded subsets; not comparable with the real benchmarks)",
    "mme_lite": "MME-RealWorld-lite (accuracy %)",
    "mme": "MME-RealWorld (accuracy %)",
}
# Circular evaluation (each table's *_circular tasks): the release-order score, then "circ" = right in every rotation.
TASKS |= {f"{task}_circular": (f"{table}_circular", f"{bench} circ") for task, (table, bench) in TASKS.items()}
METRICS |= {
    f"{bench} circ": {"overall": columns["overall"]} | {f"{m}_circular": f"{c} circ" for m, c in columns.items()}
    for bench, columns in list(METRICS.items())
}
TITLES |= {f"{t}_circular": f"{title.split(' (')[0]}, circular evaluation (accuracy %)" for t, title in TITLES.items()}
AVERAGED = ("V*", "HR4K", "HR8K")  # the paper's Avg: the mean of these benchmarks' overall scores
# cost metric -> (column, format); errors add up over a table's tasks, the others are per-sample means
COSTS = {
    "boxes": ("Boxes", ".2f"),
    "output_tokens": ("Out tokens", ".0f"),
    "seconds_per_sample": ("s/sample", ".2f"),
    "errors": ("Errors", ".0f"),
}
TINY_NAMES = {"p2r-tiny", "tiny-qwen3-vl"}  # p2r_recipe.toy.model's model name and its default build dir
MODE_ORDER = ("default", "thinking", "p2r")
DELTA = "Δ"
TABULATE = {"disable_numparse": True, "stralign": "right", "colalign": ("left",) * 3}  # cells as written; labels left


@dataclass
class TaskResult:
    """One task's metrics, read from one result file."""

    metrics: dict[str, float]
    samples: int
    file: str
    date: str
    letter_bias: dict | None = None  # lmms-eval's `letter_bias` metric, where the run has it


@dataclass
class Row:
    """One line of a table: a run, a published result, or a delta to the baseline."""

    model: str
    mode: str
    source: str  # "run", "published" or DELTA
    values: dict[str, float | None]
    files: dict[str, str] = field(default_factory=dict)  # task -> result file
    bias: dict[str, dict] = field(default_factory=dict)  # task -> its letter_bias


@dataclass
class Table:
    """One leaderboard table in a fixed column layout."""

    name: str
    title: str
    columns: list[str]
    rows: list[Row]
    note: str = ""


def display_model(pretrained: str) -> str:
    """The last path component of `pretrained`; the offline tiny model is flagged as random."""
    name = pretrained.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return "p2r-tiny (toy)" if name in TINY_NAMES else name


def run_model(args: dict[str, str], pretrained: str) -> str:
    """The Model column of a run: its model, or `PERCEIVER -> REASONER` when `--model p2r` took the perceive
    pass from another engine (perceiver_* model args; a perceiver named only by its backend is the reasoner's
    model on that backend)."""
    named = [args.get(f"perceiver_{k}") for k in ("pretrained", "served_model", "backend", "base_url")]
    if not any(named):
        return display_model(pretrained)
    reasoner = args.get("pretrained") or args.get("served_model") or pretrained
    perceiver = named[0] or named[1] or reasoner
    return f"{display_model(perceiver)} -> {display_model(reasoner)}"


def parse_model_args(model_args: object) -> dict[str, str]:
    """lmms-eval's `key=value,key=value` model arguments (or a dict of them) as a dict."""
    if not isinstance(model_args, dict):
        model_args = dict(part.split("=", 1) for part in str(model_args or "").split(",") if "=" in part)
    return {str(k).strip(): str(v).strip() for k, v in model_args.items()}


def run_date(path: Path, data: dict) -> str:
    """When the run ended, as sortable `YYYYmmdd_HHMMSS`: the date field, else the file name, else its mtime."""
    for text in (str(data.get("date") or ""), path.name):
        if found := re.search(r"\d{8}_\d{6}", text):
            return found.group()
    return datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y%m%d_%H%M%S")


def read_metrics(task: str, entry: dict, wanted: set[str]) -> dict[str, float]:
    """Wanted metrics of one task entry (`"metric,filter": value`); null means not applicable."""
    found: dict[str, float] = {}
    for key, value in entry.items():
        metric, _, filter_name = key.partition(",")
        if metric not in wanted or value is None or (metric in found and filter_name != "none"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{task}: metric {key!r} is {value!r}, not a number")
        found[metric] = float(value)
    return found


def read_result_file(path: Path) -> tuple[tuple[str, str], dict[str, TaskResult]]:
    """((model, mode), leaderboard tasks) of one lmms-eval result file; ValueError says what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not readable JSON ({e})") from None
    if not (isinstance(data, dict) and isinstance(data.get("results"), dict) and isinstance(data.get("config"), dict)):
        raise ValueError("no 'results' and 'config' objects, so not an lmms-eval result file")
    args = parse_model_args(data["config"].get("model_args"))
    if not (pretrained := args.get("pretrained") or data.get("model_name")):
        raise ValueError("no pretrained= in config.model_args to name the model")
    date, tasks = run_date(path, data), {}
    for task, entry in data["results"].items():
        if task in TASKS and not isinstance(entry, dict):
            raise ValueError(f"results[{task!r}] is not an object")
        if task in TASKS:
            metrics = read_metrics(task, entry, set(METRICS[TASKS[task][1]]) | set(COSTS))
            samples = entry["samples"] if isinstance(entry.get("samples"), int) and entry["samples"] > 0 else 1
            bias = entry.get("letter_bias,none") if isinstance(entry.get("letter_bias,none"), dict) else None
            tasks[task] = TaskResult(metrics, samples, str(path), date, bias)
    if not tasks:
        raise ValueError(f"no leaderboard task in it (has: {', '.join(data['results']) or 'nothing'})")
    return (run_model(args, str(pretrained)), args.get("mode", "default")), tasks


def collect(paths: list[Path]) -> tuple[dict[tuple[str, str], dict[str, TaskResult]], list[str]]:
    """The newest result per (model, mode, task) under `paths`, and a line for each file or path skipped."""
    runs: dict[tuple[str, str], dict[str, TaskResult]] = {}
    problems = []
    for root in paths:
        if not root.exists():
            problems.append(f"{root}: no such file or directory")
        for path in [root] if root.is_file() else sorted(root.rglob("*results.json")):
            try:
                key, tasks = read_result_file(path)
            except ValueError as e:
                problems.append(f"skipped {path}: {e}")
                continue
            slot = runs.setdefault(key, {})
            slot |= {t: r for t, r in tasks.items() if t not in slot or (r.date, r.file) > (slot[t].date, slot[t].file)}
    return runs, problems


def combine(metric: str, results: list[TaskResult]) -> float | None:
    """A cost over several tasks: errors add up, per-sample means are weighted by sample counts."""
    pairs = [(r.metrics[metric], r.samples) for r in results if metric in r.metrics]
    if not pairs or metric == "errors":
        return sum(v for v, _ in pairs) if pairs else None
    return sum(v * n for v, n in pairs) / sum(n for _, n in pairs)


def run_row(table: str, key: tuple[str, str], tasks: dict[str, TaskResult]) -> Row | None:
    """The row of one (model, mode) in one table, or None when it ran none of the table's tasks."""
    mine = {task: result for task, result in tasks.items() if TASKS[task][0] == table}
    if not mine:
        return None
    values: dict[str, float | None] = {}
    for task, result in mine.items():
        values |= {column: result.metrics.get(metric) for metric, column in METRICS[TASKS[task][1]].items()}
    values |= {column: combine(metric, list(mine.values())) for metric, (column, _) in COSTS.items()}
    bias = {task: result.letter_bias for task, result in mine.items() if result.letter_bias}
    return Row(*key, "run", values, {task: result.file for task, result in mine.items()}, bias)


def find_baseline(rows: list[Row], baseline: str) -> Row | None:
    """The row named `MODEL:MODE` (mode default if omitted); a run is preferred to a published row."""
    model, sep, mode = baseline.rpartition(":")
    model, mode = (model, mode) if sep else (baseline, "default")
    matches = [r for r in rows if r.model == display_model(model) and r.mode == mode]
    return min(matches, key=lambda r: r.source != "run", default=None)


def with_deltas(rows: list[Row], base: Row, columns: list[str]) -> list[Row]:
    """A delta row after each run but the baseline (after each row when the table has no runs)."""
    compared = [r for r in rows if r.source == "run"] or rows
    out = []
    for row in rows:
        out.append(row)
        if row is not base and any(row is r for r in compared):
            known = [c for c in columns if None not in (row.values.get(c), base.values.get(c))]
            out.append(Row(row.model, row.mode, DELTA, {c: row.values[c] - base.values[c] for c in known}))
    return out


def build_tables(runs: dict, published: bool = True, baseline: str | None = None) -> list[Table]:
    """Every table that has a row, with Avg, the cost columns present and, given a baseline, delta rows."""
    tables = []
    for name, title in TITLES.items():
        rows = [Row(*key, "published", dict(scores)) for key, scores in published_scores(name).items() if published]
        mine = filter(None, (run_row(name, key, tasks) for key, tasks in runs.items()))
        rows += sorted(mine, key=lambda r: (r.model.lower(), (*MODE_ORDER, r.mode).index(r.mode), r.mode))
        if not rows:
            continue
        benchmarks = list(dict.fromkeys(bench for table, bench in TASKS.values() if table == name))
        columns = [column for bench in benchmarks for column in METRICS[bench].values()]
        if set(AVERAGED) <= set(benchmarks):
            columns.append("Avg")
            for row in rows:
                overall = [row.values.get(METRICS[bench]["overall"]) for bench in AVERAGED]
                row.values["Avg"] = None if None in overall else sum(overall) / len(overall)
        columns += [c for c, _ in COSTS.values() if any(r.values.get(c) is not None for r in rows)]
        tables.append(Table(name, title, columns, rows))
        if baseline and (base := find_baseline(rows, baseline)):
            tables[-1].note = f"{DELTA} rows: difference to {base.model}:{base.mode} ({base.source})."
            tables[-1].rows = with_deltas(rows, base, columns)
    return tables


def cell(column: str, value: float | None, delta: bool) -> str:
    """A number as the table shows it; a missing one is '-', never 0."""
    return "-" if value is None else format(value, ("+" if delta else "") + dict(COSTS.values()).get(column, ".1f"))


def sources_text(row: Row) -> str:
    """Which file each of the row's cells came from, grouped by file."""
    files = dict.fromkeys(row.files.values())
    return "; ".join(f"{f} ({', '.join(t for t, g in row.files.items() if g == f)})" for f in files)


def grid(rows: list[Row], columns: list[str], sources: bool) -> list[list[str]]:
    """The header and the string cells of rows."""
    header = ["Model", "Mode", "Source", *columns] + (["Sources"] if sources else [])
    return [header] + [
        [row.model, row.mode, row.source, *(cell(c, row.values.get(c), row.source == DELTA) for c in columns)]
        + ([sources_text(row)] if sources else [])
        for row in rows
    ]


def to_markdown(tables: list[Table], problems: list[str], sources: bool) -> str:
    parts = []
    for t in tables:
        header, *body = grid(t.rows, t.columns, sources)
        parts += [f"### {t.title}", *filter(None, [t.note]), tabulate(body, header, "pipe", **TABULATE)]
    parts += list(filter(None, [letter_bias.markdown(tables)]))
    parts += ["Skipped:\n\n" + "\n".join(f"- {p}" for p in problems)] if problems else []
    return "\n\n".join(parts) + "\n"


def to_csv(tables: list[Table], sources: bool) -> str:
    """One CSV with one header: a row shows '-' in the columns of the other tables' layouts."""
    columns = list(dict.fromkeys(c for t in tables for c in t.columns))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["Table", *grid([], columns, sources)[0]])
    writer.writerows([t.name, *line] for t in tables for line in grid(t.rows, columns, sources)[1:])
    return out.getvalue()


def to_latex(tables: list[Table], sources: bool) -> str:
    """A booktabs tabular per table (tabulate escapes the cells), titled by a comment."""
    parts = []
    for t in tables:
        header, *body = grid(t.rows, t.columns, sources)
        tabular = tabulate(body, header, "latex_booktabs", **TABULATE).replace(DELTA, r"$\Delta$")
        parts.append("".join(f"% {line}\n" for line in filter(None, [t.title, t.note])) + tabular)
    return "\n\n".join(parts) + "\n"


def write_chart(tables: list[Table], path: Path) -> bool:
    """Grouped bars, one colour per row, of the overall scores in the main layout; False if none to draw."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    if not (shown := [t for t in tables if "Avg" in t.columns]):
        return False
    groups = [METRICS[bench]["overall"] for bench in AVERAGED] + ["Avg"]
    most = max(sum(r.source != DELTA for r in t.rows) for t in shown)  # bars per group, for the width
    fig, axes = plt.subplots(len(shown), 1, figsize=(max(9.0, 1.8 * most), 4.8 * len(shown)), squeeze=False)
    for ax, table in zip(axes[:, 0], shown, strict=True):
        rows = [r for r in table.rows if r.source != DELTA]
        width = min(0.85 / len(rows), 0.15)
        for i, row in enumerate(rows):
            values = [row.values.get(c) for c in groups]
            published = row.source == "published"
            boxes = row.values.get("Boxes")  # P2R's evidence per sample, where the run logged it
            label = f"{row.model} · {row.mode}" + (" (published)" if published else "")
            label += f", {boxes:.2f} boxes/sample" if boxes is not None else ""
            bars = ax.bar(
                [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))],
                [math.nan if v is None else v for v in values],  # a missing score draws no bar
                width, color=plt.get_cmap("tab20")(i % 20), hatch="//" if published else None, edgecolor="white",
                linewidth=0.3, label=label,
            )  # fmt: skip
            ax.bar_label(bars, ["" if v is None else f"{v:.1f}" for v in values], fontsize=6, rotation=90, padding=2)
        ax.set_xticks(range(len(groups)), ["V*", "HR-Bench 4K", "HR-Bench 8K", "Avg"])
        ax.set(ylim=(0, 112), ylabel="accuracy (%)", title=table.title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="p2r-leaderboard", description=__doc__)
    add = parser.add_argument
    add("paths", nargs="*", type=Path, default=[Path("results")], help="result files or folders (default: results/)")
    add("--out-dir", type=Path, help="where leaderboard.{md,csv,tex,json,png} go (default: the first folder scanned)")
    add("--baseline", help="MODEL:MODE that delta rows compare with, e.g. Qwen3-VL-4B-Instruct:default")
    add("--no-published", action="store_true", help="hide the paper's published rows")
    add("--sources", action="store_true", help="add a column naming the result file of each cell")
    add("--format", choices=["md", "csv", "tex", "json"], default="md", help="what to print (all are written)")
    args = parser.parse_args(argv)

    runs, problems = collect(args.paths)
    tables = build_tables(runs, published=not args.no_published, baseline=args.baseline)
    if args.baseline and not any(t.note for t in tables):
        problems.append(f"baseline {args.baseline}: no such model:mode row, so no delta rows")
    texts = {
        "md": to_markdown(tables, problems, args.sources),
        "csv": to_csv(tables, args.sources),
        "tex": to_latex(tables, args.sources),
        "json": json.dumps({"tables": [asdict(t) for t in tables], "skipped": problems}, indent=2, ensure_ascii=False),
    }
    out_dir = args.out_dir or next((p for p in args.paths if p.is_dir()), Path("results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    for suffix, text in texts.items():
        (out_dir / f"leaderboard.{suffix}").write_text(text.rstrip("\n") + "\n", encoding="utf-8")
    written = [*texts, *(["png"] if write_chart(tables, out_dir / "leaderboard.png") else [])]
    print(texts[args.format].rstrip("\n"))
    sys.stderr.write("".join(f"warning: {problem}\n" for problem in problems))
    print(f"{len(runs)} model:mode runs; wrote leaderboard.{{{','.join(written)}}} in {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
