"""launch/install_train.sh (its order, from one set of pins) and launch/check_train_stack.py, run in this venv."""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import runpy
import subprocess
import sys
import tomllib

from paths import LAUNCH, ROOT

CHECK = LAUNCH / "check_train_stack.py"
INSTALL = LAUNCH / "install_train.sh"
PINS = runpy.run_path(str(CHECK))["PINS"]


def check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, CHECK, *args], capture_output=True, text=True, timeout=300, check=False)


def test_check_names_every_mismatch_of_this_dev_venv():
    # The dev venv runs newer torch/transformers and has neither vLLM nor flash-attn: the check must say so.
    out = check()
    assert out.returncode == 1
    problems = out.stderr.split("TRAINING STACK MISMATCH", 1)[1]
    for name in PINS:
        have = metadata.version(name) if name != "vllm" and name != "flash-attn" else None
        if have is None:
            assert f"{name}: not installed (want {PINS[name]})" in problems
        elif have.split("+")[0] != PINS[name]:
            assert f"{name}: {have} installed, want {PINS[name]}" in problems
            assert re.search(rf"^{re.escape(name)}\s+{re.escape(have)}\s+want {PINS[name]}  <-- MISMATCH$", out.stdout, re.M)
        else:
            assert f"{name}:" not in problems
    assert "torch: " in problems and "transformers: " in problems  # at least these differ here
    assert "openrlhf:" not in problems  # 0.11.2 is what this venv has


def test_check_passes_when_expectations_match_this_venv():
    present = [name for name in PINS if name not in ("vllm", "flash-attn")]
    pins = [f"--pin={name}=={metadata.version(name).split('+')[0]}" for name in present]
    out = check(*pins, "--without", "vllm", "--without", "flash-attn")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.rstrip().endswith("training stack OK") and "MISMATCH" not in out.stdout
    assert re.search(r"^torch\s+\S+\s+want", out.stdout, re.M) and re.search(r"^cuda\s", out.stdout, re.M)
    assert check("--pin", "torch").returncode == 2 and check("--without", "nope").returncode == 2


def test_pyproject_train_extra_pins_what_the_check_expects():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    pinned = dict(re.fullmatch(r"([\w-]+)(?:\[\w+\])?==([\w.]+)", req).groups() for req in extra if "==" in req)
    assert all(PINS[name] == version for name, version in pinned.items() if name in PINS), pinned
    assert {"torch", "vllm", "flash-attn", "openrlhf", "transformers"} <= set(pinned)
    assert check("--constraints").stdout.split() == [f"{n}=={v}" for n, v in PINS.items()]


def steps(**env: str) -> list[str]:
    out = subprocess.run(
        ["bash", INSTALL, "--dry-run", "/tmp/p2r train venv"], capture_output=True, text=True, timeout=60,
        check=True, env={**os.environ, **env},
    )  # fmt: skip
    return [line.split("] ", 1)[1] for line in out.stdout.splitlines()]


def test_install_order_torch_vllm_flash_attn_openrlhf_package_check():
    lines = steps()
    order = ["-m venv", "torch==2.13.0 torchvision==0.28.0", "vllm==0.29.0",
             "--no-build-isolation flash-attn==2.8.3", r"openrlhf.*vllm.*==0.11.2", r"-e .*train", "check_train_stack.py"]  # fmt: skip
    found = [next(i for i, line in enumerate(lines) if re.search(pattern, line)) for pattern in order]
    assert found == sorted(found), lines
    pip = [line for line in lines if " -m pip install " in line]
    constraints = {line.split(" -c ", 1)[1].split()[0] for line in pip}
    assert len(pip) == 6 and len(constraints) == 1  # every pip step under the same pins
    assert all(line.startswith(r"/tmp/p2r\ train\ venv/bin/python") for line in lines[1:])  # quoted paths
    with_wheel = steps(FLASH_ATTN_WHEEL="/wheels/flash_attn-2.8.3-cp311-linux_x86_64.whl")
    assert not any("--no-build-isolation" in line for line in with_wheel)
    assert any(line.endswith("/wheels/flash_attn-2.8.3-cp311-linux_x86_64.whl") for line in with_wheel)
