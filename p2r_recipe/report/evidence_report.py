"""`p2r-report`: a static evidence report (summary, flips, one card per sample) for lmms-eval runs.

    p2r-report RUN [RUN ...] --out DIR [--baseline N]

RUN is a results file or a folder searched for them. DIR gets index.html, report.css, report.js,
data.js (the report's data as one JSON assignment) and img/ (screen-sized JPEG thumbnails); it
opens from file:// with no server and no network. The first run given is the baseline for flips.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from .leaderboard import METRICS, TASKS
from .published import published_scores
from .runs import COST_METRICS, Run, SampleRow, benchmark_for, find_runs
from .thumbs import DocStore, pictures

# The page itself: static files next to this module, copied beside data.js and img/.
STATIC = Path(__file__).resolve().parent / "static"
PAGE = ("index.html", "report.css", "report.js")


def _categories(task: str) -> list[str]:
    benchmark = benchmark_for(task)
    return list(benchmark.categories) if benchmark else []


def _no_evidence_share(rows: list[SampleRow]) -> float | None:
    """% of p2r-mode samples whose perceiver gave no usable box (the reasoner saw the original image only)."""
    p2r = [r.record for r in rows if r.record and r.record.get("mode") == "p2r"]
    return 100.0 * sum(not r.get("has_evidence") for r in p2r) / len(p2r) if p2r else None


def summary(runs: list[Run]) -> list[dict]:
    """One row per run and task; metrics exactly as the results file has them, plus a warning where
    the logged samples' mean `overall` does not give the file's number (samples missing or edited)."""
    out = []
    for index, run in enumerate(runs):
        for task, metrics in run.results.items():
            rows = [r for r in run.samples if r.task == task]
            check = ""
            scored = [r.correct for r in rows if r.correct is not None]
            if scored and "overall" in metrics and abs(100 * sum(scored) / len(scored) - metrics["overall"]) > 1e-6:
                check = (
                    f"{len(scored)} logged samples give {100 * sum(scored) / len(scored):.2f}, not the file's overall"
                )
            shown = ["overall", *_categories(task), *COST_METRICS]
            out.append({
                "run": index, "task": task, "samples": len(rows), "check": check,
                "metrics": {m: metrics[m] for m in shown if m in metrics},
                "no_evidence": _no_evidence_share(rows),
            })  # fmt: skip
    return out


def published(tasks: list[str]) -> list[dict]:
    """The paper's P2R numbers for the tasks that have them, keyed by our metric names."""
    out = []
    for task in tasks:
        if task not in TASKS:
            continue
        table, bench = TASKS[task]
        for (model, mode), scores in published_scores(table).items():
            values = {metric: scores[column] for metric, column in METRICS[bench].items() if column in scores}
            if mode == "p2r" and values:
                out.append({"task": task, "model": model, "values": values})
    return out


def flips(runs: list[Run], baseline: int) -> tuple[list[dict], dict[tuple[int, str, int], str]]:
    """Per other run: samples (matched by task and doc id) right in one of it and the baseline, wrong in
    the other, with counts per category; and each flipped sample's tag by (run, task, doc_id)."""

    def scored(run: Run) -> dict[tuple[str, int], SampleRow]:
        return {(r.task, r.doc_id): r for r in run.samples if r.correct is not None}

    base, tables, tags = scored(runs[baseline]), [], {}
    for index, run in enumerate(runs):
        if index == baseline:
            continue
        gained, lost, categories = 0, 0, {}
        for key, row in scored(run).items():
            before = base.get(key)
            if before is None or before.correct == row.correct:
                continue
            counts = categories.setdefault(row.category or row.task, [0, 0])
            if row.correct:
                gained, counts[0] = gained + 1, counts[0] + 1
            else:
                lost, counts[1] = lost + 1, counts[1] + 1
            tags[(index, *key)] = "wrong → right" if row.correct else "right → wrong"
            tags.setdefault((baseline, *key), "flips vs " + run.label)
        tables.append(
            {
                "base": baseline,
                "other": index,
                "gained": gained,
                "lost": lost,
                "categories": categories,
            }
        )
    return tables, tags


def sample_entry(run_index: int, run: Run, row: SampleRow, docs: DocStore, img_dir: Path, flip: str) -> dict:
    record = row.record or {}
    pics = pictures(docs, run, row, img_dir)
    boxes = (
        record.get("box_count") if record.get("mode") == "p2r" and record.get("perceiver_output") is not None else None
    )
    return {
        "run": run_index, "task": row.task, "doc": row.doc_id, "cat": row.category, "ok": row.correct,
        "flip": flip, "q": row.question, "target": row.target,
        "pred": str(record.get("prediction") or record.get("answer") or "") if record else row.reply,
        "err": row.error, "boxes": boxes, "img": pics.image, "w": pics.size[0], "h": pics.size[1],
        "ov": pics.overlays, "crops": pics.crops, "dropped": pics.dropped, "note": pics.note,
        "perceiver": record.get("perceiver_output") if isinstance(record.get("perceiver_output"), str) else None,
        "reply": str(record.get("raw_answer", "")) if record else row.reply,
        "tokens": record.get("output_tokens"), "secs": record.get("latency_s"),
    }  # fmt: skip


def build(paths: list[Path], out: Path, baseline: int = 0, progress: bool = True) -> dict:
    """Write the report for the runs under `paths` into `out`; returns the data the page shows."""
    runs, problems = find_runs(paths)
    if not runs:
        raise SystemExit("p2r-report: no run to report:\n" + "\n".join(problems))
    if not 0 <= baseline < len(runs):
        raise SystemExit(f"p2r-report: --baseline {baseline} is not one of the {len(runs)} runs (0..{len(runs) - 1})")
    img_dir = out / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    flip_tables, tags = flips(runs, baseline)
    ordered = [(i, run, row) for i, run in enumerate(runs) for row in run.samples]
    # Flips first, then by task and doc so that one document's runs sit side by side.
    ordered.sort(
        key=lambda t: (
            (t[0], t[2].task, t[2].doc_id) not in tags,
            t[2].task,
            t[2].doc_id,
            t[0],
        )
    )
    docs = DocStore()
    samples = [
        sample_entry(i, run, row, docs, img_dir, tags.get((i, row.task, row.doc_id), ""))
        for i, run, row in tqdm(ordered, desc="report", unit="sample", mininterval=5, disable=not progress)
    ]
    tasks = list(dict.fromkeys(task for run in runs for task in run.results))
    data = {
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "baseline": baseline,
        "problems": problems,
        "runs": [{"label": r.label, "path": str(r.path), "problems": r.problems} for r in runs],
        "tasks": [{"name": t, "categories": _categories(t)} for t in tasks],
        "summary": summary(runs),
        "published": published(tasks),
        "flips": flip_tables,
        "samples": samples,
    }
    # "<" escaped: the data file can never close a tag, whatever a model wrote.
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    (out / "data.js").write_text(f"window.P2R_REPORT = {text};\n", encoding="utf-8")
    for name in PAGE:
        shutil.copyfile(STATIC / name, out / name)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="p2r-report", description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs",
        nargs="+",
        type=Path,
        help="lmms-eval results files or folders (--log_samples output)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="report folder (index.html and its files)",
    )
    parser.add_argument(
        "--baseline",
        type=int,
        default=0,
        help="index of the run flips compare against (default 0)",
    )
    args = parser.parse_args(argv)
    # Datasets are read from the local cache only: a report must never download a benchmark.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = build(args.runs, args.out, args.baseline)
    flipped = sum(f["gained"] + f["lost"] for f in data["flips"])
    counts = Counter(bool(s["img"]) for s in data["samples"])
    print(f"{len(data['runs'])} run(s), {len(data['samples'])} cards ({counts[True]} with images), {flipped} flips")
    for line in data["problems"] + [f"{r['label']}: {p}" for r in data["runs"] for p in r["problems"]]:
        print(f"warning: {line}", file=sys.stderr)
    print(f"open {(args.out / 'index.html').resolve().as_uri()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
