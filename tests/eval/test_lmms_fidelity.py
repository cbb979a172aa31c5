"""The real `lmms-eval --model p2r` CLI on hub-schema rows against a recording server: what the release would send.

Local parquet files in the exact schemas of the hub datasets (V*, HR-Bench 4K/8K, MME-RealWorld
and its lite version), awkward rows included (a question with a leading space, blank and missing
HR-Bench options, no MME options, an EXIF-rotated JPEG, a PNG with colour under transparent
pixels). Every request the scripted OpenAI-compatible server receives is checked against an
independent transcription of the release's evaluation code (prompt templates, question rules,
RGB conversion, qwen-vl-utils resize, evidence): prompt bytes per pass and mode, the pixels of
every image (sent losslessly with image_format=png) and every decoding parameter.
"""

from __future__ import annotations

import base64
import io
import math
import re
from pathlib import Path

import lmms_cli
import numpy as np
import pytest
import release_rules
from PIL import Image
from servers import ScriptedServer

from p2r_recipe.lmms import envelope
from p2r_recipe.lmms.registration import tasks_dir

# --- the release, transcribed (evaluation/prompt.py, data_utils/*.py, batch_inference_vllm.py) ----------

SYSTEM = "You are a helpful assistant."
MCA_DIRECT = "Answer the question with the option's letter from the given choices (e.g., A, B, etc.) directly.\n"
MCA_REASON = (
    "Provide your detailed reasoning between the <think> </think> tags, and then answer the question with the "
    "option's letter from the given choices (e.g., A, B, etc.) within the <answer> </answer> tags.\n"
)
PERCEIVE = (
    "Locate the key visual evidence in the image for answering this question. Report bbox coordinates in JSON "
    'format only: [{"bbox_2d": [x1, y1, x2, y2], "label": "<description>"}] If the question requires the entire '
    "image, return an empty list []."
)
TEXT = {
    "default": "Question: {q}\n" + MCA_DIRECT,
    "thinking": "Question: {q}\nThink step by step. \n" + MCA_REASON,
    "perceive": "Question: {q}\n" + PERCEIVE,
    "evidence": "Question: {q}\nThe key visual regions have been highlighted and cropped for you. Think step by step.\n"
    + MCA_REASON,
    "no_evidence": "Question: {q}\nThink step by step.\n" + MCA_REASON,
}
# SamplingParams(temperature=0, top_p=1, repetition_penalty=1.05, max_tokens=MAX_TOKENS[pass]); nothing else.
DECODING = {"temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.05}
MAX_TOKENS = {"default": 16, "thinking": 1024, "perceive": 256, "evidence": 1024, "no_evidence": 1024}
MAX_PIXELS, MIN_PIXELS = 4096 * 32 * 32, 16 * 32 * 32


def vstar_question(row: dict) -> str:
    return re.sub(r"\s*Answer with the option'?s letter from the given choices directly\.?\s*$", "", row["text"]).strip()


def hrbench_question(row: dict) -> str:
    options = [f"{k}. {row[k]}" for k in "ABCD" if row.get(k) is not None and str(row[k]).strip()]
    return row["question"] + ("\nOptions:\n" + "\n".join(options) if options else "")


def mme_question(row: dict) -> str:
    options = row["multi-choice options"]
    return row["question"] + ("\nOptions:\n" + "\n".join(options) if options is not None and len(options) > 0 else "")


def qwen_resize(image: Image.Image) -> Image.Image:
    """qwen-vl-utils fetch_image: smart_resize (factor 32, release's min/max pixels), PIL's default (bicubic) resize."""
    height, width = image.height, image.width
    h, w = max(32, round(height / 32) * 32), max(32, round(width / 32) * 32)
    if h * w > MAX_PIXELS:
        beta = math.sqrt(height * width / MAX_PIXELS)
        h, w = max(32, math.floor(height / beta / 32) * 32), max(32, math.floor(width / beta / 32) * 32)
    elif h * w < MIN_PIXELS:
        beta = math.sqrt(MIN_PIXELS / (height * width))
        h, w = math.ceil(height * beta / 32) * 32, math.ceil(width * beta / 32) * 32
    return image.resize((w, h))


# --- hub-schema rows -------------------------------------------------------------------------------------


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def scene(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def exif_rotated_jpeg() -> bytes:
    """A 360x200 JPEG whose EXIF says "rotate 90°": the release uses it as stored."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(scene((360, 200), 1), "JPEG", quality=90, exif=exif)


def png_with_colour_under_alpha() -> bytes:
    """RGBA whose left half is fully transparent red: the release keeps the red, robust mode shows white."""
    rgba = np.zeros((220, 300, 4), dtype=np.uint8)
    rgba[:, :, :3] = np.asarray(scene((300, 220), 2))
    rgba[:, :150] = (200, 10, 10, 0)
    rgba[:, 150:, 3] = 255
    return encoded(Image.fromarray(rgba, "RGBA"), "PNG")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


VSTAR_ROWS = [
    {"question_id": "attr_1 BOXES", "image": exif_rotated_jpeg(), "label": "A", "category": "direct_attributes",
     "text": "What is the colour of the cup? BOXES\n(A) red\n(B) blue\nAnswer with the option's letter from the given choices directly."},
    {"question_id": "rel_2 NOBOX", "image": png_with_colour_under_alpha(), "label": "B", "category": "relative_position",
     "text": "  Is the cup left of the dog? NOBOX \n(A) yes\n(B) no\n Answer with the options letter from the given choices directly \n"},
]  # fmt: skip
HRBENCH_ROWS = [
    {"index": 0, "question": " What is written on the sign? BOXES  ", "answer": "C", "category": "single",
     "A": "STOP", "B": "GO", "C": None, "D": "  ", "cycle_category": "cycle_0", "image": b64(encoded(scene((400, 240), 3), "PNG"))},
    {"index": 1, "question": "Which way does it face? NOBOX", "answer": "A", "category": "cross",
     "A": None, "B": None, "C": None, "D": "", "cycle_category": "cycle_1", "image": b64(encoded(scene((130, 90), 4), "JPEG"))},
]  # fmt: skip
MME_ROWS = [
    {"index": 5, "question": " How many cars are there? BOXES", "answer": "E", "category": "Perception/Autonomous_Driving",
     "multi-choice options": ["(A) 1", "(B) 2", "(C) 3", "(D) 4", "(E) The image does not feature any car."],
     "l2-category": "objects_counting", "bytes": b64(encoded(scene((500, 300), 5), "JPEG"))},
    {"index": 6, "question": "What does the board say?\nNOBOX", "answer": "A", "category": "Reasoning/Monitoring",
     "multi-choice options": [], "l2-category": "ocr", "bytes": b64(encoded(scene((90, 60), 6), "PNG"))},
]  # fmt: skip


def features(kind: str):
    from datasets import Features, List, Value
    from datasets import Image as ImageFeature

    text = Value("string")
    if kind == "vstar":
        return Features({"question_id": text, "image": ImageFeature(), "text": text, "label": text, "category": text})
    if kind == "hrbench":
        columns = ("question", "answer", "category", "A", "B", "C", "D", "cycle_category", "image")
        return Features({"index": Value("int64"), **{c: text for c in columns}})
    return Features({
        "index": Value("int64"), "question": text, "answer": text, "category": text,
        "multi-choice options": List(text), "l2-category": text, "bytes": text,
    })  # fmt: skip


# task -> (template folder, rows, release question rule, image bytes of a row)
TASKS = {
    "fid_vstar": ("vstar", VSTAR_ROWS, vstar_question, lambda row: row["image"]),
    "fid_hrbench_4k": ("hrbench", HRBENCH_ROWS, hrbench_question, lambda row: base64.b64decode(row["image"])),
    "fid_hrbench_8k": ("hrbench", HRBENCH_ROWS[::-1], hrbench_question, lambda row: base64.b64decode(row["image"])),
    "fid_mme": ("mmerealworld", MME_ROWS, mme_question, lambda row: base64.b64decode(row["bytes"])),
    "fid_mme_lite": ("mmerealworld", MME_ROWS[:1], mme_question, lambda row: base64.b64decode(row["bytes"])),
}


def write_tasks(folder: Path) -> Path:
    from datasets import Dataset

    folder.mkdir(parents=True, exist_ok=True)
    for name, (template, rows, _, _) in TASKS.items():
        kind = template if template != "mmerealworld" else "mme"
        columns = {key: [row[key] for row in rows] for key in rows[0]}
        if kind == "vstar":
            columns["image"] = [{"bytes": data, "path": None} for data in columns["image"]]
        Dataset.from_dict(columns, features=features(kind)).to_parquet(str(folder / f"{name}.parquet"))
        (folder / f"{name}.yaml").write_text(
            f"include: {tasks_dir() / template / '_template_yaml'}\ntask: {name}\ndataset_path: parquet\n"
            f"dataset_kwargs:\n  data_files:\n    test: {folder / f'{name}.parquet'}\ntest_split: test\n"
        )
    return folder


# --- the scripted model and the run ----------------------------------------------------------------------

BOXES = '[{"bbox_2d": [100, 150, 420, 600], "label": "cup"}, {"bbox_2d": [500, 500, 900, 950], "label": "dog"}]'


def reply(body: dict) -> str:
    text = body["messages"][-1]["content"][-1]["text"]
    if text.endswith(PERCEIVE):
        return "[]" if "NOBOX" in text else BOXES
    return "A" if text.endswith(MCA_DIRECT) else "<think>The first one.</think><answer>A</answer>"


def run(tmp_path: Path, mode: str, *extra_args: str) -> tuple[list[dict], lmms_cli.Outputs]:
    folder = write_tasks(tmp_path / "tasks")
    with ScriptedServer(reply) as server:
        model_args = ",".join([f"backend=openai,base_url={server.base_url},served_model=scripted,mode={mode}",
                               "image_format=png", *extra_args])  # fmt: skip
        lmms_cli.run(
            "--model", "p2r", "--model_args", model_args, "--tasks", ",".join(TASKS), "--include_path", str(folder),
            "--output_path", str(tmp_path / "out"), "--log_samples", cwd=tmp_path,
        )  # fmt: skip
    return server.requests, lmms_cli.read_outputs(tmp_path / "out")


def sent_images(body: dict) -> list[Image.Image]:
    parts = body["messages"][1]["content"][:-1]
    assert all(p["type"] == "image_url" and p["image_url"]["url"].startswith("data:image/png;base64,") for p in parts)
    return [Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1]))) for p in parts]


def expected_requests(mode: str) -> list[tuple[str, int, list[Image.Image]]]:
    """(user text, max_tokens, images) of every request the release makes, in no particular order."""
    expected = []
    for _, rows, question_of, image_of in TASKS.values():
        for row in rows:
            q, data = question_of(row), image_of(row)
            original = Image.open(io.BytesIO(data)).convert("RGB")  # evaluation/utils.py load_image
            if mode != "p2r":
                expected.append((TEXT[mode].replace("{q}", q), MAX_TOKENS[mode], [original]))
                continue
            expected.append((TEXT["perceive"].replace("{q}", q), MAX_TOKENS["perceive"], [original]))
            images, _ = release_rules.evidence(data, "[]" if "NOBOX" in q else BOXES)
            key = "evidence" if len(images) > 1 else "no_evidence"
            expected.append((TEXT[key].replace("{q}", q), MAX_TOKENS[key], images))
    return [(text, tokens, [qwen_resize(im) for im in images]) for text, tokens, images in expected]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "thinking", "p2r"])
def test_every_request_is_the_releases(tmp_path, mode):
    requests, outputs = run(tmp_path, mode)
    expected: dict[str, list] = {}  # a row shared by two tasks is asked twice
    for text, tokens, images in expected_requests(mode):
        expected.setdefault(text, []).append((tokens, images))
    assert len(requests) == sum(len(rows) for _, rows, _, _ in TASKS.values()) * (2 if mode == "p2r" else 1)
    for body in requests:
        system, user = body["messages"]
        assert system == {"role": "system", "content": [{"type": "text", "text": SYSTEM}]} and user["role"] == "user"
        text = user["content"][-1]["text"]
        assert expected.get(text), text
        tokens, images = expected[text].pop()
        # Every decoding parameter received: the release's, and nothing else.
        assert {k: v for k, v in body.items() if k not in ("model", "messages")} == {**DECODING, "max_tokens": tokens}
        sent = sent_images(body)
        assert [im.size for im in sent] == [im.size for im in images], text
        for got, want in zip(sent, images):
            assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want)), text
    assert not any(expected.values())
    for task, (_, rows, _, _) in TASKS.items():
        metrics = outputs.metrics(task)
        assert metrics["errors"] == 0
        assert metrics["overall"] == pytest.approx(100 * sum(row.get("answer", row.get("label")) == "A" for row in rows) / len(rows))


@pytest.mark.slow
def test_robust_image_mode_rotates_and_flattens(tmp_path):
    requests, outputs = run(tmp_path, "default", "image_mode=robust")
    by_question = {body["messages"][1]["content"][-1]["text"]: sent_images(body)[0] for body in requests}
    [rotated] = [im for text, im in by_question.items() if "colour of the cup" in text]
    [flattened] = [im for text, im in by_question.items() if "left of the dog" in text]
    assert rotated.size == qwen_resize(Image.new("RGB", (200, 360))).size  # upright: 200x360, not 360x200
    assert flattened.convert("RGB").getpixel((10, 10)) == (255, 255, 255)  # on white, not the red under alpha
    assert all(outputs.metrics(task)["errors"] == 0 for task in TASKS)
    records = [envelope.unwrap(s["filtered_resps"]) for s in outputs.samples["fid_vstar"]]
    assert all(r["error"] is None for r in records)


@pytest.mark.parametrize("mode, pass_", [("default", "default"), ("thinking", "thinking"), ("p2r", "perceive"), ("p2r", "evidence")])
def test_vllm_sampling_params_are_the_releases(mode, pass_):
    """What the vllm backend hands to SamplingParams: the release's fields, and vLLM's defaults for the rest."""
    from p2r_recipe.engines.vllm import sampling_kwargs
    from p2r_recipe.lmms.model import P2R

    lm = P2R(backend="openai", base_url="http://127.0.0.1:9", served_model="x", mode=mode)
    params = lm.perceive_params if pass_ == "perceive" else lm.params
    assert sampling_kwargs(params) == {
        **DECODING, "max_tokens": MAX_TOKENS[pass_], "top_k": -1, "min_tokens": 0, "seed": None, "stop": [],
    }  # fmt: skip
