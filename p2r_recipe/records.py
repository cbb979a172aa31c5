"""The rows every part shares: a `Sample` in, a `Record` out, and the `Journal` that keeps finished ones.

Ground floor: no other p2r_recipe module is imported here, so reports, the leaderboard and the
toy can read records without pulling in the pipeline and its engines.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Sample:
    """One question about an image (the first image is the one P2R perceives)."""

    id: str
    question: str
    images: list[Any]
    answer_form: str = "mca"
    answer: str | None = None
    letters: str = "ABCD"


@dataclass
class Record:
    """Everything one sample produced, in the order the passes ran."""

    id: str
    mode: str
    prompts: list[str] = field(default_factory=list)
    perceiver_output: str | None = None
    boxes: list[dict] = field(default_factory=list)
    box_count: int = 0
    mean_box_area: float = 0.0
    has_evidence: bool = False
    raw_answer: str = ""
    answer: str | None = None
    prediction: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    latency_s: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)



class Journal:
    """Key -> JSON value, one line per entry, each flushed and fsync'd as it is written.

    A run killed mid-write leaves at most one torn last line, which loading drops, so a
    re-run redoes only the work that was in flight.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, Any] = {}
        self._lock = threading.Lock()
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            with self.path.open("r+b") as file:
                file.truncate(len(complete))
        for line in complete.decode("utf-8").splitlines():
            entry = json.loads(line)
            self.entries[entry["key"]] = entry["value"]

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str, default: Any = None) -> Any:
        return self.entries.get(key, default)

    def add(self, key: str, value: Any, **meta: Any) -> None:
        """Record `value` under `key`; `meta` is written beside it for people reading the file."""
        # ASCII escapes: a model can write a lone surrogate (\ud800), which UTF-8 cannot encode.
        line = json.dumps({"key": key, **meta, "value": value}) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as file:
                file.write(line)
                file.flush()
                os.fsync(file.fileno())
            self.entries[key] = value
