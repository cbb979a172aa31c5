"""`accelerate launch --num_processes 2 -m lmms_eval --model p2r`: each process answers its share, the results equal one process's."""

import sys
from pathlib import Path

import lmms_cli
import pytest
from servers import ScriptedServer, free_port

from p2r_recipe import prompts
from p2r_recipe.lmms import envelope

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
TASKS = ("p2r_demo_vstar", "p2r_demo_hrbench_4k", "p2r_demo_hrbench_8k")
LIMIT = 2  # per task: 6 requests, 3 for each of 2 processes


def evaluate(tmp_path: Path, model_args: str, processes: int, name: str = "") -> lmms_cli.Outputs:
    out = tmp_path / f"{name}np{processes}"
    args = ["--model", "p2r", "--model_args", model_args,
            "--tasks", "p2r_demo", "--limit", str(LIMIT), "--batch_size", "8", "--output_path", str(out), "--log_samples"]  # fmt: skip
    if processes == 1:
        log = lmms_cli.run(*args, cwd=tmp_path)
    else:
        # --multi_gpu on a machine without GPUs is accelerate's CPU path: torchrun processes over gloo.
        launch = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                  "-m", "lmms_eval"]  # fmt: skip
        log = lmms_cli.run(*args, cwd=tmp_path, timeout_s=600, launcher=launch, unset_env=["CUDA_VISIBLE_DEVICES"])
    outputs = lmms_cli.read_outputs(out)
    outputs.log = log
    return outputs


def comparable(outputs: lmms_cli.Outputs, task: str) -> tuple[dict, list]:
    """A task's metrics and per-document records, without the timings that differ between any two runs."""
    metrics = {k: v for k, v in outputs.metrics(task).items() if k != "seconds_per_sample"}
    records = []
    for sample in sorted(outputs.samples[task], key=lambda s: s["doc_id"]):
        record = envelope.unwrap(sample["filtered_resps"])
        records.append((sample["doc_id"], sample["target"], {k: v for k, v in record.items() if k != "latency_s"}))
    return metrics, records


@pytest.mark.slow
def test_two_cpu_processes_split_the_work_and_equal_one_process(tmp_path, tiny_model_dir):
    model_args = f"pretrained={tiny_model_dir},mode=p2r,max_pixels=65536,max_new_tokens=8"
    one = evaluate(tmp_path, model_args, 1)
    two = evaluate(tmp_path, f"{model_args},record_cache={tmp_path / 'journal.jsonl'}", 2)
    # One journal per rank, each with that rank's finished samples.
    journals = sorted(path.name for path in tmp_path.glob("journal.jsonl*"))
    assert journals == ["journal.jsonl.rank0of2", "journal.jsonl.rank1of2"]
    assert [len((tmp_path / name).read_text().splitlines()) for name in journals] == [3, 3]

    # Each process answered its own half: the work was split, not repeated.
    assert "rank 0 of 2 answers 3 requests" in two.log and "rank 1 of 2 answers 3 requests" in two.log
    assert "answers 6 requests" not in two.log
    for task in TASKS:
        assert two.results["n-samples"][task] == one.results["n-samples"][task]
        assert two.results["n-samples"][task]["effective"] == LIMIT
        metrics, records = comparable(two, task)
        assert (metrics, records) == comparable(one, task)
        # Each document's record is its own (ids and prompt sizes differ between documents).
        assert [r[2]["id"] for r in records] == [f"{task}/{i}" for i in range(LIMIT)]
        assert all(r[2]["error"] is None for r in records)
    assert len({r[2]["input_tokens"] for task in TASKS for r in comparable(two, task)[1]}) > 1
    group = [{k: v for k, v in run.metrics("p2r_demo").items() if k != "seconds_per_sample"} for run in (one, two)]
    assert group[0] == group[1]


def scripted(body: dict) -> str:
    """Two boxes from the perceiver; the reasoner's letter depends on the question, so scores differ by document."""
    text = body["messages"][-1]["content"][-1]["text"]
    if prompts.PERCEIVE_INSTRUCTION in text:
        return '[{"bbox_2d": [100, 100, 300, 300], "label": "a"}, {"bbox_2d": [600, 600, 700, 650], "label": "b"}]'
    return f"<answer>{'ABCD'[sum(map(ord, text)) % 4]}</answer>"


@pytest.mark.slow
def test_two_processes_share_one_openai_server_and_score_as_one(tmp_path):
    with ScriptedServer(scripted) as server:
        model_args = f"backend=openai,base_url={server.base_url},served_model=scripted,mode=p2r,max_pixels=65536"
        one = evaluate(tmp_path, model_args, 1, "openai")
        calls_one = server.calls
        two = evaluate(tmp_path, model_args, 2, "openai")
    samples = LIMIT * len(TASKS)
    assert calls_one == server.calls - calls_one == 2 * samples  # perceive + reason once per sample: no rank repeats one
    for task in TASKS:
        assert comparable(two, task) == comparable(one, task)
    scores = [comparable(one, task)[0]["overall"] for task in TASKS]
    assert any(score > 0 for score in scores) and any(score < 100 for score in scores)  # right and wrong answers


def test_each_vllm_process_takes_its_own_gpus_and_data_parallel_size_must_match_the_processes():
    from p2r_recipe.lmms.model import P2R, gpu_slice

    assert gpu_slice(0, 1, "0,1,2,3") == "0" and gpu_slice(3, 1, "0,1,2,3") == "3"
    assert gpu_slice(1, 2, "4,5,6,7") == "6,7"  # tensor parallel 2: process 1 takes the second pair
    with pytest.raises(ValueError, match=r"process 2 needs GPUs 4..5 \(tensor_parallel_size 2 each\), only 4 visible"):
        gpu_slice(2, 2, "0,1,2,3")
    # One process cannot be 2 replicas; the message says how to start them (before vLLM is ever imported).
    with pytest.raises(ValueError, match="data_parallel_size=2 but 1 process.*accelerate launch --num_processes 2"):
        P2R(pretrained="p2r-tiny", backend="vllm", data_parallel_size="2")
