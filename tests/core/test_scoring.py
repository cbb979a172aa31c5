import asyncio

import pytest
import release_rules
from hypothesis import given, settings
from hypothesis import strategies as st

from p2r_recipe import scoring
from p2r_recipe.scoring import (
    answer_text,
    grade_number,
    score_answer,
    score_training,
    training_answer,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("(C) the red one", "C"),
        ("The answer is D.", "D"),
        ("The best answer is: A", "A"),
        ("Answer: b", ""),  # lower case is not an option letter
        ("Based on the image, B", "B"),  # lenient: a stray capital counts, as published
        ("It is the left one", ""),
        ("The correct option is C", "C"),
        ("Option: E", ""),
        ("", ""),
        ("one two three four five six seven eight nine ten eleven twelve", ""),
    ],
)
def test_extract_choice(text, expected):
    assert scoring.extract_choice(text) == expected


def test_extract_choice_letters():
    assert scoring.extract_choice("E. the ship", letters="ABCDE") == "E"
    assert scoring.extract_choice("E. the ship") == ""
    assert scoring.extract_choice(None) == ""


def test_answer_text():
    assert scoring.answer_text("<think>hmm</think><answer> B </answer>", "p2r") == "B"
    assert scoring.answer_text("<answer>A</answer> later <answer>C</answer>", "thinking") == "A"
    assert scoring.answer_text("no tags here", "p2r") is None
    assert scoring.answer_text(" B ", "default") == "B"


@pytest.mark.parametrize(
    "reply, answer",
    [
        ("<think>A?</think><ANSWER>B</ANSWER>", None),  # upper case: no tag, as in the release
        ("<Answer>B</Answer>", None),  # mixed case
        ("<answer>B</ANSWER>", None),  # a lower-case opening needs a lower-case closing
        ("<ANSWER>A</ANSWER> then <answer>C</answer>", "C"),  # the first lower-case pair wins
        ("<answer>\nB\n</answer>", "B"),  # DOTALL, stripped
    ],
)
def test_answer_tags_are_case_sensitive_in_evaluation_and_training(reply, answer):
    for mode in ("thinking", "p2r"):
        assert scoring.answer_text(reply, mode) == answer
    # Training takes the whole reply when there are no (lower-case) tags (addendum, reward rules).
    assert training_answer(reply) == ((answer, True) if answer is not None else (reply.strip(), False))
    # An upper-case tagged B on a question whose truth is B: the evaluation scores it wrong, as the release does.
    assert score_answer(answer, "B", "mca") == float(answer == "B")


@pytest.mark.parametrize(
    "pred, gold, ok",
    [("42", "42", True), ("42.0", "42", True), ("1,000", "1000", True), ("0.5", "1/2", True),
     ("\\frac{1}{2}", "0.5", True), ("3", "4", False), ("nan", "1", False), ("abc", "1", False), ("9" * 500, "1", False)],
)
def test_numbers(pred, gold, ok):
    assert scoring.numbers_equal(pred, gold) is ok


def test_score_answer_forms():
    assert scoring.score_answer("The answer is B", "B", "mca") == 1.0
    assert scoring.score_answer("C", "(B)", "mca") == 0.0
    assert scoring.score_answer("F", "F", "mca", letters="ABCDEF") == 1.0
    assert scoring.score_answer("7", "7.0", "na") == 1.0
    assert scoring.score_answer("Yes.", "yes", "yes_no") == 1.0
    assert scoring.score_answer(None, "B", "mca") == 0.0
    with pytest.raises(ValueError, match="verifier"):
        scoring.score_answer("a cat", "cat", "free_form")


@pytest.mark.parametrize(
    "reply, verdict",
    [("Yes", True), ("yes.", True), ("**No**", False), ("<think>yes, it matches</think>\nNo", False),
     ("No, yes would be wrong", False), ("I think yes", None), ("Yesterday", None), ("", None)],
)
def test_parse_verdict_is_strict(reply, verdict):
    assert scoring.parse_verdict(reply) is verdict


def test_free_form_through_verifier_over_http():
    from servers import ScriptedServer

    from p2r_recipe.client import ChatClient

    def judge(request):
        user = request["messages"][-1]["content"]
        assert request["temperature"] == 0 and request["max_tokens"] == 64
        truth = user.split("Ground truth answer: ")[1].split("\n")[0]
        pred = user.split("Predicted answer: ")[1].split("\n")[0]
        return "<think>comparing</think> Yes" if truth.lower() in pred.lower() else "No."

    with ScriptedServer(judge) as server:
        client = ChatClient(server.base_url, "verifier", name="verifier")

        async def both():
            return await asyncio.gather(
                scoring.score_free_form("What animal?", "cat", "a small cat", client.text),
                scoring.score_free_form("What animal?", "cat", "a dog", client.text),
            )

        assert asyncio.run(both()) == [1.0, 0.0]
        assert server.calls == 2


def test_unparseable_verdict_is_an_error_not_a_zero():
    from servers import ScriptedServer

    from p2r_recipe.client import ChatClient

    with ScriptedServer(lambda request: "Maybe?") as server:
        client = ChatClient(server.base_url, "verifier", name="verifier")
        with pytest.raises(scoring.VerdictError, match="neither yes nor no"):
            asyncio.run(scoring.score_free_form("q", "cat", "cat", client.text))


# --- the release's training rules (p2r_reward.py), beside the evaluation ones --------------------


@pytest.mark.parametrize(
    "reply, answer, tagged",
    [
        ("<think>x</think><answer> B </answer>", "B", True),
        ("<answer>B</answer><answer>C</answer>", "B", True),
        ("  no tags at all \n", "no tags at all", False),
        ("<ANSWER>B</ANSWER>", "<ANSWER>B</ANSWER>", False),  # case-sensitive
        ("<answer>B", "<answer>B", False),  # unclosed
        ("", "", False),
    ],
)
def test_training_answer(reply, answer, tagged):
    assert training_answer(reply) == (answer, tagged)
    if tagged:
        assert answer_text(reply, "p2r") == answer  # the evaluation reads tagged replies the same way


@pytest.mark.timeout(60)  # quadratic scanning would take hours on this input; no wall-time assert
def test_training_answer_stays_linear_on_unclosed_tags():
    assert training_answer("<answer>" * 200_000)[1] is False


@pytest.mark.parametrize(
    "answer, truth, form, score",
    [
        ("E", "E", "mca", 1.0),  # A-E, whatever the question lists (evaluation: A-D)
        ("The answer is (C)", " c ", "mca", 1.0),
        ("B", "(B)", "mca", 0.0),  # the truth is only stripped and upper-cased
        ("one two three four five six seven eight nine ten eleven", "B", "mca", 0.0),
        ("1/2", "0.5", "na", 1.0),
        ("42.0", "42", "na", 1.0),
        ("\\frac{84}{2}", "42", "na", 0.0),  # mathruler: an integer truth wants an integer answer
        ("50%", "0.5", "na", 0.0),
        ("9^{9^{9}}", "1", "na", 0.0),
        ("yes", "yes", "yes_no", 0.0),  # any other form: 0
        ("cat", "cat", "one_word", 0.0),
    ],
)
def test_score_training(answer, truth, form, score):
    assert score_training(answer, truth, form) == score


def test_score_training_leaves_free_form_to_the_verifier():
    with pytest.raises(ValueError, match="verifier"):
        score_training("a cat", "a cat", "free_form")


def test_grade_number_is_mathruler_with_a_guard():
    from mathruler.grader import grade_answer

    for answer, truth in [("3 cm", "3"), ("1,000", "1000"), ("0.333", "1/3"), ("10^{3}", "1000"), ("2", "2.0")]:
        assert grade_number(answer, truth) == grade_answer(answer, truth), (answer, truth)
    assert grade_number("2**(10**100)", "1") is False  # sympy would never finish: the pytest timeout catches a hang


_FRAGMENTS = ["<answer>", "</answer>", "<ANSWER>", "<think>", "</think>", "A", "B", "E", "F", "(C)", "b", "The answer is",
              "Answer:", " ", "\n", "word", "42", "42.0", "1/2", "0.5", "3 cm", "10%"]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from(_FRAGMENTS), max_size=14).map("".join),
    st.sampled_from(["A", "B", "E", " b ", "(C)", "42", "0.5"]),
    st.sampled_from(["mca", "na", "yes_no"]),
)
def test_training_rules_agree_with_the_releases_code(reply, truth, form):
    """Ours against an independent transcription of the release's reward code (tests/release_rules.py)."""
    answer, _ = training_answer(reply)
    assert score_training(answer, truth, form) == release_rules.train_score(reply, truth, form)
