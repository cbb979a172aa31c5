"""A V* run whose hub copy is missing stops, through the real lmms-eval CLI, naming both hub ids of V*."""

import lmms_cli
import pytest

from p2r_recipe.lmms import tasks
from p2r_recipe.lmms.benchmarks import VSTAR


def test_both_copies_are_known_and_the_maintained_one_is_tried_first():
    assert tasks.HUB_COPIES["lmms-lab-encoder/vstar-bench"] == VSTAR.datasets
    assert VSTAR.datasets == ("lmms-lab-encoder/vstar-bench", "lmms-lab/vstar-bench")


@pytest.mark.slow
@pytest.mark.parametrize("task", ["vstar", "vstar_circular"])
def test_a_missing_v_star_names_both_hub_ids_and_exits_non_zero(tmp_path, monkeypatch, task):
    # An empty Hugging Face cache and HF_HUB_OFFLINE=1 (lmms_cli sets it): no copy can load.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    process = lmms_cli.start(
        "--model", "p2r", "--model_args", "backend=openai,base_url=http://127.0.0.1:9/v1,served_model=none",
        "--tasks", task, "--output_path", str(tmp_path / "out"), cwd=tmp_path,
    )  # fmt: skip
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0, output[-3000:]
    assert f"p2r: task {task}: none of the hub copies of its dataset could be loaded" in output
    assert "  lmms-lab/vstar-bench: ConnectionError" in output
    assert "  lmms-lab-encoder/vstar-bench: ConnectionError" in output
    assert not list((tmp_path / "out").glob("**/*_results.json"))
