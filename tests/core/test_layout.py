"""The package's layout: floors that import only downward, no cycles, short modules, a small root, and a core
that meets the toy in one place only."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from paths import ROOT

PACKAGE = ROOT / "p2r_recipe"
# Ground floor, then the pieces built on it, then the adapters and the examples.
FLOORS = {
    "records": 0, "prompts": 0, "images": 0, "scoring": 0, "release": 0, "access": 0, "client": 0,
    "evidence": 1, "engines": 1, "pipeline": 1,
    "lmms": 2, "train": 2, "serving": 2, "report": 2, "toy": 2,
}  # fmt: skip
# The one sanctioned upward import: `p2r-tiny` resolved lazily (engines.resolve_pretrained, engines.is_toy).
LAZY_TOY = {"p2r_recipe.engines"}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported p2r_recipe module, at module level?) for every import in the file, function-level ones included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found += [(target, id(node) in top) for target in targets if target.startswith("p2r_recipe")]
    return found


def floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 1 else None


def test_every_root_module_and_subpackage_has_a_floor():
    named = {path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
    named |= {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert named == set(FLOORS)


def test_no_module_imports_one_above_it():
    upward = []
    for name, path in modules().items():
        mine = floor(name)
        for target, at_top in imports(name, path):
            theirs = floor(target)
            if mine is None or theirs is None or theirs <= mine:
                continue
            if name in LAZY_TOY and target.startswith("p2r_recipe.toy") and not at_top:
                continue
            upward.append(f"{name} -> {target}")
    assert upward == []


def test_no_import_cycles():
    graph = {name: set() for name in modules()}
    for name, path in modules().items():
        for target, _ in imports(name, path):
            while target and target not in graph:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                graph[name].add(target)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*trail, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*trail, node])):
                return cycle
        state[node] = 2
        return None

    cycles = [cycle for name in sorted(graph) if name not in state and (cycle := visit(name, []))]
    assert cycles == []


def test_modules_are_short_and_the_root_is_small():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}
    root = [path.stem for path in PACKAGE.glob("*.py") if path.stem != "__init__"]
    assert len(root) <= 9, root


def test_the_core_never_imports_the_toy_at_module_level():
    core = {name: path for name, path in modules().items() if not name.startswith("p2r_recipe.toy")}
    eager = [f"{name} -> {target}" for name, path in core.items()
             for target, at_top in imports(name, path) if target.startswith("p2r_recipe.toy") and at_top]  # fmt: skip
    lazy = {name for name, path in core.items() for target, at_top in imports(name, path)
            if target.startswith("p2r_recipe.toy") and not at_top}  # fmt: skip
    assert eager == [] and lazy <= LAZY_TOY


@pytest.mark.slow
def test_the_wheel_ships_every_task_file_and_package_asset(tmp_path):
    """A wheel (not only an editable install) holds every task YAML and template, the demo data, the toy's
    weights and the report's page: each non-Python file in these folders is package data."""
    # From a copy without build/ or *.egg-info: setuptools would take a stale file list from those.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "*.egg-info", "build", "results", "tests", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    [wheel] = tmp_path.glob("p2r_recipe-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    wanted = {
        path.relative_to(ROOT).as_posix()
        for folder in ("lmms_eval_tasks", "p2r_recipe/toy/tiny_weights", "p2r_recipe/report/static")
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc", ".md") and "__pycache__" not in path.parts
    }
    assert wanted and wanted <= shipped, sorted(wanted - shipped)
