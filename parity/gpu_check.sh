#!/usr/bin/env bash
# The GPU part of the parity suite, for a CUDA machine with torch and jax[cuda]
# installed (about 15 minutes on one H100). Every row kind of flax_resnet.ARCHS:
# basic and bottleneck blocks, the 7x7 stem and timm's deep / deep_tiered stems,
# conv and avg_down shortcuts, grouped and wide convs, the seed layout, depth
# (ResNet-152), squeeze-excitation (SE-ResNeXt, ResNet-RS with its conv stem pool)
# and, when transformers is installed, its own ResNet.
# Prints the fp32-highest, TF32 (precision default), bf16 and fp64 figures and
# runs the command users run (every mode, Linen and NNX) for each kind.
# Usage: bash parity/gpu_check.sh [OUTDIR]; exit 1 if any run fails.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_parity}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"

# One row per kind (tests/test_parity_cli.py checks that these cover every kind).
KINDS="resnet18 resnet50 resnet152 resnext50_32x4d wide_resnet50_2 resnet10t resnet18d resnet50c resnet50d resnet50s seresnext26d_32x4d resnetrs50"
layouts="torchvision seed"
python -c "import transformers" 2>/dev/null && layouts="$layouts transformers"
status=0
# shellcheck disable=SC2086
python -m parity.table --archs $KINDS --layouts $layouts --configs fp32 tf32 bf16 fp64 \
    --modes eval train grad --batch 8 --size 224 224 --json "$out/gpu_parity.json" | tee "$out/gpu_parity.md" || status=1
for arch in $KINDS; do
    for api in linen nnx; do
        python -m flax_resnet parity --arch "$arch" --mode all --batch 8 --size 224 224 --api "$api" --json \
            > "$out/parity_${arch}_${api}.json" || { echo "FAIL: $arch $api (see $out/parity_${arch}_${api}.json)"; status=1; }
    done
done
python -m flax_resnet parity --arch resnet50 --layout seed --mode all --batch 8 --size 224 224 --json \
    > "$out/parity_resnet50_seed.json" || { echo "FAIL: resnet50 seed"; status=1; }
exit $status
