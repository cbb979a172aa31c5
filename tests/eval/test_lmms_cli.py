"""The real `lmms-eval` CLI with `--model p2r` on the embedded demo: three modes, outputs, cache, openai backend."""

import lmms_cli
import pytest
from servers import ScriptedServer, start_p2r_serve

from p2r_recipe import prompts
from p2r_recipe.lmms import envelope
from p2r_recipe.toy.demo import DEMO_TASKS, SPLITS, load_records

CATEGORIES = {
    "p2r_demo_vstar": ("attr", "spatial"),
    "p2r_demo_hrbench_4k": ("fsp", "fcp"),
    "p2r_demo_hrbench_8k": ("fsp", "fcp"),
}
# Small images and token budgets keep a CPU run short; the random tiny model's answers are meaningless anyway.
FAST = "max_pixels=65536,max_new_tokens=8"


def evaluate(tmp_path, model_args: str, *extra: str, limit: int = 2, name: str = "run") -> lmms_cli.Outputs:
    out = tmp_path / name
    log = lmms_cli.run(
        "--model", "p2r", "--model_args", model_args, "--tasks", "p2r_demo", "--limit", str(limit),
        "--output_path", str(out), "--log_samples", *extra, cwd=tmp_path,
    )  # fmt: skip
    outputs = lmms_cli.read_outputs(out)
    outputs.log = log
    return outputs


def check_metrics(outputs: lmms_cli.Outputs, mode: str, limit: int) -> None:
    """The agreed metric names, accuracies in [0, 100] (null for a category no sample has), boxes only in p2r mode."""
    for task, categories in CATEGORIES.items():
        metrics = outputs.metrics(task)
        accuracy = {"overall", *categories}
        boxes = {"boxes", *(f"boxes_{c}" for c in categories)} if mode == "p2r" else set()
        assert set(metrics) == accuracy | boxes | {"output_tokens", "seconds_per_sample", "errors", "letter_bias"}
        scored = [metrics[m] for m in accuracy if metrics[m] is not None]
        assert all(0 <= value <= 100 for value in scored) and len(scored) == (3 if limit >= 2 else 2)
        assert metrics["errors"] == 0 and metrics["output_tokens"] > 0 and metrics["seconds_per_sample"] > 0
        assert outputs.results["n-samples"][task]["effective"] == limit
    assert 0 <= outputs.metrics("p2r_demo")["overall"] <= 100


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "thinking", "p2r"])
def test_three_modes_on_the_demo_with_the_tiny_model(tmp_path, tiny_model_dir, mode):
    outputs = evaluate(tmp_path, f"pretrained={tiny_model_dir},mode={mode},{FAST}")
    check_metrics(outputs, mode, limit=2)
    assert f"mode={mode}" in outputs.results["config"]["model_args"]
    assert "tiny toy model (random, or trained on synthetic scenes only): its scores are not a benchmark result" in outputs.log
    for task in CATEGORIES:
        records = [envelope.unwrap(sample["filtered_resps"]) for sample in outputs.samples[task]]
        assert len(records) == 2 and all(r["mode"] == mode and r["error"] is None for r in records)
        if mode == "p2r":
            assert all(isinstance(r["perceiver_output"], str) and isinstance(r["boxes"], list) for r in records)
        else:
            assert all(r["perceiver_output"] is None for r in records)


def scripted(body: dict) -> str:
    """A perceiver that always marks two regions, and a reasoner that always answers A."""
    text = body["messages"][-1]["content"][-1]["text"]
    if prompts.PERCEIVE_INSTRUCTION in text:
        return '[{"bbox_2d": [100, 100, 300, 300], "label": "a"}, {"bbox_2d": [600, 600, 700, 650], "label": "b"}]'
    return "<think>The first option.</think><answer>A</answer>"


@pytest.mark.slow
def test_known_answers_are_scored_exactly_and_use_cache_replays_them_without_model_calls(tmp_path):
    limit = 3
    with ScriptedServer(scripted) as server:
        model_args = f"backend=openai,base_url={server.base_url},served_model=scripted,mode=p2r,max_pixels=65536"
        cache = ("--use_cache", str(tmp_path / "cache"))
        first = evaluate(tmp_path, model_args, *cache, limit=limit, name="first")
        assert server.calls == 2 * limit * len(CATEGORIES)  # perceive + reason per sample
        second = evaluate(tmp_path, model_args, *cache, limit=limit, name="second")
        assert server.calls == 2 * limit * len(CATEGORIES)  # all served from lmms-eval's cache

    check_metrics(first, "p2r", limit)
    for task, split in DEMO_TASKS.items():
        benchmark = SPLITS[split].benchmark
        expected = benchmark.aggregate([benchmark.item(doc, "A", boxes=2) for doc in load_records(split)[:limit]])
        got = first.metrics(task)
        for metric in ("overall", *CATEGORIES[task], "boxes"):
            assert got[metric] == pytest.approx(expected[metric]), metric
        # The cached replay restores whole records, so even the cost metrics come back unchanged.
        assert second.metrics(task) == got
        records = [envelope.unwrap(s["filtered_resps"]) for s in second.samples[task]]
        assert all(r["box_count"] == 2 and r["answer"] == "A" for r in records)


@pytest.mark.slow
def test_openai_backend_against_p2r_serve(tmp_path, tiny_model_dir):
    with start_p2r_serve(tiny_model_dir, api_key="test-key-123", served_name="tiny") as serve:
        model_args = f"backend=openai,base_url={serve.base_url},served_model=tiny,api_key=test-key-123,mode=p2r,{FAST}"
        outputs = evaluate(tmp_path, model_args, limit=1)
    check_metrics(outputs, "p2r", limit=1)
    records = [envelope.unwrap(s["filtered_resps"]) for task in CATEGORIES for s in outputs.samples[task]]
    assert len(records) == 3 and all(r["perceiver_output"] is not None and r["output_tokens"] > 0 for r in records)
    assert "test-key-123" not in str(outputs.results)  # lmms-eval redacts the key in what it writes
