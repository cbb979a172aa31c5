"""The threaded bicubic resize gives Pillow's bytes; budgets follow Qwen-VL's smart_resize."""

import os

import numpy as np
import pytest
from PIL import Image

from p2r_recipe import images


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "source, size",
    [
        ((3840, 2160), (1920, 1088)),  # 4K to the release's budget: both passes split
        ((7680, 4320), (2720, 1536)),  # 8K
        ((1500, 1000), (3000, 2000)),  # enlarging
        ((2000, 1200), (2000, 600)),  # height only: vertical pass alone
        ((2048, 1024), (1000, 1024)),  # width only: horizontal pass alone
        ((1200, 4000), (1100, 900)),  # height shrinks much more: Pillow's vertical-first case
    ],
)
def test_threaded_resize_gives_pillows_bytes(source, size, monkeypatch):
    if images._resize_pool is None:
        from concurrent.futures import ThreadPoolExecutor

        monkeypatch.setattr(images, "_resize_pool", ThreadPoolExecutor(2))
        monkeypatch.setattr(images, "_RESIZE_THREADS", 2)
    image = noise(*source)
    assert images.resize_bicubic(image, size).tobytes() == image.resize(size, Image.Resampling.BICUBIC).tobytes()


@pytest.mark.timeout(120)  # the bug this guards against was a child waiting forever
def test_a_forked_child_resizes_with_its_own_threads(monkeypatch):
    if images._resize_pool is None:  # one core: no pool, nothing to inherit
        pytest.skip("single-core machine: resizing is not threaded")
    image = noise(3840, 2160)
    images.resize_bicubic(image, (1920, 1088))  # the parent's pool has started its threads
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            ok = images.resize_bicubic(image, (1920, 1088)).size == (1920, 1088)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize(
    "height, width, expected",
    [(1080, 1920, (1088, 1920)), (8000, 8000, (2048, 2048)), (10, 10, (128, 128))],
)
def test_smart_resize_sides_and_budget(height, width, expected):
    budget = images.PixelBudget()
    h, w = images.smart_resize(height, width, budget.factor, budget.min_pixels, budget.max_pixels)
    assert (h, w) == expected
    assert h % 32 == 0 and w % 32 == 0 and budget.min_pixels <= h * w <= budget.max_pixels


def test_extreme_aspect_ratio_is_an_image_error():
    with pytest.raises(images.ImageError, match="aspect ratio"):
        images.smart_resize(10, 20000, 32, 16 * 1024, 4096 * 1024)


def test_image_modes_release_and_robust():
    from p2r_recipe.images import load_image

    rgba = Image.new("RGBA", (4, 2), (200, 10, 10, 0))
    assert load_image(rgba, "release").getpixel((0, 0)) == (200, 10, 10)  # the colour under the alpha
    assert load_image(rgba, "robust").getpixel((0, 0)) == (255, 255, 255)  # flattened on white
    with pytest.raises(ValueError, match="unknown image_mode 'raw'"):
        load_image(rgba, "raw")
