import io
import json
import math

import pytest
import release_rules
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageChops

from p2r_recipe.evidence import Box, crop_rect, gather_evidence, iou, parse_boxes


def scene(w=1600, h=900):
    image = Image.new("RGB", (w, h), (40, 90, 140))
    for i in range(0, w, 97):
        image.paste((200, (i * 7) % 255, 60), (i, (i * 3) % h, i + 20, (i * 3) % h + 20))
    return image


def png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def boxes_json(*coords, label="thing"):
    return json.dumps([{"bbox_2d": list(c), "label": label} for c in coords])


def test_parse_whole_json_list_and_single_object():
    assert parse_boxes(boxes_json((10, 20, 300, 400))) == [Box((10, 20, 300, 400), "thing")]
    assert parse_boxes('{"bbox_2d": [1, 2, 3, 4], "label": "a"}') == [Box((1, 2, 3, 4), "a")]
    assert parse_boxes("[]") == []


def test_parse_prose_and_code_fences():
    text = 'Sure! ```json\n[{"bbox_2d": [100, 100, 200, 220], "label": "red cup"},\n {"bbox_2d": [5, 5, 6, 6], "label": "dot"}]\n``` done'
    assert [b.label for b in parse_boxes(text)] == ["red cup", "dot"]
    mixed = 'first {"label": "a", "bbox_2d": [1, 1, 50, 50]} then {"bbox_2d": [9, 9, 2, 2], "label": "inv"} and {"bbox_2d": [1,2,3], "label": "short"}'
    assert parse_boxes(mixed) == [Box((1, 1, 50, 50), "a")]


@pytest.mark.parametrize(
    "coords",
    [[300, 10, 100, 50], [10, 60, 50, 60], [1, 2, 3], [1, 2, 3, 4, 5], ["1", 2, 3, 4], [True, 2, 3, 4], None, "1,2,3,4"],
)
def test_invalid_boxes_are_dropped(coords):
    assert parse_boxes(json.dumps([{"bbox_2d": coords, "label": "x"}])) == []


def test_non_finite_and_out_of_range_coordinates():
    assert parse_boxes('[{"bbox_2d": [NaN, 1, 5, 5]}, {"bbox_2d": [1, 1, Infinity, 5]}]') == []
    # Kept as written, as the release keeps them: IoU and drawing see these numbers.
    assert parse_boxes('[{"bbox_2d": [-50, 10, 1500, 20], "label": "wide"}]') == [Box((-50, 10, 1500, 20), "wide")]
    assert parse_boxes('[{"bbox_2d": [1200, 10, 1500, 20]}]') == [Box((1200, 10, 1500, 20))]
    assert parse_boxes('[{"bbox_2d": [1e308, 1, 1e309, 5]}]') == []


def test_iou_uses_coordinates_as_written():
    # Clamped to 0..1000 these two would be the same box (IoU 1); as written they barely overlap.
    a, b = parse_boxes(boxes_json((-900, 0, 100, 100), (0, 0, 1000, 100)))
    assert iou(a, b) == pytest.approx(100 / 1900)


def test_off_image_box_is_drawn_but_not_cropped():
    image = scene()
    ev = gather_evidence(image, boxes_json((1200, 10, 1500, 20), (100, 100, 300, 250)))
    assert len(ev.boxes) == 2 and len(ev.crops) == 1  # the off-image box gives an empty crop, skipped
    # A box at 1e300 is drawn (off the image) without overflowing the drawing code.
    assert gather_evidence(image, boxes_json((10, 10, 500, 500), (0, 0, 1e300, 1e300))).has_evidence


def test_labels_are_kept_as_text():
    assert parse_boxes('[{"bbox_2d": [1, 1, 5, 5]}]')[0].label == ""
    assert parse_boxes('[{"bbox_2d": [1, 1, 5, 5], "label": 7}]')[0].label == "7"
    assert parse_boxes('[{"bbox_2d": [1, 1, 5, 5], "label": "\\u732b"}]')[0].label == "\u732b"


def test_crop_padding_and_clamping():
    box = Box((100, 200, 300, 400))
    # 1000x1000: pad = min(0.1, 0.6) = 0.1 on both axes
    assert crop_rect(box, 1000, 1000) == (0, 100, 400, 500)
    # 8000x4000: pad_x = 600/8000 = 0.075, pad_y = 600/4000 = 0.15 -> 0.1
    assert crop_rect(box, 8000, 4000) == (int(0.025 * 8000), int(0.1 * 4000), int(0.375 * 8000), int(0.5 * 4000))
    assert crop_rect(Box((0, 0, 1000, 1000)), 640, 480) == (0, 0, 640, 480)


def test_iou():
    a = Box((0, 0, 100, 100))
    assert iou(a, a) == 1.0
    assert iou(a, Box((100, 0, 200, 100))) == 0.0
    assert iou(a, Box((50, 0, 150, 100))) == pytest.approx(1 / 3)


def test_cap_of_three_crops_all_boxes_drawn():
    image = scene()
    coords = [(100 * i, 100, 100 * i + 60, 180) for i in range(1, 6)]
    ev = gather_evidence(image, boxes_json(*coords))
    assert ev.has_evidence and len(ev.boxes) == 5 and len(ev.images) == 4
    annotated = ev.images[0]
    for i, box in enumerate(ev.boxes):  # every box's outline is drawn, in the cycling colours
        x1, y1, _, _ = box.pixels(*image.size)
        assert annotated.getpixel((x1, y1)) == Image.new("RGB", (1, 1), ["red", "green", "blue", "yellow", "orange"][i]).getpixel((0, 0))
    assert len(set(ev.crops)) == 3 and all(c.size[0] > 60 for c in ev.images[1:])


def test_no_box_falls_back_to_original():
    image = scene()
    for text in ["", "no idea", "[]", '[{"bbox_2d": [5, 5, 1, 1]}]', "{" * 10000]:
        ev = gather_evidence(image, text)
        assert not ev.has_evidence and ev.images == [image] and ev.mean_box_area == 0.0


@pytest.mark.parametrize("size", [(1600, 900), (3840, 2160), (333, 1999)])
@pytest.mark.parametrize(
    "text",
    [
        boxes_json((100, 100, 300, 250)),
        boxes_json((0, 0, 1000, 1000), (10, 900, 990, 1000), (500, 500, 501, 501), (20, 30, 40, 50)),
        'The evidence: {"bbox_2d": [700, 10, 990, 300], "label": "sign"} and {"bbox_2d": [1, 1, 2, 2], "label": "x"}',
        boxes_json((-50, -20, 1500, 400), (900, 950, 1300, 1200), (1200, 10, 1500, 20), (100, 100, 200, 200)),
        "nothing here",
    ],
)
def test_matches_release_rules_pixel_for_pixel(size, text):
    image = scene(*size)
    ours = gather_evidence(image, text)
    theirs, _ = release_rules.evidence(png(image), text)
    assert len(ours.images) == len(theirs)
    for a, b in zip(ours.images, theirs):
        assert a.size == b.size
        assert ImageChops.difference(a, b).getbbox() is None


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_parse_never_raises_on_arbitrary_text(text):
    for box in parse_boxes(text):
        x1, y1, x2, y2 = box.bbox_2d
        assert x1 < x2 and y1 < y2 and all(math.isfinite(c) for c in box.bbox_2d)


finite = st.one_of(st.integers(-2000, 3000), st.floats(allow_nan=True, allow_infinity=True))


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 3000),
    st.integers(1, 3000),
    st.lists(st.fixed_dictionaries({"bbox_2d": st.lists(finite, min_size=0, max_size=5), "label": st.text(max_size=5)}), max_size=6),
)
def test_gather_evidence_never_returns_empty(w, h, objects):
    image = Image.new("RGB", (w, h))
    ev = gather_evidence(image, json.dumps(objects))
    assert ev.images
    assert all(im.width >= 1 and im.height >= 1 for im in ev.images)
    assert ev.has_evidence == (len(ev.images) > 1)


def test_evidence_fit_patches_the_original_fit_byte_for_byte() -> None:
    import numpy as np

    from p2r_recipe.evidence import Box, gather_evidence
    from p2r_recipe.images import PixelBudget

    rng = np.random.default_rng(3)
    budget = PixelBudget(max_pixels=300 * 32 * 32, crop_max_pixels=64 * 32 * 32)
    for width, height in [(1280, 720), (997, 1501), (2000, 300)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        (fitted,) = budget.fit([image])
        for count in (0, 1, 3, 8):
            corners = rng.uniform(0, 1000, (count, 2, 2))
            # Random boxes, including ones at the image's edges and ones thinner than two outline widths.
            boxes = [Box((*c.min(0), *c.max(0))) for c in corners] + [
                Box((0, 0, 1000, 3)), Box((990, 400, 1000, 1000)), Box((500, 500, 501, 501)), Box((0, 0, 1, 1000)),
                Box((-50, 200, 1200, 400)), Box((-1e300, -5, 30, 1e300)),
            ]
            evidence = gather_evidence(image, boxes)
            patched, plain = evidence.fit(budget, fitted), budget.fit(evidence.images)
            assert [im.size for im in patched] == [im.size for im in plain]
            assert all(a.tobytes() == b.tobytes() for a, b in zip(patched, plain))
    assert gather_evidence(image, "no boxes").fit(budget, fitted) == [fitted]
