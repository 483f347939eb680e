#!/bin/bash
# The speed issue's (27) goal series at pico-tiny-body, one bench after another, into bench/results/*_SUFFIX.txt.
# Run it with nothing else on the machine (about 13 minutes on 2 cores):
#   mkdir -p /tmp/rankscope-ff51925 && git archive ff51925 src | tar -x -C /tmp/rankscope-ff51925
#   bash bench/pico_body_series.sh SUFFIX /tmp/rankscope-ff51925/src
set -u
S=${1:?a suffix for the result files}
OLD=${2:?the src folder of the checkout to compare against (ff51925)}
cd "$(dirname "$0")/.."
R=bench/results
hdr() { date; lscpu | grep 'Model name'; .venv/bin/python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; echo "git $(git rev-parse --short HEAD)"; uptime; }
export OMP_NUM_THREADS=1
{ hdr; .venv/bin/python bench/attention_paths.py; uptime; } > $R/attention_paths_pico_tiny_body_$S.txt 2>&1
{ hdr; .venv/bin/python bench/lora_paths.py --presets pico-tiny-body --tokens 2048 --dropout 0.1 --threads 1; uptime; } > $R/lora_paths_pico_tiny_body_$S.txt 2>&1
{ hdr; BENCH_THREADS=1 .venv/bin/python bench/throughput.py --presets pico-tiny-body --rounds 2; uptime; date; } > $R/throughput_pico_tiny_body_$S.txt 2>&1
{ hdr; .venv/bin/python bench/speedup.py --old-src "$OLD" --rounds 4 --steps 3; uptime; date; } > $R/speedup_vs_ff51925_$S.txt 2>&1
{ hdr; .venv/bin/python bench/speedup.py --old-src "$OLD" --rounds 2 --steps 3 --compile; uptime; date; } > $R/speedup_vs_ff51925_${S}_compiled.txt 2>&1
for cfg in "fp32 0.1" "bf16 0.1" "fp32 0" "bf16 0"; do set -- $cfg
  echo "######## relora_vs_full $1_d$2"; hdr
  .venv/bin/python bench/relora_vs_full.py --presets pico-tiny-body --batch 16 --seq 128 --threads 1 --precision $1 --dropout $2 --steps 12
  uptime; date
done > $R/relora_vs_full_pico_tiny_body_$S.txt 2>&1
{ hdr; .venv/bin/python bench/relora_floor.py --presets pico-tiny-body --precision fp32 bf16 --threads 1; uptime; date; } > $R/relora_floor_pico_tiny_body_$S.txt 2>&1
{ hdr; for m in full relora; do for p in fp32 bf16; do .venv/bin/python bench/profile_step.py --method $m --precision $p --top 25 2>&1 | grep -v USDT; done; done; uptime; date; } > $R/profile_${S}_pico_tiny_body.txt 2>&1
