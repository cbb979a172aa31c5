#!/bin/bash
# Device call 1 (issue 14): bench_eval fast on GPU 0 and straightforward on GPU 1 at once, then short whole runs.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.device_count())"
nvidia-smi -L; nproc
B=tests/bench
python3 -c "import sys; sys.path.insert(0, '$B'); from bench_eval import build_4b; from pathlib import Path; build_4b(Path('/tmp/m4b'))" 2>&1 | tail -3
SIZES="--batch-sizes 1 8 32 --decode-batch-sizes 1 4 8 16 32 64 --modes thinking p2r"
(export CUDA_VISIBLE_DEVICES=0 TORCH_LOGS=recompiles
 timeout 420 python3 $B/bench_eval.py --model /tmp/m4b --device cuda --variants fast $SIZES --out $OUT/eval_fast.json
 timeout 150 python3 $B/bench_run.py --model /tmp/m4b --device cuda --variant fast --samples 64 --batch-sizes 8 --out $OUT/run_fast_warm.json
) > $OUT/fast.log 2>&1 &
(export CUDA_VISIBLE_DEVICES=1
 timeout 400 python3 $B/bench_eval.py --model /tmp/m4b --device cuda --variants straightforward $SIZES --out $OUT/eval_plain.json
 timeout 170 python3 $B/bench_run.py --model /tmp/m4b --device cuda --variant straightforward --samples 191 --batch-sizes 8 32 --max-batches 2 --out $OUT/run_plain.json
) > $OUT/plain.log 2>&1 &
wait
grep -v "Loading\|it/s\]" $OUT/fast.log | cut -c1-400 | tail -40
grep -v "Loading\|it/s\]" $OUT/plain.log | cut -c1-300 | tail -25
