"""Training data: P2R-10k rows -> OpenRLHF prompt datasets (JSONL) per role; unusable rows are reported, never dropped silently.

A P2R-10k row (verl-style parquet) carries `prompt` (chat messages with `<image>` tags),
`images` (a list of `{"bytes", "path"}` structs or paths), the ground truth
(`reward_model.ground_truth`), and `extra_info` with `answer_form` in {mca, na, free_form}
and the bare `question`. As in the release, the question is the first user message's text
with every `<image>` tag and the whitespace after it removed, stripped (it carries the
options, and wins over `extra_info.question`, which is used only when the prompt has no
text), and a row without `answer_form` is free-form. Local parquet/JSONL files of the same
shape work too; image paths are resolved inside `--image-root`, embedded image bytes are
written once under `OUT/images/` (named by content hash).

The policy sees a copy of each image fitted to the training pixel budget (`TRAIN_BUDGET`,
upright RGB, JPEG, under `OUT/images/fitted/`): OpenRLHF sizes images with the checkpoint's
own processor settings, which for Qwen3-VL allow far more pixels than the release trained
with (and more image tokens than its 2560-token prompt budget). Evidence is still cut from
the original (`TrainSample.image`), as in evaluation.

Each output line is `{"prompt": [chat messages], "images": [paths], "label": "<json>",
"datasource": ...}`: train with `--data.input_key prompt --data.label_key label
--data.image_key images --data.apply_chat_template`. The label is a `TrainSample`. The user
turn is the release's rollout prompt, `"<image>\n" * n + text` split at the tags as verl
splits it: [image, "\n", image, ..., image, "\n" + text].

Validation. The release did not publish its validation file, so `--val-size` prompts
(default 64, one rollout batch; at most a tenth of the usable samples) are held out of the
training file into `*_val.jsonl`: a random slice drawn with `--val-seed` (default 0) from
the usable samples in source order, so the same source, size and seed always hold out the
same rows, in both stages.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import random
import re
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from p2r_recipe import prompts
from p2r_recipe.images import TRAIN_BUDGET, ImageError, PixelAllowance, encode_image, fit_to_budget, load_image
from p2r_recipe.train.schema import ANSWER_FORMS, DEFAULT_ANSWER_FORM, TrainSample, prompt_row

HUB_ID = "hongxingli/P2R-10k"
VAL_SIZE, VAL_SEED = 64, 0
_IMAGE_TAG = re.compile(r"<image>\s*")
_BATCH = 256


class RowError(ValueError):
    """Why a source row cannot become a training sample; `code` groups the summary."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


@dataclass
class Conversion:
    """The samples a source yielded, and every row it could not use, with the reason."""

    source: str
    samples: list[TrainSample] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "source": self.source,
            "rows": len(self.samples) + len(self.rejected),
            "samples": len(self.samples),
            "answer_forms": dict(Counter(s.answer_form for s in self.samples)),
            "rejected": len(self.rejected),
            "rejected_by_reason": dict(Counter(r["reason"] for r in self.rejected)),
            "rejected_rows": self.rejected,
        }


def read_rows(source: str) -> Iterator[dict | RowError]:
    """Raw rows of a hub dataset id, a local parquet file or a JSONL file (images left undecoded)."""
    path = Path(source)
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError as exc:
                        yield RowError("bad_json", f"line {number}: {exc}")
        return
    from datasets import load_dataset

    if path.suffix == ".parquet":
        dataset = load_dataset("parquet", data_files=str(path), split="train")
    else:
        dataset = load_dataset(source, split="train")
    # Arrow batches keep image bytes undecoded, so one corrupt image is one rejected row, not a crash.
    for batch in dataset.with_format("arrow").iter(batch_size=_BATCH):
        yield from batch.to_pylist()


def _prompt_question(messages: Any) -> str:
    """The release's question: the first user message's text (a string, or its first text part), with every
    `<image>` tag and the whitespace after it removed, stripped."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    user = next((m for m in messages or [] if isinstance(m, dict) and m.get("role") == "user"), None)
    content = user.get("content") if user else None
    if isinstance(content, list):
        content = next((p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"), None)
    return _IMAGE_TAG.sub("", content).strip() if isinstance(content, str) else ""


def _question(row: dict) -> str:
    question = _prompt_question(row.get("prompt"))
    if question:
        return question
    extra = row.get("extra_info") or {}
    for value in (extra.get("question"), row.get("question")):
        if isinstance(value, str) and value.strip():
            return value.strip()
    raise RowError("missing_question", "no user text in prompt and no extra_info.question")


def _answer(row: dict) -> str:
    extra = row.get("extra_info") or {}
    reward_model = row.get("reward_model") or {}
    for value in (reward_model.get("ground_truth"), row.get("ground_truth"), row.get("answer"), extra.get("answer")):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str) and value.strip():
            return value.strip()
    raise RowError("missing_answer", "no ground truth (reward_model.ground_truth, ground_truth, answer)")


class ImageStore:
    """Resolves image references (paths stay inside the image root; embedded bytes are written once by
    content hash) and writes the policy's copy fitted to the training pixel budget."""

    def __init__(self, image_root: str | Path | None, out_dir: Path):
        self.root = Path(image_root).resolve() if image_root else None
        self.folder = out_dir.resolve() / "images"

    def files(self, ref: Any, allowance: PixelAllowance | None = None) -> tuple[Path, Path]:
        """The verified original and its fitted copy for one image reference, or RowError; `allowance` is the row's pixel budget."""
        if isinstance(ref, dict):
            ref = ref.get("bytes") or ref.get("path")
        embedded = isinstance(ref, (bytes, bytearray))
        original = None if embedded else self._inside_root(ref)
        try:
            data = bytes(ref) if embedded else original.read_bytes()
        except OSError as exc:  # unreadable (permissions) or gone since it was checked
            raise RowError("missing_image", f"cannot read {original}: {exc.strerror}") from None
        try:  # a full decode: truncated files fail here, not in the middle of training
            fitted = fit_to_budget(load_image(data, "release", allowance=allowance), TRAIN_BUDGET.max_pixels, TRAIN_BUDGET.min_pixels, TRAIN_BUDGET.factor)
        except ImageError as exc:
            raise RowError("corrupt_image", str(exc)) from None
        digest = hashlib.sha256(data).hexdigest()
        if original is None:
            kind = (Image.open(io.BytesIO(data)).format or "img").lower()
            original = self._write(self.folder / f"{digest}.{kind}", data)
        path = self.folder / "fitted" / f"{digest}_{TRAIN_BUDGET.max_pixels}.jpg"
        return original, path if path.exists() else self._write(path, encode_image(fitted))

    def _inside_root(self, ref: Any) -> Path:
        if not isinstance(ref, str) or not ref:
            raise RowError("missing_image", f"unusable image reference {str(ref)[:80]!r}")
        if self.root is None:
            raise RowError("missing_image", f"{ref!r} is a path but no --image-root was given")
        try:
            path = (self.root / ref).resolve()
            inside, found = path.is_relative_to(self.root), path.is_file()
        except (OSError, ValueError) as exc:  # a NUL byte, a name too long for the file system
            raise RowError("missing_image", f"unusable image path {ref[:80]!r}: {exc}") from None
        if not inside:
            raise RowError("image_outside_root", f"{ref!r} resolves outside the image root {self.root}")
        if not found:
            raise RowError("missing_image", f"{path} does not exist")
        return path

    @staticmethod
    def _write(path: Path, data: bytes) -> Path:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return path


def to_sample(row: dict, index: int, store: ImageStore) -> TrainSample:
    """One P2R-10k row as a TrainSample, or RowError saying why it cannot be used."""
    if not isinstance(row, dict):
        raise RowError("bad_row", f"row is a {type(row).__name__}, not an object")
    extra = row.get("extra_info") or {}
    form = str(extra.get("answer_form") or row.get("answer_form") or DEFAULT_ANSWER_FORM).strip().lower()
    if form not in ANSWER_FORMS:
        # The release would train on it with a reward of 0 every time: rollouts spent on nothing.
        raise RowError("unknown_answer_form", f"answer_form {form!r} is not one of {ANSWER_FORMS}")
    question, answer = _question(row), _answer(row)
    refs = row.get("images", row.get("image"))
    refs = refs if isinstance(refs, list) else [refs] if refs is not None else []
    if len(refs) != 1:
        # P2R perceives one image; the evidence rules are defined for exactly one.
        raise RowError("image_count", f"expected 1 image, got {len(refs)}")
    original, fitted = store.files(refs[0], PixelAllowance())  # one budget for all of a row's images
    sample_id = extra.get("index", row.get("id", index))
    return TrainSample(
        id=str(sample_id), question=question, answer=answer, answer_form=form, image=str(original),
        fitted_image=str(fitted), datasource=str(row.get("data_source") or "p2r"),
    )  # fmt: skip


def convert(source: str, out_dir: str | Path, image_root: str | Path | None = None, workers: int | None = None) -> Conversion:
    """Read and verify every row of `source` (images fully decoded, in parallel), in source order."""
    store = ImageStore(image_root, Path(out_dir))
    result = Conversion(source)

    def one(item: tuple[int, dict | RowError]) -> TrainSample | dict:
        index, row = item
        try:
            if isinstance(row, RowError):
                raise row
            return to_sample(row, index, store)
        except RowError as exc:
            ident = (row.get("extra_info") or {}).get("index", row.get("id")) if isinstance(row, dict) else None
            return {"row": index, "id": None if ident is None else str(ident), "reason": exc.code, "detail": exc.detail}

    rows = enumerate(read_rows(source))
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool, tqdm(desc="rows", unit="row") as bar:
        while batch := list(itertools.islice(rows, _BATCH)):
            for outcome in pool.map(one, batch):
                (result.samples if isinstance(outcome, TrainSample) else result.rejected).append(outcome)
                bar.update()
    return result


def hold_out(samples: list[TrainSample], size: int = VAL_SIZE, seed: int = VAL_SEED) -> tuple[list, list]:
    """(training, validation): `size` samples (at most a tenth) drawn with `seed`, both lists in source order."""
    held = set(random.Random(seed).sample(range(len(samples)), min(size, len(samples) // 10)))
    return [s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held]


def perceiver_row(sample: TrainSample) -> dict:
    return prompt_row(sample, prompts.perceive_text(sample.question, training=True), [sample.fitted_image or sample.image])
