"""Trains the tiny Qwen3-VL on toy scenes (scenes.py) so the embedded demo shows P2R working.

One model learns four behaviours, each from the project's own prompt builders so its
inputs are byte for byte what evaluation sends (images fitted to the main job's budget of
65,536 pixels, crops too):
- perceive: whole image + perceive prompt -> the release's box JSON around the asked tile;
- reason: [annotated image, crop] + with-evidence prompt -> a one-sentence <think> naming the
  pattern, then <answer>letter</answer>;
- default: whole image + direct prompt -> the letter;
- thinking: whole image + thinking prompt -> a short <think>, then <answer>letter</answer>.
At the whole-image budget the pattern is a flat tint, so default and thinking can only guess:
the gap to p2r is what the demo shows.

Trained through the replies alone, the model learnt the formats and then answered one letter
and one box for everything (4,000 steps measured). So linear probes on every visual token
(TokenHeads) train with it: on whole images, whether a token is on the tile and which grid cell
it lies in; on crops, the tile's pattern. With those features in place the language model
only has to find and read them, which it does within 2,000 steps; the probes are then dropped
and the saved model is a plain Qwen3-VL.

Scenes come from seeds 10,000,000 + i, never the demo's (about 2.6e9). Training is plain
PyTorch on the CPU: a data worker renders and encodes batches while the main process trains;
a fixed seed makes the run repeatable on one machine. training.json records the loss curve and the
first steps' losses, which `optimise(stop_after=...)` reruns cheaply (tests/toy/test_tiny_training.py).

    p2r-build-tiny --train     # retrain and write the package's weights (about 11 minutes on 2 cores)
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

from .. import prompts
from ..evidence import Box, annotate, crop_rect
from ..images import PixelBudget
from ..lmms.benchmarks import HRBENCH, VSTAR, VSTAR_SUFFIX
from . import scenes
from .model import build_config, build_processor

TRAIN_SEED = 7
SCENE_SEED_BASE = 10_000_000
BUDGET = PixelBudget(max_pixels=65_536, crop_max_pixels=65_536)
# V*'s shapes at half size: fitted to the budget they look as the full sizes and the 4K/8K scenes do (the
# stripes scale with the width), and they render four times faster.
SIZES = ((1123, 791), (1024, 768), (1280, 720), (960, 720), (1152, 648), (1200, 900))
STEPS = 2000
LR = 2e-3
PROBE_WEIGHT = 1.0
CURVE_EVERY = 20  # training.json's loss curve: the mean loss of each window of this many steps
FIRST_LOSSES = 100  # training.json also keeps this many first per-step losses, which a short rerun must reproduce
JITTER = 12  # the reasoner sees boxes off by up to this much (0..1000 units), as a perceiver's would be


@dataclass
class Example:
    """One training turn: the prompt and the reply the model must write."""

    prompt: prompts.Prompt
    reply: str
    task: str
    tile: scenes.Tile
    regions: tuple[tuple[float, float, float, float], ...]  # the tile in each image, as fractions of it


def question_text(asked: scenes.Asked, hrbench: bool) -> str:
    """The question as the benchmark adapter builds it from a record (V* or HR-Bench format)."""
    if hrbench:
        return HRBENCH.question({"question": asked.question, **dict(zip("ABCD", asked.options))})
    options = "\n".join(f"({letter}) {o}" for letter, o in zip("ABCD", asked.options))
    return VSTAR.question({"text": f"{asked.question}\n{options}\n{VSTAR_SUFFIX}"})


def box_json(tile: scenes.Tile) -> str:
    return json.dumps([{"bbox_2d": list(tile.bbox_2d), "label": tile.name}])


def scene_examples(index: int) -> list[Example]:
    """The four behaviours' examples for training scene `index`."""
    seed = SCENE_SEED_BASE + index
    rng = scenes.Rng(seed)
    width, height = rng.choice(SIZES)
    scene = scenes.scene(rng, width, height, seed)
    asked = scenes.ask(rng, scene)
    question = question_text(asked, hrbench=rng.below(2) == 1)
    image = scenes.render(scene)
    (whole,) = BUDGET.fit([image])
    letter, tile = asked.answer, asked.target
    x1, y1, x2, y2 = (c + round(rng.uniform(-JITTER, JITTER)) for c in tile.bbox_2d)
    box = Box((float(max(0, x1)), float(max(0, y1)), float(min(1000, x2)), float(min(1000, y2))), tile.name)
    rect = crop_rect(box, width, height)
    evidence = BUDGET.fit([annotate(image, [box]), image.crop(rect)])
    whole_region = tuple(c / 1000 for c in tile.bbox_2d)
    tx0, ty0, tx1, ty1 = tile.pixels(width, height)
    cw, ch = rect[2] - rect[0], rect[3] - rect[1]
    crop_region = ((tx0 - rect[0]) / cw, (ty0 - rect[1]) / ch, (tx1 - rect[0]) / cw, (ty1 - rect[1]) / ch)
    think = f"<think>The {tile.name} has {tile.pattern}, option {letter}.</think><answer>{letter}</answer>"
    guess = f"<think>The {tile.name} is too small to see its pattern.</think><answer>{letter}</answer>"
    return [
        Example(prompts.Prompt(prompts.perceive_text(question), [whole]), box_json(tile), "perceive", tile, (whole_region,)),
        Example(prompts.Prompt(prompts.reason_text(question, "mca", True), evidence), think, "reason", tile,
                (whole_region, crop_region)),
        Example(prompts.Prompt(prompts.direct_text(question, "mca"), [whole]), letter, "default", tile, (whole_region,)),
        Example(prompts.Prompt(prompts.thinking_text(question, "mca"), [whole]), guess, "thinking", tile, (whole_region,)),
    ]


def token_targets(grid: torch.Tensor, region, tile: scenes.Tile, crop: bool) -> torch.Tensor:
    """Per visual token of a fitted image: [on the tile, grid column, grid row, pattern] as class indices
    (-100: no target). Whole images teach where the tile is and where each token is; crops teach the pattern."""
    gh, gw = int(grid[1]) // 2, int(grid[2]) // 2  # the processor's patch grid (it may enlarge small images)
    cx = (torch.arange(gw) + 0.5) / gw
    cy = (torch.arange(gh) + 0.5) / gh
    x0, y0, x1, y1 = region
    inside = ((cy[:, None] >= y0) & (cy[:, None] < y1)) & ((cx[None, :] >= x0) & (cx[None, :] < x1))
    inside[min(gh - 1, int((y0 + y1) / 2 * gh)), min(gw - 1, int((x0 + x1) / 2 * gw))] = True
    cells = 1000 // scenes.CELL
    out = torch.full((gh, gw, 4), -100, dtype=torch.long)
    out[..., 0] = inside.long()
    if crop:
        out[..., 3][inside] = scenes.PATTERNS.index(tile.pattern)
    else:
        out[..., 1] = (cx * cells).long().clamp(max=cells - 1)[None, :].expand(gh, gw)
        out[..., 2] = (cy * cells).long().clamp(max=cells - 1)[:, None].expand(gh, gw)
    return out.reshape(-1, 4)


class Encoder:
    """Chat-templates examples and appends the reply + <|im_end|>; labels cover only the reply."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        texts, reply_lengths = [], []
        for ex in examples:
            head = self.processor.apply_chat_template(ex.prompt.messages(), add_generation_prompt=True, tokenize=False)
            tail = ex.reply + self.tokenizer.eos_token
            texts.append(head + tail)
            reply_lengths.append(len(self.tokenizer(tail, add_special_tokens=False)["input_ids"]))
        images = [im for ex in examples for im in ex.prompt.images]
        self.tokenizer.padding_side = "right"
        batch = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        labels = torch.full_like(batch["input_ids"], -100)
        for row, n in enumerate(reply_lengths):
            end = int(batch["attention_mask"][row].sum())
            labels[row, end - n : end] = batch["input_ids"][row, end - n : end]
        regions = [(region, ex.tile, i > 0) for ex in examples for i, region in enumerate(ex.regions)]
        dense = [token_targets(grid, *r) for grid, r in zip(batch["image_grid_thw"], regions)]
        return {**batch, "labels": labels, "token_targets": torch.cat(dense)}


def group_batches(group: int, batch_size: int) -> list[list[Example]]:
    """Scene group `group`'s batches, one task each: perceive and reason from every group, default and
    thinking from every fourth (at the whole-image budget those can only learn the format), in a
    seeded order. A pure function of the group, so a rebuild sees the same batches in the same order."""
    examples = [scene_examples(index) for index in range(group * batch_size, (group + 1) * batch_size)]
    tasks = [0, 1, 2, 3] if group % 4 == 0 else [0, 1]
    return [[ex[task] for ex in examples] for task in scenes.Rng(TRAIN_SEED * 1_000_003 + group).shuffled(tasks)]


class SceneStream(torch.utils.data.IterableDataset):
    """Encoded batches of scene groups 0, 1, 2, ...: each item is one group's list of batches."""

    def __init__(self, processor, batch_size: int):
        self.encode, self.batch_size = Encoder(processor), batch_size

    def __iter__(self):
        torch.set_num_threads(1)  # the trainer has the other cores
        for group in itertools.count():
            yield [self.encode(batch) for batch in group_batches(group, self.batch_size)]


def lr_factor(step: int, steps: int, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to a tenth at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the data worker once it has exited)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class TokenHeads(torch.nn.Module):
    """Linear probes on every visual token (on the tile, column, row, pattern), trained with the model and then dropped."""

    def __init__(self, width: int):
        super().__init__()
        cells = 1000 // scenes.CELL
        self.heads = torch.nn.ModuleList(torch.nn.Linear(width, n) for n in (2, cells, cells, len(scenes.PATTERNS)))

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each probe's cross-entropy over the tokens it has targets for (crops have no cells, whole images no pattern)."""
        losses = []
        for k, head in enumerate(self.heads):
            keep = targets[:, k] != -100
            if keep.any():
                losses.append(torch.nn.functional.cross_entropy(head(features[keep]), targets[keep, k]))
        return sum(losses)


def training_loss(model, heads: TokenHeads, batch: dict[str, torch.Tensor], probe_weight: float) -> torch.Tensor:
    """Cross-entropy on the reply tokens only (the vocabulary projection runs on those positions alone),
    plus `probe_weight` times the token probes' loss on the visual tokens of the same forward pass."""
    labels, dense = batch.pop("labels"), batch.pop("token_targets")
    seen = []
    hook = model.model.visual.register_forward_hook(lambda module, args, out: seen.append(out.pooler_output))
    try:
        hidden = model.model(**batch).last_hidden_state[:, :-1]
    finally:
        hook.remove()
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[keep])
    return torch.nn.functional.cross_entropy(logits, targets[keep]) + probe_weight * heads.loss(seen[0], dense)


def new_model():
    """The tiny Qwen3-VL, freshly initialised from TRAIN_SEED, with its processor."""
    processor = build_processor()
    torch.manual_seed(TRAIN_SEED)
    model = Qwen3VLForConditionalGeneration(build_config(processor.tokenizer)).to(torch.float32).train()
    return model, processor


def scene_batches(processor, batch_size: int):
    """The training batches in order, encoded by one data process while this one trains."""
    loader = torch.utils.data.DataLoader(
        SceneStream(processor, batch_size), batch_size=None, num_workers=1, prefetch_factor=4
    )
    for group in loader:
        yield from group


def loss_curve(losses: list[float], every: int = CURVE_EVERY) -> list[float]:
    """The mean loss of each complete window of `every` steps, rounded to 4 decimals (a partial last window is dropped)."""
    return [round(sum(losses[i : i + every]) / every, 4) for i in range(0, len(losses) - every + 1, every)]


@dataclass
class Run:
    """What `optimise` hands back: the trained model (float32, still in train mode) and its per-step losses."""

    model: Qwen3VLForConditionalGeneration
    processor: object
    losses: list[float]
    wall_s: float
    cpu_s: float


def optimise(steps: int = STEPS, batch_size: int = 8, lr: float = LR, probe_weight: float = PROBE_WEIGHT,
             stop_after: int | None = None, progress: bool = True) -> Run:  # fmt: skip
    """Run the `steps`-step schedule from scratch, or only its first `stop_after` steps: the seed, data and
    learning-rate schedule are those of the full run, so the first losses must match its recorded curve.

    The loss is the replies' cross-entropy plus the token probes' (TokenHeads), which are dropped
    after training. On the CPU: two threads here and one in the data worker (measured on 2 cores:
    0.27 s a step). The thread count is fixed because it sets the order of floating-point sums."""
    if stop_after is not None and not 0 < stop_after <= steps:
        raise ValueError(f"stop_after must be in 1..{steps}, got {stop_after}")
    torch.set_num_threads(2)
    model, processor = new_model()
    heads = TokenHeads(model.config.vision_config.out_hidden_size)
    params = [*model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps))
    batches = scene_batches(processor, batch_size)
    wall, cpu = time.perf_counter(), _cpu_seconds()
    losses: list[float] = []
    bar = tqdm(total=stop_after or steps, desc="train tiny", unit="step", disable=not progress)
    for step, batch in zip(range(stop_after or steps), batches):
        loss = training_loss(model, heads, batch, probe_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    batches.close()  # stops the data worker, so its CPU time is counted below
    return Run(model, processor, losses, time.perf_counter() - wall, _cpu_seconds() - cpu)


def train(out_dir: Path, steps: int = STEPS, batch_size: int = 8, lr: float = LR, probe_weight: float = PROBE_WEIGHT) -> dict:
    """Train from scratch and save the model (fp16) into `out_dir`; returns (and writes as training.json)
    the settings, timing, final loss, the loss curve (`loss_curve`: the mean of every `loss_every` steps)
    and the first FIRST_LOSSES steps' losses (`first_losses`), all rounded to 4 decimals."""
    run = optimise(steps, batch_size, lr, probe_weight)
    losses = run.losses
    stats = {"steps": steps, "batch_size": batch_size, "lr": lr, "probe_weight": probe_weight, "seed": TRAIN_SEED,
             "device": "cpu", "wall_s": round(run.wall_s, 1), "cpu_s": round(run.cpu_s, 1),
             "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
             "loss_every": CURVE_EVERY, "loss_curve": loss_curve(losses),
             "first_losses": [round(x, 4) for x in losses[:FIRST_LOSSES]]}  # fmt: skip
    model = run.model.to(torch.float16).eval()
    ids = {key: getattr(model.config, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model.generation_config = GenerationConfig(do_sample=False, **ids)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    run.processor.save_pretrained(out_dir)
    (out_dir / "training.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats
