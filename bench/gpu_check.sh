#!/usr/bin/env bash
# The GPU check of issue 27, one prepared script of at most 8 minutes on one CUDA device:
#   1. the GPU tests (pytest -m gpu: the fused and grouped fast paths equal the plain path on CUDA; bf16 attention kept),
#   2. bench/paper_steps.py, full-rank and ReLoRA (configs/paper: r 16, adapter dropout 0.1) at pico-tiny and pico-small,
#      compiled: tokens/s, MFU against the datasheet peak, peak memory, optimiser state.
# Numbers go to $OUT/gpu_check/ (the device tool's output folder) or else bench/results/gpu_check/; bench/README.md
# quotes bench/results/gpu_check/*.txt. Usage, from the repository root: bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
RES=${OUT:-bench/results}/gpu_check
mkdir -p "$RES"
export PYTHONPATH=$PWD/src
start=$(date +%s)
{
  date -u +"%Y-%m-%d %H:%M UTC"
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $PY -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
} > "$RES/env.txt" 2>&1
cat "$RES/env.txt"

# 1. GPU tests (75 s at most)
timeout 75 $PY -m pytest tests/integration/test_speed.py -m gpu -q -x -p no:cacheprovider > "$RES/gpu_tests.txt" 2>&1
echo "exit status $?" >> "$RES/gpu_tests.txt"
tail -3 "$RES/gpu_tests.txt"

# 2. paper configs, compiled, 30 steps of 16 x 2048 (no accumulation: the per-token speed of the paper's batch)
for size in tiny small; do
  limit=$([ "$size" = tiny ] && echo 170 || echo 215)
  timeout $limit $PY bench/paper_steps.py --configs full-pico-$size relora-pico-$size --steps 30 --batch 16 --accum 1 --compile \
    > "$RES/paper_steps_pico_$size.txt" 2>&1
  echo "exit status $?" >> "$RES/paper_steps_pico_$size.txt"
  grep -E '^\|' "$RES/paper_steps_pico_$size.txt" || tail -5 "$RES/paper_steps_pico_$size.txt"
done
echo "gpu_check took $(( $(date +%s) - start )) s" | tee -a "$RES/env.txt"
