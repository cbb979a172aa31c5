"""ChatClient and OpenAIEngine against a real scripted OpenAI-compatible HTTP server."""

from __future__ import annotations

import asyncio
import base64
import io
import multiprocessing
import threading

import pytest
from PIL import Image
from servers import ScriptedServer, free_port

from p2r_recipe.client import ChatClient, RequestRejected, ServiceUnavailable, image_part, run_sync
from p2r_recipe.engines.base import GenParams
from p2r_recipe.engines.openai import OpenAIEngine
from p2r_recipe.prompts import Prompt

HELLO = [{"role": "user", "content": "hello"}]


def echo(body: dict) -> str:
    return "echo: " + str(body["messages"][-1]["content"])


def client(server_or_url, **kwargs) -> ChatClient:
    url = getattr(server_or_url, "base_url", server_or_url)
    return ChatClient(url, "scripted", **{"backoff_s": 0.01, "max_backoff_s": 0.05, **kwargs})


def in_new_loop(chat: ChatClient, coro):
    """Await `coro` in a fresh event loop, as `asyncio.run` callers do, closing that loop's connections after."""

    async def main():
        try:
            return await coro
        finally:
            await chat.aclose()

    return asyncio.run(main())


def test_chat_returns_text_and_usage_with_or_without_v1():
    with ScriptedServer(echo) as server:
        for url in (server.base_url, server.base_url + "/v1/"):
            chat = client(url)
            reply = in_new_loop(chat, chat.chat(HELLO, max_tokens=5))
            assert reply.text == "echo: hello"
            assert reply.output_tokens == 2 and reply.input_tokens > 0
        assert server.requests[-1]["max_tokens"] == 5 and server.requests[-1]["model"] == "scripted"


def test_concurrency_is_bounded_and_requests_overlap():
    with ScriptedServer(echo, latency_s=0.2) as server:
        chat = client(server, concurrency=4)

        async def many():
            return await asyncio.gather(*(chat.text(HELLO) for _ in range(16)))

        assert in_new_loop(chat, many()) == ["echo: hello"] * 16
    assert server.max_in_flight == 4  # four at a time overlapped, never more


@pytest.mark.parametrize("status", [429, 500, 503])
def test_retries_after_server_errors_then_succeeds(status):
    with ScriptedServer(echo, fail_first=2, status_on_fail=status) as server:
        chat = client(server)
        assert in_new_loop(chat, chat.text(HELLO)) == "echo: hello"
    assert server.calls == 3
    assert chat.stats["retries"] == 2 and chat.stats["failures"] == 0 and chat.stats["waited_s"] > 0


def test_timeout_then_retry():
    with ScriptedServer(echo, latency_s=lambda call: 3.0 if call == 1 else 0.0) as server:
        chat = client(server, timeout_s=0.5)
        assert in_new_loop(chat, chat.text(HELLO)) == "echo: hello"
    # The slow first call was abandoned (a retry), not waited out: the second call answered.
    assert server.calls == 2 and chat.stats["retries"] == 1


def test_service_down_raises_naming_service_after_counted_retries():
    url = f"http://127.0.0.1:{free_port()}"
    chat = client(url, name="reasoner", retries=3)
    with pytest.raises(ServiceUnavailable) as info:
        in_new_loop(chat, chat.text(HELLO))
    message = str(info.value)
    assert "reasoner" in message and url in message and "4 attempts" in message and "Connect" in message
    assert chat.stats == {"requests": 1, "retries": 3, "failures": 1, "waited_s": pytest.approx(chat.stats["waited_s"])}


def test_persistent_5xx_is_an_outage():
    with ScriptedServer(echo, fail_first=100) as server:
        chat = client(server, retries=2)
        with pytest.raises(ServiceUnavailable, match="HTTP 503"):
            in_new_loop(chat, chat.text(HELLO))
    assert server.calls == 3


def test_outage_and_recovery_on_the_same_port():
    server = ScriptedServer(echo).start()
    chat = client(server, retries=1)
    try:
        assert run_sync(chat.text(HELLO)) == "echo: hello"
        server.stop()
        with pytest.raises(ServiceUnavailable):
            run_sync(chat.text(HELLO))
        server.start()
        assert run_sync(chat.text(HELLO)) == "echo: hello"  # pooled connections re-open
    finally:
        chat.close()
        server.stop()


def test_bad_request_fails_at_once():
    with ScriptedServer(echo, fail_first=1, status_on_fail=400) as server:
        chat = client(server)
        with pytest.raises(RequestRejected, match="HTTP 400"):
            in_new_loop(chat, chat.text(HELLO))
    assert server.calls == 1 and chat.stats["retries"] == 0 and chat.stats["failures"] == 1


def test_bearer_key_sent_only_when_set():
    with ScriptedServer(echo) as server:
        for chat in (client(server, api_key="sekret"), client(server)):
            in_new_loop(chat, chat.text(HELLO))
    assert server.headers[0]["authorization"] == "Bearer sekret"
    assert "authorization" not in server.headers[1]


def test_one_client_across_event_loops_and_threads():
    with ScriptedServer(echo) as server:
        chat = client(server)
        assert in_new_loop(chat, chat.text(HELLO)) == "echo: hello"
        assert in_new_loop(chat, chat.text(HELLO)) == "echo: hello"  # a second loop

        async def inside_a_running_loop():
            return run_sync(chat.text(HELLO))  # what sync callers inside async frameworks do

        assert in_new_loop(chat, inside_a_running_loop()) == "echo: hello"
        results = []
        threads = [threading.Thread(target=lambda: results.append(run_sync(chat.text(HELLO)))) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert results == ["echo: hello"] * 4
        chat.close()


def test_run_sync_in_a_forked_child():
    with ScriptedServer(echo) as server:
        chat = client(server)
        assert run_sync(chat.text(HELLO)) == "echo: hello"  # the parent's background loop now exists
        fork = multiprocessing.get_context("fork")
        receive, send = fork.Pipe()
        child = fork.Process(target=lambda: send.send(run_sync(chat.text(HELLO))), daemon=True)
        child.start()
        try:
            assert receive.poll(20) and receive.recv() == "echo: hello"
        finally:
            child.kill()
            chat.close()


def test_wait_healthy():
    with ScriptedServer(echo, models=("reasoner",)) as server:
        chat = ChatClient(server.base_url, "reasoner")
        assert in_new_loop(chat, chat.wait_healthy(5)) == ["reasoner"]
        chat = client(server)
        with pytest.raises(RequestRejected, match="not 'scripted'"):
            in_new_loop(chat, chat.wait_healthy(5))
    chat = client(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ServiceUnavailable, match="not healthy"):
        in_new_loop(chat, chat.wait_healthy(0.3, poll_s=0.1))


def test_image_part_is_a_jpeg_data_url():
    part = image_part(Image.new("RGB", (40, 30), "red"))
    url = part["image_url"]["url"]
    assert part["type"] == "image_url" and url.startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (40, 30)


def reply_by_question(body: dict) -> str | int:
    text = body["messages"][-1]["content"][-1]["text"]
    return 400 if "bad" in text else f"answer to {text}"


def test_engine_generates_in_order_with_params_and_per_sample_errors():
    prompts = [Prompt(f"q{i}", [Image.new("RGB", (64, 64), "blue")]) for i in range(6)] + [Prompt("bad one")]
    with ScriptedServer(reply_by_question, latency_s=0.05, models=("reasoner",)) as server:
        engine = OpenAIEngine(server.base_url, "reasoner", concurrency=8, backoff_s=0.01)
        gens = engine.generate(prompts, GenParams(max_new_tokens=7, temperature=0.3, min_new_tokens=2, seed=11))
        engine.close()
    assert [g.text for g in gens[:6]] == [f"answer to q{i}" for i in range(6)]
    assert all(g.error is None and g.output_tokens == 3 and g.input_tokens > 0 for g in gens[:6])
    assert gens[6].text == "" and "HTTP 400" in gens[6].error
    body = server.requests[0]
    assert (body["max_tokens"], body["temperature"], body["min_tokens"], body["seed"]) == (7, 0.3, 2, 11)
    system, user = body["messages"]
    assert system["role"] == "system" and user["content"][0]["image_url"]["url"].startswith("data:image/jpeg")
    assert server.max_in_flight > 1


def test_engine_sends_only_the_params_set():
    release = GenParams(max_new_tokens=3, repetition_penalty=1.05)
    everything = GenParams(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.1,
                           stop=("</answer>", "\n\n"), min_new_tokens=1, seed=3)  # fmt: skip
    with ScriptedServer(echo, models=("reasoner",)) as server:
        engine = OpenAIEngine(server.base_url, "reasoner")
        for params in (GenParams(max_new_tokens=3), release, everything):
            engine.generate([Prompt("q")], params)
        engine.close()
    sent = [{k: v for k, v in body.items() if k not in ("model", "messages")} for body in server.requests]
    # Neutral vLLM extensions stay out, so a strict OpenAI server accepts the request.
    assert sent[0] == {"max_tokens": 3, "temperature": 0.0, "top_p": 1.0}
    assert sent[1] == {"max_tokens": 3, "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.05}
    assert sent[2] == {"max_tokens": 5, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1,
                       "stop": ["</answer>", "\n\n"], "min_tokens": 1, "seed": 3}  # fmt: skip


def test_a_server_refusing_an_extension_field_stops_with_its_name():
    def strict(body: dict):
        if "repetition_penalty" in body:
            return 400, "Unrecognized request argument supplied: repetition_penalty"
        return 400 if "too long" in body["messages"][-1]["content"][-1]["text"] else "ok"

    with ScriptedServer(strict, models=("reasoner",)) as server:
        engine = OpenAIEngine(server.base_url, "reasoner", backoff_s=0.01)
        with pytest.raises(RequestRejected, match="does not accept `repetition_penalty`.*repetition_penalty=1.0"):
            engine.generate([Prompt("q1"), Prompt("q2")], GenParams(max_new_tokens=4, repetition_penalty=1.05))
        # Without it the same server answers, and a 400 about something else stays that sample's error.
        ok, long = engine.generate([Prompt("q1"), Prompt("too long")], GenParams(max_new_tokens=4))
        engine.close()
    assert ok.text == "ok" and "HTTP 400" in long.error


def test_png_images_carry_the_exact_pixels():
    image = Image.effect_noise((48, 32), 60).convert("RGB")
    with ScriptedServer(echo, models=("reasoner",)) as server:
        engine = OpenAIEngine(server.base_url, "reasoner", image_format="png")
        engine.generate([Prompt("q", [image])], GenParams(max_new_tokens=2))
        engine.close()
    url = server.requests[0]["messages"][1]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).tobytes() == image.tobytes()
    with pytest.raises(ValueError, match="jpeg or png"):
        OpenAIEngine("http://127.0.0.1:9", "reasoner", image_format="webp")


def test_engine_raises_on_outage_instead_of_empty_answers():
    engine = OpenAIEngine(f"http://127.0.0.1:{free_port()}", "reasoner", retries=1, backoff_s=0.01)
    with pytest.raises(ServiceUnavailable, match="reasoner"):
        engine.generate([Prompt("q1"), Prompt("q2")], GenParams(max_new_tokens=4))


@pytest.mark.parametrize("status", [401, 404])
def test_engine_raises_on_setup_errors(status):
    with ScriptedServer(lambda body: status) as server:
        engine = OpenAIEngine(server.base_url, "reasoner")
        with pytest.raises(RequestRejected, match=f"HTTP {status}") as info:
            engine.generate([Prompt("q1"), Prompt("q2")], GenParams(max_new_tokens=4))
        engine.close()
    assert info.value.status == status
