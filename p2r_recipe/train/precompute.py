"""Stage-2 evidence, computed once: the frozen perceiver's boxes for every sample, evidence images on disk, reasoner prompts.

The request is the release's: the original image fitted to the training budget (max
2,097,152, min 4,096 pixels), JPEG quality 75, the training perceive prompt, max_tokens
2048, temperature 0. A request the perceiver refuses, or an empty answer, keeps the sample
with the original image and the no-evidence prompt, as the release does (counted in the
summary; a refused request is not cached, so a re-run asks again). A perceiver outage is
where we depart: the run stops with a message and resumes from its cache when re-run,
where the release would silently train on the no-evidence prompt.

The perceiver service is asked once per (image content, question, perceiver model),
concurrently with a bound, and each answer is appended to a JSONL cache (flushed and
fsync'd) as it arrives: a re-run makes no service calls for cached samples, and a killed
run loses only the requests in flight. Evidence images (annotated + crops, fitted to the
training pixel budget) are written once per cache key under `OUT/evidence/`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from p2r_recipe import prompts
from p2r_recipe.client import ChatClient, RequestRejected, ServiceUnavailable, gather_all, image_part, run_sync
from p2r_recipe.evidence import gather_evidence
from p2r_recipe.images import (
    TRAIN_BUDGET,
    ImageError,
    PixelBudget,
    encode_image,
    fit_to_budget,
    load_image,
)
from p2r_recipe.records import Journal
from p2r_recipe.release import PERCEIVE_PARAMS, TRAIN_JPEG_QUALITY
from p2r_recipe.train.schema import TrainSample, prompt_row, val_path, write_json, write_jsonl
from p2r_recipe.train.services import ServiceConfig

EVIDENCE_NAMES = ("annotated", "crop1", "crop2", "crop3")
_MANIFEST = "evidence.json"


class PrecomputeStopped(RuntimeError):
    """The perceiver service went down; the message says how far the run got and that the cache keeps it."""


def image_digest(path: str | Path) -> str:
    """sha256 of an image file's bytes: the cache keys on content, not on where the file lives."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(digest: str, question: str, model: str) -> str:
    return hashlib.sha256(json.dumps([digest, question, model]).encode()).hexdigest()


@dataclass
class EvidenceFiles:
    """The evidence written for one cache key (no files: the reasoner sees the original image)."""

    box_count: int
    has_evidence: bool
    files: list[str]


def _perceive_messages(sample: TrainSample, budget: PixelBudget) -> list[dict]:
    image = fit_to_budget(load_image(sample.image, "release"), budget.max_pixels, budget.min_pixels, budget.factor)
    return prompts.service_messages(prompts.perceive_text(sample.question, training=True), [image_part(image, TRAIN_JPEG_QUALITY)])


async def _perceive(
    todo: dict[str, TrainSample], client: ChatClient, cache: Journal, budget: PixelBudget
) -> dict[str, str]:
    """Ask the perceiver for every sample in `todo`; returns the keys it refused (with why) and those whose image
    failed. Raises ServiceUnavailable on an outage."""
    refused: dict[str, str] = {}
    failures: dict[str, str] = {}
    gate = asyncio.Semaphore(client.concurrency)  # also bounds how many decoded images are in memory
    bar = tqdm(total=len(todo), desc="perceiver", unit="sample")

    async def one(key: str, sample: TrainSample) -> None:
        async with gate:
            try:
                messages = await asyncio.to_thread(_perceive_messages, sample, budget)
                output = await client.text(messages, **PERCEIVE_PARAMS)
            except ImageError as exc:
                failures[key] = f"image: {exc}"
            except RequestRejected as exc:
                refused[key] = str(exc)
            else:
                await asyncio.to_thread(cache.add, key, output, id=sample.id)
            bar.update()

    with bar:
        await gather_all(one(key, sample) for key, sample in todo.items())
    return refused, failures


def _evidence(folder: Path, sample: TrainSample, output: str, budget: PixelBudget) -> EvidenceFiles:
    """Build (or reuse) the evidence images of one cache key."""
    manifest = folder / _MANIFEST
    if manifest.exists():
        return EvidenceFiles(**json.loads(manifest.read_text()))
    evidence = gather_evidence(load_image(sample.image, "release"), output)
    files = []
    if evidence.has_evidence:
        folder.mkdir(parents=True, exist_ok=True)
        for name, fitted in zip(EVIDENCE_NAMES, budget.fit(evidence.images)):
            path = folder / f"{name}.jpg"
            path.write_bytes(encode_image(fitted))
            files.append(str(path.resolve()))
    result = EvidenceFiles(len(evidence.boxes), evidence.has_evidence, files)
    # Written last and atomically: its presence means the folder is complete.
    write_json(manifest.with_suffix(".tmp"), result.__dict__).replace(manifest)
    return result


def run(
    samples: list[TrainSample],
    out_dir: str | Path,
    perceiver: ServiceConfig,
    cache_path: str | Path | None = None,
    budget: PixelBudget = TRAIN_BUDGET,
    workers: int | None = None,
    name: str = "reasoner.jsonl",
) -> dict:
    """Write `OUT/<name>` for the samples and return the summary; raises PrecomputeStopped on an outage."""
    out_dir = Path(out_dir)
    cache = Journal(cache_path or out_dir / "perceiver_cache.jsonl")
    client = perceiver.client()
    failures: list[dict] = []

    def key_of(sample: TrainSample) -> str | None:
        try:
            return cache_key(image_digest(sample.image), sample.question, perceiver.model)
        except OSError as exc:
            failures.append({"id": sample.id, "reason": f"image: {exc}"})
            return None

    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        keys = list(tqdm(pool.map(key_of, samples), total=len(samples), desc="hashing", unit="image"))
        first = {}  # samples sharing a key (same image and question) share one request and one evidence folder
        for key, sample in zip(keys, samples):
            if key is not None:
                first.setdefault(key, sample)
        cached_before = sum(1 for key in first if key in cache)
        todo = {key: sample for key, sample in first.items() if key not in cache}
        try:
            refused, problems = run_sync(_perceive(todo, client, cache, budget))
        except ServiceUnavailable as exc:
            done = sum(1 for key in keys if key in cache)
            raise PrecomputeStopped(
                f"{exc}\nStopped: the {perceiver.name} service ({perceiver.base_url}, model {perceiver.model!r}) is down; "
                f"{done}/{len(samples)} samples have their perceiver output saved in {cache.path}. "
                "Start the service and re-run the same command to resume."
            ) from None

        # A refused request is the release's empty answer: original image, no-evidence prompt.
        outputs = {key: cache.get(key) for key in first if key in cache} | {key: "" for key in refused}

        def evidence_of(key: str) -> EvidenceFiles | str:
            if not outputs[key]:
                return EvidenceFiles(0, False, [])
            try:
                return _evidence(out_dir / "evidence" / key[:2] / key, first[key], outputs[key], budget)
            except ImageError as exc:
                return f"image: {exc}"

        ready = list(outputs)
        built = dict(zip(ready, tqdm(pool.map(evidence_of, ready), total=len(ready), desc="evidence", unit="sample")))
        problems.update((key, result) for key, result in built.items() if isinstance(result, str))

    rows, histogram, no_evidence = [], Counter(), 0
    for key, sample in zip(keys, samples):
        if key is None:
            continue
        result = built.get(key)
        if not isinstance(result, EvidenceFiles):
            failures.append({"id": sample.id, "reason": problems[key]})
            continue
        histogram[result.box_count] += 1
        no_evidence += not result.has_evidence
        labelled = replace(sample, box_count=result.box_count, has_evidence=result.has_evidence)
        text = prompts.reason_text(sample.question, sample.answer_form, result.has_evidence, training=True)
        rows.append(prompt_row(labelled, text, result.files or [sample.fitted_image or sample.image]))
    output = write_jsonl(out_dir / name, rows)
    return {
        "output": str(output),
        "samples": len(samples),
        "written": len(rows),
        "perceiver": {"url": perceiver.base_url, "model": perceiver.model},
        "service_calls": client.stats["requests"],
        "service_stats": dict(client.stats),  # retries and seconds waited, e.g. through a service restart
        "cached_before": cached_before,
        "cache": str(cache.path),
        "box_count_histogram": {str(n): histogram[n] for n in sorted(histogram)},
        "no_evidence": no_evidence,
        "perceiver_refused": len(refused),
        "perceiver_empty": sum(1 for key, text in outputs.items() if not text and key not in refused),
        "failed": len(failures),
        "failures": failures,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m p2r_recipe.train.precompute", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, type=Path, help="perceiver.jsonl from `p2r_recipe.train.prepare --role perceiver`")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cache", type=Path, help="perceiver cache (default OUT/perceiver_cache.jsonl)")
    parser.add_argument("--concurrency", type=int, help="requests in flight (default $P2R_CONCURRENCY or 64)")
    parser.add_argument(
        "--val-input", type=Path, help="held-out prompts -> OUT/reasoner_val.jsonl (default: INPUT's *_val.jsonl when it exists)"
    )
    args = parser.parse_args(argv)

    def samples_of(path: Path) -> list[TrainSample]:
        with path.open(encoding="utf-8") as lines:
            return [TrainSample.from_label(json.loads(line)["label"]) for line in lines if line.strip()]

    val_input = args.val_input or val_path(args.input)
    perceiver = ServiceConfig.from_env("perceiver")
    if args.concurrency:
        perceiver = replace(perceiver, concurrency=args.concurrency)
    try:
        summary = run(samples_of(args.input), args.out, perceiver, args.cache)
        if val_input.is_file():
            held_out = samples_of(val_input)
            summary["validation"] = run(held_out, args.out, perceiver, args.cache, name=val_path("reasoner.jsonl").name)
    except PrecomputeStopped as exc:
        print(exc, file=sys.stderr)
        return 1
    path = write_json(args.out / "summary_precompute.json", summary)
    print(
        f"{summary['written']}/{summary['samples']} reasoner prompts, {summary['failed']} failed; summary: {path}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
