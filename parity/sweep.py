"""The fp32 rule, measured: seeds x batch sizes x architecture kinds, and planted bugs on every seed.

``python -m parity.sweep`` runs ``run_parity`` (every mode, fp32) for each
seed, batch size and architecture kind and counts the FAILs of the correct
implementation (false alarms: there must be none), with each run's margin
(its worst rel err / tolerance); then plants each bug of ``BUGS`` and runs
it on every seed (each must FAIL). Hours of CPU at the defaults: run it by
hand (``nice``), not in CI; ``tests/test_parity.py`` runs a sample of it in
the slow tier. Results are appended as JSON lines to ``--out`` as they come
(an interrupted sweep keeps what it ran) and summarized as Markdown tables.

    python -m parity.sweep --seeds 20 --out sweep.jsonl
    python -m parity.sweep --table sweep.jsonl     # the tables of a (partial) run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from typing import Callable, Iterator

import numpy as np

# Architecture kinds: basic blocks with the 7x7 stem; timm's deep_tiered stem and avg_down shortcut;
# bottlenecks (stride placement matters); grouped 3x3 convs.
KINDS = {"basic": "resnet18", "timm": "resnet10t", "bottleneck": "resnet14t", "grouped": "resnext50_32x4d"}
BATCHES = (1, 2, 4, 8)


def _wrap(obj, name: str, make: Callable) -> contextlib.AbstractContextManager:
    @contextlib.contextmanager
    def patched() -> Iterator[None]:
        real = getattr(obj, name)
        setattr(obj, name, make(real))
        try:
            yield
        finally:
            setattr(obj, name, real)

    return patched()


def _edit_variables(edit: Callable[[dict], None]):
    """A converter bug: ``edit`` runs on the Flax variables ``from_torch`` returns."""
    import flax_resnet

    def make(real):
        def broken(sd, **kw):
            model, v = real(sd, **kw)
            v = {"params": dict(v["params"]), "batch_stats": dict(v["batch_stats"])}
            edit(v)
            return model, v

        return broken

    return _wrap(flax_resnet, "from_torch", make)


def _edit_results(mode: str, keys: tuple[str, ...], factor: float):
    """A numerical bug in one result: ``keys`` of ``mode`` scaled by ``factor`` on the Flax side."""
    from parity import harness

    def make(real):
        def side(*args, **kwargs):
            out = real(*args, **kwargs)
            for k in keys:
                if k in out.get(mode, {}):
                    out[mode][k] = out[mode][k] * np.asarray(factor, out[mode][k].dtype)
            return out

        return side

    return _wrap(harness, "_flax_side", make)


def _swap_bn_stats(v):
    stage = v["batch_stats"]["layer3"]
    bn = stage["1" if "1" in stage else "0"]["bn2"]  # one block per stage in resnet10t/14t
    bn["mean"], bn["var"] = bn["var"], bn["mean"]


def _transpose_kernel(v):
    conv = v["params"]["layer2"]["0"]["conv2"]
    conv["kernel"] = np.swapaxes(np.asarray(conv["kernel"]), 0, 1)


@contextlib.contextmanager
def _no_variance_backward() -> Iterator[None]:
    """BatchNorm without a gradient through the batch variance (forward unchanged)."""
    import jax

    from parity import harness

    harness._jitted.cache_clear()
    with _wrap(jax.lax, "rsqrt", lambda real: lambda v: jax.lax.stop_gradient(real(v))):
        yield
    harness._jitted.cache_clear()


@contextlib.contextmanager
def _one_bad_sgd_step(step: int = 1, factor: float = 1.01) -> Iterator[None]:
    import jax
    import jax.numpy as jnp
    import optax

    from parity import harness

    def make(real):
        def bad(*a, **kw):
            def update(updates, count, params=None):
                f = jnp.where(count == step, factor, 1.0)
                return jax.tree.map(lambda u: u * f.astype(u.dtype), updates), count + 1

            return optax.chain(real(*a, **kw), optax.GradientTransformation(lambda params: jnp.zeros((), jnp.int32), update))

        return bad

    harness._jitted.cache_clear()
    with _wrap(harness, "make_sgd", make):
        yield
    harness._jitted.cache_clear()


# name: (kind, modes, how it is planted: a context manager, or config changes on the Flax side only, what tests plant it)
BUGS = {
    "swapped BN mean/var (layer3)": ("basic", ("eval",), lambda: _edit_variables(_swap_bn_stats), {}, "test_parity.py::test_first_failure_names_the_broken_block"),
    "transposed 3x3 kernel (layer2.0.conv2)": ("basic", ("eval",), lambda: _edit_variables(_transpose_kernel), {}, "test_padding.py (kernel orientation)"),
    "1% fc.bias gradient": ("basic", ("grad",), lambda: _edit_results("grad", ("grad:fc.bias",), 1.01), {}, "test_parity.py::test_fp32_gradient_rule_catches_a_one_percent_gradient_error"),
    "1% BN bias gradient (layer3)": (
        "basic", ("grad",), lambda: _edit_results("grad", ("grad:layer3.1.bn2.bias",), 1.01), {},
        "test_parity.py::test_fp32_gradient_rule_catches_a_one_percent_gradient_error",
    ),
    "BN backward without the variance path": ("basic", ("grad",), _no_variance_backward, {}, "test_parity.py::test_fp32_gradient_rule_catches_a_batchnorm_backward_bug"),
    "one SGD update 1% too large": ("basic", ("steps",), _one_bad_sgd_step, {}, "test_parity.py::test_fp32_step_rule_catches_one_wrong_sgd_update"),
    "inverted BN momentum (Flax 0.1)": ("basic", ("train",), contextlib.nullcontext, {"bn_momentum": 0.1}, "test_parity_settings.py::test_planted_setting_bugs_fail"),
    "BN eps 1e-3 instead of 1e-5": ("basic", ("eval",), contextlib.nullcontext, {"bn_eps": 1e-3}, "test_parity_settings.py::test_planted_setting_bugs_fail"),
    "stride in the 1x1 conv (v1) against v1.5": ("bottleneck", ("eval",), contextlib.nullcontext, {"stride_in_1x1": True}, "test_parity_settings.py::test_planted_setting_bugs_fail"),
}  # fmt: skip


def run_one(arch: str, seed: int, batch: int, size: int, modes, plant=contextlib.nullcontext, flax_changes: dict | None = None) -> dict:
    """One ``run_parity`` (fp32) of a seeded model; ``flax_changes``: config fields the Flax side gets wrong."""
    from flax_resnet.config import ModelConfig
    from parity import fixtures, harness

    config = ModelConfig(arch)
    model = fixtures.calibrated(config, seed=seed)
    x = fixtures.images(batch, 3, size, size, seed=seed + 1).numpy()
    t = time.perf_counter()
    with plant():
        r = harness.run_parity(model, x, modes=modes, config=config.replace(**(flax_changes or {})))
    worst = max(r.points, key=lambda p: p.margin)
    return {
        "arch": arch, "seed": seed, "batch": batch, "size": size, "modes": list(modes), "passed": r.passed,
        "margin": worst.margin, "worst": f"{worst.label} ({worst.worst})" if worst.worst else worst.label,
        "first_failure": r.first_failure.label if r.first_failure else None, "seconds": round(time.perf_counter() - t, 1),
    }  # fmt: skip


def tables(rows: list[dict]) -> str:
    """Markdown: the correct implementation per kind and batch (false FAILs, worst margin), then each bug (FAILs per seed)."""
    from flax_resnet.tables import markdown_table

    ok = [r for r in rows if not r.get("bug")]
    body = []
    for arch in dict.fromkeys(r["arch"] for r in ok):
        for batch in sorted({r["batch"] for r in ok if r["arch"] == arch}):
            rs = [r for r in ok if r["arch"] == arch and r["batch"] == batch]
            w = max(rs, key=lambda r: r["margin"])
            body.append([arch, str(batch), str(len(rs)), str(sum(not r["passed"] for r in rs)), f"{w['margin']:.2f} ({w['worst']}, seed {w['seed']})"])
    out = markdown_table(["arch", "batch", "seeds run", "false FAILs", "worst rel err / tolerance (point, seed)"], body)
    bugs = [r for r in rows if r.get("bug")]
    if bugs:
        body = []
        for bug in dict.fromkeys(r["bug"] for r in bugs):
            rs = [r for r in bugs if r["bug"] == bug]
            least = min(rs, key=lambda r: r["margin"])
            body.append([bug, rs[0]["arch"], str(len(rs)), str(sum(not r["passed"] for r in rs)), f"{least['margin']:.1f}", BUGS.get(bug, ("",) * 5)[4]])
        out += "\n\n" + markdown_table(["planted bug", "arch", "seeds run", "FAILs", "smallest rel err / tolerance", "test"], body)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m parity.sweep", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=20, help="seeds 0..N-1 (default 20)")
    p.add_argument("--first-seed", type=int, default=0, help="start at this seed (default 0)")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help="batch sizes (default 1 2 4 8)")
    p.add_argument("--kinds", nargs="*", default=list(KINDS), choices=list(KINDS), help=f"architecture kinds (default all; none: --kinds with no names): {', '.join(f'{k} ({a})' for k, a in KINDS.items())}")
    p.add_argument("--size", type=int, default=64, help="square input size (default 64; layer4 is 2x2)")
    p.add_argument("--bugs", nargs="*", default=None, help="planted bugs to run (default all; none: --bugs with no names)")
    p.add_argument("--bug-batch", type=int, default=4, help="batch size of the planted-bug runs (default 4)")
    p.add_argument("--out", default="sweep.jsonl", help="JSON lines, appended as runs finish (default sweep.jsonl)")
    p.add_argument("--table", metavar="FILE", help="only print the tables of a JSON lines file")
    args = p.parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(tables([json.loads(line) for line in f if line.strip()]))
        return 0
    # Every seed compiles the same programs: one XLA cache across the sweep's processes (as the tests' conftest).
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(root, ".cache", "jax"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    rows = []
    bugs = list(BUGS) if args.bugs is None else args.bugs

    def emit(row):
        rows.append(row)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), file=sys.stderr, flush=True)

    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for bug in bugs:
            kind, modes, plant, changes, _ = BUGS[bug]
            emit({"bug": bug, **run_one(KINDS[kind], seed, args.bug_batch, args.size, modes, plant, changes)})
        for kind in args.kinds:
            for batch in args.batches:
                emit(run_one(KINDS[kind], seed, batch, args.size, ("eval", "train", "grad", "steps")))
    print(tables(rows))
    false_alarms = sum(not r["passed"] for r in rows if "bug" not in r)
    missed = sum(r["passed"] for r in rows if "bug" in r)
    return 0 if not false_alarms and not missed else 1


if __name__ == "__main__":
    sys.exit(main())
