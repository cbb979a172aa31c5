#!/usr/bin/env python3
"""Print the training stack's versions and fail loudly when one differs from OpenRLHF 0.11.2's pins.

    python launch/check_train_stack.py                      # after launch/install_train.sh: exit 0 or 1
    python launch/check_train_stack.py --constraints        # the pins as a pip constraints file
    python launch/check_train_stack.py --without flash-attn --pin torch==2.14.1   # another stack, on purpose

Standard library only, so it runs before anything is installed (install_train.sh takes its
constraints from here: the pins live in this one place). Versions are read from the installed
distributions; torch, flash-attn and vLLM are also imported, since a wheel built against
another torch installs fine and fails only at import.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import platform
import sys

# OpenRLHF 0.11.2 pins transformers, deepspeed, ray and flash-attn; its `vllm` extra pins vllm 0.29.0,
# which pins torch 2.13.0 and torchvision 0.28.0.
PINS = {
    "torch": "2.13.0",
    "torchvision": "0.28.0",
    "vllm": "0.29.0",
    "flash-attn": "2.8.3",
    "transformers": "5.15.0",
    "deepspeed": "0.19.6",
    "ray": "2.55.0",
    "openrlhf": "0.11.2",
}
# Installed at any version: the package itself.
PRESENT = ("p2r-recipe",)
# Imported to catch a binary built against another torch or CUDA.
IMPORTS = {"torch": "torch", "flash-attn": "flash_attn", "vllm": "vllm"}


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def public(version: str) -> str:
    """`2.13.0+cu128` -> `2.13.0`: the local build label does not change the release."""
    return version.split("+", 1)[0]


def check(pins: dict[str, str]) -> tuple[list[str], list[str]]:
    """(lines to print, problems): each pinned distribution's version, then whether the compiled ones import."""
    lines = [f"{'python':<14} {platform.python_version()}"]
    problems = []
    for name, want in pins.items():
        have = installed(name)
        if have is None:
            problems.append(f"{name}: not installed (want {want})")
        elif public(have) != want:
            problems.append(f"{name}: {have} installed, want {want}")
        lines.append(f"{name:<14} {have or '-':<16} want {want}{'' if have and public(have) == want else '  <-- MISMATCH'}")
    for name in PRESENT:
        have = installed(name)
        lines.append(f"{name:<14} {have or '-'}")
        if have is None:
            problems.append(f"{name}: not installed (pip install -e '.[train]')")
    for name, module in IMPORTS.items():
        if name not in pins or installed(name) is None:
            continue
        try:
            imported = importlib.import_module(module)
        except Exception as exc:  # an ABI mismatch shows as ImportError, OSError or RuntimeError
            problems.append(f"{name}: installed but `import {module}` fails: {type(exc).__name__}: {exc}")
            continue
        if module == "torch":
            gpus = imported.cuda.device_count() if imported.cuda.is_available() else 0
            lines.append(f"{'cuda':<14} {imported.version.cuda or 'none (CPU build)'}, {gpus} GPU(s) visible")
    return lines, problems


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("--constraints", action="store_true", help="print the pins as a pip constraints file and exit")
    cli.add_argument("--pin", action="append", default=[], metavar="NAME==VERSION", help="expect another version")
    cli.add_argument("--without", action="append", default=[], metavar="NAME", help="do not require NAME")
    args = cli.parse_args(argv)
    pins = dict(PINS)
    for text in args.pin:
        name, sep, version = text.partition("==")
        if not sep or not name or not version:
            cli.error(f"--pin {text!r}: expected NAME==VERSION")
        pins[name] = version
    for name in args.without:
        if pins.pop(name, None) is None:
            cli.error(f"--without {name}: not one of {', '.join(pins)}")
    if args.constraints:
        print("\n".join(f"{name}=={version}" for name, version in pins.items()))
        return 0
    lines, problems = check(pins)
    print("\n".join(lines))
    if problems:
        print(f"\nTRAINING STACK MISMATCH ({len(problems)}):\n  - " + "\n  - ".join(problems), file=sys.stderr)
        print("fix with launch/install_train.sh (see the README's Train section)", file=sys.stderr)
        return 1
    print("\ntraining stack OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
