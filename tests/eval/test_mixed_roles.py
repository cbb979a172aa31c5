"""Mixed roles: `--model p2r` with the perceive pass on one engine and the reason pass on another.

Real parts throughout: ScriptedServer and p2r-serve over HTTP on 127.0.0.1, the hf backend with two
tiny models in one process, and the real lmms-eval CLI. A recording proxy in front of each p2r-serve
keeps the raw requests it forwards, so each role's server is seen to get its own pass only.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import lmms_cli
import pytest
import uvicorn
from lmms_eval.api.instance import Instance
from PIL import Image, ImageDraw
from servers import ScriptedServer, free_port, start_p2r_serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from p2r_recipe import prompts
from p2r_recipe.lmms import envelope, registration
from p2r_recipe.lmms.model import P2R
from p2r_recipe.report.leaderboard import read_result_file

BOXES = '[{"bbox_2d": [100, 100, 300, 300], "label": "the cup"}]'
QUESTION = "What colour is the cup?\n(A) red\n(B) blue"
PERCEIVER_KEY, REASONER_KEY = "perceiver-key-5150", "reasoner-key-8086"
# The release's decoding per pass (addendum section 1): every pass temperature 0, top_p 1, repetition_penalty
# 1.05; max_tokens 256 to perceive and 1024 to reason. The request fields carrying it, as the openai backend sends them.
RELEASE_PERCEIVE = {"max_tokens": 256, "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.05}
RELEASE_REASON = {"max_tokens": 1024, "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.05}
DECODING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed", "min_tokens")


def text_of(body: dict) -> str:
    return body["messages"][-1]["content"][-1]["text"]


def is_perceive(body: dict) -> bool:
    return prompts.PERCEIVE_INSTRUCTION in text_of(body)


def decoding_of(body: dict) -> dict:
    return {k: body[k] for k in DECODING_FIELDS if k in body}


def perceiver(body: dict) -> str:
    return BOXES if is_perceive(body) else "<answer>perceiver asked to reason</answer>"


def reasoner(body: dict) -> str:
    if is_perceive(body):
        return "<answer>reasoner asked to perceive</answer>"
    return "<think>Blue.</think><answer>B</answer>"


def request(doc_id: int) -> Instance:
    args = (QUESTION, {"p2r_answer_form": "mca"}, lambda doc: [doc["image"]], doc_id, "ours", "test")
    return Instance("generate_until", args, idx=0, metadata={"task": "ours", "doc_id": doc_id, "repeats": 1})


def docs(n: int = 3) -> list[dict]:
    images = []
    for i in range(n):
        image = Image.new("RGB", (480, 360), "white")
        ImageDraw.Draw(image).rectangle((60 + 40 * i, 60, 200 + 40 * i, 200), fill=(30, 60, 200))
        images.append({"image": image})
    return images


def answer(lm: P2R, n: int = 3) -> list[dict]:
    lm.task_dict = {"ours": {"test": docs(n)}}
    return [envelope.unwrap(reply.text) for reply in lm.generate_until([request(i) for i in range(n)])]


# --- Byte for byte: no perceiver arguments, the requests of one engine -----------------------------------


class RawRecorder:
    """An OpenAI-compatible chat server on 127.0.0.1 that keeps every request's raw body bytes and headers;
    with `upstream` it forwards each request there and returns its reply (a recording proxy), else it
    answers from `reply_fn`."""

    def __init__(self, upstream: str | None = None, reply_fn=None):
        self.upstream, self.reply_fn = upstream, reply_fn
        self.bodies: list[bytes] = []
        self.headers: list[dict] = []
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._app = Starlette(routes=[Route("/{path:path}", self._handle, methods=["GET", "POST"])])

    async def _handle(self, request: Request) -> Response:
        body = await request.body()
        if request.method == "POST":
            with self._lock:
                self.bodies.append(body)
                self.headers.append(dict(request.headers))
        if self.upstream is None:
            return self._scripted(request.url.path, body)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        async with httpx.AsyncClient(timeout=600) as client:
            url = self.upstream + request.url.path
            reply = await client.request(request.method, url, content=body, headers=headers)
        return Response(reply.content, reply.status_code, media_type=reply.headers.get("content-type"))

    def _scripted(self, path: str, body: bytes) -> Response:
        if not path.endswith("/chat/completions"):
            return Response(json.dumps({"object": "list", "data": [{"id": "scripted"}]}), media_type="application/json")
        text = self.reply_fn(json.loads(body))
        usage = {"prompt_tokens": 10, "completion_tokens": len(text.split()), "total_tokens": 10 + len(text.split())}
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": "scripted", "usage": usage}
        return Response(json.dumps({**reply, "choices": [choice]}), media_type="application/json")

    def requests(self) -> list[dict]:
        return [json.loads(body) for body in self.bodies if body]

    def __enter__(self) -> RawRecorder:
        config = uvicorn.Config(self._app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError(f"recorder did not start on port {self.port}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def sorted_bodies(recorder: RawRecorder) -> list[bytes]:
    # Requests of one pass are sent concurrently: their arrival order is not theirs to keep.
    return sorted(recorder.bodies)


def test_without_perceiver_arguments_the_requests_are_byte_for_byte_those_of_one_engine(monkeypatch):
    monkeypatch.setenv("P2R_API_KEY", REASONER_KEY)
    with RawRecorder(reply_fn=perceiver) as plain:
        lm = P2R(backend="openai", base_url=plain.base_url, served_model="scripted", max_pixels=65536, concurrency=4)
        assert lm.perceiver_engine is None and lm._roles == (lm.engine, lm.engine)
        plain_records = answer(lm)
    # Both roles named, on one service: the same model on the same engine kind sends the same bytes.
    with RawRecorder(reply_fn=perceiver) as both:
        monkeypatch.setenv("P2R_PERCEIVER_API_KEY", REASONER_KEY)
        lm = P2R(
            backend="openai", base_url=both.base_url, served_model="scripted", max_pixels=65536, concurrency=4,
            perceiver_base_url=both.base_url, perceiver_served_model="scripted",
        )  # fmt: skip
        both_records = answer(lm)
    assert len(plain.bodies) == 6 and sorted_bodies(plain) == sorted_bodies(both)
    perceived = [[r["perceiver_output"] for r in records] for records in (plain_records, both_records)]
    assert perceived == [[BOXES] * 3] * 2
    assert plain_records[0]["passes"] == {
        "perceive": {"model": "scripted", "backend": "openai", "base_url": plain.base_url},
        "answer": {"model": "scripted", "backend": "openai", "base_url": plain.base_url},
    }


# --- Two services, one per role -----------------------------------------------------------------------


def test_each_service_gets_only_its_own_pass_with_the_releases_decoding_and_its_own_key(monkeypatch):
    monkeypatch.setenv("P2R_API_KEY", REASONER_KEY)
    monkeypatch.setenv("P2R_PERCEIVER_API_KEY", PERCEIVER_KEY)
    with ScriptedServer(perceiver, models=("p2r-4b",)) as p, ScriptedServer(reasoner, models=("qwen-8b",)) as r:
        lm = P2R(
            backend="openai", base_url=r.base_url, served_model="qwen-8b", max_pixels=65536,
            perceiver_base_url=p.base_url, perceiver_served_model="p2r-4b",
        )  # fmt: skip
        records = answer(lm)
    assert p.calls == r.calls == 3
    assert all(is_perceive(body) and body["model"] == "p2r-4b" for body in p.requests)
    assert not any(is_perceive(body) for body in r.requests) and all(body["model"] == "qwen-8b" for body in r.requests)
    assert all(decoding_of(body) == RELEASE_PERCEIVE for body in p.requests)
    assert all(decoding_of(body) == RELEASE_REASON for body in r.requests)
    assert {h["authorization"] for h in p.headers} == {f"Bearer {PERCEIVER_KEY}"}
    assert {h["authorization"] for h in r.headers} == {f"Bearer {REASONER_KEY}"}
    for record in records:
        assert record["error"] is None and record["answer"] == "B" and record["perceiver_output"] == BOXES
        assert record["passes"] == {
            "perceive": {"model": "p2r-4b", "backend": "openai", "base_url": p.base_url},
            "answer": {"model": "qwen-8b", "backend": "openai", "base_url": r.base_url},
        }
        assert PERCEIVER_KEY not in json.dumps(record) and REASONER_KEY not in json.dumps(record)


def test_the_perceive_pass_takes_its_own_decoding_pixels_and_key_file(monkeypatch, tmp_path):
    key_file = tmp_path / "perceiver.key"
    key_file.write_text(PERCEIVER_KEY + "\n")
    key_file.chmod(0o600)
    monkeypatch.setenv("P2R_PERCEIVER_API_KEY_FILE", str(key_file))
    monkeypatch.setenv("P2R_PERCEIVER_API_KEY", "not-this-one")
    with ScriptedServer(perceiver) as p, ScriptedServer(reasoner) as r:
        lm = P2R(
            backend="openai", base_url=r.base_url, served_model="scripted", max_pixels=65536, max_new_tokens=64,
            perceiver_base_url=p.base_url, perceiver_served_model="scripted", perceive_max_new_tokens=32,
            perceiver_temperature=0.5, perceiver_stop="]", perceiver_max_pixels=16384, perceiver_min_pixels=4096,
        )  # fmt: skip
        records = answer(lm, n=1)
    assert records[0]["error"] is None and records[0]["answer"] == "B"
    assert decoding_of(p.requests[0]) == {**RELEASE_PERCEIVE, "max_tokens": 32, "temperature": 0.5, "stop": ["]"]}
    assert decoding_of(r.requests[0]) == {**RELEASE_REASON, "max_tokens": 64}
    assert p.headers[0]["authorization"] == f"Bearer {PERCEIVER_KEY}" and "authorization" not in r.headers[0]
    # Each pass's image was fitted to its own budget: the perceiver's 16,384 pixels, the reasoner's 65,536.
    sizes = [lm.perceive_budget.fit([docs(1)[0]["image"]])[0].size, lm.budget.fit([docs(1)[0]["image"]])[0].size]
    assert sizes[0][0] * sizes[0][1] <= 16384 < sizes[1][0] * sizes[1][1] <= 65536
    assert [image_size(p.requests[0]), image_size(r.requests[0])] == sizes


def image_size(body: dict) -> tuple[int, int]:
    """The size of the first image of a chat request (an inline data: URL)."""
    url = next(part["image_url"]["url"] for part in body["messages"][-1]["content"] if part["type"] == "image_url")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size


@pytest.mark.parametrize("down", ["reasoner", "perceiver"])
def test_a_role_whose_service_is_down_stops_the_run_naming_that_role(down):
    with ScriptedServer(perceiver) as p, ScriptedServer(reasoner) as r:
        dead = f"http://127.0.0.1:{free_port()}"
        urls = {"perceiver": p.base_url, "reasoner": r.base_url, down: dead}
        lm = P2R(
            backend="openai", base_url=urls["reasoner"], served_model="scripted", max_pixels=65536,
            perceiver_base_url=urls["perceiver"], perceiver_served_model="scripted",
            retries=0, perceiver_retries=0, backoff_s=0.01, perceiver_backoff_s=0.01,
        )  # fmt: skip
        with pytest.raises(SystemExit, match=rf"the {down} \(scripted on openai at {dead}\) failed") as info:
            answer(lm, n=1)
    assert "no scores written" in str(info.value)
    other = "perceiver" if down == "reasoner" else "reasoner"
    assert f"the {other} (" not in str(info.value)
    # The perceive pass ran only where the perceiver is up; no reason request reached a live server.
    assert p.calls == (1 if down == "reasoner" else 0) and r.calls == 0


def test_a_mixed_run_never_takes_a_one_engine_runs_cached_records(tmp_path):
    journal = str(tmp_path / "records.jsonl")
    with ScriptedServer(perceiver) as one, ScriptedServer(perceiver) as p, ScriptedServer(reasoner) as r:
        common = {"served_model": "scripted", "max_pixels": 65536, "record_cache": journal}
        plain = P2R(backend="openai", base_url=one.base_url, **common)
        answer(plain)
        mixed = {"base_url": r.base_url, "perceiver_base_url": p.base_url, "perceiver_served_model": "scripted"}
        records = answer(P2R(backend="openai", **mixed, **common))
        assert (one.calls, p.calls, r.calls) == (6, 3, 3)
        again = answer(P2R(backend="openai", **mixed, **common))
        assert again == records and (p.calls, r.calls) == (3, 3)  # resumed from its own records
    assert all(record["passes"]["answer"]["base_url"] == r.base_url for record in records)


def test_perceiver_arguments_are_checked():
    with pytest.raises(ValueError, match="need mode=p2r"):
        P2R(backend="openai", base_url="http://127.0.0.1:9", served_model="x", mode="thinking", perceiver_top_k=5)
    with pytest.raises(ValueError, match="need a perceiver engine of its own"):
        P2R(backend="openai", base_url="http://127.0.0.1:9", served_model="x", perceiver_max_pixels=4096)
    with pytest.raises(ValueError, match="perceiver_base_url and perceiver_served_model"):
        P2R(backend="openai", base_url="http://127.0.0.1:9", served_model="x", perceiver_backend="openai")
    with pytest.raises(ValueError, match=r"\$P2R_PERCEIVER_API_KEY") as info:
        P2R(backend="openai", base_url="http://127.0.0.1:9", served_model="x", perceiver_base_url="http://127.0.0.1:9",
            perceiver_served_model="y", perceiver_api_key="sk-secret-in-argv")  # fmt: skip
    assert "sk-secret-in-argv" not in str(info.value)


@pytest.mark.parametrize(
    "model_args, name",
    [("pretrained=Qwen/Qwen3-VL-4B-Instruct,mode=p2r", "Qwen3-VL-4B-Instruct"),
     ("pretrained=/ckpt/Qwen3-VL-8B-Instruct,perceiver_pretrained=/ckpt/P2R-4B/", "P2R-4B -> Qwen3-VL-8B-Instruct"),
     ("backend=openai,served_model=Qwen3-VL-8B,perceiver_base_url=http://h:1,perceiver_served_model=P2R-4B",
      "P2R-4B -> Qwen3-VL-8B"),
     ("pretrained=org/P2R-4B,perceiver_backend=vllm", "P2R-4B -> P2R-4B")],
)  # fmt: skip
def test_the_leaderboard_names_a_mixed_run_by_its_pair(tmp_path, model_args, name):
    path = tmp_path / "x_results.json"
    results = {"vstar": {"overall,none": 50.0, "samples": 2}}
    config = {"model": "p2r", "model_args": model_args}
    path.write_text(json.dumps({"results": results, "config": config, "model_name": "p2r"}))  # as lmms-eval writes them
    assert read_result_file(path)[0][0] == name


# --- hf backend: the trained toy perceives, a random tiny model reasons --------------------------------


def test_p2r_tiny_perceives_and_a_random_tiny_model_reasons_on_the_hf_backend(tiny_model_dir):
    fast = {"max_pixels": 65536, "max_new_tokens": 24, "perceive_max_new_tokens": 64}
    mixed = P2R(pretrained=str(tiny_model_dir), backend="hf", perceiver_pretrained="p2r-tiny", **fast)
    records = answer(mixed, n=2)
    assert type(mixed.perceiver_engine) is type(mixed.engine) and mixed.perceiver_engine is not mixed.engine
    alone = answer(P2R(pretrained="p2r-tiny", backend="hf", **fast), n=2)
    for record, own in zip(records, alone):
        assert record["error"] is None and record["passes"] == {
            "perceive": {"model": "p2r-tiny", "backend": "hf"},
            "answer": {"model": str(tiny_model_dir), "backend": "hf"},
        }
        # The perceive pass is the trained toy's, token for token; the answer is the random model's.
        assert record["perceiver_output"] == own["perceiver_output"]
        assert record["raw_answer"] != own["raw_answer"]


# --- The real lmms-eval CLI: two p2r-serve instances, one per role -------------------------------------


@pytest.mark.slow
def test_two_p2r_serve_roles_through_the_lmms_eval_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("P2R_API_KEY", REASONER_KEY)
    monkeypatch.setenv("P2R_PERCEIVER_API_KEY", PERCEIVER_KEY)
    # The trained toy in both roles, under two names: it stops at its answer, where a random model would write
    # all of the release's 1,024 tokens on a CPU.
    with (
        start_p2r_serve("p2r-tiny", api_key=PERCEIVER_KEY, served_name="P2R-4B") as perceive_serve,
        start_p2r_serve("p2r-tiny", api_key=REASONER_KEY, served_name="Qwen3-VL-8B") as reason_serve,
        RawRecorder(upstream=perceive_serve.base_url) as p,
        RawRecorder(upstream=reason_serve.base_url) as r,
    ):
        model_args = (
            f"backend=openai,base_url={r.base_url},served_model=Qwen3-VL-8B,mode=p2r,max_pixels=65536,"
            f"perceiver_base_url={p.base_url},perceiver_served_model=P2R-4B"
        )
        out = tmp_path / "run"
        log = lmms_cli.run(
            "--model", "p2r", "--model_args", model_args, "--tasks", "p2r_demo_vstar", "--limit", "2",
            "--output_path", str(out), "--log_samples", cwd=tmp_path, timeout_s=900,
        )  # fmt: skip
    outputs = lmms_cli.read_outputs(out)
    perceived, reasoned = p.requests(), r.requests()
    assert len(perceived) == len(reasoned) == 2
    assert all(is_perceive(b) and b["model"] == "P2R-4B" and decoding_of(b) == RELEASE_PERCEIVE for b in perceived)
    assert all(not is_perceive(b) and b["model"] == "Qwen3-VL-8B" for b in reasoned)
    assert all(decoding_of(b) == RELEASE_REASON for b in reasoned)
    assert {h["authorization"] for h in p.headers} == {f"Bearer {PERCEIVER_KEY}"}
    assert {h["authorization"] for h in r.headers} == {f"Bearer {REASONER_KEY}"}
    # The results' config names both roles; each logged record names each pass's model and backend.
    config = outputs.results["config"]["model_args"]
    assert "perceiver_served_model=P2R-4B" in config and "served_model=Qwen3-VL-8B" in config
    records = [envelope.unwrap(s["filtered_resps"]) for s in outputs.samples["p2r_demo_vstar"]]
    assert [r_["passes"]["perceive"]["model"] for r_ in records] == ["P2R-4B"] * 2
    assert [r_["passes"]["answer"]["model"] for r_ in records] == ["Qwen3-VL-8B"] * 2
    assert all(r_["error"] is None and r_["perceiver_output"] is not None for r_ in records)
    # Neither key is in what lmms-eval wrote or printed.
    written = "".join(path.read_text() for path in out.rglob("*") if path.is_file()) + log
    assert PERCEIVER_KEY not in written and REASONER_KEY not in written
    [results_file] = out.glob("*/*_results.json")
    (name, mode), _ = read_result_file(results_file)
    assert (name, mode) == ("P2R-4B -> Qwen3-VL-8B", "p2r")


@pytest.mark.slow
def test_a_reasoner_that_is_down_stops_the_cli_run_naming_the_reasoner(tmp_path):
    with ScriptedServer(perceiver) as p:
        dead = f"http://127.0.0.1:{free_port()}"
        model_args = (
            f"backend=openai,base_url={dead},served_model=reasoner,mode=p2r,max_pixels=65536,retries=0,"
            f"perceiver_base_url={p.base_url},perceiver_served_model=scripted"
        )
        process = lmms_cli.start(
            "--model", "p2r", "--model_args", model_args, "--tasks", "p2r_demo_vstar", "--limit", "1",
            "--output_path", str(tmp_path / "run"), cwd=tmp_path,
        )  # fmt: skip
        output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert f"the reasoner (reasoner on openai at {dead}) failed" in output
    assert p.calls == 1 and not list((tmp_path / "run").rglob("*_results.json"))


def test_keys_in_argv_are_taken_out_before_lmms_eval_reads_it(monkeypatch):
    monkeypatch.setattr(registration, "cli_api_key", None)
    argv = ["lmms-eval", "--model", "p2r", "--model_args", "api_key=sk-a,perceiver_api_key=sk-b,mode=p2r"]
    registration.take_cli_key(argv)
    assert argv[-1] == "perceiver_api_key=<redacted>,mode=p2r" and registration.cli_api_key == "sk-a"
