"""Prove that your own PyTorch checkpoint runs the same in Flax: the parity check on its weights.

The checkpoint (a torchvision/timm/seed-layout ``state_dict``, a training
checkpoint with ``{"state_dict": ...}``) is converted, then torch and Flax
run the same images; every point in network order (stem, each block, pooled
features, logits) is compared against a float64 reference, with torch's own
fp32 error as the yardstick. Exit status 0 = PASS.

    python examples/parity_checkpoint.py my_model.pth
    python examples/parity_checkpoint.py                   # writes and checks a stand-in resnet18.pth

Expected output (abridged; the errors vary with the machine):

    checkpoint resnet18.pth: resnet18, torchvision layout, 1000 classes
    flax-resnet parity: resnet18 (torchvision layout), batch 2, 224x224, float32, precision highest, cpu
    mode  point       max abs err  rel err    tolerance  torch own  status
    eval  stem        ...
    eval  logits      8.894e-07    6.914e-07  1.91e-06   9.55e-07   pass
    argmax: 2/2 samples agree with torch float64
    PASS: all 15 points within tolerance, argmax agrees
    verdict: PASS
"""

# example-test: --size 32

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", default=None, help="your torch checkpoint (default: a stand-in resnet18.pth)")
    p.add_argument("--size", type=int, default=224, help="input height and width")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--mode", default="eval", choices=("eval", "train", "grad", "steps"), help="what to compare")
    args = p.parse_args(argv)

    import torch

    import torch_ref
    from flax_resnet import convert
    from flax_resnet.io import read_state_dict
    from parity import harness

    path = args.checkpoint
    if path is None:  # your model here: torch_ref's ResNet is torchvision's, key for key
        path = "resnet18.pth"
        if not os.path.exists(path):
            torch.manual_seed(0)
            torch.save(torch_ref.resnet18(layout="torchvision").state_dict(), path)

    sd = convert.normalize_state_dict(read_state_dict(path))  # module. prefixes, {"state_dict": ...} wrappers
    cfg = convert.infer_config(sd)  # architecture, layout, classes and input channels from keys and shapes
    print(f"checkpoint {path}: {cfg.arch}, {cfg.layout} layout, {cfg.num_classes} classes")
    model = torch_ref.ResNet(cfg.arch, img_channels=cfg.in_channels, num_classes=cfg.num_classes, layout=cfg.layout)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32) if v.dtype.kind == "f" else v) for k, v in sd.items()})
    x = np.random.default_rng(0).normal(size=(args.batch, cfg.in_channels, args.size, args.size)).astype(np.float32)  # NCHW
    report = harness.run_parity(model.float().eval(), x, modes=(args.mode,))
    print(report.format())
    print("verdict:", "PASS" if report.passed else "FAIL")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
