"""The tiny offline Qwen3-VL: `p2r-tiny` is a toy trained on synthetic scenes (weights shipped in the
package, retrained by `p2r-build-tiny --train`); `build_tiny_model` builds random weights for tests."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from .. import prompts
from . import scenes

# Every build leaves this file in its directory, holding its stamp.
TOY_MARKER = ".p2r-tiny-complete"
# The trained toy's files, written by `p2r-build-tiny --train` and shipped as package data.
WEIGHTS_DIR = Path(__file__).resolve().parent / "tiny_weights"
_MAX_POSITIONS = 32768
# Ids follow Qwen's order; <think> tags are ordinary added tokens as in Qwen3, so decoding
# with skip_special_tokens=True keeps them.
_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
_THINK_TAGS = ["<think>", "</think>"]
_WORDS = """
the a an of and or to in on at by for with from into over under above below behind near next left right
top bottom middle center front back between inside outside is are was were be been has have had do does
what which who where when why how many much color colour shape size number count image picture photo
person people man woman boy girl child dog cat bird horse car bus truck train bicycle boat plane table
chair sofa bed tree grass sky cloud water road street building house window door sign text word letter
red orange yellow green blue purple pink brown black white gray grey large small big tall short long
one two three four five six seven eight nine ten first second third yes no true false answer question
option choice choices letter value numerical single phrase reasoning reason think step steps key visual
evidence region regions highlighted cropped locate report coordinates format entire return empty list
provide detailed between tags then simply directly output using given e.g. etc. chart graph table plot
axis label title legend total sum average percent percentage ratio area length width height angle
triangle circle square rectangle line point distance speed time year month day hour minute
food fruit apple banana pizza cake cup bottle glass plate bowl phone computer screen book paper clock
light lamp wall floor room kitchen bathroom field mountain river beach snow rain sun moon animal
holding wearing sitting standing walking running eating playing looking shown visible appears most least
"""
_CORPUS = [
    prompts.PERCEIVE_INSTRUCTION, prompts.PERCEIVE_INSTRUCTION_TRAIN, prompts.WITH_EVIDENCE, prompts.THINKING_EVAL,
    *prompts.DIRECT_POST_PROMPTS.values(), *(prompts.reasoning_post_prompt(f) for f in prompts.ANSWER_FORMS),
    '[{"bbox_2d": [12, 34, 567, 890], "label": "the red car"}] []',
    "<think> The image shows two dogs, so the answer is 2. </think> <answer> 2 </answer>",
    "Question: How many dogs are there?\nA. 1\nB. 2\nC. 3\nD. 4\n0.5 3.14 42 100%",
    *(f"{w} {w}s {w.capitalize()} {w.upper()}" for w in _WORDS.split()),
    *(q.format(colour=c) for q in scenes.QUESTIONS for c in scenes.PALETTE),
    *(f"({letter}) {p}\n{letter}. {p}\n" for letter in "ABCD" for p in scenes.PATTERNS),
    *(f"<think>The {c} tile has {p}, option {letter}.</think><answer>{letter}</answer>"
      for c in scenes.PALETTE for p in scenes.PATTERNS for letter in "ABCD"),
    *(f"<think>The {c} tile is too small to see its pattern.</think>" for c in scenes.PALETTE),
    "Options:\n", "Answer with the option's letter from the given choices directly.",
]  # fmt: skip
# Qwen's VL chat template, minus tools: only the given messages, images where they appear.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message.role + '\\n' -}}"
    "{%- if message.content is string -%}{{- message.content -}}"
    "{%- else -%}{%- for item in message.content -%}"
    "{%- if item.type == 'image' or 'image' in item or 'image_url' in item -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item.type == 'video' or 'video' in item -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}{{- item.text -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
_TRAINED_README = """# p2r-tiny: a toy Qwen3-VL trained on synthetic scenes

Trained offline on the CPU by `p2r-build-tiny --train` (p2r_recipe.toy.trainer) on the toy
scenes of p2r_recipe.toy.scenes: it locates a coloured tile, reads its stripe pattern from a
crop, and answers in the release's formats. It knows nothing else: its scores on the
embedded demo show the P2R pipeline working, they are not a benchmark result.
"""
_README = """# p2r-tiny: random-weight tiny Qwen3-VL

Built offline by `p2r-build-tiny` (p2r_recipe.toy.model) for tests and the embedded demo.
The weights are random and the tokenizer is a small BPE trained on a few sentences:
the model's answers are meaningless. It exercises the real Qwen3-VL code paths only.
"""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE with Qwen's pre-tokenization, special tokens and VL chat template."""
    qwen = Qwen2Tokenizer().backend_tokenizer  # an empty Qwen tokenizer: only its pipeline is used
    bpe = Tokenizer(models.BPE())
    bpe.normalizer, bpe.pre_tokenizer, bpe.decoder = qwen.normalizer, qwen.pre_tokenizer, qwen.decoder
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=4096, initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator(_CORPUS, trainer)
    bpe.add_special_tokens(_SPECIALS)
    bpe.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in _THINK_TAGS])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=_MAX_POSITIONS,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def build_processor() -> Qwen3VLProcessor:
    """Qwen3-VL's processor; images are capped at 4096 visual tokens (the real model allows 16384)."""
    norm = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    vision = {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2, **norm}
    images = Qwen2VLImageProcessor(size={"shortest_edge": 64 * 32 * 32, "longest_edge": 4096 * 32 * 32}, **vision)
    videos = Qwen3VLVideoProcessor(**vision)
    return Qwen3VLProcessor(images, build_tokenizer(), videos, chat_template=CHAT_TEMPLATE)


def build_config(tokenizer: PreTrainedTokenizerFast) -> Qwen3VLConfig:
    """The tiny sizes (head_dim 64: vLLM's CPU attention rejects smaller heads); token ids come from the tokenizer."""
    ids = dict(zip(_SPECIALS, tokenizer.convert_tokens_to_ids(_SPECIALS)))
    eos, pad = ids["<|im_end|>"], ids["<|endoftext|>"]
    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [12, 10, 10], "mrope_interleaved": True}
    text = {
        "vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "rope_parameters": rope,
        "max_position_embeddings": _MAX_POSITIONS, "tie_word_embeddings": True,
        "bos_token_id": pad, "eos_token_id": eos, "pad_token_id": pad,
    }  # fmt: skip
    vision = {
        "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 128,
        "num_position_embeddings": 256, "deepstack_visual_indexes": [1],
    }  # fmt: skip
    return Qwen3VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=pad, eos_token_id=eos, pad_token_id=pad,
    )  # fmt: skip


def _write(out: Path, seed: int) -> None:
    """Write the model, processor, generation config and README into the empty directory `out`."""
    processor = build_processor()
    config = build_config(processor.tokenizer)
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config).to(torch.float32).eval()
    ids = {key: getattr(config, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model.generation_config = GenerationConfig(do_sample=False, **ids)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "README.md").write_text(_README)


def _build_atomically(out_dir: str | Path, stamp: str, write) -> Path:
    """Run `write(tmp)` and rename tmp to `out_dir`, unless `out_dir` already holds a build stamped `stamp`.
    A build with another stamp (e.g. an older model cached at the same path) is replaced."""
    out = Path(out_dir).expanduser().resolve()
    marker = out / TOY_MARKER
    if marker.exists() and marker.read_text() == stamp:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    stale = None
    try:
        write(tmp)
        (tmp / TOY_MARKER).write_text(stamp)
        if marker.exists():
            if marker.read_text() == stamp:  # a concurrent builder finished first: keep its copy, never move it away
                return out
            stale = Path(tempfile.mkdtemp(prefix=f".{out.name}.stale.", dir=out.parent))
            os.rename(out, stale / "old")
        os.rename(tmp, out)  # atomic; replaces out only if it is an empty directory
    except OSError:
        if not (marker.exists() and marker.read_text() == stamp):  # not a concurrent builder winning the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    return out


def build_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the random-weight tiny model into `out_dir` (atomically) unless that build is already there."""
    return _build_atomically(out_dir, f"seed={seed}\n", lambda tmp: _write(tmp, seed))


def _weights_stamp() -> str:
    digest = hashlib.sha256((WEIGHTS_DIR / "model.safetensors").read_bytes()).hexdigest()
    return f"trained={digest}\n"


def _write_trained(out: Path) -> None:
    for path in WEIGHTS_DIR.iterdir():
        if path.is_file():
            shutil.copyfile(path, out / path.name)
    (out / "README.md").write_text(_TRAINED_README)


def install_trained_model(out_dir: str | Path) -> Path:
    """The shipped trained toy, copied into `out_dir` (atomically) unless that exact copy is already there."""
    if not (WEIGHTS_DIR / "model.safetensors").exists():
        raise FileNotFoundError(f"no trained tiny weights in {WEIGHTS_DIR}; run `p2r-build-tiny --train`")
    return _build_atomically(out_dir, _weights_stamp(), _write_trained)


def default_tiny_dir() -> Path:
    """`$P2R_TINY_DIR`, else ~/.cache/p2r_recipe/tiny-qwen3-vl."""
    return Path(os.environ.get("P2R_TINY_DIR") or Path.home() / ".cache" / "p2r_recipe" / "tiny-qwen3-vl")


def is_toy_build(path: Path) -> bool:
    """Whether `path` is a directory this module built (random or trained)."""
    return (path / TOY_MARKER).exists()


def ensure_tiny_model() -> Path:
    """The default tiny model directory: the shipped trained toy, installed on first use."""
    return install_trained_model(default_tiny_dir())
