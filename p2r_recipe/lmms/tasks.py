"""The code side of this project's lmms-eval task YAMLs: a doc's prompt and image in, per-sample metrics out.

Each folder under lmms_eval_tasks/ has a thin utils.py binding these functions to its
benchmark (p2r_recipe.lmms.benchmarks). Every metric is a per-sample number (accuracy: 0 or
100) averaged over the samples it applies to; `errors` is a count. lmms-eval expects
every sample to return every metric it returns at all, so a sample returns None where a
metric does not apply to it (another category's accuracy; `boxes` when the perceiver did
not run) and `mean_known` skips those; a whole run returns no `boxes*` outside p2r mode
and no cost metrics for other models' replies, so lmms-eval omits them: never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from .. import prompts
from ..scoring import answer_text
from . import envelope
from .benchmarks import Benchmark


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


def doc_to_text(benchmark: Benchmark, doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The bare question for the `p2r` model (its mode adds the post-prompt); other models get the
    release's direct-answer prompt (`direct_prompt: true` in the YAML's default kwargs)."""
    question = benchmark.question(doc)
    if (lmms_eval_specific_kwargs or {}).get("direct_prompt"):
        return prompts.direct_text(question, benchmark.answer_form)
    return question


def process_results(benchmark: Benchmark, doc: dict, results: list[str]) -> dict[str, float | None]:
    """Per-sample metric values; an errored sample scores 0 and counts 1 in `errors`."""
    reply = read_reply(results[0])
    item = benchmark.item(
        doc,
        reply.answer,
        boxes=reply.boxes,
        output_tokens=reply.output_tokens,
        seconds=reply.seconds,
        error=reply.error,
    )
    score, own = 100.0 * item["correct"], item["category"]
    metrics = {"overall": score, "errors": int(item["error"] is not None)}
    metrics.update({c: score if c == own else None for c in benchmark.categories})
    if reply.mode == "p2r":
        metrics["boxes"] = reply.boxes
        metrics.update({f"boxes_{c}": reply.boxes if c == own else None for c in benchmark.categories})
    if reply.mode is not None:
        metrics["output_tokens"], metrics["seconds_per_sample"] = reply.output_tokens, reply.seconds
    return metrics


def bind(benchmark: Benchmark):
    """The `doc_to_visual`, `doc_to_text` and `process_results` a task's utils.py exposes, bound to one benchmark."""

    def visual(doc):
        return doc_to_visual(benchmark, doc)

    def text(doc, lmms_eval_specific_kwargs=None):
        return doc_to_text(benchmark, doc, lmms_eval_specific_kwargs)

    def results(doc, results):
        return process_results(benchmark, doc, results)

    return visual, text, results


def mean_known(values: list[float | None]) -> float | None:
    """Mean over the samples a metric applies to; None (JSON null) when it applies to none."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def total(values: list[int]) -> int:
    """Aggregation of `errors` within a task."""
    return sum(values)


def group_mean(metrics: list[float | None], sizes: list[int], weight_by_size: bool = True) -> float | None:
    """A group's metric: its tasks' values weighted by their sizes, tasks without a value left out."""
    pairs = [(m, s if weight_by_size else 1) for m, s in zip(metrics, sizes) if m is not None]
    weight = sum(s for _, s in pairs)
    return sum(m * s for m, s in pairs) / weight if weight else None


def group_total(metrics: list[int], sizes: list[int], weight_by_size: bool = False) -> int:
    """Aggregation of `errors` across a group's tasks (lmms-eval's group aggregation signature)."""
    return sum(metrics)
