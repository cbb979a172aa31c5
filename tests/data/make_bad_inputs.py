"""Writes the bad-input corpus: broken or unusual images (`bad_images/`, with `expected.json`) and
hostile model outputs (`hostile_outputs.jsonl`), each with the outcome the project defines for it.

    python tests/data/make_bad_inputs.py

Image outcomes: `error` is a substring of the ImageError message (from `load_image`, or from
fitting the pixel budget); otherwise the image loads as upright RGB of `size`, with the listed
`pixels` (x, y -> RGB, within JPEG tolerance) and `fitted` = its size under the default budget.

Hostile outputs: `text` is a string, or for one too long to store a list of segments joined:
strings, and {"unit", "count", "sep"} repeats (a unit containing "{i}" is numbered; "{x1}" etc.
are a 10-unit grid cell, see `expand`). Each has
`boxes` (parse_boxes count), `evidence` (gather_evidence found crops), `answer` (answer_text
in p2r mode, same encoding), `choice` (extract_choice of it), `perceiver` ([reward, reason]
with a frozen reasoner answering A with evidence and C without, gold A) and `reasoner`
([reward, reason] for the text as the policy's own answer under the release's training rules,
`training_choice`; gold `gold`, form `form`).
"""

from __future__ import annotations

import io
import json
import random
import re
import struct
import zlib
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
IMAGES = HERE / "bad_images"
RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _halves(size: tuple[int, int], left, right, mode: str = "RGB") -> Image.Image:
    image = Image.new(mode, size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming `width` x `height`, with one tiny IDAT: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


def _corrupt_png() -> bytes:
    data = bytearray(_save(_halves((32, 32), RED, BLUE), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start + 2 : start + 10] = b"\xff" * 8  # inside the zlib stream; the CRC no longer matches
    return bytes(data)


def _exif_rotated() -> bytes:
    """Stored 40x20 (red left, blue right) with EXIF Orientation 6: shown upright as 20x40, red on top."""
    image = _halves((40, 20), RED, BLUE)
    exif = image.getexif()
    exif[0x0112] = 6
    return _save(image, "JPEG", exif=exif, quality=95)


def _bad_exif() -> bytes:
    """A JPEG whose APP1 Exif segment is garbage."""
    data = _save(Image.new("RGB", (16, 16), GREEN), "JPEG", quality=95)
    segment = b"Exif\0\0" + b"MM\0*\xff\xff\xff\xff" + b"\x13" * 40
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + data[2:]


def _palette_transparent() -> bytes:
    """Palette image: index 0 (left, red) fully transparent, index 1 (right, blue) opaque."""
    image = _halves((16, 16), 0, 1, mode="P")
    image.putpalette([*RED, *BLUE] + [0] * (254 * 3))
    return _save(image, "PNG", transparency=0)


def _gray16() -> bytes:
    image = _halves((16, 16), 0, 65535, mode="I;16")
    return _save(image, "PNG")


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, GREEN, BLUE)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _gif_bomb() -> bytes:
    """A GIF whose logical screen and frame claim 65535 x 65535 pixels."""
    data = bytearray(_save(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", 65535, 65535)
    at = data.index(b"\x2c")  # image descriptor: left, top, width, height
    data[at + 5 : at + 9] = struct.pack("<HH", 65535, 65535)
    return bytes(data)


def _la() -> bytes:
    """Greyscale + alpha: left black and transparent, right black and opaque."""
    return _save(_halves((16, 16), (0, 0), (0, 255), mode="LA"), "PNG")


_JPEG = _save(_halves((64, 64), RED, BLUE), "JPEG", quality=95)
_NOISE_PNG = _save(Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3)), "PNG")

# name -> (what it is, bytes, expected outcome)
BAD_IMAGES = {
    "empty.jpg": ("0 bytes", b"", {"error": "empty image file"}),
    "truncated.jpg": ("a JPEG cut in half", _JPEG[: len(_JPEG) // 2], {"error": "unreadable image"}),
    "truncated.png": ("a PNG cut inside its pixel data", _NOISE_PNG[:-40], {"error": "unreadable image"}),
    "corrupt.png": ("a PNG with bytes overwritten inside IDAT", _corrupt_png(), {"error": "unreadable image"}),
    "bomb.png": ("decompression bomb: 100000 x 100000 in a 70-byte header", _png_header_only(100_000, 100_000), {"error": "image too large"}),
    "bomb.gif": ("decompression bomb: a GIF claiming 65535 x 65535", _gif_bomb(), {"error": "image too large"}),
    "zero_width.png": ("a PNG header claiming width 0", _png_header_only(0, 16), {"error": "unreadable image"}),
    "not_an_image.jpg": ("plain text with an image extension", b"This is a text file, not a JPEG.\n", {"error": "unreadable image"}),
    "html.png": ("an HTML error page saved as .png", b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n", {"error": "unreadable image"}),
    "wide_20000x10.png": (
        "20000 x 10: aspect ratio 2000, beyond Qwen-VL's 200",
        _save(Image.new("RGB", (20000, 10), RED), "PNG"),
        {"error": "aspect ratio 2000 exceeds 200"},
    ),
    "one_pixel.png": (
        "1 x 1: upscaled to the budget's minimum",
        _save(Image.new("RGB", (1, 1), RED), "PNG"),
        {"size": [1, 1], "pixels": [[0, 0, RED]], "fitted": [128, 128]},
    ),
    "cmyk.jpg": (
        "CMYK JPEG (left cyan, right yellow)",
        _save(_halves((32, 24), (255, 0, 0, 0), (0, 0, 255, 0), mode="CMYK"), "JPEG", quality=95),
        {"size": [32, 24], "pixels": [[2, 12, [0, 255, 255]], [29, 12, [255, 255, 0]]], "fitted": [160, 128]},
    ),
    "gray16.png": (
        "16-bit greyscale (left 0, right 65535): scaled to 8 bits, not clipped",
        _gray16(),
        {"size": [16, 16], "pixels": [[0, 0, BLACK], [15, 0, WHITE]], "fitted": [128, 128]},
    ),
    "palette_transparent.png": (
        "palette image with a transparent index: flattened on white",
        _palette_transparent(),
        {"size": [16, 16], "pixels": [[0, 0, WHITE], [15, 15, BLUE]], "fitted": [128, 128]},
    ),
    "grey_alpha.png": (
        "greyscale + alpha: transparent half flattened on white",
        _la(),
        {"size": [16, 16], "pixels": [[0, 0, WHITE], [15, 0, BLACK]], "fitted": [128, 128]},
    ),
    "exif_rotated.jpg": (
        "stored 40x20 with EXIF orientation 6: rotated upright to 20x40",
        _exif_rotated(),
        {"size": [20, 40], "pixels": [[10, 2, RED], [10, 37, BLUE]], "fitted": [96, 192]},
    ),
    "bad_exif.jpg": (
        "a JPEG with a garbage Exif segment: the pixels are used as stored",
        _bad_exif(),
        {"size": [16, 16], "pixels": [[8, 8, GREEN]], "fitted": [128, 128]},
    ),
    "animated.gif": (
        "animated GIF (red, green, blue frames): the first frame is used",
        _animated_gif(),
        {"size": [16, 16], "pixels": [[8, 8, RED]], "fitted": [128, 128]},
    ),
    "png_named.jpg": (
        "a PNG with a .jpg extension: the content decides",
        _save(Image.new("RGB", (48, 32), GREEN), "PNG"),
        {"size": [48, 32], "pixels": [[0, 0, GREEN]], "fitted": [160, 128]},
    ),
}


def _box(x1, y1, x2, y2, label="cat") -> dict:
    return {"bbox_2d": [x1, y1, x2, y2], "label": label}


BOX = json.dumps([_box(100, 100, 300, 300)])
TWO = json.dumps([_box(100, 100, 300, 300, "a"), _box(600, 600, 700, 700, "b")])
ANSWER_A = "<think>Looked.</think><answer>A</answer>"
MB = 1 << 20
GOT, NONE = [1.0, ""], [0.0, ""]  # perceiver: evidence -> reasoner says A (right); none -> C (wrong)
PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer", "The best option is",
            "The correct option is", "Best answer:", "Best option:", "Answer:", "Option:", "The correct answer",
            "The correct option")  # fmt: skip


def training_choice(text) -> str:
    """The release's training reading of a reply (p2r_reward.py), transcribed: the first case-sensitive <answer>
    tags, else the whole text, stripped; the 12 prefixes removed; the first capital A-E."""
    text = expand(text)
    start = text.find("<answer>")
    end = text.find("</answer>", start + len("<answer>")) if start >= 0 else -1
    answer = (text[start + len("<answer>") : end] if end >= 0 else text).strip()
    for prefix in PREFIXES:
        answer = answer.replace(prefix, "")
    found = re.search("[ABCDE]", answer)
    return found.group(0) if found else ""


def _out(id_, text, boxes=0, evidence=None, answer=None, choice="", perceiver=None, reasoner=None, **extra) -> dict:
    evidence = boxes > 0 if evidence is None else evidence
    perceiver = perceiver or (GOT if evidence else NONE)
    reasoner = reasoner or [float(training_choice(text) == "A"), ""]
    return {"id": id_, "text": text, "boxes": boxes, "evidence": evidence, "answer": answer, "choice": choice,
            "perceiver": perceiver, "reasoner": reasoner, **extra}  # fmt: skip


def _repeat(unit: str, count: int, sep: str = "") -> dict:
    return {"unit": unit, "count": count, "sep": sep}


def expand(text: str | list) -> str:
    """A stored output as the model wrote it (the tests use this same function)."""
    if isinstance(text, str):
        return text
    parts = []
    for seg in text:
        if isinstance(seg, str):
            parts.append(seg)
        elif "{i}" in seg["unit"]:
            cells = ((i, i % 100 * 10, i // 100 % 100 * 10) for i in range(seg["count"]))
            parts.append(seg["sep"].join(seg["unit"].format(i=i, x1=x, y1=y, x2=x + 8, y2=y + 8) for i, x, y in cells))
        else:
            parts.append(seg["sep"].join([seg["unit"]] * seg["count"]))
    return "".join(parts)


_GRID_BOX = '{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": "cell {i}"}}'
_CELL = '{{"bbox_2d": [10, 10, 90, 90], "label": "cell {i}"}}'

HOSTILE_OUTPUTS = [
    # malformed JSON
    _out("unclosed_list", BOX[:-1], boxes=1),
    _out("unclosed_object", BOX[:-2]),
    _out("trailing_comma", BOX[:-1] + ",]", boxes=1),
    _out("single_quotes", BOX.replace('"', "'")),
    _out("code_fence", f"```json\n{BOX}\n```", boxes=1),
    _out("prose_around_boxes", f"The cat is at {json.dumps(_box(1, 1, 9, 9, 'a'))}, the dog at {json.dumps(_box(50, 50, 90, 90, 'b'))}.", boxes=2),
    _out("three_coordinates", '[{"bbox_2d": [100, 100, 300], "label": "cat"}]'),
    _out("five_coordinates", '[{"bbox_2d": [100, 100, 300, 300, 5], "label": "cat"}]'),
    _out("reversed_corners", json.dumps([_box(300, 300, 100, 100)])),
    _out("zero_width_box", json.dumps([_box(100, 100, 100, 300)])),
    _out("coordinates_out_of_range_are_kept", json.dumps([_box(-50, -20, 2000, 1500)]), boxes=1),
    _out("float_exponents", '[{"bbox_2d": [1e2, 1e2, 3e2, 3.0e2], "label": "cat"}]', boxes=1),
    _out("nested_coordinate_lists", '[{"bbox_2d": [[100, 100], [300, 300]], "label": "cat"}]'),
    _out("uppercase_key", '[{"BBOX_2D": [100, 100, 300, 300], "label": "cat"}]'),
    _out("bbox_as_object", '[{"bbox_2d": {"x1": 1, "y1": 1, "x2": 3, "y2": 3}, "label": "cat"}]'),
    _out("list_of_lists", f"[{BOX}]"),
    _out("json_null", "null"),
    _out("json_number", "42"),
    _out("json_string_holding_boxes", json.dumps(BOX)),
    _out("empty_list", "[]"),
    # NaN, Infinity, huge numbers, strings as coordinates
    _out("nan", '[{"bbox_2d": [NaN, 0, 100, 100], "label": "cat"}]'),
    _out("infinity", '[{"bbox_2d": [0, 0, Infinity, 100], "label": "cat"}]'),
    _out("minus_infinity", '[{"bbox_2d": [-Infinity, 0, 100, 100], "label": "cat"}]'),
    _out("huge_float_kept", '[{"bbox_2d": [0, 0, 1e308, 1e308], "label": "cat"}]', boxes=1),
    _out("float_overflow", '[{"bbox_2d": [0, 0, 1e400, 100], "label": "cat"}]'),
    _out("int_beyond_float", '[{"bbox_2d": [0, 0, 1%s, 100], "label": "cat"}]' % ("0" * 400)),
    _out("int_5000_digits", '[{"bbox_2d": [0, 0, 1%s, 100], "label": "cat"}]' % ("0" * 5000)),
    _out("string_coordinates", '[{"bbox_2d": ["100", "100", "300", "300"], "label": "cat"}]'),
    _out("boolean_coordinates", '[{"bbox_2d": [true, false, true, true], "label": "cat"}]'),
    _out("null_coordinates", '[{"bbox_2d": [null, null, null, null], "label": "cat"}]'),
    # many boxes, deep nesting, megabyte-long text
    _out("boxes_10000_distinct", ["[", _repeat(_GRID_BOX, 10_000, ", "), "]"], boxes=10_000),
    _out("boxes_10000_identical", ["[", _repeat(_CELL, 10_000, ", "), "]"], boxes=10_000, perceiver=[0.0, "iou_penalty"]),
    _out("deep_list", [_repeat("[", 100_000), _repeat("]", 100_000)]),
    _out("deep_object", [_repeat('{"a":', 100_000), "1", _repeat("}", 100_000)]),
    _out("box_inside_deep_nesting", [_repeat("[", 50_000), BOX, _repeat("]", 50_000)], boxes=1),
    _out("megabyte_of_letters", [_repeat("a", MB)]),
    _out("megabyte_of_unclosed_box_keys", ["{", _repeat('"bbox_2d": [1, 2, 3, 4], ', MB // 25)]),
    _out("megabyte_of_opening_answer_tags", [_repeat("<answer>", MB // 8)]),
    _out("megabyte_answer", ["<think>x</think><answer>", _repeat("A", MB), "</answer>"], answer=[_repeat("A", MB)], choice="A"),
    _out("megabyte_think", ["<think>", _repeat("x", MB), "</think><answer>A</answer>"], answer="A", choice="A"),
    # labels
    _out("unicode_label", json.dumps([_box(100, 100, 300, 300, "猫 🐱 ĉ")], ensure_ascii=False), boxes=1),
    _out("invisible_label", json.dumps([_box(100, 100, 300, 300, "\u202e\u200b")]), boxes=1),
    _out("lone_surrogate_label", '[{"bbox_2d": [100, 100, 300, 300], "label": "\\ud800"}]', boxes=1),
    _out("placeholder_label", json.dumps([_box(100, 100, 300, 300, "description")]), boxes=1, perceiver=[0.0, "label_penalty"]),
    _out("empty_label", json.dumps([_box(100, 100, 300, 300, "")]), boxes=1, perceiver=[0.0, "label_penalty"]),
    _out("missing_label", '{"bbox_2d": [100, 100, 300, 300]}', boxes=1, perceiver=[0.0, "label_penalty"]),
    # The release raises on a label that is not a string; ours penalises it.
    _out("number_label", '[{"bbox_2d": [100, 100, 300, 300], "label": 42}]', boxes=1, perceiver=[0.0, "label_penalty"]),
    _out("object_label", '[{"bbox_2d": [100, 100, 300, 300], "label": {"name": ["cat"]}}]', boxes=1,
         perceiver=[0.0, "label_penalty"]),  # fmt: skip
    _out("null_label", '[{"bbox_2d": [100, 100, 300, 300], "label": null}]', boxes=1, perceiver=[0.0, "label_penalty"]),
    _out("capitalised_placeholder_label", json.dumps([_box(100, 100, 300, 300, " Description ")]), boxes=1,
         perceiver=[0.0, "label_penalty"]),  # fmt: skip
    _out("whitespace_label", json.dumps([_box(100, 100, 300, 300, "  ")]), boxes=1),
    _out("100kb_label", ['[{"bbox_2d": [100, 100, 300, 300], "label": "', _repeat("cat ", 25_000), '"}]'], boxes=1),
    _out("overlapping_pair", json.dumps([_box(0, 0, 500, 500, "a"), _box(10, 10, 510, 510, "b")]), boxes=2, perceiver=[0.0, "iou_penalty"]),
    # answer tags
    _out("empty_output", ""),
    _out("whitespace_only", " \n\t "),
    _out("no_answer_tags", "The answer is A."),
    _out("think_only", "<think>The answer is A.</think>"),
    _out("unclosed_answer", "<think>x</think><answer>A"),
    _out("several_answer_tags", "<answer>B</answer> no wait <answer>A</answer>", answer="B", choice="B"),
    _out("uppercase_tags", "<ANSWER>A</ANSWER>"),  # the release's tags are case-sensitive: no answer
    _out("nested_answer_tags", "<answer><answer>A</answer></answer>", answer="<answer>A", choice="A"),
    _out("answer_prefix_and_parentheses", "<answer>The answer is (A)</answer>", answer="The answer is (A)", choice="A"),
    _out("stray_capital_counts", "<answer>Definitely C</answer>", answer="Definitely C", choice="D"),
    _out("lowercase_letter", "<answer>a</answer>", answer="a", choice=""),
    _out("letter_not_offered", "<answer>E</answer>", answer="E", choice=""),
    _out("nul_byte", "<answer>\u0000A</answer>", answer="\u0000A", choice="A"),
    _out("terminal_escape", "\u001b[31m<answer>A</answer>\u001b[0m", answer="A", choice="A"),
    _out("html_injection", "<script>alert(1)</script><answer>A</answer>", answer="A", choice="A"),
    _out("boxes_and_answer", f"{BOX}\n{ANSWER_A}", boxes=1, answer="A", choice="A"),
    # numeric answers (reasoner role, form na): equivalence must stay bounded on hostile expressions; scores are
    # mathruler's (the release's training grader), which wants an integer answer for an integer truth
    *(
        _out(f"numeric_{name}", f"<answer>{value}</answer>", answer=value, choice="", form="na", gold="42", reasoner=[score, ""])
        for name, value, score in [
            ("plain", "42", 1.0),
            ("fraction", "\\frac{84}{2}", 0.0),
            ("decimal", "42.0", 1.0),
            ("nan", "NaN", 0.0),
            ("overflow", "1e999999", 0.0),
            ("power_tower", "9^{9^{9}}", 0.0),
            ("huge_power", "2^{99999999999}", 0.0),
            ("factorial_of_googol", "(10^{100})!", 0.0),
            ("binomial", "\\binom{10^{9}}{10^{5}}", 0.0),
            ("towers_in_parentheses", "((10^{99})^{9999})^{9999}", 0.0),
            ("exponential_tower", "e^{e^{e^{e}}}", 0.0),
            ("small_power", "2^{5}+10", 0.0),
        ]
    ),
]


def main(out: Path = HERE) -> None:
    images = out / IMAGES.name
    images.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (what, data, outcome) in BAD_IMAGES.items():
        (images / name).write_bytes(data)
        expected[name] = {"what": what, **outcome}
    (images / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    lines = (json.dumps(item) + "\n" for item in HOSTILE_OUTPUTS)
    (out / "hostile_outputs.jsonl").write_text("".join(lines))
    print(f"{len(BAD_IMAGES)} images in {images}, {len(HOSTILE_OUTPUTS)} outputs in {out / 'hostile_outputs.jsonl'}")


if __name__ == "__main__":
    main()
