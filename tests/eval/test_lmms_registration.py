"""Registration with lmms-eval: the `p2r` entry point, and our tasks answering to the documented names.

If a new lmms-eval changes how plugins or task folders are found, these fail loudly.
"""

import re
from importlib.metadata import entry_points

import lmms_cli
import pytest

from p2r_recipe.lmms.registration import MODEL_ID, tasks_dir

OUR_TASKS = (
    "vstar", "hrbench_4k", "hrbench_8k", "mmerealworld_p2r", "mmerealworld_lite_p2r",
    "p2r_demo_vstar", "p2r_demo_hrbench_4k", "p2r_demo_hrbench_8k",
)  # fmt: skip


def test_the_entry_point_registers_the_p2r_model():
    [ep] = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == MODEL_ID]
    manifest = ep.load()()
    assert manifest.model_id == "p2r" and manifest.simple_class_path == "p2r_recipe.lmms.model.P2R"

    from lmms_eval.models import get_model

    from p2r_recipe.lmms.model import P2R

    assert get_model("p2r") is P2R and P2R.is_simple


def config_locations(listing: str) -> dict[str, str]:
    """Name -> config path from lmms-eval's `--tasks list_groups` / `list_subtasks` markdown tables."""
    rows = re.findall(r"^\|([\w-]+)\s*\|([^|]+\.yaml)\s*\|", listing, re.MULTILINE)
    return {name: path.strip() for name, path in rows}


@pytest.mark.slow
def test_documented_task_names_resolve_to_our_yaml_files(tmp_path):
    # Three real CLI invocations, run side by side: each spends ~10 s indexing lmms-eval's tasks.
    with_p2r = lmms_cli.start("--model", "p2r", "--tasks", "list_groups", cwd=tmp_path)
    other_model = lmms_cli.start("--model", "qwen3_vl", "--tasks", "list_groups", cwd=tmp_path)
    names = lmms_cli.start("--tasks", "list", cwd=tmp_path)

    groups = config_locations(lmms_cli.finish(with_p2r))
    assert groups["hrbench"] == str(tasks_dir() / "hrbench" / "hrbench.yaml")
    assert groups["p2r_demo"] == str(tasks_dir() / "p2r_demo" / "p2r_demo.yaml")

    # Other models keep lmms-eval's own (GPT-judged) `hrbench`; our other names are added for everyone.
    groups = config_locations(lmms_cli.finish(other_model))
    assert groups["hrbench"] == "lmms_eval/tasks/hrbench/hrbench.yaml"
    assert groups["p2r_demo"] == str(tasks_dir() / "p2r_demo" / "p2r_demo.yaml")

    listed = set(re.findall(r"^ - (\S+)$", lmms_cli.finish(names), re.MULTILINE))
    assert set(OUR_TASKS) | {"hrbench", "p2r_demo"} <= listed
