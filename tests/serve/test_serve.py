"""p2r-serve: the real console script with the tiny model, over real HTTP, from our engine and the openai package."""

from __future__ import annotations

import base64

import httpx
import pytest
from PIL import Image
from servers import start_p2r_serve

from p2r_recipe.client import RequestRejected, image_part
from p2r_recipe.engines.base import GenParams
from p2r_recipe.engines.openai import OpenAIEngine
from p2r_recipe.images import encode_image
from p2r_recipe.pipeline import Pipeline
from p2r_recipe.prompts import SYSTEM_PROMPT, Prompt
from p2r_recipe.records import Sample
from p2r_recipe.serving.protocol import APIError, to_params, to_prompt

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_model_dir) -> str:
    with start_p2r_serve(tiny_model_dir, api_key=KEY, extra_args=("--max-body-mb", "1", "--max-batch", "8")) as (url, _):
        yield url


def chat_body(content, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def test_health_is_open_and_models_need_the_key(server):
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    assert httpx.get(f"{server}/v1/models").status_code == 401
    models = httpx.get(f"{server}/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]


def test_engine_chat_with_images(server):
    engine = OpenAIEngine(server, "tiny", api_key=KEY)
    small, large = (Prompt("what color?", [Image.new("RGB", (s, s), "red")]) for s in (256, 512))
    gens = engine.generate([small, large], GenParams(max_new_tokens=6, min_new_tokens=6))
    engine.close()
    assert [g.error for g in gens] == [None, None]
    assert [g.output_tokens for g in gens] == [6, 6] and all(isinstance(g.text, str) for g in gens)
    # 256 px -> 8x8 merged patches, 512 px -> 16x16: the images reached the model. (Below the
    # processor's 65,536-pixel floor, e.g. 128 px, an image is enlarged to 256 px, as vLLM does.)
    assert gens[1].input_tokens - gens[0].input_tokens == 256 - 64


def test_chat_without_key_is_401(server):
    response = httpx.post(f"{server}/v1/chat/completions", json=chat_body("hi"))
    assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
    engine = OpenAIEngine(server, "tiny", api_key="wrong")
    with pytest.raises(RequestRejected, match="HTTP 401"):  # a setup error stops the run
        engine.generate([Prompt("hi")], GenParams(max_new_tokens=2))
    engine.close()


def test_huge_body_is_413(server):
    huge = chat_body([{"type": "text", "text": "x" * (2 * 2**20)}])
    response = httpx.post(f"{server}/v1/chat/completions", json=huge, headers=AUTH, timeout=30)
    assert response.status_code == 413


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n not really").decode(), "unreadable image"),
        ("data:image/png;base64,***", "bad data URL"),
        ("/etc/passwd", "must be a data: URL"),
        ("http://example.com/cat.jpg", "must be a data: URL"),
    ],
)
def test_bad_images_are_400_with_the_reason(server, url, reason):
    body = chat_body([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}])
    response = httpx.post(f"{server}/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 400 and reason in response.json()["error"]["message"]


def test_bad_requests_are_refused_clearly(server):
    post = lambda body: httpx.post(f"{server}/v1/chat/completions", json=body, headers=AUTH)
    assert post({**chat_body("hi"), "model": "reasoner"}).status_code == 404
    assert post(chat_body("hi", stream=True)).status_code == 400
    assert post(chat_body("hi", max_tokens=0)).status_code == 400
    response = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers=AUTH)
    assert response.status_code == 400 and "not JSON" in response.json()["error"]["message"]
    multi_turn = {
        "model": "tiny", "max_tokens": 2,
        "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    }  # fmt: skip
    assert post(multi_turn).status_code == 200


def test_32_concurrent_requests_are_micro_batched(server):
    before = httpx.get(f"{server}/health").json()
    engine = OpenAIEngine(server, "tiny", api_key=KEY, concurrency=32)
    prompts = [Prompt(f"question {i}", [Image.new("RGB", (64, 64), (i * 8, 0, 0))]) for i in range(32)]
    gens = engine.generate(prompts, GenParams(max_new_tokens=4, min_new_tokens=4))
    engine.close()
    assert [g.error for g in gens] == [None] * 32 and all(g.output_tokens == 4 for g in gens)
    after = httpx.get(f"{server}/health").json()
    assert after["requests"] - before["requests"] == 32
    assert after["largest_batch"] > 1 and after["batches"] - before["batches"] < 32


def test_p2r_pipeline_over_the_server(server):
    engine = OpenAIEngine(server, "tiny", api_key=KEY)
    samples = [Sample(f"s{i}", "What is shown?\nA. cat\nB. dog", [Image.new("RGB", (96, 64), "green")]) for i in range(3)]
    records = Pipeline(engine, "p2r", GenParams(max_new_tokens=8)).run(samples)
    engine.close()
    assert [r.error for r in records] == [None] * 3
    assert all(len(r.prompts) == 2 and r.perceiver_output is not None and r.input_tokens > 0 for r in records)


def test_the_openai_package_talks_to_p2r_serve(server):
    import openai  # a dev dependency; imported here so only this test needs it

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    image = {
        "type": "image_url",
        "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(encode_image(Image.new("RGB", (96, 64)), "PNG")).decode()
        },
    }
    reply = client.chat.completions.create(
        model="tiny",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [image, {"type": "text", "text": "hi"}]},
        ],
        max_tokens=3,
        extra_body={"min_tokens": 3},
    )
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    assert isinstance(reply.choices[0].message.content, str)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()


def test_request_mapping_to_prompt_and_params():
    red = image_part(Image.new("RGB", (40, 40), "red"))
    prompt = to_prompt([
        {"role": "user", "content": "old turn"},
        {"role": "assistant", "content": "ignored"},
        {"role": "user", "content": [red, {"type": "text", "text": "a"}, red, {"type": "text", "text": "b"}]},
    ])  # fmt: skip
    assert (prompt.system, prompt.text, len(prompt.images)) == (SYSTEM_PROMPT, "a\nb", 2)
    assert prompt.images[0].size == (40, 40)
    assert (
        to_prompt([{"role": "system", "content": [{"type": "text", "text": "S"}]}, {"role": "user", "content": "q"}]).system
        == "S"
    )
    assert to_params({"max_tokens": 5, "min_tokens": 2, "temperature": 0.7, "seed": 3}) == GenParams(5, 0.7, 2, 3)
    assert to_params({"max_completion_tokens": 9}) == GenParams(9)
    for bad in ([], [{"role": "system", "content": "only system"}], [{"role": "user", "content": 3}], "text"):
        with pytest.raises(APIError):
            to_prompt(bad)
    for bad in ({"n": 2}, {"temperature": -1}, {"max_tokens": "many"}, {"seed": 1.5}, {"min_tokens": 10**9}, {"max_tokens": 10**6}):
        with pytest.raises(APIError):
            to_params(bad)
    assert to_params({}) == GenParams(max_new_tokens=1024, temperature=0.0)  # greedy unless asked
