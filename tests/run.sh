#!/usr/bin/env bash
# Installs the dev environment into .venv and runs the test suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q -e ".[dev]"
# OpenRLHF pins flash-attn, which only builds with CUDA; on CPU its library code is all the tests need.
.venv/bin/pip install -q --no-deps "openrlhf==0.11.2"
.venv/bin/python -m pytest "$@"
