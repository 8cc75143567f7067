#!/usr/bin/env bash
# GPU check for dalign: sample -> score -> 5 LoRA SFT steps on a random Qwen2.5-1.5B-shaped model (CUDA, bf16),
# plus CPU-vs-GPU score agreement on a tiny model. Needs only torch, transformers, peft and this repo; downloads
# nothing. Under 5 minutes on one GPU; the last line is one JSON object.
#   benchmarks/gpu_check.sh                 # on a CUDA machine
#   benchmarks/gpu_check.sh --device cpu    # smoke run of the same code path, small shape, on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout 300 "$PY" benchmarks/gpu_check.py "$@"
