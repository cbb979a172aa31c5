#!/bin/bash
# Device call 5 (issue 25), one GPU: bench_eval per variant (thinking and p2r at batch 1, 8 and 32, decode speed
# at batch 1 to 64) with the CUDA-graph decoding step, then merged into eval_gpu.json.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
B=tests/bench
python3 -c "import sys; sys.path.insert(0, '$B'); from bench_eval import build_4b; from pathlib import Path; build_4b(Path('/tmp/m4b'))" 2>&1 | tail -2
EVAL="python3 $B/bench_eval.py --model /tmp/m4b --device cuda --modes thinking p2r --batch-sizes 1 8 32 --decode-batch-sizes 1 8 32 64 --decode-steps 32"
keep() { grep -v "it/s\]\|prompt/s\]" | cut -c1-400 | tail -12; }
timeout 200 $EVAL --variants fast --out $OUT/eval_fast.json 2>&1 | keep
timeout 290 $EVAL --variants straightforward --out $OUT/eval_plain.json 2>&1 | keep
python3 $B/bench_eval.py --merge $OUT/eval_fast.json $OUT/eval_plain.json --out $OUT/eval_gpu.json > /dev/null && echo merged
