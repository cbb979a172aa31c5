"""Per-benchmark record adapters (question, images, answer, category) and the aggregation of scored items.

Each public benchmark is read in its own hub record format:

- V* (`lmms-lab/vstar-bench`): `question_id`, `image` (HF Image feature), `text` (question,
  "(A) .." option lines, then "Answer with the option's letter from the given choices
  directly."), `label` (letter), `category` (direct_attributes | relative_position).
- HR-Bench (`DreamMr/HR-Bench`, splits hrbench_4k / hrbench_8k): `index`, `question`,
  `answer` (letter), `category` (single | cross), `A`..`D`, `cycle_category`, `image`
  (base64 string).
- MME-RealWorld (`yifanzhang114/MME-RealWorld-Lmms-eval` and `-lite-lmms-eval`): `index`,
  `question`, `multi-choice options` ("(A) .." strings), `answer` (letter), `category`
  ("Perception/<subtask>" | "Reasoning/<subtask>"), `l2-category`, `bytes` (base64 string).

An "item" is the per-sample dict a task's process_results hands to the aggregation;
`Benchmark.item` builds it, `aggregate` turns a list of them into the agreed metrics.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image

from ..images import decode_image, load_image
from ..records import Sample
from ..scoring import extract_choice, score_answer

VSTAR_SUFFIX = "Answer with the option's letter from the given choices directly."
VSTAR_CATEGORIES = {"direct_attributes": "attr", "relative_position": "spatial"}
HRBENCH_CATEGORIES = {"single": "fsp", "cross": "fcp"}
# MME-RealWorld's subtask names (the last part of `category`) -> the published tables' columns.
MME_SUBTASKS = {
    "ocr with complex context": "ocr",
    "remote sensing": "rs",
    "diagram and table": "dt",
    "monitoring": "mo",
    "autonomous_driving": "ad",
}
MME_CATEGORIES = (
    *(f"perception_{s}" for s in ("ocr", "rs", "dt", "mo", "ad")),
    *(f"reasoning_{s}" for s in ("ocr", "dt", "mo", "ad")),
)


def _base64_source(text: str) -> str:
    # A data URL defers decoding to load_image, so a corrupt string is a per-sample ImageError.
    return "data:;base64," + text


# The release's V* rule (vstar.py): the instruction at the end removed, then the rest stripped.
_VSTAR_INSTRUCTION = re.compile(r"\s*Answer with the option'?s letter from the given choices directly\.?\s*$")


def _vstar_question(doc: dict) -> str:
    return _VSTAR_INSTRUCTION.sub("", doc["text"]).strip()


def _blank(value: Any) -> bool:
    """An HR-Bench option the release leaves out: None or blank text. NaN too, which the release
    would print as "nan" (hub rows have None there, so it never happens on the real data)."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()


def _with_options(question: str, options: list[str]) -> str:
    """The question, then "\nOptions:\n" and one option per line; no header when there are no options."""
    return question + "\nOptions:\n" + "\n".join(options) if options else question


def _hrbench_question(doc: dict) -> str:
    return _with_options(doc["question"], [f"{letter}. {doc[letter]}" for letter in "ABCD" if not _blank(doc.get(letter))])


def _mme_question(doc: dict) -> str:
    return _with_options(doc["question"], list(doc["multi-choice options"] if doc["multi-choice options"] is not None else []))


def _mme_category(doc: dict) -> str:
    task, _, subtask = doc["category"].rpartition("/")
    key = MME_SUBTASKS.get(subtask.strip().lower())
    if key is None:
        raise ValueError(f"unknown MME-RealWorld category {doc['category']!r}")
    return f"{'perception' if 'perception' in task.lower() else 'reasoning'}_{key}"


def _lookup(table: dict[str, str], field: str) -> Callable[[dict], str]:
    def category(doc: dict) -> str:
        try:
            return table[doc[field]]
        except KeyError:
            raise ValueError(f"unknown {field} {doc.get(field)!r}; expected one of {sorted(table)}") from None

    return category


@dataclass(frozen=True)
class Benchmark:
    """How to read one benchmark's records, and the categories its accuracy is reported in."""

    name: str
    datasets: tuple[str, ...]
    doc_id: Callable[[dict], str]
    question: Callable[[dict], str]
    image_sources: Callable[[dict], list[Any]]
    answer: Callable[[dict], str]
    category: Callable[[dict], str]
    categories: tuple[str, ...]
    letters: str = "ABCD"
    answer_form: str = "mca"

    def images(self, doc: dict, image_mode: str | None = "release") -> list[Image.Image]:
        """The doc's images as RGB by the rule of `image_mode` (images.IMAGE_MODES), or with None decoded
        as stored (the mode is then the caller's choice); raises ImageError for a corrupt one."""
        if image_mode is None:
            return [decode_image(source) for source in self.image_sources(doc)]
        return [load_image(source, image_mode) for source in self.image_sources(doc)]

    def sample(self, doc: dict) -> Sample:
        """The doc as a pipeline Sample (images stay undecoded until the pipeline loads them)."""
        return Sample(
            id=self.doc_id(doc),
            question=self.question(doc),
            images=self.image_sources(doc),
            answer_form=self.answer_form,
            answer=self.answer(doc),
            letters=self.letters,
        )

    def item(
        self,
        doc: dict,
        answer: str | None,
        *,
        boxes: int | None = None,
        output_tokens: int | None = None,
        seconds: float | None = None,
        error: str | None = None,
    ) -> dict:
        """Score one extracted answer (text inside <answer>, or the whole default-mode output).

        An errored sample is wrong whatever its answer; `boxes` is None outside p2r mode.
        """
        truth = self.answer(doc)
        correct = 0.0 if error else score_answer(answer, truth, self.answer_form, self.letters)
        return Item(
            id=self.doc_id(doc),
            category=self.category(doc),
            correct=correct,
            prediction=extract_choice(answer or "", self.letters),
            answer=truth,
            boxes=boxes,
            output_tokens=output_tokens,
            seconds=seconds,
            error=error,
        ).to_dict()

    def aggregate(self, items: list[dict]) -> dict[str, float | None]:
        return aggregate(items, self.categories)

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every metric name `aggregate` writes for this benchmark."""
        return metric_names(self.categories)


@dataclass
class Item:
    """One scored sample: what the aggregation needs, and what a reader of logged samples wants."""

    id: str
    category: str
    correct: float
    prediction: str
    answer: str
    boxes: int | None = None
    output_tokens: int | None = None
    seconds: float | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def metric_names(categories: tuple[str, ...]) -> tuple[str, ...]:
    return (
        "overall",
        *categories,
        "boxes",
        *(f"boxes_{c}" for c in categories),
        "output_tokens",
        "seconds_per_sample",
        "errors",
    )


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _known(items: list[dict], key: str) -> list[float]:
    return [item[key] for item in items if item.get(key) is not None]


def aggregate(items: list[dict], categories: tuple[str, ...] = ()) -> dict[str, float | None]:
    """Accuracy x100 per category and overall, and the cost metrics.

    Categories are those listed plus any the items carry. A metric with nothing to average
    (no items in a category; no boxes outside p2r mode) is None, never NaN. Errored items
    count as wrong and are counted in `errors`.
    """
    categories = tuple(dict.fromkeys([*categories, *(item["category"] for item in items)]))
    by_category = {c: [item for item in items if item["category"] == c] for c in categories}

    def accuracy(group: list[dict]) -> float | None:
        mean = _mean([0.0 if item.get("error") else float(item["correct"]) for item in group])
        return None if mean is None else 100.0 * mean

    metrics: dict[str, float | None] = {"overall": accuracy(items)}
    metrics.update({c: accuracy(group) for c, group in by_category.items()})
    metrics["boxes"] = _mean(_known(items, "boxes"))
    metrics.update({f"boxes_{c}": _mean(_known(group, "boxes")) for c, group in by_category.items()})
    metrics["output_tokens"] = _mean(_known(items, "output_tokens"))
    metrics["seconds_per_sample"] = _mean(_known(items, "seconds"))
    metrics["errors"] = sum(1 for item in items if item.get("error"))
    return metrics


VSTAR = Benchmark(
    name="vstar",
    datasets=("lmms-lab/vstar-bench",),
    doc_id=lambda doc: str(doc["question_id"]),
    question=_vstar_question,
    image_sources=lambda doc: [doc["image"]],
    answer=lambda doc: doc["label"].strip().upper(),
    category=_lookup(VSTAR_CATEGORIES, "category"),
    categories=tuple(VSTAR_CATEGORIES.values()),
)

HRBENCH = Benchmark(
    name="hrbench",
    datasets=("DreamMr/HR-Bench",),
    doc_id=lambda doc: str(doc["index"]),
    question=_hrbench_question,
    image_sources=lambda doc: [_base64_source(doc["image"])],
    answer=lambda doc: doc["answer"].strip().upper(),
    category=_lookup(HRBENCH_CATEGORIES, "category"),
    categories=tuple(HRBENCH_CATEGORIES.values()),
)

MMEREALWORLD = Benchmark(
    name="mmerealworld",
    datasets=("yifanzhang114/MME-RealWorld-Lmms-eval", "yifanzhang114/MME-RealWorld-lite-lmms-eval"),
    doc_id=lambda doc: str(doc["index"]),
    question=_mme_question,
    image_sources=lambda doc: [_base64_source(doc["bytes"]) if isinstance(doc["bytes"], str) else doc["bytes"]],
    answer=lambda doc: doc["answer"].strip().upper(),
    category=_mme_category,
    categories=MME_CATEGORIES,
    # The release's MME-RealWorld scorer accepts A-F (some rows carry a sixth option).
    letters="ABCDEF",
)

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (VSTAR, HRBENCH, MMEREALWORLD)}
