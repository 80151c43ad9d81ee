"""Parity figures for many architectures at once, as a Markdown table.

``python -m parity.table`` runs the harness for each architecture and layout
and prints, per precision, the logits' relative error against the float64
torch run (and torch's own error at that precision, with their ratio), plus
the worst point of the train-mode forward and the gradients. The README's
tables and the GPU check (``parity/gpu_check.sh``) come from here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

CONFIGS = {
    # name: (dtype, precision)
    "fp64": ("float64", "highest"),
    "fp32": ("float32", "highest"),
    "tf32": ("float32", "default"),
    "bf16": ("bfloat16", "highest"),
}


def measure(arch: str, layout: str, configs, batch: int, size: tuple[int, int], modes, scan_blocks: bool = False) -> list[dict]:
    from parity import fixtures, harness

    if layout == "transformers":
        from parity import hf

        model = hf.TransformersResNet(hf.reference_model(arch))
    else:
        model = fixtures.reference_model(arch, layout)
    x = fixtures.images(batch, 3, *size).numpy()
    rows = []
    for name in configs:
        dtype, precision = CONFIGS[name]
        t = time.perf_counter()
        r = harness.run_parity(model, x, modes=modes, dtype=dtype, precision=precision, scan_blocks=scan_blocks)
        logits = r.point("eval", "logits") if "eval" in modes else None
        worst = {m: max((p for p in r.points if p.mode == m), key=lambda p: p.rel / p.tol) for m in modes}
        rows.append(
            {
                "arch": arch,
                "layout": layout,
                "config": name,
                "passed": r.passed,
                "logits_rel": logits.rel if logits else None,
                "torch_rel": logits.torch_rel if logits else None,
                "worst": {m: {"point": p.name + (f" ({p.worst.split(':', 1)[-1]})" if p.worst else ""), "rel": p.rel, "tol": p.tol} for m, p in worst.items()},
                "kinks": r.kinks,
                "device": r.device,
                "seconds": round(time.perf_counter() - t, 1),
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    from flax_resnet.tables import markdown_table

    modes = list(rows[0]["worst"]) if rows else []
    kinks = any(r.get("kinks") is not None for r in rows)
    head = ["arch", "layout", "precision", "logits rel err", "torch's own", "ratio", *(f"worst {m} (rel / tol)" for m in modes)]
    head += ["kinks followed"] * kinks + ["pass"]
    body = []
    for r in rows:
        own, rel = r["torch_rel"], r["logits_rel"]
        worst = [f"{w['point']}: {w['rel']:.1e} / {w['tol']:.1e}" for w in r["worst"].values()]
        body.append(
            [
                r["arch"],
                r["layout"],
                r["config"],
                "-" if rel is None else f"{rel:.2e}",
                f"{own:.2e}" if own else "-",
                f"{rel / own:.2f}" if own and rel is not None else "-",
                *worst,
                *([str(r["kinks"]) if r.get("kinks") is not None else "-"] * kinks),
                "yes" if r["passed"] else "NO",
            ]
        )
    return markdown_table(head, body)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m parity.table", description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=["resnet50", "resnet101", "resnet152"], metavar="ARCH", help="architectures (default resnet50 resnet101 resnet152)")
    p.add_argument("--layouts", nargs="+", default=["seed", "torchvision"], choices=["seed", "torchvision", "transformers"], help="torch layouts: seed, torchvision, transformers (transformers' own modules; default seed torchvision)")
    p.add_argument("--configs", nargs="+", default=["fp32", "fp64"], choices=list(CONFIGS), help=f"precisions: {', '.join(CONFIGS)} (default fp32 fp64)")
    p.add_argument("--modes", nargs="+", default=["eval"], choices=["eval", "train", "grad", "steps"], help="eval, train, grad, steps (default eval)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"), help="input size (default 224 224)")
    p.add_argument("--scan-blocks", action="store_true", help="run the Flax side as ResNet(scan_blocks=True)")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)
    from flax_resnet.archs import get_arch

    rows = []
    for arch in args.archs:
        for layout in args.layouts:
            if layout == "seed" and not get_arch(arch).has_seed_layout:
                continue
            if layout == "transformers":
                from parity.hf import config_of

                try:
                    config_of(arch)
                except ValueError:
                    continue
            rows += measure(arch, layout, args.configs, args.batch, tuple(args.size), tuple(args.modes), args.scan_blocks)
            print(f"done {arch} {layout}", file=sys.stderr, flush=True)
    if rows:
        print(f"device: {rows[0]['device']}; batch {args.batch}, {args.size[0]}x{args.size[1]}\n")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
