"""The `p2r` lmms-eval model in process: real lmms-eval Instances and Collator, a real HTTP chat server."""

import json

import pytest
from lmms_eval.api.instance import GenerationResult, Instance
from PIL import Image
from servers import ScriptedServer, free_port

from p2r_recipe import prompts
from p2r_recipe.lmms import envelope
from p2r_recipe.lmms.model import P2R, guess_answer_form

BOXES = (
    '[{"bbox_2d": [100, 100, 300, 300], "label": "the cup"}, {"bbox_2d": [500, 500, 700, 700], "label": "the sign"}]'
)


def scripted(body: dict) -> str:
    text = body["messages"][-1]["content"][-1]["text"]
    if prompts.PERCEIVE_INSTRUCTION in text:
        return BOXES
    return "<think>It is blue.</think><answer>B</answer>"


def model(base_url: str, mode: str = "p2r", **kwargs) -> P2R:
    return P2R(backend="openai", base_url=base_url, served_model="scripted", mode=mode, max_pixels=65536, **kwargs)


def request(
    task: str, doc_id: int, context: str, gen_kwargs: dict, doc_to_visual=lambda doc: [doc["image"]]
) -> Instance:
    args = (context, gen_kwargs, doc_to_visual, doc_id, task, "test")
    return Instance("generate_until", args, idx=0, metadata={"task": task, "doc_id": doc_id, "repeats": 1})


def broken_visual(doc):
    raise OSError("image file is truncated")


def test_generate_until_answers_our_tasks_with_records_and_other_tasks_with_text():
    docs = [{"image": Image.new("RGB", (640, 480), colour)} for colour in ("white", "blue", "gray")]
    mcq = "<image>\nWhat colour is the cup?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly."
    requests = [
        request("other_mcq", 0, mcq, {"until": ["\n\n"], "max_new_tokens": 16}),
        request("ours", 1, "What colour is the cup?\n(A) red\n(B) blue", {"until": ["\n\n"], "p2r_answer_form": "mca"}),
        request("other_open", 2, "Describe the picture.", {"until": ["\n\n"]}),
        request("other_mcq", 2, mcq, {"until": ["\n\n"], "max_new_tokens": 16}, doc_to_visual=broken_visual),
        request("ours", 0, "Which?\nA. x\nB. y", {"p2r_answer_form": "mca"}, doc_to_visual=broken_visual),
    ]
    with ScriptedServer(scripted) as server:
        lm = model(server.base_url, concurrency=2)
        lm.task_dict = {task: {"test": docs} for task in ("other_mcq", "ours", "other_open")}
        replies = lm.generate_until(requests)

    assert all(isinstance(r, GenerationResult) for r in replies)
    assert replies[0].text == "B" and replies[2].text == "B"
    assert replies[3].text == ""  # a failed sample: scored wrong by its task, never cached
    failed = envelope.unwrap(replies[4].text)
    assert failed["error"] == "image: OSError: image file is truncated" and failed["perceiver_output"] is None
    record = envelope.unwrap(replies[1].text)
    assert record["id"] == "ours/1" and record["mode"] == "p2r" and record["answer"] == "B"
    assert record["perceiver_output"] == BOXES and record["box_count"] == 2 and record["has_evidence"]
    assert replies[1].token_counts.output_tokens == record["output_tokens"] > 0
    # 3 samples with an image, two passes each; the open question was asked for a free-form answer.
    assert server.calls == 6
    reason_texts = [body["messages"][-1]["content"][-1]["text"] for body in server.requests]
    assert sum(prompts.reasoning_post_prompt("free_form") in t for t in reason_texts) == 1
    assert sum(prompts.reasoning_post_prompt("mca") in t for t in reason_texts) == 2
    assert not any("<image>" in t for t in reason_texts)


def test_default_mode_sends_one_direct_prompt_per_sample():
    doc = {"image": Image.new("RGB", (320, 240), "white")}
    with ScriptedServer(lambda body: "B") as server:
        lm = model(server.base_url, mode="default")
        lm.task_dict = {"ours": {"test": [doc]}}
        [reply] = lm.generate_until([request("ours", 0, "Which?\nA. x\nB. y", {"p2r_answer_form": "mca"})])
    assert envelope.unwrap(reply.text)["answer"] == "B"
    assert json.loads(json.dumps(server.requests[0]))["messages"][-1]["content"][-1]["text"] == prompts.direct_text(
        "Which?\nA. x\nB. y", "mca"
    )


def test_a_service_that_stays_down_stops_the_run_with_a_clear_error():
    lm = model(f"http://127.0.0.1:{free_port()}", retries=1, backoff_s=0.01)
    lm.task_dict = {"ours": {"test": [{"image": Image.new("RGB", (64, 64))}]}}
    with pytest.raises(SystemExit, match="127.0.0.1"):
        lm.generate_until([request("ours", 0, "Which?\nA. x\nB. y", {"p2r_answer_form": "mca"})])


def test_arguments_are_checked_before_any_model_is_loaded():
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        P2R(pretrained="p2r-tiny", mode="fast")
    with pytest.raises(ValueError, match="base_url"):
        P2R(backend="openai", served_model="x")
    with pytest.raises(ValueError, match="pretrained is required"):
        P2R()
    with pytest.raises(ValueError, match="batch_size"):
        P2R(pretrained="p2r-tiny", batch_size="auto")
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        model("http://127.0.0.1:9").loglikelihood([])


# The release's evaluation decoding, transcribed from ../shared/p2r_release_addendum.md section 1
# (evaluation/batch_inference_vllm.py MAX_TOKENS and SamplingParams, run_eval_batch.sh), not from our code:
# mode -> {pass: (max_tokens, temperature, top_p, top_k, repetition_penalty, stop)}; top_k 0 = off.
RELEASE = {
    "default": {"answer": (16, 0.0, 1.0, 0, 1.05, ())},
    "thinking": {"answer": (1024, 0.0, 1.0, 0, 1.05, ())},
    "p2r": {"perceive": (256, 0.0, 1.0, 0, 1.05, ()), "answer": (1024, 0.0, 1.0, 0, 1.05, ())},
}


def settings(params) -> tuple:
    return (params.max_new_tokens, params.temperature, params.top_p, params.top_k, params.repetition_penalty, params.stop)


@pytest.mark.parametrize("mode", RELEASE)
def test_default_decoding_is_the_releases(mode):
    lm = model("http://127.0.0.1:9", mode=mode)
    assert settings(lm.params) == RELEASE[mode]["answer"]
    if mode == "p2r":
        assert settings(lm.perceive_params) == RELEASE[mode]["perceive"]
    assert lm.image_mode == "release" and lm.params.min_new_tokens == 0 and lm.params.seed is None


def test_decoding_model_args():
    lm = model("http://127.0.0.1:9", max_new_tokens=64)
    assert (lm.params.max_new_tokens, lm.perceive_params.max_new_tokens) == (64, 64)  # a smaller cap covers both
    lm = model("http://127.0.0.1:9", max_new_tokens=64, perceive_max_new_tokens=16)
    assert (lm.params.max_new_tokens, lm.perceive_params.max_new_tokens) == (64, 16)
    lm = model("http://127.0.0.1:9", max_new_tokens=4096)
    assert (lm.params.max_new_tokens, lm.perceive_params.max_new_tokens) == (4096, 256)
    # As lmms-eval's model_args parser hands them over: numbers parsed, strings as written.
    lm = model("http://127.0.0.1:9", temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1, stop="</answer>|Question:")
    assert settings(lm.params)[1:] == settings(lm.perceive_params)[1:] == (0.7, 0.9, 20, 1.0, ("</answer>", "Question:"))
    with pytest.raises(ValueError, match="unknown image_mode 'raw'"):
        model("http://127.0.0.1:9", image_mode="raw")


def test_the_perceive_pass_decodes_as_the_reasoner_unless_its_own_arguments_say_otherwise():
    url = "http://127.0.0.1:9"
    lm = model(url, perceiver_base_url=url, perceiver_served_model="perceiver")
    assert settings(lm.params) == RELEASE["p2r"]["answer"] and settings(lm.perceive_params) == RELEASE["p2r"]["perceive"]
    lm = model(url, temperature=0.7, stop="</answer>", perceiver_top_k=5, perceiver_stop="]|Question:")
    assert settings(lm.params) == (1024, 0.7, 1.0, 0, 1.05, ("</answer>",))
    assert settings(lm.perceive_params) == (256, 0.7, 1.0, 5, 1.05, ("]", "Question:"))
    assert lm.perceiver_engine is None  # decoding alone needs no second engine


@pytest.mark.parametrize(
    "question, expected",
    [("Which one?\nA. red\nB. blue", ("mca", "AB")),
     ("Which one?\n(A) red\n(B) blue\n(C) green\n(D) white\n(E) none", ("mca", "ABCDE")),
     ("Pick:\nA) yes\nB) no", ("mca", "AB")),
     ("What is written on the sign?", ("free_form", "ABCD")),
     ("A dog sits here. What is it doing?", ("free_form", "ABCD"))],
)  # fmt: skip
def test_guess_answer_form(question, expected):
    assert guess_answer_form(question) == expected


def test_record_cache_resumes_without_recomputing(tmp_path):
    docs = [{"image": Image.new("RGB", (320, 240), colour)} for colour in ("white", "blue", "gray", "red")]
    question = "What colour is the cup?\n(A) red\n(B) blue"
    requests = [request("ours", i, question, {"p2r_answer_form": "mca"}) for i in range(4)]
    journal = tmp_path / "records.jsonl"
    with ScriptedServer(scripted) as server:
        first = model(server.base_url, concurrency=2, record_cache=str(journal))
        first.task_dict = {"ours": {"test": docs}}
        first_replies = first.generate_until(requests[:2])  # the run is killed after two samples
        calls = server.calls
        again = model(server.base_url, concurrency=2, record_cache=str(journal))
        again.task_dict = {"ours": {"test": docs}}
        replies = again.generate_until(requests)
        assert server.calls - calls == 2 * 2  # perceive + reason for the two samples not yet done
    assert [r.text for r in replies[:2]] == [r.text for r in first_replies]
    assert len(journal.read_text().splitlines()) == 4
    assert all(envelope.unwrap(r.text)["prediction"] == "B" for r in replies)


def test_a_server_that_refuses_the_penalty_stops_the_run_naming_it():
    refuse = lambda body: (400, "extra fields not permitted: repetition_penalty")
    with ScriptedServer(refuse) as server:
        lm = model(server.base_url, mode="default")
        lm.task_dict = {"ours": {"test": [{"image": Image.new("RGB", (64, 64))}]}}
        with pytest.raises(SystemExit, match="does not accept `repetition_penalty`"):
            lm.generate_until([request("ours", 0, "Which?\nA. x\nB. y", {"p2r_answer_form": "mca"})])
