"""Leaderboard: reading lmms-eval result files, tables, deltas, published rows, output formats and the CLI."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import paths
import pytest
from PIL import Image

from p2r_recipe.report import leaderboard as lb
from p2r_recipe.report import published

DATA = paths.DATA / "leaderboard"
QWEN = DATA / "Qwen__Qwen3-VL-4B-Instruct"
BROKEN = sorted((DATA / "broken").glob("*_results.json"))
REFERENCE = Path(os.environ.get("P2R_REFERENCE", paths.ROOT.parent / "shared" / "p2r_reference.md"))

# Hand-computed from the fixture files (sample counts: V* 191, HR-Bench splits 800 each).
DEFAULT_V, DEFAULT_HR4K, DEFAULT_HR8K = 80.6282722513089, 73.75, 67.25
P2R_V, P2R_HR4K, P2R_HR8K = 92.14659685863874, 80.375, 76.5  # V* from the newer rerun, HR-Bench from the older run
DEFAULT_AVG = 73.87609075043630  # (80.6282722513089 + 73.75 + 67.25) / 3
P2R_AVG = 83.00719895287958  # (92.14659685863874 + 80.375 + 76.5) / 3
P2R_BOXES = 3886.5 / 1791  # (1.5 * 191 + 2.0 * 800 + 2.5 * 800) / 1791
P2R_TOKENS = 653480 / 1791  # (280 * 191 + 350 * 800 + 400 * 800) / 1791


def tables_by_name(tables: list[lb.Table]) -> dict[str, lb.Table]:
    return {t.name: t for t in tables}


def row(table: lb.Table, model: str, mode: str, source: str = "run") -> lb.Row:
    (found,) = [r for r in table.rows if (r.model, r.mode, r.source) == (model, mode, source)]
    return found


def delta_after(table: lb.Table, model: str, mode: str, source: str = "run") -> lb.Row:
    i = table.rows.index(row(table, model, mode, source))
    assert table.rows[i + 1].source == lb.DELTA
    return table.rows[i + 1]


@pytest.fixture(scope="module")
def collected() -> tuple[dict, list[str]]:
    return lb.collect([DATA])


def paper_tables() -> list[tuple[list[str], list[list[str]]]]:
    """The markdown tables of the reference's section 8, as (header, rows)."""
    if not REFERENCE.exists():
        pytest.skip(f"{REFERENCE} not here (set P2R_REFERENCE)")
    section = REFERENCE.read_text(encoding="utf-8").split("## 8.", 1)[1].split("\n## ", 1)[0]
    tables, current = [], None
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|"):
            current = None
        elif current is None:
            current = (cells, [])
            tables.append(current)
        elif not set(cells[0]) <= {"-"}:
            current[1].append(cells)
    return tables


def test_published_rows_equal_the_papers_tables() -> None:
    paper = paper_tables()
    tables = tables_by_name(lb.build_tables({}))
    for (header, rows), table in zip(paper, (tables["main"], tables["mme_lite"]), strict=True):
        ours = {r.model: r for r in table.rows}
        assert set(ours) == {cells[0] for cells in rows}
        assert all(r.source == "published" for r in table.rows)
        for cells in rows:
            for column, text in zip(header[1:], cells[1:], strict=True):
                if column == "Avg":  # derived as the paper does: the mean of V*, HR4K and HR8K, rounded
                    assert lb.cell(column, ours[cells[0]].values[column], False) == text
                else:
                    assert ours[cells[0]].values[column] == float(text), (cells[0], column)


def test_paper_avg_is_the_mean_of_the_three_benchmarks() -> None:
    p2r_4b = row(tables_by_name(lb.build_tables({}))["main"], "P2R-4B", "p2r", "published")
    assert p2r_4b.values["Avg"] == pytest.approx((93.2 + 81.9 + 80.5) / 3)
    assert lb.cell("Avg", p2r_4b.values["Avg"], False) == "85.2"


def test_runs_grouped_by_model_and_mode_newest_file_wins_per_task(collected) -> None:
    runs, _ = collected
    assert set(runs) == {
        ("Qwen3-VL-4B-Instruct", "default"),
        ("Qwen3-VL-4B-Instruct", "p2r"),
        ("p2r-4b-step200", "p2r"),
        ("p2r-tiny (toy)", "default"),
        ("p2r-tiny (toy)", "p2r"),
    }
    p2r = runs["Qwen3-VL-4B-Instruct", "p2r"]
    assert p2r["vstar"].file == str(QWEN / "20250303_120000_results.json")
    assert p2r["hrbench_4k"].file == p2r["hrbench_8k"].file == str(QWEN / "20250302_090000_results.json")
    assert set(runs["Qwen3-VL-4B-Instruct", "default"]) == {"vstar", "hrbench_4k", "hrbench_8k", "mmerealworld_lite_p2r"}


def test_main_table_values_averages_and_costs(collected) -> None:
    main = tables_by_name(lb.build_tables(collected[0], published=False))["main"]
    default, p2r = row(main, "Qwen3-VL-4B-Instruct", "default"), row(main, "Qwen3-VL-4B-Instruct", "p2r")
    assert [default.values[c] for c in ("V*", "HR4K", "HR8K")] == pytest.approx([DEFAULT_V, DEFAULT_HR4K, DEFAULT_HR8K])
    assert [p2r.values[c] for c in ("V* Attr", "V* Spatial", "V*")] == pytest.approx(
        [91.30434782608695, 93.42105263157895, P2R_V]
    )
    assert [p2r.values[c] for c in ("HR4K FSP", "HR4K FCP", "HR4K", "HR8K")] == pytest.approx([90.25, 70.5, P2R_HR4K, P2R_HR8K])
    assert default.values["Avg"] == pytest.approx(DEFAULT_AVG)
    assert p2r.values["Avg"] == pytest.approx(P2R_AVG)
    assert p2r.values["Boxes"] == pytest.approx(P2R_BOXES)
    assert p2r.values["Out tokens"] == pytest.approx(P2R_TOKENS)
    assert p2r.values["s/sample"] == pytest.approx(3829.2 / 1791)
    assert p2r.values["Errors"] == 4  # 1 (V* rerun) + 1 + 2 (HR-Bench): errors add up
    assert default.values["Boxes"] is None  # null in V*, absent in HR-Bench: not applicable in default mode
    assert default.values["s/sample"] == pytest.approx((0.2 * 191 + 0.3 * 800 + 0.5 * 800) / 1791)
    assert main.columns == [*published.MAIN_COLUMNS, "Avg", "Boxes", "Out tokens", "s/sample", "Errors"]


def test_demo_tasks_get_their_own_table_and_the_tiny_model_is_flagged(collected) -> None:
    tables = tables_by_name(lb.build_tables(collected[0]))
    assert list(tables) == ["main", "demo", "mme_lite"]
    demo = tables["demo"]
    assert [(r.model, r.mode) for r in demo.rows] == [("p2r-tiny (toy)", m) for m in ("default", "p2r")]
    assert row(demo, "p2r-tiny (toy)", "p2r").values["Avg"] == pytest.approx((37.5 + 37.5 + 12.5) / 3)
    assert not any("tiny" in r.model for r in tables["main"].rows)
    assert "not comparable" in demo.title


def test_missing_cells_print_as_dash_never_zero(collected) -> None:
    tables = lb.build_tables(collected[0])
    partial = row(tables_by_name(tables)["main"], "p2r-4b-step200", "p2r")
    assert partial.values["V* Spatial"] is None and partial.values["Avg"] is None
    markdown = lb.to_markdown(tables, [], sources=False)
    (line,) = [ln for ln in markdown.splitlines() if ln.startswith("| p2r-4b-step200 ")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3:13] == ["88.0", "-", "87.0", "-", "-", "-", "-", "-", "-", "-"]
    (tiny_p2r,) = [ln for ln in markdown.splitlines() if ln.startswith("| p2r-tiny (toy) | p2r ")]
    assert " 0.0 |" in tiny_p2r  # a real zero stays a zero


def test_delta_rows_against_a_run_baseline(collected) -> None:
    tables = tables_by_name(lb.build_tables(collected[0], baseline="Qwen3-VL-4B-Instruct:default"))
    main = tables["main"]
    assert main.note == f"{lb.DELTA} rows: difference to Qwen3-VL-4B-Instruct:default (run)."
    delta = delta_after(main, "Qwen3-VL-4B-Instruct", "p2r")
    assert delta.values["V*"] == pytest.approx(P2R_V - DEFAULT_V)  # 11.518...
    assert delta.values["Avg"] == pytest.approx(P2R_AVG - DEFAULT_AVG)  # 9.131...
    assert delta.values["HR8K"] == pytest.approx(76.5 - 67.25)
    assert delta.values["Errors"] == 3
    assert "Boxes" not in delta.values  # the baseline has none: the cell shows "-"
    assert [lb.cell(c, delta.values.get(c), True) for c in ("V*", "Avg", "Boxes")] == ["+11.5", "+9.1", "-"]
    assert delta_after(main, "p2r-4b-step200", "p2r").values["V*"] == pytest.approx(87.0 - DEFAULT_V)
    # published rows get no delta rows while the table has runs; the baseline itself gets none
    sources = [r.source for r in main.rows]
    assert sources.count(lb.DELTA) == 2 and sources.count("published") == len(published.MAIN)
    assert row(tables["mme_lite"], "Qwen3-VL-4B-Instruct", "default") in tables["mme_lite"].rows
    assert "demo" in tables and not tables["demo"].note  # no baseline row in that table


def test_delta_rows_against_a_published_baseline() -> None:
    tables = tables_by_name(lb.build_tables({}, baseline="Qwen/Qwen3-VL-8B-Instruct:default"))
    delta = delta_after(tables["main"], "P2R-8B", "p2r", "published")
    assert delta.values["V*"] == pytest.approx(93.7 - 83.8)
    assert delta.values["Avg"] == pytest.approx((93.7 + 81.5 + 82.6 - 83.8 - 74.8 - 70.1) / 3)  # 9.7
    assert lb.cell("Avg", delta.values["Avg"], True) == "+9.7"
    assert delta_after(tables["mme_lite"], "P2R-8B", "p2r", "published").values["overall"] == pytest.approx(57.4 - 50.4)
    assert sum(r.source == lb.DELTA for r in tables["main"].rows) == len(published.MAIN) - 1


def test_malformed_and_foreign_files_are_reported_by_name_and_skipped(collected) -> None:
    runs, problems = collected
    assert len(BROKEN) == 4 and len(problems) == 4
    assert len(runs) == 5  # every other file is still read
    for path, problem in zip(BROKEN, sorted(problems), strict=True):
        assert problem.startswith(f"skipped {path}: ")
    assert "not readable JSON" in problems[0]
    assert "'N/A', not a number" in problems[1]
    assert "not an lmms-eval result file" in problems[2]
    assert "no leaderboard task in it (has: mme)" in problems[3]
    assert lb.collect([DATA / "nowhere"])[1] == [f"{DATA / 'nowhere'}: no such file or directory"]


def test_date_field_decides_before_file_name(tmp_path: Path) -> None:
    source = json.loads((QWEN / "20250303_120000_results.json").read_text())
    for name, date, overall in (("20250101_000000", "20250109_000000", 11.0), ("20250105_000000", None, 22.0)):
        source["date"], source["results"]["vstar"]["overall,none"] = date, overall
        (tmp_path / f"{name}_results.json").write_text(json.dumps(source))
    runs, problems = lb.collect([tmp_path])
    assert not problems
    assert runs["Qwen3-VL-4B-Instruct", "p2r"]["vstar"].metrics["overall"] == 11.0


def test_reads_the_file_lmms_evals_tracker_writes(tmp_path: Path) -> None:
    from lmms_eval.loggers.evaluation_tracker import EvaluationTracker

    model_args = "pretrained=Qwen/Qwen3-VL-4B-Instruct,mode=thinking,backend=vllm"
    tracker = EvaluationTracker(output_path=str(tmp_path))
    tracker.general_config_tracker.log_experiment_args(
        model_source="p2r", model_args=model_args, system_instruction=None, chat_template=None, fewshot_as_multiturn=False
    )
    entry = {"alias": "vstar", "attr,none": 75.0, "attr_stderr,none": "N/A", "overall,none": 70.0, "samples": 191}
    results = {"results": {"vstar": entry}, "config": {"model": "p2r", "model_args": model_args}, "date": "20250102_030405"}
    tracker.save_results_aggregated(results=results, samples=None, datetime_str="20250102_030405")
    written = tmp_path / "Qwen__Qwen3-VL-4B-Instruct" / "20250102_030405_results.json"
    assert written.exists()
    runs, problems = lb.collect([tmp_path])
    assert not problems
    vstar = runs["Qwen3-VL-4B-Instruct", "thinking"]["vstar"]
    assert (vstar.metrics, vstar.samples, vstar.file, vstar.date) == (
        {"attr": 75.0, "overall": 70.0}, 191, str(written), "20250102_030405"
    )  # fmt: skip


def test_metric_and_demo_task_names_agree_with_the_benchmark_modules() -> None:
    benchmarks = pytest.importorskip("p2r_recipe.lmms.benchmarks")
    demo = pytest.importorskip("p2r_recipe.toy.demo")
    assert set(lb.METRICS["V*"]) == {"overall", *benchmarks.VSTAR.categories}
    assert set(lb.METRICS["HR4K"]) == set(lb.METRICS["HR8K"]) == {"overall", *benchmarks.HRBENCH.categories}
    assert set(lb.METRICS["MME"]) == {"overall", *benchmarks.MME_CATEGORIES}
    assert set(lb.COSTS) <= set(benchmarks.metric_names(()))
    assert set(demo.DEMO_TASKS) == {task for task, (table, _) in lb.TASKS.items() if table == "demo"}


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "p2r_recipe.report.leaderboard", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done


def test_cli_writes_every_format_and_the_chart(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = run_cli(str(DATA), "--out-dir", str(out), "--baseline", "Qwen3-VL-4B-Instruct:default", "--sources", cwd=tmp_path)
    assert done.stdout.startswith("### V* and HR-Bench") and "| P2R-4B " in done.stdout
    for path in BROKEN:
        assert f"warning: skipped {path}" in done.stderr
    assert (out / "leaderboard.md").read_text().strip() == done.stdout.strip()

    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    p2r = [r for r in rows if (r["Table"], r["Model"], r["Mode"]) == ("main", "Qwen3-VL-4B-Instruct", "p2r")]
    assert [(r["Source"], r["V*"], r["Avg"], r["Boxes"], r["Out tokens"], r["Errors"]) for r in p2r] == [
        ("run", "92.1", "83.0", "2.17", "365", "4"),
        (lb.DELTA, "+11.5", "+9.1", "-", "+360", "+3"),
    ]
    assert str(QWEN / "20250303_120000_results.json") + " (vstar)" in p2r[0]["Sources"]
    assert str(QWEN / "20250302_090000_results.json") + " (hrbench_4k, hrbench_8k)" in p2r[0]["Sources"]
    assert all(r["P-OCR"] == "-" for r in rows if r["Table"] != "mme_lite")

    report = json.loads((out / "leaderboard.json").read_text())
    assert [t["name"] for t in report["tables"]] == ["main", "demo", "mme_lite"]
    assert len(report["skipped"]) == 4
    latex = (out / "leaderboard.tex").read_text()
    assert latex.count("\\begin{tabular}") == 3 and "$\\Delta$" in latex and "\\toprule" in latex
    with Image.open(out / "leaderboard.png") as png:
        assert png.format == "PNG" and png.width > 1000 and png.height > 1000  # two panels: main and demo


def test_cli_defaults_to_results_and_hides_published_rows(tmp_path: Path) -> None:
    shutil.copytree(QWEN, tmp_path / "results" / QWEN.name)
    done = run_cli("--no-published", "--format", "csv", "--baseline", "Nobody:default", cwd=tmp_path)
    rows = list(csv.DictReader(done.stdout.splitlines()))
    assert {r["Source"] for r in rows} == {"run"}
    assert {(r["Table"], r["Mode"]) for r in rows} == {("main", "default"), ("main", "p2r"), ("mme_lite", "default")}
    assert "warning: baseline Nobody:default: no such model:mode row" in done.stderr
    assert sorted(p.name for p in (tmp_path / "results").glob("leaderboard.*")) == [
        f"leaderboard.{suffix}" for suffix in ("csv", "json", "md", "png", "tex")
    ]
