"""The hf engine on the tiny Qwen3-VL: batching, token counts, pixel sizes, determinism, seeding, error isolation."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from p2r_recipe import prompts
from p2r_recipe.engines.base import GenParams
from p2r_recipe.engines.hf import HFEngine, stop_lengths
from p2r_recipe.images import PixelBudget, fit_to_budget
from p2r_recipe.prompts import Prompt

BUDGET = PixelBudget(max_pixels=256 * 32 * 32, crop_max_pixels=64 * 32 * 32)
SHORT = GenParams(max_new_tokens=6, min_new_tokens=3)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> HFEngine:
    # CPU fp32 on any machine: the equality tests compare padded and unpadded runs exactly.
    engine = HFEngine(str(tiny_model_dir), device="cpu", batch_size=4, budget=BUDGET)
    # With tied random embeddings greedy decoding just repeats the prompt's last token, whatever
    # the input; an untied random head makes every output depend on the whole prompt, so the
    # equality tests below could catch rows being mixed up or padding leaking into attention.
    generator = torch.Generator().manual_seed(0)
    head = engine.model.lm_head
    head.weight = torch.nn.Parameter(torch.randn(head.weight.shape, generator=generator))
    return engine


def scene(width: int, height: int, seed: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (40 + 20 * seed, 90, 160))
    draw = ImageDraw.Draw(image)
    for i, colour in enumerate(["red", "yellow", "white"]):
        x, y = (97 * (i + seed)) % (width - 40), (53 * (i + 2 * seed)) % (height - 40)
        draw.rectangle((x, y, x + 30, y + 30), fill=colour)
    return image


def fitted(images: list[Image.Image]) -> list[Image.Image]:
    return [fit_to_budget(im, BUDGET.for_image(i), BUDGET.min_pixels) for i, im in enumerate(images)]


def one_image(seed: int, question: str = "What colour is the square?") -> Prompt:
    return Prompt(prompts.direct_text(question, "one_word"), fitted([scene(1280, 720, seed)]))


def with_crops(seed: int) -> Prompt:
    full = scene(1280, 720, seed)
    crops = [full.crop(box) for box in [(100, 100, 400, 300), (0, 0, 90, 500), (600, 200, 1240, 260)]]
    return Prompt(prompts.reason_text("Which square is largest?", "mca", True), fitted([full, *crops]))


def prompt_tokens(engine: HFEngine, prompt: Prompt) -> int:
    """Chat-template tokens with each image placeholder expanded to one token per 32x32 pixels."""
    text = engine.processor.apply_chat_template(prompt.messages(), add_generation_prompt=True, tokenize=False)
    placeholders = len(engine.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    return placeholders - len(prompt.images) + sum(im.width * im.height for im in prompt.images) // (32 * 32)


def truncated_png() -> Image.Image:
    data = io.BytesIO()
    scene(200, 200, 0).save(data, "PNG")
    return Image.open(io.BytesIO(data.getvalue()[:120]))  # opens lazily; decoding fails inside the processor


def test_mixed_batch_gives_one_generation_per_prompt(engine: HFEngine) -> None:
    batch = [one_image(0), with_crops(1), one_image(2, "Is there a red square?"), with_crops(3), one_image(4)]
    gens = engine.generate(batch, SHORT)
    assert len(gens) == len(batch)
    for prompt, gen in zip(batch, gens):
        assert gen.error is None
        assert SHORT.min_new_tokens <= gen.output_tokens <= SHORT.max_new_tokens
        assert gen.extra["finish_reason"] == ("length" if gen.output_tokens == SHORT.max_new_tokens else "stop")
        assert gen.input_tokens == prompt_tokens(engine, prompt)
    assert gens[1].input_tokens > gens[0].input_tokens  # 4 images vs 1
    assert engine.generate([], SHORT) == []


def test_processor_keeps_the_fitted_sizes(engine: HFEngine) -> None:
    prompt = with_crops(0)
    assert len({im.size for im in prompt.images}) == 4
    grid = engine.encode([prompt])["image_grid_thw"]
    patch = engine.processor.image_processor.patch_size
    assert [int(t * h * w) * patch * patch for t, h, w in grid] == [im.width * im.height for im in prompt.images]
    assert [int(h) * patch for _, h, _ in grid] == [im.height for im in prompt.images]


def test_greedy_batched_equals_one_by_one(engine: HFEngine) -> None:
    # Two batches of 4 (sorted by image area), with and without padding.
    texts = [Prompt("A question without an image."), Prompt(prompts.direct_text("Is it a dog?", "yes_no"))]
    batch = [one_image(0), with_crops(1), *texts, one_image(5, "Count the squares."), with_crops(2)]
    params = GenParams(max_new_tokens=8)
    batched = engine.generate(batch, params)
    alone = [engine.generate([p], params)[0] for p in batch]
    assert [(g.text, g.input_tokens, g.output_tokens) for g in batched] == [
        (g.text, g.input_tokens, g.output_tokens) for g in alone
    ]
    assert len({g.text for g in batched}) > len(batch) // 2  # outputs depend on the input
    assert engine.generate(batch, params) == batched


def test_sampling_is_seeded_and_respects_min_new_tokens(engine: HFEngine) -> None:
    batch = [one_image(0), with_crops(1)]
    params = GenParams(max_new_tokens=10, min_new_tokens=10, temperature=1.0, seed=7)
    first, again = engine.generate(batch, params), engine.generate(batch, params)
    assert [g.text for g in first] == [g.text for g in again]
    assert all(g.output_tokens == 10 for g in first)
    other = engine.generate(batch, GenParams(max_new_tokens=10, min_new_tokens=10, temperature=1.0, seed=8))
    assert [g.text for g in other] != [g.text for g in first]
    greedy = engine.generate(batch, GenParams(max_new_tokens=10, min_new_tokens=10))
    assert [g.text for g in greedy] != [g.text for g in first]


def test_a_bad_prompt_fails_alone(engine: HFEngine) -> None:
    good = [one_image(0), with_crops(1), Prompt("Text only.")]
    batch = [good[0], Prompt("broken", [truncated_png()]), good[1], Prompt("a path", ["img.png"]), good[2]]
    gens = engine.generate(batch, SHORT)
    assert len(gens) == 5
    assert "truncated" in gens[1].error and gens[1].output_tokens == 0
    assert "PIL" in gens[3].error
    expected = engine.generate(good, SHORT)
    assert [gens[0], gens[2], gens[4]] == expected
    assert all(g.error is None for g in expected)


def test_stop_lengths_count_through_the_first_eos() -> None:
    eos, pad = 9, 0
    new = torch.tensor([[5, 6, eos, pad, pad], [5, 6, 7, 8, 4], [eos, pad, pad, pad, pad], [4, eos, 3, eos, pad]])
    lengths, stopped = stop_lengths(new, torch.tensor([eos, 11]))
    assert lengths == [3, 5, 1, 2]
    assert stopped == [True, False, True, True]
