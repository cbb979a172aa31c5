"""The hf engine on the tiny Qwen3-VL: batching, token counts, pixel sizes, determinism, seeding, error isolation."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from cases import BUDGET, engine_scene, one_image, with_crops
from PIL import Image

from p2r_recipe import prompts
from p2r_recipe.engines.base import GenParams
from p2r_recipe.engines.hf import HFEngine, PromptRepetitionPenalty, stop_lengths
from p2r_recipe.images import smart_resize
from p2r_recipe.prompts import Prompt

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


# The release's vLLM kept the Qwen3-VL processor's own pixel range (addendum section 2, "derived"):
# images that qwen-vl-utils fitted below 65,536 pixels were enlarged again by the processor.
PROCESSOR_FLOOR = 65_536


def seen(image: Image.Image) -> tuple[int, int]:
    """(height, width) the model sees: the fitted image, enlarged to the processor's floor when below it."""
    return smart_resize(image.height, image.width, 32, PROCESSOR_FLOOR, 1 << 30)


def prompt_tokens(engine: HFEngine, prompt: Prompt) -> int:
    """Chat-template tokens with each image placeholder expanded to one token per 32x32 pixels seen."""
    text = engine.processor.apply_chat_template(prompt.messages(), add_generation_prompt=True, tokenize=False)
    placeholders = len(engine.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    return placeholders - len(prompt.images) + sum(h * w for h, w in map(seen, prompt.images)) // (32 * 32)


def truncated_png() -> Image.Image:
    data = io.BytesIO()
    engine_scene(200, 200, 0).save(data, "PNG")
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


def test_processor_sees_what_the_releases_vllm_saw(engine: HFEngine) -> None:
    prompt = with_crops(0)
    assert len({im.size for im in prompt.images}) == 4
    assert any(im.width * im.height < PROCESSOR_FLOOR for im in prompt.images)  # a crop below the floor
    assert engine.processor.image_processor.size == {"shortest_edge": PROCESSOR_FLOOR, "longest_edge": 4096 * 32 * 32}
    grid = engine.encode([prompt])["image_grid_thw"]
    patch = engine.processor.image_processor.patch_size
    assert [(int(h) * patch, int(w) * patch) for _, h, w in grid] == [seen(im) for im in prompt.images]
    assert [int(t) for t, _, _ in grid] == [1] * 4


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


RELEASE = GenParams(max_new_tokens=8, repetition_penalty=1.05)  # the release's greedy decoding with its penalty


def recorded_generate_kwargs(engine: HFEngine, monkeypatch, prompts_: list[Prompt], params: GenParams) -> list[dict]:
    """Run the real generate and record the keyword arguments each model.generate call got."""
    calls, real = [], engine.model.generate

    def recording(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(engine.model, "generate", recording)
    engine.generate(prompts_, params)
    return calls


def test_generate_kwargs_carry_every_decoding_setting(engine: HFEngine, monkeypatch) -> None:
    [greedy] = recorded_generate_kwargs(engine, monkeypatch, [one_image(0)], RELEASE)
    assert (greedy["do_sample"], greedy["max_new_tokens"], greedy["repetition_penalty"]) == (False, 8, 1.0)
    assert "stop_strings" not in greedy and not {"temperature", "top_p", "top_k"} & set(greedy)
    [penalty] = greedy["logits_processor"]
    assert isinstance(penalty, PromptRepetitionPenalty) and penalty.penalty == 1.05
    params = GenParams(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.0, stop=("x",), seed=1)
    [sampled] = recorded_generate_kwargs(engine, monkeypatch, [one_image(0)], params)
    assert (sampled["do_sample"], sampled["temperature"], sampled["top_p"], sampled["top_k"]) == (True, 0.7, 0.9, 20)
    assert sampled["stop_strings"] == ["x"] and sampled["tokenizer"] is engine.processor.tokenizer
    assert len(sampled["logits_processor"]) == 0 and sampled["repetition_penalty"] == 1.0


def test_repetition_penalty_changes_the_output_and_batched_rows_decode_as_alone(engine: HFEngine) -> None:
    batch = [Prompt("A question without an image."), one_image(0), with_crops(1), Prompt("Why?")]
    plain = engine.generate(batch, GenParams(max_new_tokens=8))
    strong = GenParams(max_new_tokens=8, repetition_penalty=3.0)
    penalised = engine.generate(batch, strong)
    assert [g.text for g in penalised] != [g.text for g in plain]
    # Each row decodes as it would alone (as vLLM's unpadded rows do): padding is no part of a prompt.
    for params in (RELEASE, strong):
        batched = engine.generate(batch, params)
        assert [g.text for g in batched] == [engine.generate([p], params)[0].text for p in batch]


def test_stop_strings_end_the_text_before_them(engine: HFEngine) -> None:
    prompt = one_image(4)
    [free] = engine.generate([prompt], GenParams(max_new_tokens=8))
    word = free.text.split()[1]
    [stopped] = engine.generate([prompt], GenParams(max_new_tokens=8, stop=(word,)))
    assert stopped.text == free.text[: free.text.index(word)] and stopped.extra["finish_reason"] == "stop"
    assert stopped.output_tokens < free.output_tokens


def test_penalty_counts_prompt_and_output_tokens_once_and_never_the_padding() -> None:
    pad = 0
    # Row 0 is left-padded by two pad tokens; row 1 is a full prompt that contains the pad id itself.
    input_ids = torch.tensor([[pad, pad, 5, 6, 6, 7], [pad, 3, 4, 5, 6, 2]])
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # 5 prompt positions; 1 token generated
    scores = torch.tensor([[2.0, 2.0, 2.0, -2.0, 2.0, 2.0, 2.0, 2.0]] * 2)
    out = PromptRepetitionPenalty(2.0, attention_mask)(input_ids, scores.clone())
    assert out[0].tolist() == [2.0, 2.0, 2.0, -2.0, 2.0, 1.0, 1.0, 1.0]  # 5, 6 (prompt), 7 (output); not pad
    assert out[1].tolist() == [1.0, 2.0, 1.0, -4.0, 1.0, 1.0, 1.0, 2.0]  # a real pad-id token counts


def test_grouped_sdpa_equals_repeated_kv_attention() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from p2r_recipe.engines.hf import grouped_sdpa

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 4, True
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(3, 8, 1, 64, generator=generator, dtype=torch.float64)
    key, value = (torch.randn(3, 2, 37, 64, generator=generator, dtype=torch.float64) for _ in range(2))
    # Left padding and unwritten cache slots, as a padded batch over a static cache has them.
    mask = torch.ones(3, 1, 1, 37, dtype=torch.bool)
    mask[0, ..., :5] = mask[1, ..., 30:] = False
    out, _ = grouped_sdpa(module, query, key, value, mask, scaling=0.125)
    repeated = key.repeat_interleave(4, dim=1), value.repeat_interleave(4, dim=1)
    reference = torch.nn.functional.scaled_dot_product_attention(query, *repeated, attn_mask=mask, scale=0.125)
    assert out.shape == (3, 1, 8, 64)
    torch.testing.assert_close(out, reference.transpose(1, 2), rtol=1e-12, atol=1e-12)
    prefill = torch.randn(3, 8, 5, 64, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(
        grouped_sdpa(module, prefill, key, value, None)[0], sdpa_attention_forward(module, prefill, key, value, None)[0]
    )


def test_static_cache_decodes_as_the_dynamic_cache(engine: HFEngine, tiny_model_dir: Path) -> None:
    # The static-cache engine decodes with grouped_sdpa (1 KV head, 2 query heads in the tiny model).
    static = HFEngine(str(tiny_model_dir), device="cpu", batch_size=4, budget=BUDGET, static_cache=True, graphs=False)
    assert static.model.config.text_config._attn_implementation == "p2r_grouped_sdpa"
    static.model.lm_head.weight = engine.model.lm_head.weight
    # A short batch is filled up to its bucket (3 -> 4) with repeats, whose replies are dropped.
    batch = [one_image(0), with_crops(1), Prompt("Text only."), one_image(3, "Count the squares."), with_crops(4)]
    params = GenParams(max_new_tokens=8, min_new_tokens=8)
    assert static._fill(batch[2:]) == [*batch[2:], batch[4]]
    expected = [(g.text, g.input_tokens, g.output_tokens) for g in engine.generate(batch, params)]
    assert [(g.text, g.input_tokens, g.output_tokens) for g in static.generate(batch, params)] == expected
