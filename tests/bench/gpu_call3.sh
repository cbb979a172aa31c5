#!/bin/bash
# Device call 3 (issues 14, 16): 64 p2r samples at batch 8 on one GPU (cold machine), a 15-sample run that ends
# with a batch of 7 (does a partial batch recompile?), then the 64 samples split over both GPUs (cache warm).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
B=tests/bench
python3 -c "import sys; sys.path.insert(0, '$B'); from bench_eval import build_4b; from pathlib import Path; build_4b(Path('/tmp/m4b'))" 2>&1 | tail -1
RUN="python3 $B/bench_run.py --model /tmp/m4b --device cuda --variant fast --batch-sizes 8"
CUDA_VISIBLE_DEVICES=0 timeout 230 $RUN --samples 64 --out $OUT/run_b8_1gpu.json > $OUT/one.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 TORCH_LOGS=recompiles timeout 230 $RUN --samples 15 --out $OUT/run_b8_partial.json > $OUT/partial.log 2>&1 &
wait
CUDA_VISIBLE_DEVICES=0 timeout 130 $RUN --samples 64 --shard 0 2 --out $OUT/run_b8_shard0.json > $OUT/s0.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 130 $RUN --samples 64 --shard 1 2 --out $OUT/run_b8_shard1.json > $OUT/s1.log 2>&1 &
wait
for f in $OUT/*.log; do echo "== $f"; grep "^{'batch'\|recompil\|triggered\|- 0/" $f | cut -c1-300; done
