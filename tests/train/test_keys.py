"""Keys never reach results or logs: the lmms model's key through the real lmms-eval CLI."""

from __future__ import annotations

import lmms_cli
import pytest
import reliability
from servers import ScriptedServer

SECRET = "sk-p2r-7f3a9c-do-not-log"
# Small images and token budgets keep a CPU run short.
FAST = "max_pixels=65536,max_new_tokens=8,mode=p2r"


def _run(tmp_path, model_args: str) -> tuple[str, str]:
    """lmms-eval on the demo task against `model_args`; its stdout+stderr and every file it wrote, as text."""
    out = tmp_path / "out"
    log = lmms_cli.run(
        "--model", "p2r", "--model_args", model_args, "--tasks", "p2r_demo_vstar", "--limit", "1",
        "--output_path", str(out), "--log_samples", "--verbosity", "DEBUG", cwd=tmp_path,
    )  # fmt: skip
    written = "".join(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())
    return log, written  # lmms_cli.run has checked that the run wrote its results


@pytest.mark.slow
def test_a_key_in_model_args_reaches_the_service_but_not_results_or_logs(tmp_path, monkeypatch):
    monkeypatch.delenv("P2R_API_KEY", raising=False)
    with ScriptedServer(reliability.p2r_reply) as server:
        log, written = _run(tmp_path, f"backend=openai,base_url={server.base_url},served_model=scripted,api_key={SECRET},{FAST}")
    assert server.headers and {h["authorization"] for h in server.headers} == {f"Bearer {SECRET}"}
    assert "served_model=scripted" in log  # lmms-eval does print the model args ...
    assert SECRET not in log and SECRET not in written  # ... without the key


@pytest.mark.slow
def test_the_lmms_model_reads_its_key_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("P2R_API_KEY", SECRET)
    with ScriptedServer(reliability.p2r_reply) as server:
        log, written = _run(tmp_path, f"backend=openai,base_url={server.base_url},served_model=scripted,{FAST}")
    assert server.headers and {h["authorization"] for h in server.headers} == {f"Bearer {SECRET}"}
    assert SECRET not in log and SECRET not in written
