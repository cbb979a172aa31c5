"""The three evaluation modes as compositions of prompts, an engine, evidence and scoring.

`default`: one direct pass. `thinking`: one reasoning pass. `p2r`: a batched perceive
pass, evidence from each sample's boxes, then a batched reason pass. Every backend runs
the same code; a bad sample becomes a record with `error` set and never stops the batch.
"""

from __future__ import annotations

import time
from dataclasses import replace

from PIL import Image

from . import prompts
from .engines.base import Engine, Generation, GenParams
from .evidence import Evidence, gather_evidence
from .images import ImageError, PixelBudget, check_image_mode, load_image
from .records import Record, Sample
from .release import RELEASE_MAX_NEW_TOKENS, RELEASE_SAMPLING
from .scoring import answer_text, extract_choice

# The release's evaluation decoding (release.RELEASE_SAMPLING, one SamplingParams for every pass); a
# pass's max_tokens come from release.RELEASE_MAX_NEW_TOKENS, re-exported here for the lmms model.
RELEASE_DECODING = GenParams(**RELEASE_SAMPLING)


def release_params(pass_name: str) -> GenParams:
    """The release's decoding for a pass: a mode's answering pass (`default`, `thinking`, `p2r`) or `perceive`."""
    return replace(RELEASE_DECODING, max_new_tokens=RELEASE_MAX_NEW_TOKENS[pass_name])


class Pipeline:
    """Runs one mode over batches of samples with one engine, or with a second one for the perceive pass.

    `params` decode the answering pass (default: the release's for `mode`); `perceive_params` the
    perceive pass (default: `params` with at most the release's 256 tokens). `image_mode` turns
    inputs into RGB (images.IMAGE_MODES; default the release's plain conversion). `perceive_engine`
    and `perceive_budget` give the perceive pass its own model and pixel budget (mixed roles);
    omitted, `engine` and `budget` play both roles and the requests are exactly those of one engine.
    """

    def __init__(
        self,
        engine: Engine,
        mode: str = "p2r",
        params: GenParams | None = None,
        perceive_params: GenParams | None = None,
        budget: PixelBudget | None = None,
        image_mode: str = "release",
        perceive_engine: Engine | None = None,
        perceive_budget: PixelBudget | None = None,
    ):
        if mode not in prompts.MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {prompts.MODES}")
        check_image_mode(image_mode)
        self.engine, self.mode, self.image_mode = engine, mode, image_mode
        self.params = params or release_params(mode)
        self.perceive_params = perceive_params or replace(
            self.params, max_new_tokens=min(RELEASE_MAX_NEW_TOKENS["perceive"], self.params.max_new_tokens)
        )
        self.budget = budget or PixelBudget()
        self.perceive_engine = perceive_engine or engine
        self.perceive_budget = perceive_budget or self.budget

    def run(self, samples: list[Sample]) -> list[Record]:
        """One record per sample, in order."""
        records = [Record(id=s.id, mode=self.mode) for s in samples]
        images = self._load(samples, records)
        evidence: dict[int, Evidence] = {}
        if self.mode == "p2r":
            evidence = self._perceive(samples, records, images)
        live = list(evidence) if self.mode == "p2r" else list(images)
        final = self._build(live, records, lambda i: self._final_prompt(samples[i], images[i], evidence.get(i)))
        self._generate(self.engine, list(final.values()), [records[i] for i in final], self.params, "raw_answer")
        for i in final:
            self._extract(samples[i], records[i])
        return records

    @staticmethod
    def _build(live: list[int], records: list[Record], prompt_of) -> dict[int, prompts.Prompt]:
        """Each live sample's prompt; one whose image cannot be fitted to the pixel budget (aspect
        ratio over 200, e.g. a crop of an extreme panorama) gets that error instead."""
        built = {}
        for i in live:
            try:
                built[i] = prompt_of(i)
            except ImageError as exc:
                records[i].error = f"image: {exc}"
        return built

    def _load(self, samples: list[Sample], records: list[Record]) -> dict[int, list[Image.Image]]:
        images = {}
        for i, sample in enumerate(samples):
            try:
                if not sample.images:
                    raise ImageError("sample has no image")
                images[i] = [load_image(im, self.image_mode) for im in sample.images]
            except ImageError as exc:
                records[i].error = f"image: {exc}"
        return images

    def _perceive(self, samples, records, images) -> dict[int, Evidence]:
        """Batched perceive pass; returns the evidence of every sample that got through it."""
        def perceive_prompt(i: int) -> prompts.Prompt:
            return prompts.Prompt(prompts.perceive_text(samples[i].question), self.perceive_budget.fit(images[i][:1]))

        batch = self._build(list(images), records, perceive_prompt)
        perceived = [records[i] for i in batch]
        self._generate(self.perceive_engine, list(batch.values()), perceived, self.perceive_params, "perceiver_output")
        # The perceive pass's fit of the original is the reason pass's only when both budgets fit it alike.
        reusable = _first_fit(self.perceive_budget) == _first_fit(self.budget)
        evidence = {}
        for i in batch:
            record = records[i]
            if record.error is None:
                found = evidence[i] = gather_evidence(images[i][0], record.perceiver_output or "")
                if reusable:
                    found.fitted_original = batch[i].images[0]  # the reason pass's fit patches it (Evidence.fit)
                record.boxes = [{"bbox_2d": list(b.bbox_2d), "label": b.label} for b in found.boxes]
                record.box_count, record.mean_box_area = len(found.boxes), found.mean_box_area
                record.has_evidence = found.has_evidence
        return evidence

    def _final_prompt(self, sample: Sample, images: list[Image.Image], evidence: Evidence | None) -> prompts.Prompt:
        if self.mode == "default":
            text = prompts.direct_text(sample.question, sample.answer_form)
        elif self.mode == "thinking":
            text = prompts.thinking_text(sample.question, sample.answer_form)
        else:
            text = prompts.reason_text(sample.question, sample.answer_form, evidence.has_evidence)
            return prompts.Prompt(text, evidence.fit(self.budget, evidence.fitted_original))
        return prompts.Prompt(text, self.budget.fit(images))

    @staticmethod
    def _generate(
        engine: Engine, batch: list[prompts.Prompt], records: list[Record], params: GenParams, target: str
    ) -> None:
        """Generate for a batch with `engine` and write each reply into `target` of its record (or its error)."""
        if not batch:
            return
        for prompt, record in zip(batch, records):
            record.prompts.append(prompt.text)
        start = time.perf_counter()
        generations: list[Generation] = engine.generate(batch, params)
        per_sample = (time.perf_counter() - start) / len(batch)
        for gen, record in zip(generations, records):
            record.latency_s += per_sample
            record.input_tokens += gen.input_tokens
            record.output_tokens += gen.output_tokens
            if gen.error is not None:
                record.error = f"{engine.name}: {gen.error}"
            else:
                setattr(record, target, gen.text)

    def _extract(self, sample: Sample, record: Record) -> None:
        if record.error is not None:
            return
        record.answer = answer_text(record.raw_answer, self.mode)
        if record.answer is not None and sample.answer_form == "mca":
            record.prediction = extract_choice(record.answer, sample.letters)
        else:
            record.prediction = record.answer or ""


def _first_fit(budget: PixelBudget) -> tuple[int, int, int]:
    """What decides how `budget` fits a prompt's first image."""
    return budget.max_pixels, budget.min_pixels, budget.factor
