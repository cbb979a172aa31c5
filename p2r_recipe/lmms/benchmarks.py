"""Per-benchmark record adapters (question, images, answer, category) and the aggregation of scored items.

Each public benchmark is read in its own hub record format:

- V* (`lmms-lab-encoder/vstar-bench`, formerly `lmms-lab/vstar-bench`): `question_id`,
  `image` (HF Image feature), `text` (question, "(A) .." option lines, then "Answer with the
  option's letter from the given choices directly."), `label` (letter), `category`
  (direct_attributes | relative_position).
- HR-Bench (`DreamMr/HR-Bench`, splits hrbench_4k / hrbench_8k): `index`, `question`,
  `answer` (letter), `category` (single | cross), `A`..`D`, `cycle_category`, `image`
  (base64 string).
- MME-RealWorld (`yifanzhang114/MME-RealWorld-Lmms-eval` and `-lite-lmms-eval`): `index`,
  `question`, `multi-choice options` ("(A) .." strings), `answer` (letter), `category`
  ("Perception/<subtask>" | "Reasoning/<subtask>"), `l2-category`, `bytes` (base64 string).

An "item" is the per-sample dict a task's process_results hands to the aggregation;
`Benchmark.item` builds it, `aggregate` turns a list of them into the agreed metrics.
`Benchmark.rotate` writes a doc with its options rotated (circular evaluation) in the same
record format, so every other function reads it as it reads the stored doc.
"""

from __future__ import annotations

import math
import re
from collections import Counter
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


# One option of V*'s `text`: "(A) red" on its own line, or inline up to the next "(B)"; and one
# MME-RealWorld option string ("(A) 30").
_VSTAR_OPTION = re.compile(r"\(([A-F])\)[ \t]?([^\n]*?)(?=[ \t]*\([A-F]\)|[ \t]*\n|[ \t]*$)")
_MME_OPTION = re.compile(r"^\(([A-F])\) ?(.*)$", re.DOTALL)


def _vstar_options(doc: dict) -> list[tuple[str, Any]]:
    return [(m.group(1), m.group(2)) for m in _VSTAR_OPTION.finditer(doc["text"])]


def _vstar_relabel(doc: dict, texts: list[Any], truth: str) -> dict:
    """The option lines' texts replaced in place; every other byte of `text` (and the letters) kept."""
    fill = iter(texts)
    text = _VSTAR_OPTION.sub(lambda m: m.group(0)[: m.start(2) - m.start(0)] + next(fill), doc["text"])
    return {**doc, "text": text, "label": truth}


def _blank(value: Any) -> bool:
    """An HR-Bench option the release leaves out: None or blank text. NaN too, which the release
    would print as "nan" (hub rows have None there, so it never happens on the real data)."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()


def _with_options(question: str, options: list[str]) -> str:
    """The question, then "\nOptions:\n" and one option per line; no header when there are no options."""
    return question + "\nOptions:\n" + "\n".join(options) if options else question


def _hrbench_options(doc: dict) -> list[tuple[str, Any]]:
    return [(letter, doc[letter]) for letter in "ABCD" if not _blank(doc.get(letter))]


def _hrbench_question(doc: dict) -> str:
    return _with_options(doc["question"], [f"{letter}. {text}" for letter, text in _hrbench_options(doc)])


def _hrbench_relabel(doc: dict, texts: list[Any], truth: str) -> dict:
    """The texts in the option columns that had one (blank ones stay blank, so stay left out)."""
    return {**doc, **dict(zip([letter for letter, _ in _hrbench_options(doc)], texts)), "answer": truth}


def _mme_lines(doc: dict) -> list[str]:
    return list(doc["multi-choice options"] if doc["multi-choice options"] is not None else [])


def _mme_question(doc: dict) -> str:
    return _with_options(doc["question"], _mme_lines(doc))


def _mme_matches(doc: dict) -> list[re.Match]:
    matches = [_MME_OPTION.match(line) for line in _mme_lines(doc)]
    if None in matches:
        raise ValueError(f"MME-RealWorld {doc['index']}: an option is not '(X) text': {_mme_lines(doc)!r}")
    return matches


def _mme_options(doc: dict) -> list[tuple[str, Any]]:
    return [(m.group(1), m.group(2)) for m in _mme_matches(doc)]


def _mme_relabel(doc: dict, texts: list[Any], truth: str) -> dict:
    lines = [m.string[: m.start(2)] + text for m, text in zip(_mme_matches(doc), texts)]
    return {**doc, "multi-choice options": lines, "answer": truth}


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
    # (letter, text) of each option as asked, blanks left out; and a doc with other texts in those slots.
    options: Callable[[dict], list[tuple[str, Any]]]
    relabel: Callable[[dict, list[Any], str], dict]
    image_columns: tuple[str, ...]
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

    def aggregate(self, items: list[dict]) -> dict:
        return aggregate(items, self.categories)

    def rotations(self, doc: dict) -> int:
        """How many orders circular evaluation asks the doc in: one per option (one without options)."""
        return max(1, len(self.options(doc)))

    def rotate(self, doc: dict, shift: int) -> dict:
        """The doc asked with its options rotated by `shift`: the option in slot i is the one stored in
        slot i+shift (mod N), letters stay in their slots, the ground truth moves with its text.

        Rotation 0 is the stored doc itself (the release's question, byte for byte). Raises ValueError
        for a doc whose ground truth is none of its option letters, which no rotation can score.
        """
        options = self.options(doc)
        if shift % max(1, len(options)) == 0:
            return doc
        letters, texts = [letter for letter, _ in options], [text for _, text in options]
        truth = self.answer(doc)
        if truth not in letters:
            raise ValueError(f"{self.name} {self.doc_id(doc)}: ground truth {truth!r} is not one of its options {letters}")
        shift %= len(texts)
        moved = letters[(letters.index(truth) - shift) % len(texts)]
        return self.relabel(doc, texts[shift:] + texts[:shift], moved)

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every metric name `aggregate` writes for this benchmark, as its tasks report them."""
        return metric_names(self.categories)

    @property
    def circular_metrics(self) -> tuple[str, ...]:
        """Every metric name this benchmark's circular tasks report."""
        return metric_names(self.categories, circular=True)


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


def metric_names(categories: tuple[str, ...], circular: bool = False) -> tuple[str, ...]:
    """A task's metrics in YAML order: accuracies (circular ones in circular tasks), costs, letter_bias."""
    return (
        "overall",
        *categories,
        *(("overall_circular", *(f"{c}_circular" for c in categories)) if circular else ()),
        "boxes",
        *(f"boxes_{c}" for c in categories),
        "output_tokens",
        "seconds_per_sample",
        "errors",
        "letter_bias",
    )


NO_LETTER = "-"  # letter_bias's key for a prediction without an option letter


def letter_bias(predicted: list[str], truth: list[str]) -> dict:
    """How often each letter was predicted and was the ground truth:
    {"n": samples, "predicted": {letter: count, "-": no letter}, "truth": {letter: count}}."""
    said = Counter(p or NO_LETTER for p in predicted)
    true = Counter(truth)
    letters = sorted((set(said) | set(true)) - {NO_LETTER})
    return {
        "n": len(predicted),
        "predicted": {letter: said[letter] for letter in [*letters, NO_LETTER]},
        "truth": {letter: true[letter] for letter in letters},
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _known(items: list[dict], key: str) -> list[float]:
    return [item[key] for item in items if item.get(key) is not None]


def aggregate(items: list[dict], categories: tuple[str, ...] = ()) -> dict:
    """Accuracy x100 per category and overall, and the cost metrics.

    Categories are those listed plus any the items carry. A metric with nothing to average
    (no items in a category; no boxes outside p2r mode) is None, never NaN. Errored items
    count as wrong and are counted in `errors`. `letter_bias` counts predicted and true letters.
    """
    categories = tuple(dict.fromkeys([*categories, *(item["category"] for item in items)]))
    by_category = {c: [item for item in items if item["category"] == c] for c in categories}

    def accuracy(group: list[dict]) -> float | None:
        mean = _mean([0.0 if item.get("error") else float(item["correct"]) for item in group])
        return None if mean is None else 100.0 * mean

    metrics: dict = {"overall": accuracy(items)}
    metrics.update({c: accuracy(group) for c, group in by_category.items()})
    metrics["boxes"] = _mean(_known(items, "boxes"))
    metrics.update({f"boxes_{c}": _mean(_known(group, "boxes")) for c, group in by_category.items()})
    metrics["output_tokens"] = _mean(_known(items, "output_tokens"))
    metrics["seconds_per_sample"] = _mean(_known(items, "seconds"))
    metrics["errors"] = sum(1 for item in items if item.get("error"))
    metrics["letter_bias"] = letter_bias([item["prediction"] for item in items], [item["answer"] for item in items])
    return metrics


VSTAR = Benchmark(
    name="vstar",
    datasets=("lmms-lab-encoder/vstar-bench", "lmms-lab/vstar-bench"),
    doc_id=lambda doc: str(doc["question_id"]),
    question=_vstar_question,
    image_sources=lambda doc: [doc["image"]],
    answer=lambda doc: doc["label"].strip().upper(),
    category=_lookup(VSTAR_CATEGORIES, "category"),
    categories=tuple(VSTAR_CATEGORIES.values()),
    options=_vstar_options,
    relabel=_vstar_relabel,
    image_columns=("image",),
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
    options=_hrbench_options,
    relabel=_hrbench_relabel,
    image_columns=("image",),
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
    options=_mme_options,
    relabel=_mme_relabel,
    image_columns=("bytes",),
    # The release's MME-RealWorld scorer accepts A-F (some rows carry a sixth option).
    letters="ABCDEF",
)

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (VSTAR, HRBENCH, MMEREALWORLD)}
