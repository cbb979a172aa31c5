#!/bin/bash
# Device call 2 (issues 14, 16): whole 191-sample p2r runs of the fast engine, first on a cold machine
# (batch 8 on GPU 0, batch 32 on GPU 1), then the batch-8 run split over both GPUs with the compile cache warm.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
B=tests/bench
python3 -c "import sys; sys.path.insert(0, '$B'); from bench_eval import build_4b; from pathlib import Path; build_4b(Path('/tmp/m4b'))" 2>&1 | tail -1
RUN="python3 $B/bench_run.py --model /tmp/m4b --device cuda --variant fast --samples 191"
CUDA_VISIBLE_DEVICES=0 timeout 330 $RUN --batch-sizes 8 --out $OUT/run_fast_b8.json > $OUT/cold.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 330 $RUN --batch-sizes 32 --out $OUT/run_fast_b32.json > $OUT/cold32.log 2>&1 &
wait
CUDA_VISIBLE_DEVICES=0 timeout 200 $RUN --batch-sizes 8 --shard 0 2 --out $OUT/run_fast_b8_shard0.json > $OUT/shard.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 200 $RUN --batch-sizes 8 --shard 1 2 --out $OUT/run_fast_b8_shard1.json > $OUT/shard1.log 2>&1 &
wait
for f in $OUT/*.log; do echo "== $f"; grep "^{'batch'" $f; done
python3 - <<'PY'
import json, os, glob
for f in sorted(glob.glob(os.environ["OUT"] + "/run_*.json")):
    r = json.load(open(f)); print(f, r["load_s"], r.get("inductor_counters"), (r.get("compile_times") or "")[:600])
PY
