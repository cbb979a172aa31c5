"""release.py holds the release's numbers with their sources, and our smart_resize is qwen-vl-utils' (one departure).

qwen-vl-utils is the reference the release resizes with (0.0.14, installed with lmms-eval in the dev venv).
Last, the lmms-eval runner every CLI test uses (tests/support/lmms_cli.py) fails a run that scored nothing,
which lmms-eval itself reports with exit status 0.
"""

import ast
import io
import itertools
import re
import tokenize
from pathlib import Path

import lmms_cli
import pytest
from qwen_vl_utils.vision_process import smart_resize as reference_resize

from p2r_recipe import images, pipeline, release, scoring
from p2r_recipe.engines.base import GenParams
from p2r_recipe.train import config, precompute, reward

SOURCE = Path(release.__file__).read_text()
# The release files a constant may cite (release.py's docstring gives their full paths).
RELEASE_FILES = {
    "batch_inference_vllm.py", "run_eval_batch.sh", "base_data.py", "p2r_reward.py", "p2r_dataset.py",
    "agent_loop.py", "_generated_ppo_trainer.yaml", "run_pra_grpo_perceiver.sh", "run_pra_grpo_reasoner.sh",
}  # fmt: skip
CITATION = re.compile(r"([\w.-]+\.(?:py|sh|yaml)):\d+(?:-\d+)?")

# Sides from 1 pixel to 20,000: under, at and over multiples of 32, and common photo sizes.
SIDES = [1, 2, 3, 5, 7, 10, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 100, 127, 200, 224, 333, 448, 500,
         640, 999, 1000, 1024, 1080, 1920, 2048, 3000, 4096, 6000, 7680, 8192, 10000, 20000]  # fmt: skip
# (max_pixels, min_pixels): evaluation, training, a small lmms-eval run's, and budgets so small that long
# thin images fall below one factor on their short side.
BUDGETS = [
    (release.EVAL_MAX_PIXELS, release.EVAL_MIN_PIXELS),
    (release.TRAIN_MAX_PIXELS, release.TRAIN_MIN_PIXELS),
    (65_536, 4_096),
    (16_384, 4_096),
    (4_096, 4_096),
    (1_024, 1_024),
]


def outcome(resize, height: int, width: int, max_pixels: int, min_pixels: int):
    """The (height, width) a smart_resize picks, or "refused" where it raises (aspect ratio over 200)."""
    try:
        return resize(height, width, factor=release.QWEN_FACTOR, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError:  # ImageError (ours) is a ValueError, as the reference raises
        return "refused"


def test_smart_resize_is_qwen_vl_utils_except_where_the_reference_returns_a_zero_side():
    same, refused, zero_side = 0, 0, {budget: 0 for budget in BUDGETS}
    for (height, width), (max_pixels, min_pixels) in itertools.product(itertools.product(SIDES, SIDES), BUDGETS):
        ours = outcome(images.smart_resize, height, width, max_pixels, min_pixels)
        theirs = outcome(reference_resize, height, width, max_pixels, min_pixels)
        case = (height, width, max_pixels, min_pixels, ours, theirs)
        if ours == theirs:
            same += 1
            refused += ours == "refused"
            continue
        # The one departure: a long thin image over budget, whose short side the reference floors to 0
        # (a size no processor accepts); ours keeps that side at one factor and the other side as is.
        assert theirs != "refused" and 0 in theirs, case
        assert [o if t else release.QWEN_FACTOR for o, t in zip(ours, theirs)] == list(ours), case
        assert [o for o, t in zip(ours, theirs) if t] == [t for t in theirs if t], case
        zero_side[max_pixels, min_pixels] += 1
    print(f"smart_resize: {same} equal ({refused} both refused); reference returns a 0 side: {zero_side}")
    assert refused and sum(zero_side.values())  # the grid reaches both the refusal and the departure
    assert same + sum(zero_side.values()) == len(SIDES) ** 2 * len(BUDGETS)
    # At the release's own budgets no image of the grid meets the departure.
    assert zero_side[BUDGETS[0]] == zero_side[BUDGETS[1]] == 0


def test_every_constant_cites_the_release_file_and_line_it_comes_from():
    comments = {tok.start[0]: tok.string for tok in tokenize.generate_tokens(io.StringIO(SOURCE).readline)
                if tok.type == tokenize.COMMENT}  # fmt: skip
    tree = ast.parse(SOURCE)
    constants = [node for node in tree.body if isinstance(node, ast.Assign)]
    assert len(constants) >= 30
    for node in constants:
        [target] = node.targets
        assert isinstance(target, ast.Name) and target.id.isupper(), ast.dump(target)
        # The comment block directly above the assignment, and any comment on its own lines.
        cited, line = [], node.lineno - 1
        while line in comments:
            cited.append(comments[line])
            line -= 1
        cited += [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
        files = {name for text in cited for name in CITATION.findall(text)}
        assert files and files <= RELEASE_FILES, (target.id, cited)


def test_release_is_plain_values_and_imports_nothing():
    tree = ast.parse(SOURCE)
    assert not [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    plain = (int, float, str, tuple, dict)
    values = {name: value for name, value in vars(release).items() if name.isupper()}
    assert values and all(isinstance(value, plain) for value in values.values()), values


def test_the_modules_apply_release_values_under_their_old_names():
    assert pipeline.RELEASE_MAX_NEW_TOKENS is release.RELEASE_MAX_NEW_TOKENS
    assert pipeline.RELEASE_DECODING == GenParams(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.05)
    assert pipeline.release_params("perceive").max_new_tokens == 256
    assert images.PixelBudget() == images.PixelBudget(4_194_304, 16_384, 4_194_304, 32)
    assert images.TRAIN_BUDGET == images.PixelBudget(2_097_152, 4_096, 2_097_152, 32)
    assert images.TRAIN_JPEG_QUALITY == reward.TRAIN_JPEG_QUALITY == precompute.TRAIN_JPEG_QUALITY == 75
    assert reward.REASONER_PARAMS is release.REASONER_PARAMS and precompute.PERCEIVE_PARAMS is release.PERCEIVE_PARAMS
    assert scoring.VERIFIER_PARAMS is release.VERIFIER_PARAMS and scoring.TRAINING_LETTERS == "ABCDE"
    assert reward.IOU_LIMIT == 0.5
    assert config.TURN_CAP_VARS == {"perceiver": ("P2R_PERCEIVE_MAX_TOKENS", 1024), "reasoner": ("P2R_REASON_MAX_TOKENS", 2048)}
    defaults = config.TrainConfig()
    assert (defaults.learning_rate, defaults.adam_beta1, defaults.adam_beta2) == (1e-6, 0.9, 0.999)
    assert (defaults.prompt_max_len, defaults.response_max_len, defaults.rollout_max_len) == (2560, 1024, 4096)


@pytest.mark.parametrize("name", ["RELEASE_SAMPLING", "REASONER_PARAMS", "PERCEIVE_PARAMS", "VERIFIER_PARAMS"])
def test_request_settings_carry_only_what_the_release_sends(name):
    # The service requests send these dicts whole; a key added here would reach every request.
    expected = {
        "RELEASE_SAMPLING": {"temperature", "top_p", "top_k", "repetition_penalty", "stop"},
        "REASONER_PARAMS": {"max_tokens", "temperature"},
        "PERCEIVE_PARAMS": {"max_tokens", "temperature"},
        "VERIFIER_PARAMS": {"max_tokens", "temperature", "chat_template_kwargs"},
    }[name]
    assert set(getattr(release, name)) == expected


@pytest.mark.slow
def test_the_lmms_eval_runner_fails_a_run_that_exits_0_without_results(tmp_path):
    process = lmms_cli.start(
        "--model", "p2r", "--model_args", f"pretrained={tmp_path / 'no-such-model'},mode=default",
        "--tasks", "p2r_demo_vstar", "--limit", "1", "--output_path", "out", cwd=tmp_path,
    )  # fmt: skip
    with pytest.raises(AssertionError, match="exited 0 but wrote no results under " + re.escape(str(tmp_path / "out"))):
        lmms_cli.finish(process)
    assert process.returncode == 0  # lmms-eval logged the model's exception and exited 0
