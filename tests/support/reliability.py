"""Helpers for the reliability tests: the bad-input corpus, a P2R service whose answers are known
(in this process, or as a killable subprocess), process memory, and small lmms-eval tasks.

Run as a script it serves the scripted P2R service on a port until killed:
    python tests/reliability.py PORT [LATENCY_S] [REQUEST_LOG]
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data"
BAD_IMAGES = DATA / "bad_images"
ROOT = HERE.parents[1]  # the repository (this file is in tests/support)

_spec = importlib.util.spec_from_file_location("make_bad_inputs", DATA / "make_bad_inputs.py")
corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)
expand = corpus.expand


def bad_images() -> dict[str, dict]:
    """Every corpus image's expected outcome, by file name."""
    return json.loads((BAD_IMAGES / "expected.json").read_text())


@dataclass
class Hostile:
    """One hostile model output, expanded, with its expected outcomes."""

    id: str
    text: str
    boxes: int
    evidence: bool
    answer: str | None
    choice: str
    perceiver: tuple[float, str]
    reasoner: tuple[float, str]
    form: str = "mca"
    gold: str = "A"


def hostile_outputs() -> list[Hostile]:
    """The hostile outputs of the corpus, expanded."""
    items = []
    for line in (DATA / "hostile_outputs.jsonl").read_text().splitlines():
        raw = json.loads(line)
        answer = raw["answer"] if raw["answer"] is None else expand(raw["answer"])
        fields = {**raw, "text": expand(raw["text"]), "answer": answer}
        fields["perceiver"], fields["reasoner"] = tuple(raw["perceiver"]), tuple(raw["reasoner"])
        items.append(Hostile(**fields))
    return items


# --- a P2R service with known answers ------------------------------------------------------------

_SUBJECT = re.compile(r"Question: (hostile|image|sample) (\S+)")


def subject(body: dict) -> tuple[str, str]:
    """(kind, name) of the question a request is about: 'hostile <id>', 'image <file>' or 'sample <n>'."""
    found = _SUBJECT.search(user_text(body))
    return (found.group(1), found.group(2)) if found else ("", "")


def user_text(body: dict) -> str:
    content = body["messages"][-1]["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content if p["type"] == "text")


def is_perceive(body: dict) -> bool:
    """A perceive request, in its evaluation or its training wording."""
    from p2r_recipe import prompts

    text = user_text(body)
    return prompts.PERCEIVE_INSTRUCTION in text or prompts.PERCEIVE_INSTRUCTION_TRAIN in text


def sample_answer(n: int) -> str:
    """The scripted reasoner's letter for 'sample <n>': right (A) for 2 of every 3 samples."""
    return "B" if n % 3 == 2 else "A"


def p2r_reply(body: dict) -> str:
    """Both P2R passes with known answers: a hostile output is the reply to both of its passes;
    any other perceive request gets one box placed by its question, and the reasoner answers the
    letter `sample_answer` gives for 'sample <n>' and A for anything else."""
    kind, name = subject(body)
    if kind == "hostile":
        return hostile_texts()[name]
    if is_perceive(body):
        x = zlib.crc32(user_text(body).encode()) % 500
        return json.dumps([{"bbox_2d": [x, x, x + 300, x + 300], "label": "the object"}])
    letter = sample_answer(int(name)) if kind == "sample" else "A"
    return f"<think>Looked at the evidence.</think><answer>{letter}</answer>"


@functools.cache
def hostile_texts() -> dict[str, str]:
    return {h.id: h.text for h in hostile_outputs()}


def serve_main(argv: list[str]) -> None:
    """Serve `p2r_reply` on 127.0.0.1:PORT until killed, appending each request's subject to REQUEST_LOG."""
    from servers import ScriptedServer

    port, latency = int(argv[0]), float(argv[1]) if len(argv) > 1 else 0.0
    log = Path(argv[2]) if len(argv) > 2 else None

    def reply(body: dict) -> str:
        text = p2r_reply(body)
        if log is not None:
            with log.open("a") as out:
                out.write(" ".join(subject(body)) + (" perceive" if is_perceive(body) else " reason") + "\n")
        return text

    server = ScriptedServer(reply, latency_s=latency)
    server.port, server.base_url = port, f"http://127.0.0.1:{port}"
    server.start()
    print(f"scripted P2R service on {server.base_url}", flush=True)
    while True:
        time.sleep(3600)


class ScriptedProcess:
    """The scripted P2R service in a subprocess on a fixed port, so a test can kill it and start it again."""

    def __init__(self, port: int, latency_s: float = 0.0, log: Path | None = None):
        self.port, self.latency_s, self.log = port, latency_s, log
        self.base_url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout_s: float = 30) -> ScriptedProcess:
        args = [sys.executable, __file__, str(self.port), str(self.latency_s), *([str(self.log)] if self.log else [])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}
        self.process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while not self.up():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"scripted service did not start on port {self.port}")
            time.sleep(0.05)
        self.starts += 1
        return self

    def up(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/v1/models", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def kill(self) -> None:
        """SIGKILL: connections in flight break, as when a service crashes."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def requests(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log and self.log.exists() else []

    def __enter__(self) -> ScriptedProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill()


# --- processes ----------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RSSSampler:
    """Samples a process's RSS every `every_s` in a thread while in use; `peak` is the highest seen."""

    def __init__(self, pid: int, every_s: float = 0.05):
        self.pid, self.every_s, self.peak = pid, every_s, 0.0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            self._stop.wait(self.every_s)

    def __enter__(self) -> RSSSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def listening_addresses(pid: int) -> set[str]:
    """The local addresses (ip:port) the process's TCP sockets listen on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                found.add(f"{_ip(address, width)}:{int(port, 16)}")
    return found


def _ip(hex_address: str, width: int) -> str:
    raw = bytes.fromhex(hex_address)
    if width == 8:
        return ".".join(str(b) for b in raw[::-1])
    words = [raw[i : i + 4][::-1].hex() for i in range(0, 16, 4)]
    return ":".join("".join(words)[i : i + 4] for i in range(0, 32, 4))


# --- lmms-eval tasks ----------------------------------------------------------------------------


def write_hrbench_task(folder: Path, name: str, docs: list[dict]) -> Path:
    """A task folder for `--include_path`: HR-Bench's template over a local parquet of `docs`
    (each: question, image bytes; answer A, category single)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "index": i, "question": doc["question"], "answer": doc.get("answer", "A"), "category": "single",
            "A": "first", "B": "second", "C": "third", "D": "fourth", "cycle_category": "single",
            "image": base64.b64encode(doc["image"]).decode(),
        }
        for i, doc in enumerate(docs)
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), folder / f"{name}.parquet")
    template = ROOT / "lmms_eval_tasks" / "hrbench" / "_template_yaml"
    (folder / f"{name}.yaml").write_text(
        f"include: {template}\ntask: {name}\ndataset_path: parquet\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / f'{name}.parquet'}\ntest_split: test\n"
    )
    return folder


def png(size: tuple[int, int] = (64, 48), colour=(90, 120, 150)) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    serve_main(sys.argv[1:])
