#!/usr/bin/env bash
# Throughput on a machine with NVIDIA GPUs, at full size: RAN on iResNet50 (K=6, 112 px faces),
# DALI "mixed" decoding (nvJPEG on the GPU), bf16 autocast (fp32 for comparison), one Ray Train
# worker per GPU; then the loader alone, DALI mixed against the torch DataLoader path.
# Both append their tables to bench/RESULTS.md.
#   make venv && bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}

GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 1 ]; then
    echo "bench/gpu.sh needs a CUDA GPU (torch sees none)" >&2
    exit 1
fi
WORKERS=1
if [ "$GPUS" -ge 2 ]; then WORKERS="1,$GPUS"; fi
CPUS=$(( $(nproc) / GPUS > 8 ? 8 : $(nproc) / GPUS ))

"$PY" bench/train.py --gpu --backbones iresnet50 --precisions bf16,fp32 --workers "$WORKERS" \
    --batch 128 --images 16384 --steps 25 --log-every 1,50 --cpus "$CPUS"
"$PY" bench/loader.py --gpu --images 8192 --batch 128 --threads "$CPUS"
