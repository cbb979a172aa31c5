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

from p2r_recipe import demo
from p2r_recipe.benchmarks import HRBENCH, VSTAR
from p2r_recipe.images import load_image

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


def _colour_at(pixels: np.ndarray, shape: demo.Shape) -> str:
    names = [name for name, rgb in demo.PALETTE.items() if tuple(pixels[shape.y, shape.x]) == rgb]
    assert len(names) == 1, f"pixel at the {shape.kind}'s centre is {pixels[shape.y, shape.x]}, no palette colour"
    return names[0]


def _expected_answer(question: str, shapes: list[demo.Shape], colour) -> str:
    """Answer the question from the shapes' positions and the colours read off the pixels."""
    by_kind = {s.kind: s for s in shapes}
    kinds = "|".join(demo.KINDS)
    if m := re.fullmatch(rf"What is the color of the ({kinds})\?", question):
        return colour(by_kind[m[1]])
    if m := re.fullmatch(r"Which shape is drawn in (\w+)\?", question):
        (match,) = [s for s in shapes if colour(s) == m[1]]
        return match.kind
    if m := re.fullmatch(rf"Is the (\w+) ({kinds}) on the left or right side of the (\w+) ({kinds})\?", question):
        a, b = by_kind[m[2]], by_kind[m[4]]
        assert (colour(a), colour(b)) == (m[1], m[3])
        return "left" if a.x < b.x else "right"
    if m := re.fullmatch(rf"Which object is closer to the top of the image, the (\w+ ({kinds})) or the (\w+ ({kinds}))\?",
                         question):  # fmt: skip
        a, b = by_kind[m[2]], by_kind[m[4]]
        assert (f"{colour(a)} {a.kind}", f"{colour(b)} {b.kind}") == (m[1], m[3])
        return f"the {m[1]}" if a.y < b.y else f"the {m[3]}"
    if m := re.fullmatch(rf"What are the colors of the ({kinds}) and the ({kinds}), respectively\?", question):
        return f"{colour(by_kind[m[1]])} and {colour(by_kind[m[2]])}"
    if m := re.fullmatch(r"How many (\w+) shapes are there in the image\?", question):
        return str(sum(colour(s) == m[1] for s in shapes))
    raise AssertionError(f"no checker for {question!r}")


@pytest.mark.parametrize(("split", "index"), CASES, ids=[f"{s}-{i}" for s, i in CASES])
def test_image_regenerates_and_its_answer_holds_in_the_pixels(split, index):
    q = demo.questions(split)[index]
    doc = stored(split)[index]
    benchmark = demo.SPLITS[split].benchmark
    (image,) = benchmark.images(doc)
    pixels = np.asarray(image)
    assert image.size == (q.width, q.height)
    assert np.array_equal(pixels, np.asarray(demo.render(q))), "stored image differs from a fresh render"

    shapes = list(q.shapes)
    assert len({s.kind for s in shapes}) == len(shapes), "shape kinds must be unique so questions name one object"
    # Every saturated pixel belongs to a listed shape: nothing hidden could change an answer.
    codes = pixels[..., 0].astype(np.int32)
    for channel in (1, 2):
        codes <<= 8
        codes |= pixels[..., channel]
    saturated = np.isin(codes, [(r << 16) | (g << 8) | b for r, g, b in demo.PALETTE.values()])
    for s in shapes:
        assert saturated[s.y - s.r : s.y + s.r + 1, s.x - s.r : s.x + s.r + 1].sum() > s.r * s.r
        saturated[s.y - s.r : s.y + s.r + 1, s.x - s.r : s.x + s.r + 1] = False
    assert not saturated.any()
    # Targets keep a radius of at least 10 px at Qwen's default 4096*32*32 pixel budget.
    scale = min(1.0, (4096 * 32 * 32 / (q.width * q.height)) ** 0.5)
    assert min(s.r for s in shapes) * scale >= 10

    options = option_texts(split, doc)
    truth = benchmark.answer(doc)
    assert options[truth] == _expected_answer(q.question, shapes, functools.partial(_colour_at, pixels))
    assert list(options.values()).count(options[truth]) == 1


def test_question_text_goes_through_the_adapters():
    vstar_doc, hr_doc = stored("vstar")[1], stored("hrbench_4k")[0]
    assert VSTAR.question(vstar_doc) == vstar_doc["text"].rsplit("\n", 1)[0]
    assert re.search(r"\n\(A\) (left|right)\n\(B\) (left|right)$", VSTAR.question(vstar_doc))
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
    subprocess.run([sys.executable, "-m", "p2r_recipe.demo", "--out", str(tmp_path)], check=True, capture_output=True)
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
