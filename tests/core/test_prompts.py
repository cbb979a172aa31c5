import pytest

from p2r_recipe import prompts


def test_perceive_prompt_exact():
    assert prompts.perceive_text("What colour is the cup?") == (
        "Question: What colour is the cup?\n"
        "Locate the key visual evidence in the image for answering this question. Report bbox coordinates in JSON "
        'format only: [{"bbox_2d": [x1, y1, x2, y2], "label": "<description>"}] If the question requires the '
        "entire image, return an empty list []."
    )
    assert '"label": "description"}]' in prompts.perceive_text("q", training=True)


def test_reason_prompts_exact():
    mca = (
        "Provide your detailed reasoning between the <think> </think> tags, and then answer the question with the "
        "option's letter from the given choices (e.g., A, B, etc.) within the <answer> </answer> tags.\n"
    )
    assert prompts.reason_text("Q?", "mca", has_evidence=True) == (
        "Question: Q?\nThe key visual regions have been highlighted and cropped for you. Think step by step.\n" + mca
    )
    assert prompts.reason_text("Q?", "mca", has_evidence=False) == "Question: Q?\nThink step by step.\n" + mca
    assert prompts.thinking_text("Q?", "mca") == "Question: Q?\nThink step by step. \n" + mca


@pytest.mark.parametrize(
    "form, tail",
    [
        ("na", "answer the question using a numerical value (e.g., 42 or 3.1)"),
        ("free_form", "answer the question simply"),
        ("one_word", "answer the question using a single word or phrase"),
        ("yes_no", "answer the question using yes or no"),
    ],
)
def test_reasoning_post_prompts(form, tail):
    assert prompts.reasoning_post_prompt(form) == (
        f"Provide your detailed reasoning between the <think> </think> tags, and then {tail} within the <answer> </answer> tags.\n"
    )


def test_training_free_form_variant():
    assert prompts.reasoning_post_prompt("free_form", training=True).endswith(
        "and then provide your text answer within the <answer> </answer> tags.\n"
    )
    assert prompts.reasoning_post_prompt("mca", training=True) == prompts.reasoning_post_prompt("mca")


def test_direct_prompts():
    assert prompts.direct_text("Q?", "mca") == (
        "Question: Q?\nAnswer the question with the option's letter from the given choices (e.g., A, B, etc.) directly.\n"
    )
    assert prompts.direct_text("Q?", "yes_no") == "Question: Q?\nOutput yes or no directly.\n"
    with pytest.raises(ValueError, match="unknown answer form"):
        prompts.direct_text("Q?", "essay")


def test_messages_put_images_before_text():
    prompt = prompts.Prompt("hello", images=["a", "b"])
    system, user = prompt.messages()
    assert system["content"][0]["text"] == "You are a helpful assistant."
    assert [p["type"] for p in user["content"]] == ["image", "image", "text"]


def test_training_post_prompts_are_the_releases_three():
    free_form = prompts.reasoning_post_prompt("free_form", training=True)
    assert free_form.endswith("and then provide your text answer within the <answer> </answer> tags.\n")
    # The release's ANSWER_FORM_POST_PROMPTS.get(form, free_form): any other form gets the free-form tail.
    for form in ("yes_no", "one_word", "something_else"):
        assert prompts.reasoning_post_prompt(form, training=True) == free_form
    with pytest.raises(ValueError):
        prompts.reasoning_post_prompt("something_else")  # evaluation still refuses unknown forms
