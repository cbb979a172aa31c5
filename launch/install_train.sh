#!/usr/bin/env bash
# Install the PRA-GRPO training stack on a CUDA GPU machine, in the order that works with OpenRLHF 0.11.2's pins,
# then check it. Run from the repository root.
#
# usage: launch/install_train.sh [--dry-run] [VENV_DIR]
#
#   VENV_DIR   create (if missing) and install into this venv; default: the active python (`python3`)
#   --dry-run  print the steps, install nothing
#
# Environment:
#   PYTHON            interpreter for a new venv (default python3; Python 3.10-3.12)
#   FLASH_ATTN_WHEEL  a flash-attn 2.8.3 wheel (path or URL) built for torch 2.13 and your CUDA/Python, instead
#                     of building it from source (the build needs nvcc and takes 10-60 minutes; MAX_JOBS caps it)
#
# Order and why:
#   1. torch 2.13.0 + torchvision 0.28.0   the versions vllm 0.29.0 pins (OpenRLHF's `vllm` extra pins vllm 0.29.0)
#   2. vllm 0.29.0
#   3. flash-attn 2.8.3                     without build isolation: its build imports the torch installed in step 1
#   4. openrlhf[vllm] 0.11.2                 transformers 5.15.0, deepspeed 0.19.6, ray[default] 2.55.0
#   5. this package with its `train` extra
#   6. launch/check_train_stack.py           prints the versions and fails on any mismatch
# Every step runs under one constraints file (the pins of launch/check_train_stack.py), so no later step can
# silently move torch, vLLM or transformers to another version.
set -euo pipefail

dry=0 venv=
while (($#)); do
  case $1 in
    --dry-run) dry=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "install_train: unknown option $1" >&2; exit 2 ;;
    *) venv=$1 ;;
  esac
  shift
done

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n $venv ]]; then
  python=$venv/bin/python
else
  python=$(command -v python3)
fi
constraints=$(mktemp "${TMPDIR:-/tmp}/p2r-train-constraints.XXXXXX")
trap 'rm -f "$constraints"' EXIT
"${PYTHON:-python3}" "$root/launch/check_train_stack.py" --constraints >"$constraints"
pin() { sed -n "s/^$1==//p" "$constraints"; }

pip=("$python" -m pip install -c "$constraints")
q() {  # one step as a shell-quoted line: printed, then run with eval
  local line
  line=$(printf '%q ' "$@")
  echo "${line% }"
}
steps=()
[[ -n $venv && ! -x $python ]] && steps+=("$(q "${PYTHON:-python3}" -m venv "$venv")")
steps+=(
  "$(q "${pip[@]}" --upgrade pip setuptools wheel packaging ninja psutil)"
  "$(q "${pip[@]}" "torch==$(pin torch)" "torchvision==$(pin torchvision)")"
  "$(q "${pip[@]}" "vllm==$(pin vllm)")"
)
if [[ -n ${FLASH_ATTN_WHEEL:-} ]]; then
  steps+=("$(q "${pip[@]}" "$FLASH_ATTN_WHEEL")")
else
  steps+=("$(q "${pip[@]}" --no-build-isolation "flash-attn==$(pin flash-attn)")")
fi
steps+=(
  "$(q "${pip[@]}" "openrlhf[vllm]==$(pin openrlhf)")"
  "$(q "${pip[@]}" -e "$root[train]")"
  "$(q "$python" "$root/launch/check_train_stack.py")"
)

for i in "${!steps[@]}"; do
  echo "[$((i + 1))/${#steps[@]}] ${steps[i]}"
  if ((!dry)); then
    eval "${steps[i]}" || { echo "install_train: step $((i + 1)) failed: ${steps[i]}" >&2; exit 1; }
  fi
done
