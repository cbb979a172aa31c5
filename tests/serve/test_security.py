"""Security: loopback-only by default, the bearer key on p2r-serve and in every client, size limits
answered with 4xx (and the server still up), and image paths that never leave the image root."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
from pathlib import Path

import httpx
import p2r10k
import pytest
import reliability
import rollouts
from PIL import Image
from servers import ScriptedServer, _serve_command, start_p2r_serve

from p2r_recipe.client import image_part
from p2r_recipe.engines.base import GenParams
from p2r_recipe.images import encode_image
from p2r_recipe.prompts import Prompt
from p2r_recipe.train import data, precompute
from p2r_recipe.train.reward import reward_func
from p2r_recipe.train.services import SERVICES, ServiceConfig

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY_MB = 1


@pytest.fixture(scope="module")
def serve(tiny_model_dir):
    """p2r-serve started as users start it: no --host, a key, a 1 MB body limit."""
    with start_p2r_serve(tiny_model_dir, api_key=KEY, extra_args=("--max-body-mb", str(MAX_BODY_MB))) as server:
        yield server


def chat_url(serve) -> str:
    return f"{serve.base_url}/v1/chat/completions"


def chat_body(content, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def image_url(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def _other_address() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET: nothing is sent, the kernel only picks a route
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_p2r_serve_listens_on_loopback_only_by_default(serve):
    port = int(serve.base_url.rsplit(":", 1)[1])
    assert reliability.listening_addresses(serve.process.pid) == {f"127.0.0.1:{port}"}
    other = _other_address()
    if other is not None:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{other}:{port}/health", timeout=2)


def test_p2r_serve_warns_when_told_to_listen_everywhere_without_a_key(tmp_path):
    env = {**os.environ, "P2R_SERVE_API_KEY": ""}
    result = subprocess.run(
        [*_serve_command(), "--model", str(tmp_path / "no-model"), "--host", "0.0.0.0"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode != 0  # no model there: it stops after the warning
    assert "listening on 0.0.0.0 with no API key" in result.stderr


def test_launchers_and_clients_default_to_loopback():
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_HOST", "_PORT", "_MODEL", "_API_KEY"))}
    for role in SERVICES:
        assert ServiceConfig.from_env(role, {}).host == "127.0.0.1"
        for extra in ([], ["--dev"]):
            script = reliability.ROOT / "launch" / f"start_{role}_server.sh"
            out = subprocess.run([str(script), "--dry-run", *extra, "m"], env=env, capture_output=True, text=True, check=False)
            assert out.returncode == 0 and " --host 127.0.0.1 " in out.stdout.splitlines()[0], out.stdout + out.stderr


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
     {"Authorization": f"Bearer {KEY}x"}, {"Authorization": f"Bearer {KEY[:-1]}"}, {"X-API-Key": KEY}],
)  # fmt: skip
def test_every_endpoint_but_health_needs_the_exact_key(serve, headers):
    assert httpx.get(f"{serve.base_url}/v1/models", headers=headers).status_code == 401
    assert httpx.post(chat_url(serve), json=chat_body("hi"), headers=headers).status_code == 401
    assert httpx.get(f"{serve.base_url}/v1/models?api_key={KEY}").status_code == 401
    assert httpx.get(f"{serve.base_url}/health").status_code == 200


def _chunks(size: int):
    yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
    for _ in range(size // 65536):
        yield b"x" * 65536
    yield b'"}]}'


WIDE = encode_image(Image.new("RGB", (20000, 10), "red"), "PNG")
BOMB = (reliability.BAD_IMAGES / "bomb.png").read_bytes()
SMALL = encode_image(Image.new("RGB", (32, 32), "red"), "PNG")
DEEP = b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@pytest.mark.parametrize(
    ("request_kwargs", "status", "reason"),
    [
        ({"json": chat_body("x" * (2 * MAX_BODY_MB << 20))}, 413, "request body over"),
        ({"content": _chunks(2 * MAX_BODY_MB << 20)}, 413, "request body over"),  # chunked: no Content-Length
        ({"json": chat_body([image_url(BOMB), {"type": "text", "text": "?"}])}, 400, "image too large"),
        ({"json": chat_body([image_url(WIDE), {"type": "text", "text": "?"}])}, 400, "aspect ratio"),
        ({"json": chat_body([image_url(SMALL)] * 17 + [{"type": "text", "text": "?"}])}, 400, "more than 16 images"),
        ({"json": chat_body([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}])}, 400, "data: URL"),
        ({"content": DEEP}, 400, "not JSON"),
    ],
    ids=["body-over-limit", "chunked-body", "decompression-bomb", "aspect-ratio", "17-images", "file-url", "deep-json"],
)
def test_limits_are_4xx_and_the_server_stays_up(serve, request_kwargs, status, reason):
    headers = {**AUTH, **({"Content-Type": "application/json"} if "content" in request_kwargs else {})}
    response = httpx.post(chat_url(serve), headers=headers, timeout=60, **request_kwargs)
    assert response.status_code == status and reason in response.json()["error"]["message"]
    fine = chat_body([image_part(Image.new("RGB", (64, 64))), {"type": "text", "text": "hi"}])
    ok = httpx.post(chat_url(serve), json=fine, headers=AUTH, timeout=60)
    assert ok.status_code == 200 and serve.process.poll() is None


# --- every client sends the key ------------------------------------------------------------------


def echo(body: dict) -> str:
    return "<answer>A</answer>" if "Ground truth" not in rollouts.user_text(body) else "Yes"


def test_reward_clients_send_their_service_keys(tmp_path, monkeypatch):
    with ScriptedServer(echo) as reasoner, ScriptedServer(echo) as verifier:
        rollouts.configure(monkeypatch, "perceiver", reasoner=reasoner, REASONER_API_KEY="r-key")
        sample = rollouts.sample(tmp_path, form="mca")
        prompt = rollouts.chat_prompt(sample)
        reward_func([rollouts.query(prompt, rollouts.BOX)], [prompt], [sample.to_label()])
        rollouts.configure(monkeypatch, "reasoner", verifier=verifier, VERIFIER_API_KEY="v-key")
        sample = rollouts.sample(tmp_path, form="free_form")
        reward_func([rollouts.query(prompt, "<answer>x</answer>")], [prompt], [sample.to_label()])
    assert [h["authorization"] for h in reasoner.headers] == ["Bearer r-key"]
    assert [h["authorization"] for h in verifier.headers] == ["Bearer v-key"]


def test_precompute_and_lmms_clients_send_their_keys(tmp_path):
    from p2r_recipe.lmms.model import P2R  # imports lmms-eval

    source = p2r10k.write_parquet(tmp_path / "t.parquet", p2r10k.embedded_rows(2))
    items = data.convert(str(source), tmp_path / "d").samples
    with ScriptedServer(lambda body: "[]") as server:
        env = {"PERCEIVER_PORT": str(server.port), "PERCEIVER_MODEL": "scripted", "PERCEIVER_API_KEY": "p-key"}
        config = ServiceConfig.from_env("perceiver", env)
        precompute.run(items, tmp_path / "out", config)
        model = P2R(backend="openai", base_url=server.base_url, served_model="scripted", api_key="e-key")
        model.engine.generate([Prompt("q")], GenParams(max_new_tokens=2))
        model.engine.close()
    assert [h["authorization"] for h in server.headers] == ["Bearer p-key"] * 2 + ["Bearer e-key"]


# --- image paths from labels stay inside the image root ------------------------------------------


def test_no_image_path_escapes_the_image_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "secret.png"
    p2r10k.picture(1).save(outside)  # a valid image: only the path rule keeps it out
    (root / "imgs").mkdir(parents=True)
    p2r10k.picture(0).save(root / "imgs" / "ok.png")
    (root / "imgs" / "link.png").symlink_to(outside)
    (root / "imgs" / "dir_link").symlink_to(tmp_path, target_is_directory=True)
    refs = {
        "ok": ("imgs/ok.png", None),
        "parent": ("../secret.png", "image_outside_root"),
        "absolute": (str(outside), "image_outside_root"),
        "nested_parent": ("imgs/../../secret.png", "image_outside_root"),
        "symlink": ("imgs/link.png", "image_outside_root"),
        "symlinked_dir": ("imgs/dir_link/secret.png", "image_outside_root"),
        "struct_path": ({"bytes": None, "path": "../secret.png"}, "image_outside_root"),
        "just_dotdot": ("..", "image_outside_root"),
        "file_url": (f"file://{outside}", "missing_image"),
        "backslashes": ("..\\secret.png", "missing_image"),
        "home": ("~/secret.png", "missing_image"),
        "nul_byte": ("imgs/ok.png\x00../../secret.png", "missing_image"),
        "name_too_long": ("x" * 5000 + ".png", "missing_image"),
    }
    rows = [p2r10k.row(i, "mca", ref) | {"id": name} for i, (name, (ref, _)) in enumerate(refs.items())]
    for row in rows:
        row["extra_info"].pop("index")
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = data.convert(str(source), tmp_path / "out", image_root=root)
    assert [s.id for s in result.samples] == ["ok"] and Path(result.samples[0].image) == root / "imgs" / "ok.png"
    assert {r["id"]: r["reason"] for r in result.rejected} == {n: code for n, (_, code) in refs.items() if code}
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(written) == 1  # only ok.png's fitted copy: nothing from outside was decoded or copied
