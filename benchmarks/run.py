#!/usr/bin/env python
"""flax-resnet benchmarks, side by side with PyTorch, in one command.

    python benchmarks/run.py --quick            # a few minutes
    python benchmarks/run.py                    # the full table (~15 min on 2 cores)
    python benchmarks/run.py --json out.json    # also write every figure as JSON

Every measurement runs in its own subprocess (so each has a clean peak RSS
and no framework's threads or caches leak into another's), and the
subprocesses of one row run back to back, so the Flax/torch ratio of a row
compares like with like. Times are medians over repeats, after a warm-up.
Other processes' runnable threads are sampled during every measurement
(and the load average recorded): rows measured while other processes
competed for the CPU are flagged with * in the table.

Sections (``--sections``):

* ``eval``: forward img/s, Flax ``jit`` (and the BatchNorm-folded inference
  model, ``flax_resnet.inference.fold``) against torch eager NCHW and
  channels_last, and ``torch.compile``; ratio against torch's best eager
  layout.
* ``train``: train step img/s (forward, backward, SGD momentum update,
  BatchNorm statistics): the library's ``training.train_step_fn`` under
  ``jit`` with donated buffers (default kernels, and plain XLA convs)
  against torch eager and ``torch.compile``.
* ``compile``: lower and compile time and first-call latency, unrolled vs
  ``scan_blocks=True``, eval and train step.
* ``nnx``: Flax NNX (``flax_resnet.nnx``) against Linen in one process,
  ResNet-50 fp32 eval and train step: ``nnx.jit``, ``nnx.cached_partial``
  and ``nnx.split`` + ``jax.jit``.
* ``construct``: a ResNet with converted weights ready to run (from a torch
  state_dict in memory: ``from_torch``, ``jax.eval_shape`` structure check,
  ``device_put``), the conversion alone against a plain copy of the same
  bytes, and ``jit(init)`` for comparison.

bfloat16 means: Flax ``dtype=jnp.bfloat16`` compute with float32 parameters;
torch ``autocast(bfloat16)`` (the CPU/GPU AMP recipe), same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.common import OTHER_BUSY, _peak_rss_mib  # noqa: E402 - after the path set-up
from benchmarks.driver import Runner, _other_runnable, machine  # noqa: E402
from benchmarks.flax_workers import worker_compile, worker_construct, worker_flax_eval, worker_flax_train, worker_nnx  # noqa: E402
from benchmarks.sections import section_compile, section_construct, section_eval, section_nnx, section_train  # noqa: E402
from benchmarks.torch_workers import worker_torch_eval, worker_torch_train  # noqa: E402

WORKERS = {
    "flax_eval": worker_flax_eval,
    "flax_train": worker_flax_train,
    "torch_eval": worker_torch_eval,
    "torch_train": worker_torch_train,
    "compile": worker_compile,
    "nnx": worker_nnx,
    "construct": worker_construct,
}


def worker_main(task_json: str) -> None:
    task = json.loads(task_json)
    try:
        out = WORKERS[task["kind"]](task)
        out["ok"] = True
    except Exception as e:  # reported in the table, the run goes on
        out = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    out["peak_rss_mib"] = _peak_rss_mib()
    print("BENCH_RESULT " + json.dumps(out), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="resnet50 only, fewer repeats: a few minutes")
    p.add_argument("--json", metavar="FILE", help="write machine info and every measurement to FILE")
    p.add_argument("--archs", nargs="+", help="eval/train architectures (default resnet50 resnet101 resnet152; quick: resnet50)")
    p.add_argument("--batches", nargs="+", type=int, help="eval batch sizes (default 1 32)")
    p.add_argument("--train-batches", nargs="+", type=int, help="train batch sizes (default 32; quick: 32)")
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], help="default fp32 bf16")
    p.add_argument("--torch-dtypes", nargs="+", choices=["fp32", "bf16"],
                   help="dtypes of the torch rows (default: --dtypes; torch bf16 on a CPU without AVX512-BF16 is emulated, minutes per row)")
    p.add_argument("--sections", nargs="+", choices=["eval", "train", "compile", "construct", "nnx"], default=["eval", "train", "compile", "construct", "nnx"])
    p.add_argument("--nnx-archs", nargs="+", default=["resnet50"], help="architectures of the nnx section (default resnet50)")
    p.add_argument("--repeats", type=int, help="eval rounds per measurement (median; default 5, quick 3; batch 1: at least 10)")
    p.add_argument("--budget", type=float, default=None, help="eval: stop after >= 2 rounds once the timed calls took this many seconds (default 6)")
    p.add_argument("--train-repeats", type=int, default=3, help="train rounds per measurement (median; default 3)")
    p.add_argument("--train-budget", type=float, default=8.0, help="train: stop after >= 2 rounds once the timed calls took this many seconds")
    p.add_argument("--compile-archs", nargs="*", help="architectures whose batch>1 rows also run torch.compile (default: resnet50; it compiles for minutes per row on a small CPU)")
    p.add_argument("--no-train-compile", dest="train_compile", action="store_false", help="skip torch.compile for train steps (run for fp32 rows only)")
    p.add_argument("--chunk", type=int, default=8, help="micro-batch of Flax fast eval (inference.predict_fn); 0 = whole batch")
    p.add_argument("--xla-opts", action="store_true", help="compile Flax with flax_resnet.inference.FAST_COMPILE_OPTIONS")
    p.add_argument("--verbose", "-v", action="store_true", help="progress on stderr")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0

    q = args.quick
    args.archs = args.archs or (["resnet50"] if q else ["resnet50", "resnet101", "resnet152"])
    args.batches = args.batches or [1, 32]
    args.train_batches = args.train_batches or [32]
    args.dtypes = args.dtypes or ["fp32", "bf16"]
    args.torch_dtypes = args.torch_dtypes or args.dtypes
    args.repeats = args.repeats or (3 if q else 5)
    if args.budget is None:
        args.budget = 6.0
    args.compile_archs = args.compile_archs if args.compile_archs is not None else ([] if q else ["resnet50"])
    args.compile_depths = ["resnet50", "resnet152"] if q else ["resnet50", "resnet101", "resnet152"]
    args.compile_modes = ["eval", "train"]
    args.compile_batch = 8
    args.construct_archs = ["resnet152"]
    args.construct_repeats = 3 if q else 5
    args.jit_init = not q

    info = machine()
    load0 = os.getloadavg()
    print(f"# flax-resnet benchmarks{' (quick)' if q else ''}")
    print()
    print(f"Machine: {info.get('cpu')}, {info['cores']} cores ({', '.join(info.get('cpu_features', []))}); {info.get('jax_device')}")
    v = info["versions"]
    print(f"Versions: jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, torch {v['torch']}, numpy {v['numpy']}; python {info['python']}")
    print(f"XLA_FLAGS: {info['xla_flags'] or '(none)'}; Flax compiler options: {'FAST_COMPILE_OPTIONS' if args.xla_opts else 'defaults'}")
    other = _other_runnable()
    print(
        f"Load average at start: {load0[0]:.2f}; other processes' runnable threads: {other}. "
        f"Rows marked * had other processes running (> {OTHER_BUSY} runnable threads on average) while measured."
    )
    print(
        f"Medians over rounds after one warm-up call: eval up to {args.repeats} rounds (batch 1: 10), train up to {args.train_repeats}, "
        f"stopping after 2 rounds once {args.budget:.0f}/{args.train_budget:.0f} s were spent; "
        "each framework in its own process, its variants timed in turns."
    )
    print()
    sys.stdout.flush()

    r = Runner(args)
    sections = {"eval": section_eval, "train": section_train, "compile": section_compile, "construct": section_construct, "nnx": section_nnx}
    texts = []
    for name in args.sections:
        text = sections[name](r, args)
        texts.append(text)
        print(text)
        print()
        sys.stdout.flush()
    total = time.perf_counter() - r.t0
    print(f"Total wall time {total / 60:.1f} min; load average at end {os.getloadavg()[0]:.2f}.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": {k: v for k, v in vars(args).items() if k != "worker"}, "load_start": load0, "wall_s": total, "tables": texts, "measurements": r.results}, f, indent=1)
        print(f"Wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
