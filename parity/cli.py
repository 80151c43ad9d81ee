"""``flax-resnet parity`` / ``python -m parity``: compare Flax with PyTorch.

Exit status: 0 when every point is within tolerance, 1 on a parity failure,
2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

MODE_CHOICES = ("eval", "train", "grad", "steps", "all")
DESCRIPTION = (
    "Compare the Flax ResNet with PyTorch on the same weights and inputs, against a float64 torch run. "
    "Exit status: 0 when every point is within tolerance, 1 on a parity failure, 2 on bad input."
)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("parity", help="compare Flax and PyTorch outputs, BN updates and gradients", description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    from flax_resnet.archs import ARCHS

    p.add_argument("--arch", default="resnet50", choices=list(ARCHS), metavar="ARCH", help=f"architecture of the random weights: {', '.join(ARCHS)} (default resnet50)")
    p.add_argument(
        "--layout",
        default=None,
        choices=["torchvision", "seed"],
        help="torch state_dict layout: torchvision (bias-free convs, 'downsample'; also timm's keys) or seed (the seed code's "
        "ResNet-50/101/152: conv biases, 'identity_downsample'); default torchvision, or the checkpoint's own with --weights",
    )
    p.add_argument("--weights", default=None, metavar="FILE", help="compare this checkpoint instead of seeded random weights")
    p.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    p.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"), help="input size (default 224 224)")
    p.add_argument("--mode", default="eval", choices=MODE_CHOICES, help="what to compare: eval, train, grad, steps or all (default eval; all = every mode)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"], help="Flax compute dtype: float32, float64 or bfloat16 (default float32)")
    p.add_argument("--precision", default="highest", choices=["highest", "default"], help="highest pins fp32 (no TF32) in both frameworks; default allows TF32 (default highest)")
    p.add_argument("--steps", type=int, default=2, help="SGD steps for --mode steps/all (default 2)")
    p.add_argument("--scan-blocks", action="store_true", help="run the Flax side as ResNet(scan_blocks=True): same numbers, faster to compile for 100+ layers")
    p.add_argument("--api", default="linen", choices=["linen", "nnx"], help="the Flax side: the Linen model or the NNX one, flax_resnet.nnx (default linen)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the random model (default 1000)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _usage(msg: str) -> Exception:
    from flax_resnet.cli import UsageError

    return UsageError(msg)


def run(args: argparse.Namespace) -> int:
    if args.batch < 1 or min(args.size) < 1:
        raise _usage(f"--batch and --size must be positive, got batch {args.batch}, size {tuple(args.size)}")
    if args.steps < 1:
        raise _usage(f"--steps must be positive, got {args.steps}")
    if args.mode in ("train", "grad", "steps", "all") and args.batch * (args.size[0] // 32 or 1) * (args.size[1] // 32 or 1) < 2:
        raise _usage("train-mode BatchNorm needs more than one value per channel: use --batch 2 or larger inputs")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise _usage("the parity check needs PyTorch: pip install 'flax-resnet[torch]'") from None

    from parity import fixtures, harness

    if args.weights:
        model = _load_reference(args.weights, args.layout)
    else:
        try:
            model = fixtures.reference_model(args.arch, args.layout or "torchvision", seed=args.seed, num_classes=args.num_classes)
        except ValueError as e:
            raise _usage(str(e)) from None
    in_ch = model.conv1.in_channels
    x = fixtures.images(args.batch, in_ch, args.size[0], args.size[1], seed=args.seed + 1).numpy()
    modes = harness.MODES if args.mode == "all" else (args.mode,)
    report = harness.run_parity(model, x, modes=modes, dtype=args.dtype, precision=args.precision, steps=args.steps, scan_blocks=args.scan_blocks, api=args.api)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format())
    return 0 if report.passed else 1


def _load_reference(path: str, layout: str | None):
    """A float32 ``torch_ref`` model holding a checkpoint's weights."""
    import torch

    import torch_ref
    from flax_resnet import convert

    from flax_resnet.io import CheckpointError, read_state_dict

    sd = convert.normalize_state_dict(read_state_dict(path))
    convert.check_finite(sd, str(path), CheckpointError)  # NaN/Inf weights are bad input (exit 2), not a parity failure
    cfg = convert.infer_config(sd, layout=layout)
    model = torch_ref.ResNet(cfg.arch, img_channels=cfg.in_channels, num_classes=cfg.num_classes, layout=cfg.layout)
    # Strictness and shapes are checked by the converter first: one collected error.
    convert.torch_to_flax(sd, cfg.arch, cfg.layout)
    model.load_state_dict({k: torch.from_numpy(v.astype("float32") if v.dtype.kind == "f" else v) for k, v in sd.items()}, strict=False)
    return model.float().eval()


def main(argv: list[str] | None = None) -> int:
    from flax_resnet.cli import UsageError

    p = argparse.ArgumentParser(prog="python -m parity", description=DESCRIPTION)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except (UsageError, FileNotFoundError, IsADirectoryError, ValueError) as e:
        print(f"parity: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
