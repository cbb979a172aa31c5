"""p2r-serve under hostile requests (issue 17), each against a real server on 127.0.0.1: prompts past
the model's context, many images that decode to too many pixels, formats that would run a program,
cross-site requests to the keyless server, options it does not implement, a slow request, SIGTERM
while generating, keys, and text that is not Unicode (lone UTF-16 surrogates). After every hostile case the server must still be healthy: /health
200, a good request answered, and its memory bounded."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import reliability
from PIL import Image
from servers import _serve_command, start_p2r_serve

from p2r_recipe.engines.base import GenParams
from p2r_recipe.images import IMAGE_FORMATS, MAX_TOTAL_PIXELS, ImageError, PixelAllowance, load_image
from p2r_recipe.prompts import Prompt
from p2r_recipe.serving.protocol import APIError, ChatRequest, fit_context

KEY = "hostile-test-key"
CONTEXT = 32768  # the tiny model's
MAX_GENERATION_S = 3
# What one request may add to the server's memory: its images' pixel budget in RGB, and headroom.
RSS_GROWTH_MB = MAX_TOTAL_PIXELS * 4 / 2**20 + 300


@pytest.fixture(scope="module")
def fake_gs(tmp_path_factory) -> Path:
    """A `gs` first on PATH that leaves a marker file when anything runs it (Pillow's EPS reader would)."""
    folder = tmp_path_factory.mktemp("bin")
    marker = folder / "gs-ran"
    script = folder / "gs"
    script.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    script.chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def keyless(tiny_model_dir, fake_gs):
    """A keyless server (as started by default) with short generation caps and the fake `gs` on its PATH."""
    path = os.environ["PATH"]
    os.environ["PATH"] = f"{fake_gs}{os.pathsep}{path}"
    try:
        args = ("--max-generation-s", str(MAX_GENERATION_S), "--max-batch", "4", "--allowed-hosts", "localhost,p2r.internal")
        with start_p2r_serve(tiny_model_dir, extra_args=args) as server:
            yield server
    finally:
        os.environ["PATH"] = path


@pytest.fixture(scope="module")
def keyed(tiny_model_dir):
    with start_p2r_serve(tiny_model_dir, api_key=KEY) as server:
        yield server


def chat(server, body: dict | None = None, headers: dict | None = None, timeout: float = 60, **kwargs) -> httpx.Response:
    if body is not None:
        kwargs["json"] = body
    return httpx.post(f"{server.base_url}/v1/chat/completions", headers=headers, timeout=timeout, **kwargs)


def body(content="hi", **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def image(data: bytes, kind: str = "png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:image/{kind};base64," + base64.b64encode(data).decode()}}


def png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def assert_healthy(server, headers: dict | None = None, rss_before_mb: float | None = None) -> None:
    assert server.process.poll() is None
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    good = body([image(png((64, 48))), {"type": "text", "text": "what is this?"}])
    response = chat(server, good, headers)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2
    if rss_before_mb is not None:
        assert reliability.rss_mb(server.process.pid) - rss_before_mb < RSS_GROWTH_MB


def refused(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert all(word in message for word in words), message


# --- 1. prompts past the context, a slow request, SIGTERM ---------------------------------------


@pytest.mark.parametrize(
    ("content", "extra", "words"),
    [
        ("x" * 2**20, {}, ("over this model's context of 32768 tokens",)),  # 1 MiB: refused without tokenising it
        ("hello " * 40_000, {}, ("over this model's context of 32768 tokens",)),  # tokenised: just past it
        ([image(png((2048, 2048)))] * 9 + [{"type": "text", "text": "?"}], {}, ("text and images", "32768")),
        ("hi", {"max_tokens": CONTEXT}, ("context is 32768 tokens", "max_tokens 32768")),
        ("hi", {"max_tokens": 4, "min_tokens": 8}, ("min_tokens 8 is over max_tokens 4",)),
    ],
    ids=["1MiB-text", "40k-words", "9-images-of-4096-tokens", "max_tokens-past-context", "min-over-max"],
)
def test_prompts_past_the_context_are_400_before_any_generation(keyless, content, extra, words):
    before = httpx.get(f"{keyless.base_url}/health").json()
    rss = reliability.rss_mb(keyless.process.pid)
    start = time.monotonic()
    refused(chat(keyless, {**body(content), **extra}), 400, *words)
    assert time.monotonic() - start < 20
    assert httpx.get(f"{keyless.base_url}/health").json()["requests"] == before["requests"]  # nothing queued
    assert_healthy(keyless, rss_before_mb=rss)


def test_the_default_token_limit_shrinks_to_the_room_the_context_leaves():
    class Counted:  # fit_context is pure arithmetic over an engine's counts
        context_length = 100

        def prompt_tokens(self, prompt, limit=None):
            return len(prompt.text)

    fits = fit_context(Counted(), ChatRequest(Prompt("x" * 90), GenParams(max_new_tokens=1024), False))
    assert fits.max_new_tokens == 10
    with pytest.raises(APIError, match="do not fit"):
        fit_context(Counted(), ChatRequest(Prompt("x" * 90), GenParams(max_new_tokens=11), True))
    with pytest.raises(APIError, match="over this model's context"):
        fit_context(Counted(), ChatRequest(Prompt("x" * 100), GenParams(max_new_tokens=1), False))


def test_a_slow_request_holds_up_another_for_at_most_the_generation_cap(keyless):
    slow: dict = {}
    endless = body("tell me everything", max_tokens=30_000, min_tokens=30_000)
    worker = threading.Thread(target=lambda: slow.update(response=chat(keyless, endless, timeout=120)))
    start = time.monotonic()
    worker.start()
    time.sleep(0.5)
    quick = chat(keyless, body("hi"))
    waited = time.monotonic() - start
    worker.join(timeout=120)
    assert quick.status_code == 200
    assert waited < MAX_GENERATION_S + 8  # the cap, plus the quick request's own work on a loaded CPU
    reply = slow["response"].json()
    assert reply["choices"][0]["finish_reason"] == "length" and 0 < reply["usage"]["completion_tokens"] < 30_000
    assert_healthy(keyless)


def test_sigterm_while_generating_ends_the_server_promptly(tiny_model_dir):
    with start_p2r_serve(tiny_model_dir) as server:  # the default 600 s cap: only the signal can end it early
        slow: dict = {}

        def ask():
            try:
                slow["response"] = chat(server, body("go on", max_tokens=30_000, min_tokens=30_000), timeout=120)
            except httpx.TransportError as exc:
                slow["response"] = exc

        worker = threading.Thread(target=ask)
        worker.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.base_url}/health").json()["batches"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)  # generating now
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=30)
        stopped_in = time.monotonic() - start
        worker.join(timeout=30)
    assert stopped_in < 10
    response = slow["response"]
    assert isinstance(response, httpx.TransportError) or response.status_code == 503


# --- 2. pixels per request -----------------------------------------------------------------------


def test_images_that_decode_to_too_many_pixels_together_are_400(keyless):
    # Five 20 MP one-colour PNGs: a small body, each under the per-image limit, 100 MP together.
    big = png((5000, 4000))
    assert len(big) < 200_000 and 5000 * 4000 * 5 > MAX_TOTAL_PIXELS > 5000 * 4000
    rss = reliability.rss_mb(keyless.process.pid)
    for _ in range(3):
        refused(chat(keyless, body([image(big)] * 5 + [{"type": "text", "text": "?"}])), 400, "images too large together")
    assert_healthy(keyless, rss_before_mb=rss)


def test_the_pixel_allowance_is_charged_from_headers_before_decoding():
    allowance = PixelAllowance(1000)
    load_image(png((20, 20)), allowance=allowance)
    assert allowance.left == 600
    with pytest.raises(ImageError, match="images too large together"):
        load_image(png((30, 30)), allowance=allowance)
    assert allowance.left == 600  # the refused image took nothing
    with pytest.raises(ImageError, match="images too large together"):
        load_image(Image.new("RGB", (25, 25)), allowance=allowance)  # decoded images count too


# --- 3. formats ----------------------------------------------------------------------------------


def encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), "blue").save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_allowed_formats_load(fmt):
    assert load_image(encoded(fmt)).size == (40, 30)


@pytest.mark.parametrize("fmt", ["EPS", "PPM", "ICO", "TGA", "PCX", "SGI", "PDF", "QOI", "DDS", "SPIDER"])
def test_other_formats_are_a_per_sample_error(fmt):
    try:
        data = encoded(fmt)
    except (KeyError, OSError, ValueError):
        pytest.skip(f"this Pillow cannot write {fmt}")
    with pytest.raises(ImageError, match="unreadable image: not a JPEG, PNG"):
        load_image(data)


def test_eps_never_runs_ghostscript(keyless, fake_gs, tmp_path):
    eps = encoded("EPS")
    marker = fake_gs / "gs-ran"
    # The test can fail: plain Pillow does run `gs` on this file.
    env = {**os.environ, "PATH": f"{fake_gs}{os.pathsep}{os.environ['PATH']}"}
    (tmp_path / "a.eps").write_bytes(eps)
    code = f"from PIL import Image\ntry:\n    Image.open({str(tmp_path / 'a.eps')!r}).load()\nexcept Exception:\n    pass"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    assert marker.exists()
    marker.unlink()
    refused(chat(keyless, body([image(eps, "eps"), {"type": "text", "text": "?"}])), 400, "not a JPEG, PNG")
    with pytest.raises(ImageError, match="not allowed"):  # an EPS someone else opened is refused before its pixels
        load_image(Image.open(io.BytesIO(eps)))
    assert not marker.exists()
    assert_healthy(keyless)


# --- 4. the keyless server and cross-site requests -----------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"},
     {"Content-Type": "multipart/form-data; boundary=x"}, {}],
    ids=["text-plain", "form", "multipart", "none"],
)  # fmt: skip
def test_keyless_posts_must_be_json(keyless, headers):
    import json

    refused(chat(keyless, content=json.dumps(body()).encode(), headers=headers), 415, "application/json")
    assert_healthy(keyless)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.nip.io", "localhost.evil.example", ""])
def test_keyless_requests_must_name_this_server(keyless, host):
    headers = {"Host": host}
    refused(chat(keyless, body(), headers), 403, "is not a name of this server")
    refused(httpx.get(f"{keyless.base_url}/v1/models", headers=headers), 403, "--allowed-hosts")
    assert httpx.get(f"{keyless.base_url}/health", headers=headers).status_code == 200
    assert_healthy(keyless)


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:1234", "127.0.0.1", "[::1]:80", "p2r.internal:8000"])
def test_keyless_accepts_its_own_names_and_ip_addresses(keyless, host):
    assert chat(keyless, body(), {"Host": host}).status_code == 200


def test_with_a_key_content_type_and_host_are_not_checked(keyed):
    import json

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain", "Host": "anything.example"}
    assert chat(keyed, content=json.dumps(body()).encode(), headers=headers).status_code == 200


# --- 5. sampling options -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    [{"logprobs": True}, {"top_logprobs": 2}, {"tools": [{"type": "function", "function": {"name": "f"}}]},
     {"response_format": {"type": "json_object"}}, {"logit_bias": {"1": 5}}, {"frequency_penalty": 0.5},
     {"presence_penalty": 1}, {"n": 2}, {"stream": True}, {"best_of": 2}, {"use_beam_search": True},
     {"ignore_eos": True}, {"guided_json": {}}, {"chat_template_kwargs": {"add_generation_prompt": False}}],
    ids=lambda option: next(iter(option)),
)  # fmt: skip
def test_options_not_implemented_are_400_naming_them(keyless, option):
    name = next(iter(option))
    refused(chat(keyless, body(**option)), 400, "unsupported option", name)
    assert_healthy(keyless)


@pytest.mark.parametrize(
    "option",
    [{"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}, {"repetition_penalty": 0}, {"stop": ""}, {"stop": [1]},
     {"stop": ["a"] * 17}, {"temperature": "hot"}],
)  # fmt: skip
def test_bad_option_values_are_400(keyless, option):
    refused(chat(keyless, body(**option)), 400, next(iter(option)))


def test_neutral_values_of_other_options_are_accepted(keyless):
    neutral = {"logprobs": False, "frequency_penalty": 0, "presence_penalty": 0.0, "stream": False, "n": 1,
               "response_format": {"type": "text"}, "user": "someone", "tools": None,
               "chat_template_kwargs": {"enable_thinking": False}}  # the tiny template never reads it  # fmt: skip
    assert chat(keyless, body(**neutral)).status_code == 200


def reply(server, **options) -> dict:
    response = chat(server, body("describe the picture", **options))
    assert response.status_code == 200, response.text
    return response.json()


def test_implemented_options_are_honoured(keyless):
    text = lambda r: r["choices"][0]["message"]["content"]
    greedy = reply(keyless, max_tokens=12)
    varied = reply(keyless, max_tokens=12, repetition_penalty=100.0)
    assert text(varied) != text(greedy)  # the penalty changed what greedy decoding picks
    # stop: the reply ends before the stop string, with fewer tokens and finish_reason "stop"
    stop = text(varied)[len(text(varied)) // 2 :][:3]
    cut = reply(keyless, max_tokens=12, repetition_penalty=100.0, stop=[stop])
    assert text(cut) == text(varied)[: text(varied).find(stop)] and cut["choices"][0]["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] < 12
    # top_k=1 at temperature 1 is greedy; without it, a seeded sample differs and repeats with its seed
    assert text(reply(keyless, max_tokens=12, temperature=1.0, top_k=1, seed=3)) == text(greedy)
    sampled = reply(keyless, max_tokens=12, temperature=1.0, seed=3)
    assert text(sampled) != text(greedy) and text(reply(keyless, max_tokens=12, temperature=1.0, seed=3)) == text(sampled)
    # top_p small enough keeps only the most likely token: greedy again
    assert text(reply(keyless, max_tokens=12, temperature=1.0, top_p=1e-9, seed=3)) == text(greedy)
    assert reply(keyless, max_completion_tokens=3, min_tokens=3)["usage"]["completion_tokens"] == 3


# --- 6. keys -------------------------------------------------------------------------------------


def start_fails(*args: str, env_key: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "P2R_SERVE_API_KEY": env_key, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*_serve_command(), "--model", "/nonexistent/model", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


@pytest.mark.parametrize("args", [("--api-key", ""), ("--api-key", "  ")], ids=["empty", "blank"])
def test_an_empty_key_is_refused_at_start_up(args):
    result = start_fails(*args)
    assert result.returncode == 2 and "the API key is empty" in result.stderr


def test_empty_or_shared_key_files_are_refused_and_argv_keys_warn(tmp_path):
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    empty.chmod(0o600)
    result = start_fails("--api-key-file", str(empty))
    assert result.returncode == 2 and f"--api-key-file={empty} is empty" in result.stderr
    result = start_fails("--api-key", "visible")  # a real key: it warns, then fails on the missing model
    assert "visible to every user of this machine" in result.stderr and "P2R_SERVE_API_KEY" in result.stderr
    shared = tmp_path / "shared.key"
    shared.write_text("k\n")
    shared.chmod(0o640)  # the training services' rule: a key file others can read is refused, not just warned about
    result = start_fails("--api-key-file", str(shared))
    assert result.returncode == 2 and "readable by others (mode 640); chmod 600" in result.stderr


def test_the_key_can_come_from_a_file(tiny_model_dir, tmp_path):
    key_file = tmp_path / "serve.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(stat.S_IRUSR | stat.S_IWUSR)
    with start_p2r_serve(tiny_model_dir, extra_args=("--api-key-file", str(key_file))) as server:
        assert chat(server, body()).status_code == 401
        assert_healthy(server, {"Authorization": f"Bearer {KEY}"})
        cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
        assert KEY.encode() not in cmdline


# --- 7. text that is not Unicode -----------------------------------------------------------------


def raw_chat(server, messages_json: str, **kwargs) -> httpx.Response:
    """A chat request sent as this exact JSON text (a client's JSON library would refuse to write a lone surrogate)."""
    text = '{"model": "tiny", "max_tokens": 2, "messages": ' + messages_json + "}"
    headers = {"Content-Type": "application/json"}
    return httpx.post(f"{server.base_url}/v1/chat/completions", content=text.encode(), headers=headers, **kwargs)


LONE_SURROGATES = {
    "content": '[{"role": "user", "content": "a\\ud800b"}]',
    "text-part": '[{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]',
    "system": '[{"role": "system", "content": "\\ud800"}, {"role": "user", "content": "hi"}]',
    "high-then-high": '[{"role": "user", "content": "\\ud83d\\ud83d"}]',
}
PAIRED = '[{"role": "user", "content": "smile \\ud83d\\ude00"}]'


@pytest.mark.parametrize("messages", LONE_SURROGATES.values(), ids=LONE_SURROGATES.keys())
def test_a_lone_surrogate_is_a_400_naming_where_it_is(keyless, messages):
    refused(raw_chat(keyless, messages, timeout=60), 400, "lone UTF-16 surrogate", "messages[")
    assert_healthy(keyless)


def test_surrogates_elsewhere_are_400_and_pairs_are_text(keyless):
    text = '{"model": "tiny", "max_tokens": 2, "stop": ["\\udc00"], "messages": [{"role": "user", "content": "hi"}]}'
    response = httpx.post(f"{keyless.base_url}/v1/chat/completions", content=text.encode(),
                          headers={"Content-Type": "application/json"}, timeout=60)  # fmt: skip
    refused(response, 400, "stop[0]", "lone UTF-16 surrogate")
    option = '{"model": "tiny", "\\ud800": 1, "messages": [{"role": "user", "content": "hi"}]}'
    response = httpx.post(f"{keyless.base_url}/v1/chat/completions", content=option.encode(),
                          headers={"Content-Type": "application/json"}, timeout=60)  # fmt: skip
    refused(response, 400, "lone UTF-16 surrogate")  # not echoed raw into the error, which could not be encoded
    assert raw_chat(keyless, PAIRED, timeout=60).status_code == 200  # an escaped pair is one character


def test_lone_surrogates_inside_a_burst_fail_alone(keyless):
    good = '[{"role": "user", "content": "question %d"}]'

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            text = lambda messages: ('{"model": "tiny", "max_tokens": 2, "messages": ' + messages + "}").encode()
            bodies = [text(good % i) for i in range(16)] + [text(m) for m in LONE_SURROGATES.values()]
            return await asyncio.gather(*(
                client.post(f"{keyless.base_url}/v1/chat/completions", content=b, headers={"Content-Type": "application/json"})
                for b in bodies
            ))  # fmt: skip

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses[:16]] == [200] * 16, [r.text for r in responses[:16] if r.status_code != 200]
    for response in responses[16:]:
        refused(response, 400, "lone UTF-16 surrogate")
    assert_healthy(keyless)
