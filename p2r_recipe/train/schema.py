"""The training sample and the files both stages write: the `TrainSample` label that rewards and agents read
back, the OpenRLHF prompt row (the release's rollout prompt), and atomic JSON/JSONL writers.

Light on purpose: OpenRLHF loads `reward.py` and `agent.py` inside Ray workers, and they need only this.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from p2r_recipe import prompts

ROLES = ("perceiver", "reasoner")
ANSWER_FORMS = ("mca", "na", "free_form")
DEFAULT_ANSWER_FORM = "free_form"  # the release's, for rows without one
# The OpenRLHF flags that read the rows written here (None: a switch without a value).
OPENRLHF_DATA_FLAGS = {
    "--data.input_key": "prompt",
    "--data.label_key": "label",
    "--data.image_key": "images",
    "--data.apply_chat_template": None,
}

@dataclass
class TrainSample:
    """One training question; serialised as the OpenRLHF label (JSON) that rewards and agents read back."""

    id: str
    question: str
    answer: str
    answer_form: str
    image: str  # absolute path of the original image, which evidence is cut from
    fitted_image: str = ""  # the copy the policy sees, fitted to the training pixel budget
    datasource: str = "p2r"
    box_count: int = 0  # stage 2: valid boxes the frozen perceiver reported
    has_evidence: bool = False  # stage 2: the prompt shows the annotated image and crops

    def to_label(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_label(cls, label: str | dict) -> TrainSample:
        try:
            data = json.loads(label) if isinstance(label, str) else dict(label)
            return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not a P2R training label ({exc}): {str(label)[:200]!r}") from None


def policy_messages(text: str, image_count: int) -> list[dict]:
    """The release's rollout prompt: user text `"<image>\n" * n + text`, cut at each tag into content parts."""
    parts: list[dict] = []
    for i in range(image_count):
        parts += [{"type": "image"}, {"type": "text", "text": "\n" + (text if i == image_count - 1 else "")}]
    user = parts or [{"type": "text", "text": text}]
    return [
        {"role": "system", "content": [{"type": "text", "text": prompts.SYSTEM_PROMPT}]},
        {"role": "user", "content": user},
    ]


def prompt_row(sample: TrainSample, text: str, images: list[str]) -> dict:
    """One OpenRLHF prompt-dataset line: the release's rollout prompt, image paths, label."""
    messages = policy_messages(text, len(images))
    return {"prompt": messages, "images": images, "label": sample.to_label(), "datasource": sample.datasource}


def val_path(path: str | Path) -> Path:
    """Where the held-out slice of a prompt dataset lives: `perceiver.jsonl` -> `perceiver_val.jsonl`."""
    path = Path(path)
    return path.with_name(f"{path.stem}_val.jsonl")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write all lines to a temporary file, then rename: readers never see half a dataset."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
