"""reward_func for both roles against real HTTP services on 127.0.0.1 (scripted answers, and p2r-serve with the tiny model)."""

from __future__ import annotations

import json
import logging

import pytest
import rollouts
from PIL import Image
from rollouts import BOX, TWO_BOXES, chat_prompt, configure, query, reasoner, verifier
from servers import ScriptedServer, start_p2r_serve

from p2r_recipe import prompts
from p2r_recipe.client import ServiceUnavailable
from p2r_recipe.evidence import gather_evidence
from p2r_recipe.images import data_url, fit_to_budget, load_image
from p2r_recipe.scoring import VERIFIER_PARAMS
from p2r_recipe.train.reward import FAILURES, RewardConfig, response_text, reward_func, rewarder


def score(sample, response: str) -> tuple[float, dict]:
    prompt = chat_prompt(sample)
    result = reward_func([query(prompt, response)], [prompt], [sample.to_label()])
    assert result["rewards"].shape == (1,) and result["scores"].tolist() == result["rewards"].tolist()
    return result["rewards"].item(), {name: value.item() for name, value in result["extra_logs"].items()}


def flags(logs: dict) -> set[str]:
    return {code for code in FAILURES if logs[code]}


def test_perceiver_correct_answer_from_evidence(tmp_path, monkeypatch):
    sample = rollouts.sample(tmp_path, form="mca")
    with ScriptedServer(reasoner("A", "C")) as server:
        configure(monkeypatch, "perceiver", reasoner=server)
        reward, logs = score(sample, BOX)
    assert reward == 1.0 and logs["box_count"] == 1 and logs["no_evidence"] == 0 and not flags(logs)
    body = server.requests[0]
    assert rollouts.image_count(body) == 2  # annotated image + one crop
    assert rollouts.user_text(body) == prompts.reason_text(sample.question, "mca", True, training=True)
    # The release's request and nothing else: system as a plain string, max_tokens 2048, temperature 0.
    assert set(body) == {"model", "messages", "max_tokens", "temperature"} and body["model"] == "scripted"
    assert (body["max_tokens"], body["temperature"]) == (2048, 0)
    assert body["messages"][0] == {"role": "system", "content": prompts.SYSTEM_PROMPT}
    # Evidence from the full-resolution original, each image fitted to 4,096..2,097,152 pixels, JPEG quality 75.
    found = gather_evidence(load_image(sample.image), BOX).images
    expected = [fit_to_budget(im, 2_097_152, 4_096) for im in found]
    assert sent_urls(body) == [data_url(im, quality=75) for im in expected]


def sent_urls(body: dict) -> list[str]:
    return [p["image_url"]["url"] for p in body["messages"][-1]["content"] if p["type"] == "image_url"]


def test_small_image_is_enlarged_to_the_release_minimum(tmp_path, monkeypatch):
    sample = rollouts.sample(tmp_path, form="mca")
    Image.open(sample.image).resize((40, 30)).save(sample.image)  # 1,200 pixels
    with ScriptedServer(reasoner("A", "A")) as server:
        configure(monkeypatch, "perceiver", reasoner=server)
        score(sample, "[]")
    # smart_resize with min 4,096 (the release's); our evaluation minimum, 16,384, would give 160x128.
    assert load_image(sent_urls(server.requests[0])[0]).size == (96, 64)


def test_perceiver_wrong_answer_scores_zero_without_a_flag(tmp_path, monkeypatch):
    sample = rollouts.sample(tmp_path, form="mca")
    with ScriptedServer(reasoner("B", "B")) as server:
        configure(monkeypatch, "perceiver", reasoner=server)
        reward, logs = score(sample, TWO_BOXES)
    assert reward == 0.0 and logs["box_count"] == 2 and not flags(logs)
    assert rollouts.image_count(server.requests[0]) == 3


@pytest.mark.parametrize(
    "response, code",
    [
        ('[{"bbox_2d": [0, 0, 500, 500], "label": "a"}, {"bbox_2d": [10, 10, 510, 510], "label": "b"}]', "iou_penalty"),
        ('[{"bbox_2d": [0, 0, 500, 500], "label": "description"}]', "label_penalty"),
        ('[{"bbox_2d": [0, 0, 500, 500], "label": "a"}, {"bbox_2d": [600, 600, 700, 700], "label": " Description\\n"}]', "label_penalty"),
        ('[{"bbox_2d": [0, 0, 500, 500], "label": "DESCRIPTION"}]', "label_penalty"),
        ('[{"bbox_2d": [0, 0, 500, 500]}]', "label_penalty"),
        ('[{"bbox_2d": [0, 0, 500, 500], "label": null}]', "label_penalty"),
        ('[{"bbox_2d": [0, 0, 500, 500], "label": ""}]', "label_penalty"),
        ('[{"bbox_2d": [0, 0, 500, 500], "label": 0}]', "label_penalty"),
        ('[{"bbox_2d": [0, 0, 500, 500], "label": 7}]', "label_penalty"),  # ours: the release raises here
        ('[{"bbox_2d": [0, 0, 500, 500], "label": ["a"]}]', "label_penalty"),
        # IoU on the coordinates as written: clamped to 0..1000 these two would barely overlap
        ('[{"bbox_2d": [900, 0, 1900, 100], "label": "a"}, {"bbox_2d": [950, 0, 1900, 100], "label": "b"}]', "iou_penalty"),
        # every valid box counts, not only the three that are cropped
        ('[' + ", ".join(f'{{"bbox_2d": [{i * 100}, 0, {i * 100 + 50}, 50], "label": "r{i}"}}' for i in range(4))
         + ', {"bbox_2d": [300, 0, 349, 50], "label": "again"}]', "iou_penalty"),
        # the IoU rule comes first
        ('[{"bbox_2d": [0, 0, 500, 500], "label": ""}, {"bbox_2d": [0, 0, 500, 490], "label": "b"}]', "iou_penalty"),
    ],
)
def test_perceiver_box_penalties_skip_the_reasoner(tmp_path, monkeypatch, response, code):
    sample = rollouts.sample(tmp_path, form="mca")
    with ScriptedServer(reasoner("A", "A")) as server:
        configure(monkeypatch, "perceiver", reasoner=server)
        reward, logs = score(sample, response)
    assert reward == 0.0 and flags(logs) == {code} and server.calls == 0


@pytest.mark.parametrize(
    "label, pairs",
    [
        ('" "', "IoU exactly 0.5"),  # whitespace-only passes, as in the release
        ('"<description>"', "IoU exactly 0.5"),
        ('"a description of the cup"', "IoU exactly 0.5"),
    ],
)
def test_labels_and_overlaps_the_release_lets_through(tmp_path, monkeypatch, label, pairs):
    sample = rollouts.sample(tmp_path, form="mca")
    # IoU of these two is exactly 0.5: the release's rule is strictly greater.
    response = f'[{{"bbox_2d": [0, 0, 100, 100], "label": {label}}}, {{"bbox_2d": [0, 0, 100, 50], "label": "b"}}]'
    with ScriptedServer(reasoner("A", "C")) as server:
        configure(monkeypatch, "perceiver", reasoner=server)
        reward, logs = score(sample, response)
    assert reward == 1.0 and not flags(logs) and server.calls == 1, pairs


@pytest.mark.parametrize("response", ["[]", "I cannot find anything.", '[{"bbox_2d": [500, 500, 400, 600], "label": "x"}]'])
def test_perceiver_without_valid_box_falls_back_to_the_original_image(tmp_path, monkeypatch, response):
    sample = rollouts.sample(tmp_path, form="mca")
    with ScriptedServer(reasoner("C", "A")) as server:
        configure(monkeypatch, "perceiver", reasoner=server)
        reward, logs = score(sample, response)
    assert reward == 1.0 and logs["no_evidence"] == 1 and logs["box_count"] == 0 and not flags(logs)
    body = server.requests[0]
    assert rollouts.image_count(body) == 1
    assert rollouts.user_text(body) == prompts.reason_text(sample.question, "mca", False, training=True)


def test_perceiver_free_form_goes_through_the_verifier(tmp_path, monkeypatch):
    sample = rollouts.sample(tmp_path, form="free_form")
    with ScriptedServer(reasoner(sample.answer, "no idea")) as reason, ScriptedServer(verifier) as judge:
        configure(monkeypatch, "perceiver", reasoner=reason, verifier=judge)
        assert score(sample, BOX)[0] == 1.0
        assert score(sample, "[]")[0] == 0.0
    assert judge.calls == 2
    body = judge.requests[0]
    assert set(body) == {"model", "messages", *VERIFIER_PARAMS}
    assert (body["max_tokens"], body["temperature"], body["chat_template_kwargs"]) == (64, 0, {"enable_thinking": False})
    assert body["messages"][0] == {"role": "system", "content": "You are a helpful grading assistant."}
    assert f"Predicted answer: {sample.answer}\n" in rollouts.user_text(body)
    assert rollouts.user_text(reason.requests[0]).endswith(prompts.reasoning_post_prompt("free_form", training=True))


@pytest.mark.parametrize("reply, expected", [("Yes.", 1.0), ("no, it is blue", 0.0), ("<think>yes?</think>\nYes", 1.0)])
def test_reasoner_free_form_verdicts(tmp_path, monkeypatch, reply, expected):
    sample = rollouts.sample(tmp_path, form="free_form")
    with ScriptedServer(lambda body: reply) as judge:
        configure(monkeypatch, "reasoner", verifier=judge)
        reward, logs = score(sample, "<think>hm</think><answer>a square</answer>")
    assert reward == expected and not flags(logs)


def test_verifier_reply_without_a_leading_verdict_is_flagged(tmp_path, monkeypatch):
    sample = rollouts.sample(tmp_path, form="free_form")
    with ScriptedServer(lambda body: "The prediction matches, so yes.") as judge:
        configure(monkeypatch, "reasoner", verifier=judge)
        reward, logs = score(sample, "<answer>a square</answer>")
    assert reward == 0.0 and flags(logs) == {"verifier_unparsed"}


@pytest.mark.parametrize(
    "form, response, expected, flagged",
    [
        ("mca", "<think>x</think><answer>A</answer>", 1.0, set()),
        ("mca", "<think>x</think><answer>The answer is (B)</answer>", 0.0, set()),
        ("na", "<answer>1.0</answer>", 1.0, set()),
        ("na", "<answer>2</answer>", 0.0, set()),
    ],
)
def test_reasoner_scores_its_own_answer_without_services(tmp_path, monkeypatch, form, response, expected, flagged):
    sample = rollouts.sample(tmp_path, form=form, box_count=2, has_evidence=True)
    configure(monkeypatch, "reasoner")  # both services on dead ports: none may be called
    reward, logs = score(sample, response)
    assert reward == expected and flags(logs) == flagged
    assert logs["box_count"] == 2 and logs["no_evidence"] == 0


@pytest.mark.parametrize(
    "form, truth, response, expected, untagged",
    [
        # No <answer> tags: the whole reply is the answer (the evaluation rule would score it wrong).
        ("mca", "B", "I think it is B.", 1.0, 1),
        ("mca", "A", "   A   ", 1.0, 1),
        ("na", "1", "1", 1.0, 1),
        ("mca", "B", "<answer>B", 1.0, 1),  # unclosed: no tags, so the whole text
        # Tags are case-sensitive: <ANSWER> is no tag, so the first capital A-E of the whole text counts (the A of ANSWER).
        ("mca", "B", "<ANSWER>B</ANSWER>", 0.0, 1),
        ("mca", "B", "<answer>B</answer><answer>C</answer>", 1.0, 0),  # the first tags
        # Letters A-E whatever the question lists; the truth stripped and upper-cased, then compared exactly.
        ("mca", "E", "<answer>E</answer>", 1.0, 0),
        ("mca", " e ", "<answer>The answer is E</answer>", 1.0, 0),
        ("mca", "(B)", "<answer>B</answer>", 0.0, 0),
        ("mca", "B", "<answer>" + "word " * 11 + "</answer>", 0.0, 0),
        # Numbers through mathruler: it accepts these ...
        ("na", "0.5", "<answer>1/2</answer>", 1.0, 0),
        ("na", "3", "<answer>3 cm</answer>", 1.0, 0),
        # ... and not these, which the evaluation's math-verify would accept.
        ("na", "0.5", "<answer>50%</answer>", 0.0, 0),
        ("na", "1000", "<answer>10^{3}</answer>", 0.0, 0),
        # Any other answer form scores 0, whatever the answer.
        ("yes_no", "yes", "<answer>yes</answer>", 0.0, 0),
    ],
)
def test_training_answer_rules_are_the_releases(tmp_path, monkeypatch, form, truth, response, expected, untagged):
    sample = rollouts.sample(tmp_path, form="mca", answer=truth, answer_form=form)
    configure(monkeypatch, "reasoner")  # no service may be called
    reward, logs = score(sample, response)
    assert (reward, logs["untagged"]) == (expected, untagged) and not flags(logs)


def test_reasoner_reply_without_tags_is_scored_whole(tmp_path, monkeypatch):
    sample = rollouts.sample(tmp_path, form="mca")
    with ScriptedServer(lambda body: "Looking at the crop, the square is red, so (A).") as server:
        configure(monkeypatch, "perceiver", reasoner=server)
        reward, logs = score(sample, BOX)
    assert (reward, logs["untagged"]) == (1.0, 1)


def test_batch_requests_overlap(tmp_path, monkeypatch):
    samples = [rollouts.sample(tmp_path, i, form="mca") for i in range(8)]
    with ScriptedServer(reasoner("A", "A"), latency_s=0.3) as server:
        configure(monkeypatch, "perceiver", reasoner=server)
        prompt = [chat_prompt(s) for s in samples]
        result = reward_func([query(p, BOX) for p in prompt], prompt, [s.to_label() for s in samples])
    assert result["rewards"].tolist() == [1.0] * 8 and result["extra_logs"]["box_count"].tolist() == [1.0] * 8
    assert server.max_in_flight == 8  # all eight in flight together, not one after another


@pytest.mark.parametrize("role, form, down", [("perceiver", "mca", "reasoner"), ("reasoner", "free_form", "verifier")])
def test_service_down_raises_naming_it(tmp_path, monkeypatch, caplog, role, form, down):
    sample = rollouts.sample(tmp_path, form=form)
    configure(monkeypatch, role)
    unavailable = f"{down} service at http://127.0.0.1:\\d+/v1/ unavailable after 2 attempts"
    with caplog.at_level(logging.ERROR, logger="p2r_recipe.train.reward"), pytest.raises(ServiceUnavailable, match=unavailable):
        score(sample, "<answer>a square</answer>" if role == "reasoner" else BOX)
    assert any(down in record.getMessage() and "training must stop" in record.getMessage() for record in caplog.records)


def test_failing_service_is_retried(tmp_path, monkeypatch):
    sample = rollouts.sample(tmp_path, form="mca")
    with ScriptedServer(reasoner("A", "A"), fail_first=2) as server:
        configure(monkeypatch, "perceiver", reasoner=server, P2R_RETRIES="3")
        assert score(sample, BOX)[0] == 1.0
    assert server.calls == 3


def test_slow_service_times_out_then_retry_succeeds(tmp_path, monkeypatch):
    sample = rollouts.sample(tmp_path, form="mca")
    with ScriptedServer(reasoner("A", "A"), latency_s=lambda call: 3.0 if call == 1 else 0.0) as server:
        configure(monkeypatch, "perceiver", reasoner=server, P2R_TIMEOUT_S="0.5", P2R_RETRIES="2")
        assert score(sample, BOX)[0] == 1.0
        assert rewarder().reasoner.stats["retries"] == 1  # the slow call was abandoned, not waited out
    assert server.calls == 2


def test_rejected_request_is_a_flagged_zero(tmp_path, monkeypatch):
    sample = rollouts.sample(tmp_path, form="mca")
    with ScriptedServer(lambda body: 400) as server:
        configure(monkeypatch, "perceiver", reasoner=server)
        reward, logs = score(sample, BOX)
    assert reward == 0.0 and flags(logs) == {"request_rejected"} and server.calls == 1


def test_missing_image_is_a_flagged_zero(tmp_path, monkeypatch):
    sample = rollouts.sample(tmp_path, form="mca", image=str(tmp_path / "gone.png"))
    configure(monkeypatch, "perceiver")
    reward, logs = score(sample, BOX)
    assert reward == 0.0 and flags(logs) == {"image_error"}


def test_reward_log_keeps_the_texts(tmp_path, monkeypatch):
    sample = rollouts.sample(tmp_path, form="mca")
    log = tmp_path / "rollouts.jsonl"
    with ScriptedServer(reasoner("The answer is A", "C")) as server:
        configure(monkeypatch, "perceiver", reasoner=server, P2R_REWARD_LOG=str(log))
        score(sample, BOX)
    (line,) = [json.loads(x) for x in log.read_text().splitlines()]
    assert line["response"] == BOX and line["answer"] == "The answer is A" and line["prediction"] == "A"
    assert (line["score"], line["box_count"], line["role"], line["id"]) == (1.0, 1, "perceiver", "0")


def test_pixel_budget_from_env(tmp_path, monkeypatch):
    sample = rollouts.sample(tmp_path, form="mca")
    with ScriptedServer(reasoner("A", "A")) as server:
        configure(monkeypatch, "perceiver", reasoner=server, P2R_MAX_PIXELS=str(64 * 64), P2R_MIN_PIXELS=str(32 * 32))
        score(sample, "[]")
    from p2r_recipe.images import load_image

    url = server.requests[0]["messages"][-1]["content"][0]["image_url"]["url"]
    width, height = load_image(url).size
    assert width * height <= 64 * 64 and width % 32 == 0 and height % 32 == 0


def test_role_must_be_set(monkeypatch):
    monkeypatch.delenv("P2R_ROLE", raising=False)
    with pytest.raises(ValueError, match="P2R_ROLE"):
        RewardConfig.from_env()


def test_response_is_cut_out_of_the_query():
    prompt = rollouts.CHATML.format(system="s", images=rollouts.IMAGE * 2, text="Question: q\n")
    assert response_text(query(prompt, "<answer>A</answer>"), prompt) == "<answer>A</answer>"
    assert response_text(prompt + "[]<|im_end|>\n<|endoftext|>", prompt) == "[]"
    with pytest.raises(ValueError, match="does not occur"):
        response_text("something else entirely", prompt)


def test_rewards_with_tiny_model_services(tmp_path, monkeypatch, tiny_model_dir):
    """p2r-serve with the tiny random model as reasoner and verifier: the real request path end to end (scores arbitrary)."""
    with start_p2r_serve(tiny_model_dir, served_name="scripted") as serve:
        port = serve.base_url.rsplit(":", 1)[1]
        env = {"P2R_TIMEOUT_S": "120", "P2R_REASONER_MAX_TOKENS": "24", "REASONER_PORT": port, "VERIFIER_PORT": port}
        configure(monkeypatch, "perceiver", **env)
        reward, logs = score(rollouts.sample(tmp_path, 0, form="mca"), BOX)
        assert reward in (0.0, 1.0) and logs["box_count"] == 1 and logs["no_evidence"] == 0
        assert not flags(logs)
        configure(monkeypatch, "reasoner", **env)
        reward, logs = score(rollouts.sample(tmp_path, 2, form="free_form"), "<answer>a red square</answer>")
        assert reward in (0.0, 1.0) and flags(logs) <= {"verifier_unparsed"}
        assert rewarder().verifier.stats["requests"] == 1
