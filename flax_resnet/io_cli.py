"""``flax-resnet convert`` and ``flax-resnet inspect``: checkpoint files in and out."""

from __future__ import annotations

import argparse
import json
import sys

from flax_resnet.archs import ARCHS
from flax_resnet.cli import add_command

CONVERT_EPILOG = """\
output format (from DST's suffix):
  X.msgpack          Flax variables, flax.serialization msgpack (plus a __meta__ entry)
  X.safetensors      a torch state_dict (torchvision or seed keys); with --layout flax,
                     flattened Flax keys instead (params/layer1/0/conv1/kernel)
  X.npz              like .safetensors, as numpy's .npz
  X.pth / .pt / .bin a torch state_dict (torch.save); loads into torchvision/timm strictly
  X (no suffix)      an Orbax checkpoint directory (StandardCheckpointer), existing or not;
                     missing parent directories are created

SRC: any of these (format read from the content, not the name), a training checkpoint
({"state_dict": ...}, {"model": ...}, {"model_state_dict": ...}, with epoch/optimizer
entries; module. prefixes), or an Orbax CheckpointManager step or root directory (latest
step). .pth files are read with torch.load(weights_only=True) only: a pickle that would
run code is refused and nothing in it runs. Only .pth in or out needs torch.

A Hugging Face model directory (config.json next to model.safetensors or
pytorch_model.bin; transformers' save_pretrained or a timm hub snapshot) is a SRC too:
its config is checked against the weights, and v1 (downsample_in_bottleneck) and the
class names are kept in the output's metadata (.msgpack, .safetensors, .npz, Orbax).

--layout torchvision|seed|transformers: the output's layout (default: the source's). torchvision has
bias-free convs and "downsample"; seed has conv biases and "identity_downsample"
(resnet50/101/152). seed -> torchvision folds each conv bias into the next BatchNorm's
running_mean (exact); torchvision -> seed adds zero biases. transformers writes the keys
of transformers' ResNetForImageClassification (7x7-stem, ungrouped architectures).

Writes are atomic (temporary file, then rename); an existing output is replaced only with
--force. Refused, with one line on stderr and exit status 2: unsafe pickles, corrupt or
truncated files, files that are not ResNet checkpoints, a wrong --arch (the mismatching
keys and shapes are listed), NaN/Inf weights (unless --allow-nonfinite).

examples:
  flax-resnet convert resnet50-0676ba61.pth resnet50.msgpack
  flax-resnet convert checkpoint.pth ckpt/resnet50 --dtype bfloat16
  flax-resnet convert resnet50.msgpack resnet50.safetensors --layout torchvision
  flax-resnet inspect resnet50.safetensors
"""


CONVERT_DESCRIPTION = (
    "Convert a ResNet checkpoint: strict (every key and shape checked), safe "
    "(no pickled code runs), atomic (no partial output) and never overwriting without --force."
)
INSPECT_DESCRIPTION = (
    "Describe a checkpoint file or Orbax directory. Exit status 0 if convert would "
    "accept it, 1 if it has problems (non-finite values, unexpected/missing/mis-shaped keys), "
    "2 if it is not a readable checkpoint."
)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n} B"


def register(subparsers: argparse._SubParsersAction) -> None:
    c = add_command(subparsers, "convert", "convert a checkpoint between PyTorch, safetensors, Flax msgpack and Orbax", CONVERT_DESCRIPTION, CONVERT_EPILOG)
    c.add_argument("src", metavar="SRC", help="input file or Orbax directory")
    c.add_argument("dst", metavar="DST", help="output path; its suffix picks the format (see below)")
    c.add_argument(
        "--arch",
        default="auto",
        metavar="ARCH",
        help=f"architecture the file must hold: auto (infer it from keys and shapes) or one of {', '.join(ARCHS)}",
    )
    c.add_argument(
        "--layout",
        default="source",
        choices=("source", "torchvision", "seed", "transformers", "flax"),
        help="key layout of the output: the source's, torchvision, seed, transformers (ResNetForImageClassification), or flax (Flax keys in .safetensors/.npz)",
    )
    c.add_argument("--dtype", default="keep", choices=("keep", "float32", "bfloat16"), help="floating weights kept as they are, or cast")
    c.add_argument("--force", action="store_true", help="overwrite an existing output")
    c.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/Inf weights instead of refusing")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=run_convert)

    i = add_command(subparsers, "inspect", "describe a checkpoint: architecture, layout, classes, parameters, dtypes, problems", INSPECT_DESCRIPTION)
    i.add_argument("file", metavar="FILE", help="checkpoint file or Orbax directory")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.add_argument("--full", action="store_true", help="print long metadata (e.g. 1000 class names) in full, not shortened")
    i.set_defaults(func=run_inspect)


def run_convert(args: argparse.Namespace) -> int:
    from flax_resnet import io

    arch = None if args.arch in (None, "auto") else args.arch
    r = io.convert(
        args.src,
        args.dst,
        arch=arch,
        layout=None if args.layout == "source" else args.layout,
        dtype=None if args.dtype == "keep" else args.dtype,
        force=args.force,
        allow_nonfinite=args.allow_nonfinite,
    )
    if args.json:
        print(json.dumps(r, indent=2, default=str))
        return 0
    src = f"{r['src_format']}, {r['src_keys']} keys"
    if r["wrapper"]:
        src += f", from [{r['wrapper']!r}]"
    if r["prefix"]:
        src += f", prefix {r['prefix']!r} stripped"
    dst = f"{r['format']}, " + ("Flax variables" if r["keys"] == "flax" else f"{r['layout']} state_dict")
    print(f"converted {r['src']} ({src}) -> {r['dst']} ({dst})")
    print(f"  architecture  {r['arch']}, {r['layout']} layout, {r['num_classes']} classes")
    print(f"  parameters    {r['num_params']:,} ({r['dtype']}) + {r['num_stats']:,} BatchNorm statistics")
    print(f"  wrote         {r['bytes']:,} bytes ({_human_bytes(r['bytes'])}) in {r['seconds']:.2f} s")
    if r["extras"]:
        print(f"  ignored       {', '.join(r['extras'])}")
    return 0


def _short_meta(meta: dict, items: int = 5, chars: int = 60) -> tuple[dict, bool]:
    """``(meta, shortened)``: lists past ``items`` entries and strings past ``chars`` characters cut, saying how much."""
    out, cut = {}, False
    for k, v in meta.items():
        if isinstance(v, (list, tuple)) and len(v) > items:
            v, cut = [*v[:items], f"... ({len(v)} in all)"], True
        elif isinstance(v, str) and len(v) > chars:
            v, cut = v[:chars] + f"... ({len(v)} chars)", True
        out[k] = v
    return out, cut


def format_report(r: dict, full: bool = False) -> str:
    """``inspect``'s report as aligned text lines; long metadata shortened unless ``full``."""
    lines = []

    def row(name, value):
        lines.append(f"{name:<14}{value}")

    row("file", f"{r['path']} ({r['format']}, {r['bytes']:,} bytes)")
    keys = f"{r['keys']}, {r['num_tensors']} tensors"
    if r["wrapper"]:
        keys += f", inside [{r['wrapper']!r}]"
    if r["prefix"]:
        keys += f", prefix {r['prefix']!r}"
    row("keys", keys)
    row("architecture", r["arch"] or "unknown")
    row("layout", r["layout"] or "unknown")
    row("num_classes", r["num_classes"] if r["num_classes"] is not None else "unknown")
    row("in_channels", r["in_channels"] if r["in_channels"] is not None else "unknown")
    if r["num_params"] is not None:
        row("parameters", f"{r['num_params']:,} (+ {r['num_stats']:,} BatchNorm statistics)")
    row("dtypes", ", ".join(f"{k} x{v}" for k, v in r["dtypes"].items()))
    if r["num_batches_tracked"] is not None:
        row("batches", f"num_batches_tracked {r['num_batches_tracked'] if isinstance(r['num_batches_tracked'], int) else 'varies'}")
    if r["extras"]:
        row("other entries", ", ".join(r["extras"]))
    if r["meta"]:
        meta, cut = (r["meta"], False) if full else _short_meta(r["meta"])
        row("metadata", json.dumps(meta, sort_keys=True) + (" (--full shows all)" if cut else ""))

    def listed(items, limit=8):
        more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    if r["unexpected"]:
        row("unexpected", f"{len(r['unexpected'])}: {listed(r['unexpected'])}")
    if r["missing"]:
        row("missing", f"{len(r['missing'])}: {listed(r['missing'])}")
    if r["mismatched"]:
        row("mis-shaped", f"{len(r['mismatched'])}: " + listed([f"{k} expected {tuple(a)} found {tuple(b)}" for k, a, b in r["mismatched"]]))
    if r["nonfinite"]:
        row("non-finite", f"{len(r['nonfinite'])}: " + listed([f"{k} ({n} NaN, {i} Inf of {s})" for k, n, i, s in r["nonfinite"]]))
    row("status", "ok" if r["ok"] else "PROBLEMS: " + "; ".join(r["problems"]))
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    from flax_resnet import io

    r = io.inspect(args.file)
    if args.json:
        print(json.dumps(r, indent=2, default=str))
    else:
        print(format_report(r, full=args.full))
    sys.stdout.flush()
    return 0 if r["ok"] else 1
