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
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "gpu"],
        help="where both frameworks run: auto (each one's default: a GPU where it sees one), cpu, or gpu (an error unless torch and JAX both see one); default auto",
    )  # fmt: skip
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
    from parity.torch_side import check_device, on_device

    try:
        check_device(args.device)
    except ValueError as e:
        raise _usage(str(e)) from None

    if args.weights:
        config, model = _load_reference(args.weights, args.layout)
    else:
        from flax_resnet.config import ModelConfig

        try:
            config = ModelConfig(args.arch, args.layout or "torchvision", num_classes=args.num_classes)
        except ValueError as e:
            raise _usage(str(e)) from None
        model = fixtures.calibrated(config, seed=args.seed)
    x = fixtures.images(args.batch, config.in_channels, args.size[0], args.size[1], seed=args.seed + 1).numpy()
    modes = harness.MODES if args.mode == "all" else (args.mode,)
    with on_device(args.device):
        report = harness.run_parity(
            model, x, modes=modes, dtype=args.dtype, precision=args.precision, steps=args.steps, scan_blocks=args.scan_blocks, api=args.api,
            explain=True, config=config,
        )  # fmt: skip
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format())
    return 0 if report.passed else 1


def _load_reference(path: str, layout: str | None):
    """``(config, float32 torch model holding the file's weights)``, both from the file's model description.

    Every format ``flax_resnet.load`` reads; a transformers model (directory
    or file in its key layout) is compared against transformers' own
    ``ResNetForImageClassification`` (``parity.hf``), the others against
    ``torch_ref.build(config)``.
    """
    import torch

    import torch_ref
    from flax_resnet.io import CheckpointError, read
    from flax_resnet.io.resolve import resolve, torch_state

    resolved = resolve(read(path), layout=layout)  # strict: every key and shape, NaN/Inf refused (exit 2)
    config = resolved.config  # with what only a model directory's config says (ResNet v1 strides)
    sd = {k: torch.from_numpy(v.astype("float32") if v.dtype.kind == "f" else v) for k, v in torch_state(resolved, config.layout).items()}
    if config.layout == "transformers":
        from parity import hf

        try:
            model = hf.from_state_dict(config, sd, directory=path)
        except ImportError:
            raise CheckpointError(
                f"{path}: a transformers model is compared against transformers' own ResNetForImageClassification: pip install 'flax-resnet[test]' "
                "(or transformers), or pass --layout torchvision to compare against torch_ref"
            ) from None
        return config, model
    model = torch_ref.build(config)
    model.load_state_dict(sd, strict=False)  # num_batches_tracked may be absent (Flax files); the converter checked the rest
    return config, model.float().eval()


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
