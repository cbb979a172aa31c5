#!/bin/bash
# Device call 4 (issue 25), one GPU, most important first (a cut-off call still returns the earlier files): whole
# 191-sample p2r runs with the CUDA-graph decoding step, each fast run a cold process (no cache of any kind carries
# over), the straightforward ones extrapolated from 3 batches; the trained toy's tokens, fast vs straightforward.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
B=tests/bench
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
python3 -c "import sys; sys.path.insert(0, '$B'); from bench_eval import build_4b; from pathlib import Path; build_4b(Path('/tmp/m4b'))" 2>&1 | tail -2
RUN="python3 $B/bench_run.py --model /tmp/m4b --device cuda --samples 191"
keep() { grep -v "it/s\]\|prompt/s\]" | cut -c1-700 | tail -6; }
timeout 105 $RUN --variant fast --batch-sizes 32 --out $OUT/run_fast_b32.json 2>&1 | keep
timeout 100 $RUN --variant straightforward --batch-sizes 32 --max-batches 3 --out $OUT/run_plain_b32.json 2>&1 | keep
timeout 100 python3 $B/bench_run.py --same-tokens --device cuda --batch-sizes 8 --out $OUT/same_tokens.json 2>&1 | keep
timeout 165 $RUN --variant fast --batch-sizes 8 --out $OUT/run_fast_b8.json 2>&1 | keep
timeout 80 $RUN --variant straightforward --batch-sizes 8 --max-batches 3 --out $OUT/run_plain_b8.json 2>&1 | keep
