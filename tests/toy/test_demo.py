"""The embedded demo benchmark: real record formats, deterministic regeneration, and answers that hold in the pixels."""

from __future__ import annotations

import functools
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from p2r_recipe.evidence import Box, crop_rect
from p2r_recipe.images import PixelBudget, load_image
from p2r_recipe.lmms.benchmarks import HRBENCH, VSTAR
from p2r_recipe.toy import demo, scenes

STRING = pa.string()
SCHEMAS = {
    "vstar": pa.schema(
        [("question_id", STRING), ("image", pa.struct([("bytes", pa.binary()), ("path", STRING)])),
         ("text", STRING), ("label", STRING), ("category", STRING)]
    ),
    "hrbench": pa.schema(
        [("index", pa.int64()), *((c, STRING) for c in ("question", "answer", "category", "A", "B", "C", "D",
                                                         "cycle_category", "image"))]
    ),
}  # fmt: skip
CASES = [(split, q.index) for split in demo.SPLITS for q in demo.questions(split)]


@functools.cache
def stored(split: str) -> list[dict]:
    return pq.read_table(demo.DATA_DIR / f"{split}.parquet").to_pylist()


def option_texts(split: str, doc: dict) -> dict[str, str]:
    """The options as a reader of the record sees them (V*: "(A) .." lines; HR-Bench: columns A-D)."""
    if split == "vstar":
        return dict(re.findall(r"^\(([A-D])\) (.+)$", doc["text"], re.MULTILINE))
    return {letter: doc[letter] for letter in "ABCD"}


@pytest.mark.parametrize("split", list(demo.SPLITS))
def test_files_have_the_real_datasets_columns_and_types(split):
    table = pq.read_table(demo.DATA_DIR / f"{split}.parquet")
    expected = SCHEMAS["vstar" if split == "vstar" else "hrbench"]
    assert table.schema.remove_metadata() == expected
    if split == "vstar":  # the HF Image feature, so `datasets` hands PIL images as from the hub
        assert b'"image": {"_type": "Image"}' in table.schema.metadata[b"huggingface"]


def test_files_are_small_and_hold_the_planned_mix():
    total = sum((demo.DATA_DIR / f"{split}.parquet").stat().st_size for split in demo.SPLITS)
    assert total < 6e6
    counts = {split: sorted(doc["category"] for doc in stored(split)) for split in demo.SPLITS}
    assert counts["vstar"] == ["direct_attributes"] * 6 + ["relative_position"] * 6
    assert counts["hrbench_4k"] == counts["hrbench_8k"] == ["cross"] * 3 + ["single"] * 3


@pytest.mark.parametrize("split", list(demo.SPLITS))
def test_text_columns_regenerate_identically(split):
    regenerated = [demo.record(q, b"") for q in demo.questions(split)]
    for doc, fresh in zip(stored(split), regenerated, strict=True):
        assert {k: v for k, v in doc.items() if k != "image"} == {k: v for k, v in fresh.items() if k != "image"}


def _read_pattern(pixels: np.ndarray, tile: scenes.Tile, width: int, height: int) -> tuple[str, str]:
    """The tile's colour and pattern as read off the pixels: the one palette colour inside its rectangle,
    and the one pattern whose mask matches where that colour is."""
    x0, y0, x1, y1 = tile.pixels(width, height)
    region = pixels[y0:y1, x0:x1]
    white = (region == scenes.WHITE).all(axis=-1)
    colours = [name for name, rgb in scenes.PALETTE.items() if ((region == rgb).all(axis=-1) | white).all()]
    assert len(colours) == 1, f"tile at {tile.bbox_2d} holds pixels other than white and one palette colour"
    s = scenes.stripe_width(width)
    v, u = np.ogrid[0 : y1 - y0, 0 : x1 - x0]
    matches = [p for p in scenes.PATTERNS if np.array_equal(~white, np.broadcast_to(scenes._pattern_mask(p, u, v, s), white.shape))]
    assert len(matches) == 1
    return colours[0], matches[0]


@pytest.mark.parametrize(("split", "index"), CASES, ids=[f"{s}-{i}" for s, i in CASES])
def test_image_regenerates_and_its_answer_holds_in_the_pixels(split, index):
    q = demo.questions(split)[index]
    doc = stored(split)[index]
    benchmark = demo.SPLITS[split].benchmark
    (image,) = benchmark.images(doc)
    pixels = np.asarray(image)
    assert image.size == (q.width, q.height)
    assert np.array_equal(pixels, np.asarray(demo.render(q))), "stored image differs from a fresh render"

    read = [_read_pattern(pixels, tile, q.width, q.height) for tile in q.scene.tiles]
    assert len({colour for colour, _ in read}) == len(read), "tile colours must be unique so a question names one tile"
    # Every saturated pixel belongs to a listed tile: nothing hidden could change an answer.
    codes = pixels[..., 0].astype(np.int32)
    for channel in (1, 2):
        codes <<= 8
        codes |= pixels[..., channel]
    saturated = np.isin(codes, [(r << 16) | (g << 8) | b for r, g, b in scenes.PALETTE.values()])
    for tile in q.scene.tiles:
        x0, y0, x1, y1 = tile.pixels(q.width, q.height)
        saturated[y0:y1, x0:x1] = False
    assert not saturated.any()

    (colour,) = re.findall(r"the (\w+) tile", q.question)
    (pattern,) = [p for c, p in read if c == colour]
    options = option_texts(split, doc)
    truth = benchmark.answer(doc)
    assert options[truth] == pattern
    assert sorted(options.values()) == sorted(scenes.PATTERNS)


def test_patterns_blur_away_at_the_main_jobs_budget_and_show_in_the_crop():
    """The demo's premise, measured: at 65,536 pixels a tile is nearly flat, in its padded crop it is striped."""
    budget = PixelBudget(max_pixels=65_536, crop_max_pixels=65_536)
    for split in demo.SPLITS:
        q = demo.questions(split)[0]
        image = demo.render(q)
        box = Box(tuple(map(float, q.target.bbox_2d)))
        whole, crop = budget.fit([image, image.crop(crop_rect(box, q.width, q.height))])

        def spread(im, rect):
            inner = np.asarray(im.crop(rect).convert("L"), dtype=float)
            return inner[2:-2, 2:-2].std()

        wx0, wy0, wx1, wy1 = q.target.pixels(whole.width, whole.height)
        cw, ch = crop.size
        # the tile sits in the middle third of its crop
        assert spread(whole, (wx0, wy0, wx1, wy1)) < 0.35 * spread(crop, (cw * 2 // 5, ch * 2 // 5, cw * 3 // 5, ch * 3 // 5))


def test_demo_seeds_never_train_the_tiny_model():
    from p2r_recipe.toy.trainer import SCENE_SEED_BASE

    seeds = [demo.question_seed(split, q.index) for split in demo.SPLITS for q in demo.questions(split)]
    assert min(seeds) > SCENE_SEED_BASE + 10**8


def test_question_text_goes_through_the_adapters():
    vstar_doc, hr_doc = stored("vstar")[1], stored("hrbench_4k")[0]
    assert VSTAR.question(vstar_doc) == vstar_doc["text"].rsplit("\n", 1)[0]
    assert re.search(r"\n\(A\) [a-z ]+\n\(B\) [a-z ]+\n\(C\) [a-z ]+\n\(D\) [a-z ]+$", VSTAR.question(vstar_doc))
    assert HRBENCH.question(hr_doc).startswith(hr_doc["question"] + "\nOptions:\nA. ")


def test_demo_samples_alternate_the_splits():
    samples = demo.demo_samples()
    assert len(samples) == 24
    assert [s.id.split("/")[0] for s in samples[:3]] == ["vstar", "hrbench_4k", "hrbench_8k"]
    assert len({s.id for s in samples}) == 24
    assert [s.id for s in demo.demo_samples(4)] == [s.id for s in samples[:4]]
    assert all(s.answer in "ABCD" and s.answer_form == "mca" for s in samples)
    image = load_image(samples[1].images[0])  # HR-Bench's base64 string reaches the pipeline as a data URL
    assert image.size == (3840, 2160)


def test_records_render_in_memory_without_the_files(tmp_path):
    fresh = demo.load_records("vstar", data_dir=tmp_path)
    for doc, saved in zip(fresh, stored("vstar"), strict=True):
        assert np.array_equal(np.asarray(load_image(doc["image"])), np.asarray(load_image(saved["image"])))


@pytest.mark.slow
def test_cli_rebuilds_the_committed_files(tmp_path):
    subprocess.run([sys.executable, "-m", "p2r_recipe.toy.demo", "--out", str(tmp_path)], check=True, capture_output=True)
    for split, spec in demo.SPLITS.items():
        rebuilt = pq.read_table(tmp_path / f"{split}.parquet")
        committed = pq.read_table(demo.DATA_DIR / f"{split}.parquet")
        if rebuilt.equals(committed):  # identical bytes in every cell
            continue
        # A different zlib may compress the PNGs differently; the decoded content must still match.
        assert rebuilt.schema == committed.schema
        for new, old in zip(rebuilt.to_pylist(), committed.to_pylist(), strict=True):
            assert {k: v for k, v in new.items() if k != "image"} == {k: v for k, v in old.items() if k != "image"}
            new_image, old_image = spec.benchmark.images(new)[0], spec.benchmark.images(old)[0]
            assert np.array_equal(np.asarray(new_image), np.asarray(old_image))
