#!/usr/bin/env bash
# The GPU part of the parity suite, for a CUDA machine with torch and jax[cuda]
# installed (a few minutes on one H100). Prints the fp32-highest, TF32
# (precision default) and bf16 figures for the README's tolerance table.
# Usage: bash parity/gpu_check.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_parity}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
python -m parity.table --archs resnet50 resnet152 --layouts torchvision --configs fp32 tf32 bf16 fp64 \
    --modes eval train grad --batch 8 --size 224 224 --json "$out/gpu_parity.json" | tee "$out/gpu_parity.md"
python -m parity --arch resnet50 --layout seed --mode all --batch 8 --size 224 224 --json > "$out/gpu_resnet50_all.json" || true
