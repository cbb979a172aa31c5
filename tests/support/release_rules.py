"""A straightforward, independent transcription of the release's evidence rules (reference facts, section 3).

Used as the oracle in tests (ours must match it pixel for pixel) and as the
"reference way" in the evidence benchmark: it decodes, draws, crops and encodes on
every call, as the release does.
"""

from __future__ import annotations

import base64
import io
import json
import re

from PIL import Image, ImageDraw

COLORS = ["red", "green", "blue", "yellow", "orange", "purple", "cyan", "magenta"]


def parse(text):
    try:
        data = json.loads(text)
        items = data if isinstance(data, list) else [data]
    except Exception:
        items = []
        for m in re.findall(r'\{[^{}]*"bbox_2d"\s*:\s*\[[^\]]*\][^{}]*\}', text):
            try:
                items.append(json.loads(m))
            except Exception:
                pass
    boxes = []
    for item in items:
        if not isinstance(item, dict):
            continue
        b = item.get("bbox_2d")
        if isinstance(b, list) and len(b) == 4 and all(type(v) in (int, float) for v in b):
            if b[0] < b[2] and b[1] < b[3]:
                boxes.append((b, item.get("label", "")))
    return boxes


def evidence(image_bytes, text, max_crops=3):
    """Returns (images, boxes) exactly as the rules read (coordinates as written; crops clamped after padding)."""
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    w, h = image.size
    boxes = parse(text)
    crops = []
    for b, _ in boxes[:max_crops]:
        px, py = min(0.1, 600 / w), min(0.1, 600 / h)
        x1, y1, x2, y2 = b[0] / 1000, b[1] / 1000, b[2] / 1000, b[3] / 1000
        x1, y1 = max(0.0, x1 - px), max(0.0, y1 - py)
        x2, y2 = min(1.0, x2 + px), min(1.0, y2 + py)
        rect = (int(x1 * w), int(y1 * h), int(x2 * w), int(y2 * h))
        if rect[2] > rect[0] and rect[3] > rect[1]:
            crops.append(image.crop(rect))
    if not crops:
        return [image], boxes
    annotated = image.copy()
    draw = ImageDraw.Draw(annotated)
    for i, (b, _) in enumerate(boxes):
        rect = (int(b[0] / 1000 * w), int(b[1] / 1000 * h), int(b[2] / 1000 * w), int(b[3] / 1000 * h))
        draw.rectangle(rect, outline=COLORS[i % 8], width=max(3, int(0.003 * w)))
    return [annotated, *crops], boxes


def evidence_payload(image_bytes, text):
    """The release's per-call path: decode, draw, crop, then JPEG + base64 every image."""
    images, _ = evidence(image_bytes, text)
    out = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=95)
        out.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


# --- the training reward's answer rules (p2r_reward.py), transcribed -------------------------------

_TRAIN_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_MCA_PREFIXES = [
    "The best answer is", "The correct answer is", "The answer is", "The answer", "The best option is",
    "The correct option is", "Best answer:", "Best option:", "Answer:", "Option:", "The correct answer",
    "The correct option",
]  # fmt: skip


def train_score(reply, ground_truth, answer_form):
    """The release's reward for a reply of a locally scored form (its `_extract_answer` + `_evaluate_answer`)."""
    if not reply:
        answer = ""
    else:
        m = _TRAIN_ANSWER.search(reply)
        answer = m.group(1).strip() if m else reply.strip()
    if answer_form == "mca":
        s = answer.strip() if answer else ""
        for prefix in _MCA_PREFIXES:
            s = s.replace(prefix, "")
        if len(s.split()) > 10 and not re.search("[ABCDE]", s):
            return 0.0
        m = re.search(r"[ABCDE]", s)
        return 1.0 if (m[0] if m else "") == ground_truth.strip().upper() else 0.0
    if answer_form == "na":
        try:
            from mathruler.grader import grade_answer

            return float(grade_answer(answer, ground_truth))
        except Exception:
            return 0.0
    return 0.0
