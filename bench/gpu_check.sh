#!/usr/bin/env bash
# One prepared check for a machine with one GPU (an H200 here): Python 3.12, PyTorch preinstalled,
# no internet. Missing wheels come from .whl/ (built on a connected machine with `make gpu-wheels`).
#
#   bash bench/gpu_check.sh              # install from .whl/ if needed, GPU tests, the 1B bench
#   bash bench/gpu_check.sh --cpu-smoke  # the same steps on CPU with a tiny model (checks the script)
#
# What it runs, in < 8 minutes on one H200:
#   1. pytest -m gpu: the unit tests with a GPU variant (1 rank: bf16 model parity, a real
#      one-rank CUDA run with the step-time breakdown and a profiler trace).
#   2. bench.gpu_train: a ~1B llama-style GPT (conf/model/llama_1b.yaml) in bf16, 50 steps each,
#      DeepSpeed ZeRO-1, Megatron tp=1, and a hand-written loop: tokens/s, MFU, peak memory.
# One GPU cannot host two NCCL ranks, so multi-rank layouts (ZeRO over dp, tp/pp) stay on the CPU
# mock cluster (gloo) and are not run here.
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[[ "${1:-}" == "--cpu-smoke" ]] && SMOKE=1
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled HF_HUB_OFFLINE=1
START=$(date +%s)
stamp() { echo "[$(( $(date +%s) - START ))s] $*"; }

$PY -c 'import torch' 2>/dev/null || { echo "$PY has no torch: this script expects PyTorch preinstalled (set PY=/path/to/python)"; exit 2; }
stamp "python: $($PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())')"
if [[ $SMOKE == 0 ]]; then
  $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA device visible: use --cpu-smoke on a CPU machine")'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

# Install what is missing, offline, from .whl/ (torch is never replaced: the machine's CUDA build stays).
if ! $PY -c 'import deepspeed, megatron.core, hydra, webdataset, safetensors' 2>/dev/null; then
  [[ -d .whl ]] || { echo "dependencies missing and no .whl/ folder: run 'make gpu-wheels' on a connected machine and copy .whl/ here"; exit 2; }
  stamp "installing from .whl/ (offline)"
  $PY -m pip install -q --no-index --find-links .whl --no-deps .whl/*.whl
  $PY -m pip install -q --no-index --find-links .whl --no-deps --no-build-isolation -e . || true
fi
$PY -c 'import deepspeed, megatron.core; print("deepspeed", deepspeed.__version__)'

if [[ $SMOKE == 1 ]]; then
  export DS_ACCELERATOR=cpu
  stamp "gpu tests (skip without CUDA)"
  timeout 120 $PY -m pytest -q -m gpu tests/test_gpu.py -rs | tail -3
  stamp "bench.gpu_train --cpu-smoke"
  timeout 300 $PY -m bench.gpu_train --cpu-smoke
else
  stamp "gpu tests (1 rank)"
  timeout 180 $PY -m pytest -q -m gpu tests/test_gpu.py
  stamp "bench.gpu_train: llama_1b bf16, 50 steps x 3"
  timeout 360 $PY -m bench.gpu_train --steps 50 --warmup 10 --micro 4 --seq 2048
fi
stamp "done"
