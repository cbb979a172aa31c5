"""The code side of this project's lmms-eval task YAMLs: a doc's prompt and image in, per-sample metrics out.

Each folder under lmms_eval_tasks/ has a thin utils.py binding these functions to its
benchmark (p2r_recipe.lmms.benchmarks). Every metric is a per-sample number (accuracy: 0 or
100) averaged over the samples it applies to; `errors` is a count. lmms-eval expects
every sample to return every metric it returns at all, so a sample returns None where a
metric does not apply to it (another category's accuracy; `boxes` when the perceiver did
not run) and `mean_known` skips those; a whole run returns no `boxes*` outside p2r mode
and no cost metrics for other models' replies, so lmms-eval omits them: never NaN.

Circular evaluation (the `*_circular` task variants): `circular_docs` asks every question once
per rotation of its options (a doc per rotation, lmms-eval's own requests, so every model,
backend, `--use_cache` and `record_cache` work unchanged). Rotation 0 is the stored question,
byte for byte: its samples give the release's metrics (`overall`, per category); all rotations
together give `overall_circular` and `<category>_circular`, where a question counts as correct
only when every rotation is. `letter_bias` (every task) counts predicted letters against the
ground-truth letters.

Hub copies: lmms-eval moved its tasks' datasets from `lmms-lab/...` to `lmms-lab-encoder/...`
(its PR #1416, a Hugging Face repo move: the old ids redirect "but should no longer be relied on";
V*'s fields are unchanged). `read_hub_copies` (installed by the V* tasks' utils.py) makes lmms-eval's download
try each copy in HUB_COPIES in turn and, when none loads, stop naming them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from loguru import logger
from PIL import Image

from .. import prompts
from ..scoring import answer_text
from . import benchmarks, envelope
from .benchmarks import NO_LETTER, Benchmark


@dataclass
class Reply:
    """What scoring needs from one reply: an envelope's record, or another model's plain text."""

    answer: str | None
    mode: str | None = None
    boxes: int | None = None
    output_tokens: int | None = None
    seconds: float | None = None
    error: str | None = None


def read_reply(text: str) -> Reply:
    """A reply of the `p2r` model carries its record; any other text is a whole default-mode answer."""
    try:
        record = envelope.unwrap(text)
    except ValueError as exc:
        return Reply(answer=None, error=str(exc))
    if record is None:
        return Reply(answer=answer_text(text if isinstance(text, str) else "", "default"))
    perceived = record["mode"] == "p2r" and record["perceiver_output"] is not None
    return Reply(
        answer=record["answer"],
        mode=record["mode"],
        boxes=record["box_count"] if perceived else None,
        output_tokens=record["output_tokens"],
        seconds=record["latency_s"],
        error=record["error"],
    )


# Columns `circular_docs` adds: which rotation a doc asks, and how many its question has.
ROTATION = "p2r_rotation"
ROTATIONS = "p2r_rotations"
# A dataset's hub ids, in the order they are tried: the maintained id first, then the one the P2R release names.
HUB_COPIES = {"lmms-lab-encoder/vstar-bench": ("lmms-lab-encoder/vstar-bench", "lmms-lab/vstar-bench")}


class DatasetMissing(SystemExit):
    """No hub copy of a task's dataset could be loaded. A SystemExit, because lmms-eval 0.7.3 logs
    an Exception raised while it loads tasks and exits 0, which a script would take for success."""


def _reason(exc: BaseException) -> str:
    # lmms-eval retries the download with tenacity, whose RetryError hides the real failure.
    last = getattr(exc, "last_attempt", None)
    cause = last.exception() if last is not None and last.failed else exc
    return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"


def read_hub_copies() -> None:
    """Make lmms-eval's `ConfigurableTask.download` try every hub copy of a dataset in HUB_COPIES, in
    order, and raise DatasetMissing naming each copy and why it failed when none loads (idempotent).

    The copy that loaded becomes the task's `dataset_path`, so the results JSON names it; reading
    another than the first is logged. Tasks of other datasets download exactly as before.
    """
    # Imported here: only lmms-eval runs load task utils, and lmms-eval is heavy to import.
    from lmms_eval.api.task import ConfigurableTask

    builtin = ConfigurableTask.download
    if getattr(builtin, "p2r_copies", False):
        return

    def download(self, dataset_kwargs=None):
        copies = HUB_COPIES.get(self.DATASET_PATH)
        if copies is None:
            return builtin(self, dataset_kwargs)
        failures = []
        for path in copies:
            self.DATASET_PATH = path
            try:
                builtin(self, dataset_kwargs)
            except Exception as exc:  # any failure to load one copy means: try the next
                failures.append(f"  {path}: {_reason(exc)}")
                continue
            if path != copies[0]:
                logger.warning(f"p2r: {copies[0]} could not be loaded; read {path}, its copy with the same fields")
            self.config.dataset_path = path
            return None
        raise DatasetMissing(
            f"p2r: task {self.config.task}: none of the hub copies of its dataset could be loaded:\n"
            + "\n".join(failures)
            + f"\nDownload one, e.g. `hf download --repo-type dataset {copies[0]}` "
            f"(or {' / '.join(copies[1:])}), with network access (HF_HUB_OFFLINE unset)."
        )

    download.p2r_copies = True
    download.__doc__ = builtin.__doc__
    ConfigurableTask.download = download


def asked(benchmark: Benchmark, doc: dict) -> dict:
    """The doc as asked: its stored form, or its rotation in a circular task."""
    return benchmark.rotate(doc, doc.get(ROTATION) or 0)


def doc_to_visual(benchmark: Benchmark, doc: dict) -> list[Image.Image]:
    """The doc's images decoded as stored (their PIL mode, no EXIF rotation): the `p2r` model converts
    them by its `image_mode`. A corrupt one raises ImageError, which the model makes a per-sample error."""
    return benchmark.images(doc, image_mode=None)


def undecoded_images(dataset):
    """`process_docs` for a dataset with an Image column: keep its stored bytes. `datasets` would
    otherwise decode it and apply the EXIF rotation, which the release never does (it reads bytes)."""
    from datasets import Image as ImageFeature

    columns = [name for name, feature in dataset.features.items() if isinstance(feature, ImageFeature)]
    for name in columns:
        dataset = dataset.cast_column(name, ImageFeature(decode=False))
    return dataset


def circular_docs(benchmark: Benchmark, dataset):
    """`process_docs` of a circular task: each doc once per rotation (ROTATION 0..N-1, N options),
    the rotations of a question next to each other, so `--limit` takes whole questions.

    The stored rows are not copied (a column added per rotation, then an index over them), so a
    benchmark's images take no more disk or memory. Raises ValueError naming a doc whose ground
    truth is none of its options.
    """
    # Imported here, as in undecoded_images: `datasets` comes with lmms-eval and only its runs need it.
    from datasets import concatenate_datasets

    light = dataset.remove_columns([c for c in benchmark.image_columns if c in dataset.column_names])
    counts = []
    for doc in light:
        counts.append(benchmark.rotations(doc))
        benchmark.rotate(doc, 1)  # a doc that cannot be rotated fails here, before any request
    copies = [
        dataset.add_column(ROTATION, [shift] * len(dataset)).add_column(ROTATIONS, counts)
        for shift in range(max(counts, default=1))
    ]
    whole = concatenate_datasets(copies)
    return whole.select([shift * len(dataset) + i for i, n in enumerate(counts) for shift in range(n)])


def doc_to_text(benchmark: Benchmark, doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The bare question for the `p2r` model (its mode adds the post-prompt); other models get the
    release's direct-answer prompt (`direct_prompt: true` in the YAML's default kwargs)."""
    question = benchmark.question(asked(benchmark, doc))
    if (lmms_eval_specific_kwargs or {}).get("direct_prompt"):
        return prompts.direct_text(question, benchmark.answer_form)
    return question


def process_results(benchmark: Benchmark, doc: dict, results: list[str]) -> dict[str, float | None]:
    """Per-sample metric values; an errored sample scores 0 and counts 1 in `errors`.

    In a circular task the release's accuracies come from rotation 0 alone (None for the others);
    every rotation adds to `*_circular`, the cost metrics and `letter_bias`.
    """
    reply = read_reply(results[0])
    shift = doc.get(ROTATION)
    item = benchmark.item(
        asked(benchmark, doc),
        reply.answer,
        boxes=reply.boxes,
        output_tokens=reply.output_tokens,
        seconds=reply.seconds,
        error=reply.error,
    )
    own = item["category"]
    score = 100.0 * item["correct"] if not shift else None
    metrics = {"overall": score, "errors": int(item["error"] is not None)}
    metrics.update({c: score if c == own else None for c in benchmark.categories})
    metrics["letter_bias"] = {"predicted": item["prediction"] or NO_LETTER, "truth": item["answer"]}
    if shift is not None:
        rotation = {"id": item["id"], "rotation": shift, "rotations": doc[ROTATIONS], "correct": item["correct"]}
        metrics["overall_circular"] = rotation
        metrics.update({f"{c}_circular": rotation if c == own else None for c in benchmark.categories})
    if reply.mode == "p2r":
        metrics["boxes"] = reply.boxes
        metrics.update({f"boxes_{c}": reply.boxes if c == own else None for c in benchmark.categories})
    if reply.mode is not None:
        metrics["output_tokens"], metrics["seconds_per_sample"] = reply.output_tokens, reply.seconds
    return metrics


def bind(benchmark: Benchmark):
    """The `doc_to_visual`, `doc_to_text`, `process_results` and circular `process_docs` a task's
    utils.py exposes, bound to one benchmark."""

    def visual(doc):
        return doc_to_visual(benchmark, doc)

    def text(doc, lmms_eval_specific_kwargs=None):
        return doc_to_text(benchmark, doc, lmms_eval_specific_kwargs)

    def results(doc, results):
        return process_results(benchmark, doc, results)

    def circular(dataset):
        return circular_docs(benchmark, dataset)

    return visual, text, results, circular


def mean_known(values: list[float | None]) -> float | None:
    """Mean over the samples a metric applies to; None (JSON null) when it applies to none."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def total(values: list[int]) -> int:
    """Aggregation of `errors` within a task."""
    return sum(values)


def circular_accuracy(values: list[dict | None]) -> float | None:
    """CircularEval accuracy x100: a question is correct only if all its rotations are.

    A question with a rotation missing (a `--limit` cut) is left out, with a warning that counts
    them; None when no question is complete.
    """
    questions: dict[str, list[dict]] = {}
    for value in values:
        if value is not None:
            questions.setdefault(value["id"], []).append(value)
    complete = [q for q in questions.values() if sorted(r["rotation"] for r in q) == list(range(q[0]["rotations"]))]
    if len(complete) < len(questions):
        logger.warning(
            f"p2r: circular accuracy leaves out {len(questions) - len(complete)} of {len(questions)} questions "
            "whose rotations were not all answered once each (a --limit that cuts a question?)"
        )
    return 100.0 * sum(all(r["correct"] for r in q) for q in complete) / len(complete) if complete else None


def letter_bias(values: list[dict]) -> dict:
    """Aggregation of `letter_bias` within a task: benchmarks.letter_bias over every sample."""
    return benchmarks.letter_bias([v["predicted"] for v in values], [v["truth"] for v in values])


def group_mean(metrics: list[float | None], sizes: list[int], weight_by_size: bool = True) -> float | None:
    """A group's metric: its tasks' values weighted by their sizes, tasks without a value left out."""
    pairs = [(m, s if weight_by_size else 1) for m, s in zip(metrics, sizes) if m is not None]
    weight = sum(s for _, s in pairs)
    return sum(m * s for m, s in pairs) / weight if weight else None


def group_total(metrics: list[int], sizes: list[int], weight_by_size: bool = False) -> int:
    """Aggregation of `errors` across a group's tasks (lmms-eval's group aggregation signature)."""
    return sum(metrics)
