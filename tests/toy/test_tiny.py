"""The tiny Qwen3-VL builds offline, loads through the Auto classes and generates."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from paths import ROOT
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from p2r_recipe import prompts
from p2r_recipe.engines import TOY_NAME as TINY_MODEL_NAME
from p2r_recipe.engines import resolve_pretrained
from p2r_recipe.toy import scenes
from p2r_recipe.toy.cli import main
from p2r_recipe.toy.model import WEIGHTS_DIR, build_tiny_model, install_trained_model


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1; huggingface_hub reads it at import, so set its constant too."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _load(path: Path):
    return AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path)


def _messages(images: list[Image.Image], text: str) -> list[dict]:
    content = [*({"type": "image", "image": im} for im in images), {"type": "text", "text": text}]
    return [{"role": "system", "content": prompts.SYSTEM_PROMPT}, {"role": "user", "content": content}]


def _images(n: int) -> list[Image.Image]:
    """A 448x448 image and up to three small crops of it (as P2R's reason pass feeds)."""
    full = Image.new("RGB", (448, 448), (30, 120, 200))
    full.paste((220, 40, 40), (100, 100, 300, 260))
    crops = [full.crop(box) for box in [(100, 100, 300, 260), (0, 0, 64, 200), (10, 20, 130, 60)]]
    return [full, *crops][:n]


def _generate(processor, model, n_images: int) -> tuple[dict, torch.Tensor]:
    inputs = processor.apply_chat_template(
        _messages(_images(n_images), prompts.perceive_text("Where is the red box?")),
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    )  # fmt: skip
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    return inputs, out


def test_build_is_deterministic_and_idempotent(tmp_path: Path, tiny_model_dir: Path) -> None:
    start = time.perf_counter()
    again = build_tiny_model(tmp_path / "again", seed=0)
    print(f"\nbuild: {time.perf_counter() - start:.2f} s")
    for name in ["model.safetensors", "tokenizer.json", "config.json", "processor_config.json"]:
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(again, seed=0) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
    assert "meaningless" in (again / "README.md").read_text()


def test_concurrent_builders_leave_one_complete_dir(tmp_path: Path) -> None:
    # Threads, not processes, to keep the test fast; the rename race is the same.
    out = tmp_path / "shared"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(build_tiny_model, [out] * 4))
    assert results == [out] * 4
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]  # no temp dirs left behind
    _load(out)


def test_tokenizer_round_trips_and_matches_config(tiny_model_dir: Path) -> None:
    processor, model = _load(tiny_model_dir)
    tok, cfg = processor.tokenizer, model.config
    text = prompts.reason_text("Héllo wörld  日本語 🙂?", "mca", True)
    text += '[{"bbox_2d": [1, 2, 3, 4], "label": "x"}]\n\t<think> a </think> <answer> B </answer>'
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text  # think tags are not special
    assert len(tok("<think>")["input_ids"]) == 1
    assert 2000 <= len(tok) <= cfg.text_config.vocab_size
    ids = tok.convert_tokens_to_ids
    assert (cfg.image_token_id, cfg.video_token_id) == (ids("<|image_pad|>"), ids("<|video_pad|>"))
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id) == (ids("<|vision_start|>"), ids("<|vision_end|>"))
    assert model.generation_config.eos_token_id == tok.eos_token_id == ids("<|im_end|>")
    assert tok.pad_token_id == ids("<|endoftext|>")
    assert model.dtype == torch.float32


def test_chat_template_matches_qwen_vl(tiny_model_dir: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}, {"type": "image"}]},
        {"role": "assistant", "content": "A."},
    ]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    vision, prompt = "<|vision_start|><|image_pad|><|vision_end|>", "<|im_start|>assistant\n"
    assert rendered == f"<|im_start|>user\n{vision}Q?{vision}<|im_end|>\n{prompt}A.<|im_end|>\n{prompt}"
    assert processor.tokenizer.apply_chat_template(messages, tokenize=False) == rendered.removesuffix(prompt)


@pytest.mark.parametrize("n_images", [1, 4])
def test_generate_with_images(tiny_model_dir: Path, n_images: int) -> None:
    processor, model = _load(tiny_model_dir)
    start = time.perf_counter()
    inputs, out = _generate(processor, model, n_images)
    print(f"\ngenerate 8 tokens, {n_images} image(s), {inputs['input_ids'].shape[1]} prompt tokens: "
          f"{time.perf_counter() - start:.2f} s")  # fmt: skip
    grid = inputs["image_grid_thw"]
    assert grid.shape == (n_images, 3) and grid[0].tolist() == [1, 28, 28]  # 448 px / patch 16
    n_pad = (inputs["input_ids"] == model.config.image_token_id).sum().item()
    assert n_pad == (grid.prod(-1) // processor.image_processor.merge_size**2).sum().item()
    assert inputs["pixel_values"].shape[0] == grid.prod(-1).sum().item()
    prompt_len = inputs["input_ids"].shape[1]
    assert out.shape == (1, prompt_len + 8)
    assert torch.equal(out[:, :prompt_len], inputs["input_ids"])
    assert int(out.max()) < model.config.text_config.vocab_size


def test_generation_is_the_same_across_builds(tmp_path: Path, tiny_model_dir: Path) -> None:
    first = _generate(*_load(tiny_model_dir), 1)[1]
    second = _generate(*_load(build_tiny_model(tmp_path / "second", seed=0)), 1)[1]
    assert torch.equal(first, second)


def test_resolve_pretrained_and_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("P2R_TINY_DIR", str(tmp_path / "cache"))
    resolved = Path(resolve_pretrained(TINY_MODEL_NAME))
    assert resolved == tmp_path / "cache"
    assert (resolved / "model.safetensors").read_bytes() == (WEIGHTS_DIR / "model.safetensors").read_bytes()
    assert "trained on synthetic scenes" in (resolved / "README.md").read_text()
    assert resolve_pretrained("Qwen/Qwen3-VL-4B-Instruct") == "Qwen/Qwen3-VL-4B-Instruct"
    main([])
    printed = capsys.readouterr().out
    assert str(resolved) in printed and "not a benchmark result" in printed
    main(["--random", "--out", str(tmp_path / "random")])
    assert "meaningless" in capsys.readouterr().out


def test_an_older_build_at_the_default_path_is_replaced_by_the_trained_toy(tmp_path: Path) -> None:
    stale = build_tiny_model(tmp_path / "cache", seed=0)
    assert install_trained_model(stale) == stale
    assert (stale / "model.safetensors").read_bytes() == (WEIGHTS_DIR / "model.safetensors").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_shipped_weights_are_small_half_precision_and_package_data() -> None:
    import tomllib
    from safetensors import safe_open

    path = WEIGHTS_DIR / "model.safetensors"
    assert path.stat().st_size < 5e6
    with safe_open(path, "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118 (not a dict)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "toy/tiny_weights/*" in pyproject["tool"]["setuptools"]["package-data"]["p2r_recipe"]


def test_token_probe_targets_sit_where_the_tile_is_drawn() -> None:
    """The training's per-token targets line up with the pixels the model sees: on the whole image the tokens
    marked as on the tile hold the tile's middle, in the crop they are the striped ones (the most contrasted
    tokens) and carry the tile's pattern; rows and columns are not swapped (the images are wider than tall)."""
    from p2r_recipe.toy.model import build_processor
    from p2r_recipe.toy.trainer import Encoder, scene_examples

    encode = Encoder(build_processor())
    for index in range(4):
        reason = scene_examples(index)[1]
        batch = encode([reason])
        grids = batch["image_grid_thw"].tolist()
        whole_targets, crop_targets = batch["token_targets"].split([t * h * w // 4 for t, h, w in grids])

        (_, h, w), tile = grids[0], reason.tile
        on = whole_targets[:, 0].reshape(h // 2, w // 2) == 1
        middle_x, middle_y = (tile.bbox_2d[0] + tile.bbox_2d[2]) / 2000, (tile.bbox_2d[1] + tile.bbox_2d[3]) / 2000
        assert h < w and on[int(middle_y * h / 2), int(middle_x * w / 2)] and on.sum() <= 4

        (_, h, w), crop = grids[1], reason.prompt.images[1]
        pixels = np.asarray(crop.convert("L").resize((w * 16, h * 16)), dtype=float)
        contrast = pixels.reshape(h // 2, 32, w // 2, 32).std(axis=(1, 3)).reshape(-1)
        on = crop_targets[:, 0].numpy() == 1
        assert contrast[on].min() > 2 * np.median(contrast[~on])
        assert set(crop_targets[on, 3].tolist()) == {scenes.PATTERNS.index(tile.pattern)}
        assert set(crop_targets[~on, 3].tolist()) == {-100}
