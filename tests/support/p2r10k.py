"""A small synthetic set in P2R-10k's row format (verl-style: prompt, images, reward_model, extra_info), for training tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "cyan", "magenta"]


def picture(i: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A distinct picture per index: a coloured square on a grey background."""
    image = Image.new("RGB", size, (120 + i % 100, 120, 120))
    x = 20 + (i * 37) % (size[0] - 80)
    ImageDraw.Draw(image).rectangle((x, 60, x + 50, 110), fill=COLOURS[i % len(COLOURS)])
    return image


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def question(i: int, form: str) -> str:
    if form == "mca":
        return f"What colour is square {i}?\n(A) {COLOURS[i % 8]}\n(B) {COLOURS[(i + 1) % 8]}"
    if form == "na":
        return f"How many squares are in picture {i}?"
    return f"Describe the square in picture {i}."


def answer(i: int, form: str) -> str:
    return {"mca": "A", "na": "1"}.get(form, f"a {COLOURS[i % 8]} square")


def row(i: int, form: str, image_ref) -> dict:
    """One row as P2R-10k stores it."""
    q = question(i, form)
    return {
        "data_source": "synthetic",
        "prompt": [{"role": "user", "content": f"<image>\n{q}"}],
        "images": [image_ref],
        "ability": "vqa",
        "reward_model": {"ground_truth": answer(i, form), "style": "rule"},
        "extra_info": {"index": i, "question": q, "answer_form": form},
    }


def forms(n: int) -> list[str]:
    return [("mca", "na", "free_form")[i % 3] for i in range(n)]


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def embedded_rows(n: int) -> list[dict]:
    """Rows with the image bytes inside, as the hub parquet carries them."""
    return [row(i, form, {"bytes": png(picture(i)), "path": f"img_{i}.png"}) for i, form in enumerate(forms(n))]


def path_rows(n: int, image_root: Path) -> list[dict]:
    """Rows referring to image files under `image_root` (written here)."""
    (image_root / "imgs").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, form in enumerate(forms(n)):
        picture(i).save(image_root / "imgs" / f"{i}.png")
        rows.append(row(i, form, f"imgs/{i}.png"))
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
