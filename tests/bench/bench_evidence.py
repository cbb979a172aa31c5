"""Evidence speed: parse + annotate + crop + fit to the pixel budget + encode, ours vs the release's straightforward way.

Synthetic photos (4K and 8K, stored as JPEG) with perceiver answers of 0..8 boxes. Timed per sample:
- `ours`: the pipeline's path. The image is already decoded and already fitted to the budget (the
  pipeline decodes each image once and fits it for the perceive pass, before any box exists);
  `gather_evidence`, `Evidence.fit` (the annotated image's fit is that fit resampled again only
  where the boxes were drawn, `images.refit_edited`; the crops through `fit_to_budget`, Pillow's
  bicubic split across threads, same bytes) and `data_url`.
- `ours_with_decode`: the same plus `load_image` of the JPEG bytes, for a run that decodes per call.
- `reference`: `tests/release_rules.py::evidence_payload`: decode, draw, crop, JPEG + base64 of every
  image at full resolution (the server has to shrink them to its pixel budget itself).
- `reference_fitted`: the same with the images shrunk to the pixel budget by a plain
  `Image.resize` before encoding, i.e. the whole job done the straightforward way; its data
  URLs must equal ours byte for byte.
Prints one JSON line and writes results/bench/evidence.json.

    python tests/bench/bench_evidence.py [--sizes 3840x2160 7680x4320] [--boxes 0 1 2 3 4 5 6 7 8] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics

from common import boxes_text, machine, median_s, parse_args, photo, write_result
from PIL import Image

# After `common`, which puts tests/support on sys.path.
import release_rules  # noqa: I001
from p2r_recipe.evidence import gather_evidence
from p2r_recipe.images import PixelBudget, data_url, load_image, smart_resize


def ours(image: Image.Image, fitted: Image.Image, text: str, budget: PixelBudget) -> list[str]:
    """`fitted` is the original image fitted to the budget, which the pipeline's perceive pass already made."""
    evidence = gather_evidence(image, text)
    return [data_url(im) for im in evidence.fit(budget, fitted)]


def reference_fitted(data: bytes, text: str, budget: PixelBudget) -> list[str]:
    images, _ = release_rules.evidence(data, text)
    urls = []
    for i, im in enumerate(images):
        h, w = smart_resize(im.height, im.width, budget.factor, budget.min_pixels, budget.for_image(i))
        im = im.resize((w, h), Image.Resampling.BICUBIC) if (w, h) != im.size else im
        buffer = io.BytesIO()
        im.save(buffer, format="JPEG", quality=95)
        urls.append("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["3840x2160", "7680x4320"])
    parser.add_argument("--boxes", nargs="+", type=int, default=list(range(9)))
    parser.add_argument("--repeats", type=int, default=5)
    args = parse_args(parser, argv, "evidence", quick={"sizes": ["1920x1080"], "boxes": [0, 3], "repeats": 1})

    budget = PixelBudget()  # the release's evaluation budget
    ways = ("ours", "ours_with_decode", "reference", "reference_fitted")
    report: dict = {"budget_max_pixels": budget.max_pixels, "boxes": args.boxes, "repeats": args.repeats, **machine()}
    for size in args.sizes:
        width, height = map(int, size.split("x"))
        data = jpeg(photo(width, height))
        image = load_image(data)
        (fitted,) = budget.fit([image])
        per_way: dict[str, list[float]] = {way: [] for way in ways}
        for count in args.boxes:
            text = boxes_text(count, seed=count)
            if ours(image, fitted, text, budget) != reference_fitted(data, text, budget):
                raise SystemExit(f"{size}, {count} boxes: our data URLs differ from the reference's")
            runs = {
                "ours": lambda: ours(image, fitted, text, budget),
                "ours_with_decode": lambda: ours(load_image(data), fitted, text, budget),
                "reference": lambda: release_rules.evidence_payload(data, text),
                "reference_fitted": lambda: reference_fitted(data, text, budget),
            }
            for way, run in runs.items():
                per_way[way].append(median_s(run, args.repeats) * 1000)
        row = {f"{way}_ms": round(statistics.mean(per_way[way]), 1) for way in ways}
        row["ours_over_reference"] = round(row["ours_ms"] / row["reference_ms"], 3)
        row["ours_over_reference_fitted"] = round(row["ours_ms"] / row["reference_fitted_ms"], 3)
        row["ms_by_box_count"] = {way: [round(v, 1) for v in per_way[way]] for way in ways}
        row["jpeg_bytes"] = len(data)
        report[size] = row
    return write_result(report, args.out)


if __name__ == "__main__":
    main()
