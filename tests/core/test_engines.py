"""make_engine picks the backend; the package stays light to import; vllm's absence is explained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from p2r_recipe.engines import BACKENDS, choose_backend, make_engine, resolve_backend


def test_importing_engines_pulls_in_no_heavy_package() -> None:
    code = (
        "import sys, p2r_recipe.engines; print(sorted({'torch', 'transformers', 'vllm', 'httpx'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unknown_backend_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="'tgi'.*hf, vllm, openai"):
        make_engine("tgi", pretrained="x")
    assert sorted(BACKENDS) == ["hf", "openai", "vllm"]


def test_vllm_missing_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail whether or not it is installed
    with pytest.raises(ImportError, match=r"needs vLLM.*pip install 'p2r-recipe\[vllm\]'"):
        make_engine("vllm", pretrained="p2r-tiny")


def test_make_engine_builds_hf_and_openai(tiny_model_dir: Path) -> None:
    import torch

    from p2r_recipe.engines.hf import HFEngine, resolve_dtype
    from p2r_recipe.engines.openai import OpenAIEngine

    hf = make_engine("hf", pretrained=str(tiny_model_dir), device="cpu", batch_size=2)
    assert isinstance(hf, HFEngine) and hf.name == "hf" and hf.batch_size == 2
    assert hf.model.device.type == "cpu" and hf.model.dtype == torch.float32
    assert resolve_dtype("auto", "cuda:1") == torch.bfloat16 and resolve_dtype("float16", "cpu") == torch.float16
    service = make_engine("openai", base_url="http://127.0.0.1:9/v1", model="p2r")
    assert isinstance(service, OpenAIEngine) and service.name == "openai"


def test_isolate_failures_halves_until_only_bad_prompts_fail() -> None:
    from p2r_recipe.engines.base import Generation
    from p2r_recipe.engines.local import isolate_failures
    from p2r_recipe.prompts import Prompt

    calls: list[int] = []

    def run(batch: list[Prompt]) -> list[Generation]:
        calls.append(len(batch))
        if any(p.text.startswith("bad") for p in batch):
            raise RuntimeError("cannot process " + ", ".join(p.text for p in batch if p.text.startswith("bad")))
        return [Generation(p.text.upper()) for p in batch]

    batch = [Prompt(f"bad {i}" if i in (5, 6) else f"ok {i}") for i in range(32)]
    gens = isolate_failures(run, batch)
    assert [g.error for g in gens if g.error] == [
        "RuntimeError: cannot process bad 5",
        "RuntimeError: cannot process bad 6",
    ]
    assert [g.text for g in gens] == ["" if i in (5, 6) else f"OK {i}" for i in range(32)]
    assert len(calls) <= 1 + 2 * 2 * 5  # about log2(32) halvings per bad prompt, not 32 single calls


def test_auto_backend_rule() -> None:
    assert choose_backend("auto", "http://127.0.0.1:8000/v1", True, True) == "openai"
    assert choose_backend("auto", None, True, True) == "vllm"
    assert choose_backend("auto", None, True, False) == "hf"
    assert choose_backend("auto", None, False, True) == "hf"
    assert choose_backend("hf", None, True, True) == "hf" and choose_backend("vllm", None, False, False) == "vllm"


def test_auto_backend_on_this_cpu_machine(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    assert not torch.cuda.is_available()  # CI has no GPU: whether vLLM is installed or not, auto is hf here
    assert resolve_backend("auto") == "hf"
    monkeypatch.setitem(sys.modules, "vllm", None)
    assert resolve_backend("auto") == "hf"
    assert make_engine("auto", pretrained=str(tiny_model_dir), device="cpu").name == "hf"
    assert make_engine("auto", base_url="http://127.0.0.1:9/v1", model="p2r").name == "openai"
