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
  model, ``flax_resnet.inference.fast_eval_model``) against torch eager NCHW and
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
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from flax_resnet.tables import markdown_table  # noqa: E402 - after the path set-up

LOADED = 1.5  # load average above which a row is flagged (when other processes cannot be sampled)
OTHER_BUSY = 0.5  # mean runnable threads of other processes above which a row is flagged
IMAGE = 224
NUM_CLASSES = 1000

# ----------------------------------------------------------------------------
# Shared helpers (worker side)


def _peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median_time(fn, repeats: int, warmup: int = 1, budget_s: float | None = None) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls.

    With ``budget_s``, stops early (after at least 2 timed calls) once the
    timed calls have used the budget.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if budget_s is not None and len(times) >= 2 and sum(times) > budget_s:
            break
    return statistics.median(times), times


def _state_dict(arch: str, seed: int = 0) -> dict:
    """A torchvision-layout state_dict of numpy arrays with torch's default init.

    Built from the converter's own key/shape table, so the Flax workers need
    no torch; the torch workers load the very same arrays.
    """
    import numpy as np

    from flax_resnet.convert import ModelConfig, leaves

    rng = np.random.default_rng(seed)
    sd = {}
    for leaf in leaves(ModelConfig(arch, "torchvision", NUM_CLASSES, 3)):
        shape, key = leaf.torch_shape, leaf.torch_key
        if key.endswith("running_var") or (key.endswith(".weight") and len(shape) == 1):
            sd[key] = np.ones(shape, np.float32)
        elif key.endswith("running_mean") or key.endswith(".bias"):
            sd[key] = np.zeros(shape, np.float32)
        elif len(shape) == 4:  # kaiming normal, fan_out
            sd[key] = (rng.standard_normal(shape, dtype=np.float32) * np.sqrt(2.0 / (shape[0] * shape[2] * shape[3]))).astype(np.float32)
        else:  # fc
            bound = 1 / np.sqrt(shape[1])
            sd[key] = rng.uniform(-bound, bound, shape).astype(np.float32)
    # The last BN scale of each residual branch at 0.2 keeps activations O(1) with default stats.
    last = ".bn3.weight" if "layer1.0.conv3.weight" in sd else ".bn2.weight"
    for key in sd:
        if key.startswith("layer") and key.endswith(last):
            sd[key] = np.full(sd[key].shape, 0.2, np.float32)
    return sd


def _images(batch: int, nhwc: bool):
    import numpy as np

    x = np.random.default_rng(1).standard_normal((batch, IMAGE, IMAGE, 3), dtype=np.float32)
    labels = np.random.default_rng(2).integers(0, NUM_CLASSES, batch)
    return (x if nhwc else np.ascontiguousarray(x.transpose(0, 3, 1, 2))), labels


# ----------------------------------------------------------------------------
# Workers: one measurement each, in a fresh process; print one JSON line.


def _round_robin(fns: dict, repeats: int, budget_s: float | None, batch: int) -> dict:
    """Times several callables in turns (one call of each per round), so load drift hits all alike.

    One warm-up call each, then up to ``repeats`` rounds; with ``budget_s``,
    stops after at least 2 rounds once the timed calls used the budget.
    """
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    used = 0.0
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
            times[k].append(dt)
            used += dt
        if budget_s is not None and len(times[next(iter(times))]) >= 2 and used > budget_s:
            break
    return {k: {"img_s": batch / statistics.median(ts), "median_s": statistics.median(ts), "times": ts} for k, ts in times.items()}


def _flax_model(arch: str, dtype: str, variant: str, kind: str):
    """The default model with converted weights; eval ``fast``: BatchNorm folded (``inference.fast_eval_model``)."""
    import jax
    import jax.numpy as jnp

    import flax_resnet
    from flax_resnet import inference

    sd = _state_dict(arch)
    model, variables = flax_resnet.from_torch(sd, scan_blocks="scan" in variant, remat="remat" in variant)
    if dtype == "bf16":
        model = model.clone(dtype=jnp.bfloat16)
    if "fast" in variant and kind == "eval":
        model, variables = inference.fast_eval_model(model, variables)
    return model, jax.device_put(variables)


def _compiler_options(task):
    from flax_resnet import inference

    return inference.FAST_COMPILE_OPTIONS if task.get("xla_opts") else None


def worker_flax_eval(task):
    """Flax eval forward, one or more variants (``jit``: the default model; ``fast``: BN folded, chunked)."""
    import jax

    from flax_resnet import inference

    x, _ = _images(task["batch"], nhwc=True)
    x = jax.device_put(x)
    fns, compile_s = {}, {}
    for variant in task["variants"]:
        model, variables = _flax_model(task["arch"], task["dtype"], variant, "eval")
        chunk = task.get("chunk") if variant == "fast" else None
        f = inference.predict_fn(model, chunk=chunk, compiler_options=_compiler_options(task))
        t0 = time.perf_counter()
        compiled = f.lower(variables, x).compile()
        compile_s[variant] = time.perf_counter() - t0
        fns[variant] = lambda c=compiled, v=variables: c(v, x).block_until_ready()
    out = _round_robin(fns, task["repeats"], task.get("budget_s"), task["batch"])
    for k in out:
        out[k]["compile_s"] = compile_s[k]
    return {"variants": out}


def worker_flax_train(task):
    """The library's train step (``training.train_step_fn``) under jit, state donated; variants ``jit`` and ``plain``.

    ``jit``: the default model (on CPU, ``flax_resnet.kernels``' CPU forms);
    ``plain``: traced under ``kernels.use_plain()``, every conv a plain XLA conv.
    """
    import contextlib

    import jax

    from flax_resnet import kernels, training

    x, labels = _images(task["batch"], nhwc=True)
    x, labels = jax.device_put(x), jax.device_put(labels)
    tx = training.torch_sgd(0.1, momentum=0.9)  # as the torch workers' SGD(lr=0.1, momentum=0.9)
    fns, compile_s = {}, {}
    for variant in task["variants"]:
        model, variables = _flax_model(task["arch"], task["dtype"], variant, "train")
        state = [training.create_train_state(model, variables, tx)]

        def step(state, x, y):  # a fresh function per variant: kernels are chosen when it is traced
            return training.train_step_fn(state, x, y)

        f = jax.jit(step, donate_argnums=0, compiler_options=_compiler_options(task))
        t0 = time.perf_counter()
        with kernels.use_plain() if variant == "plain" else contextlib.nullcontext():
            compiled = f.lower(state[0], x, labels).compile()
        compile_s[variant] = time.perf_counter() - t0

        def run(c=compiled, state=state):
            state[0], metrics = c(state[0], x, labels)
            metrics["loss"].block_until_ready()

        fns[variant] = run
    out = _round_robin(fns, task["repeats"], task.get("budget_s"), task["batch"])
    for k in out:
        out[k]["compile_s"] = compile_s[k]
    return {"variants": out}


def worker_nnx(task):
    """NNX against Linen in one process, variants timed in turns (resnet50 fp32 by default).

    ``linen``: the Linen rows' code (``inference.predict_fn``; ``training.train_step_fn``
    under jit, state donated). ``nnx_jit``: ``nnx.jit`` (eval: ``m(x)``; train: the
    library's ``flax_resnet.nnx.training.train_step``), which traverses the model and
    optimizer graphs on every call. ``nnx_cached``: the same under ``nnx.cached_partial``
    (the traversal cached). ``nnx_split``: ``nnx.split`` once, then ``jax.jit`` of a pure
    function of the state (``nnx.merge`` inside; train: donated), ``nnx.update`` never needed.
    """
    import jax
    from flax import nnx

    import flax_resnet
    import flax_resnet.nnx as frn
    from flax_resnet import inference, training
    from flax_resnet.nnx import training as nnx_training

    x, labels = _images(task["batch"], nhwc=True)
    x, labels = jax.device_put(x), jax.device_put(labels)
    sd = _state_dict(task["arch"])
    tx = training.torch_sgd(0.1, momentum=0.9)
    fns, compile_s = {}, {}

    def timed_first(name, fn):
        t0 = time.perf_counter()
        fn()
        compile_s[name] = time.perf_counter() - t0
        fns[name] = fn

    if task["mode"] == "eval":
        model, variables = flax_resnet.from_torch(sd)
        variables = jax.device_put(variables)
        f_linen = inference.predict_fn(model)
        timed_first("linen", lambda: f_linen(variables, x).block_until_ready())
        m = frn.from_torch(sd)
        m.eval()
        f = nnx.jit(lambda m, x: m(x))
        timed_first("nnx_jit", lambda: f(m, x).block_until_ready())
        cached = nnx.cached_partial(f, m)
        timed_first("nnx_cached", lambda: cached(x).block_until_ready())
        g, st = nnx.split(m)
        pure = jax.jit(lambda st, x: nnx.merge(g, st)(x))
        timed_first("nnx_split", lambda: pure(st, x).block_until_ready())
    else:
        model, variables = flax_resnet.from_torch(sd)
        state = [training.create_train_state(model, variables, tx)]
        f_linen = jax.jit(training.train_step_fn, donate_argnums=0)

        def linen():
            state[0], metrics = f_linen(state[0], x, labels)
            metrics["loss"].block_until_ready()

        timed_first("linen", linen)
        m1 = frn.from_torch(sd)
        o1 = nnx_training.create_optimizer(m1, tx)
        timed_first("nnx_jit", lambda: nnx_training.train_step(m1, o1, x, labels)["loss"].block_until_ready())
        m2 = frn.from_torch(sd)
        o2 = nnx_training.create_optimizer(m2, tx)
        cached = nnx.cached_partial(nnx_training._train_step, m2, o2)
        timed_first("nnx_cached", lambda: cached(x, labels, 0.0)["loss"].block_until_ready())
        m3 = frn.from_torch(sd)
        g, st = nnx.split((m3, nnx_training.create_optimizer(m3, tx)))
        holder = [st]

        def pure(st, x, y):
            m, opt = nnx.merge(g, st)
            metrics = nnx_training.train_step_fn(m, opt, x, y)
            return nnx.state((m, opt)), metrics

        step = jax.jit(pure, donate_argnums=0)

        def split():
            holder[0], metrics = step(holder[0], x, labels)
            metrics["loss"].block_until_ready()

        timed_first("nnx_split", split)
    out = _round_robin(fns, task["repeats"], task.get("budget_s"), task["batch"])
    for k in out:
        out[k]["compile_s"] = compile_s[k]
    return {"variants": out}


def _torch_model(arch: str, batch: int, layout: str):
    import numpy as np
    import torch

    import torch_ref

    torch.manual_seed(0)
    model = torch_ref.ResNet(arch, num_classes=NUM_CLASSES)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in _state_dict(arch).items()}, strict=False)
    cl = layout == "cl"
    if cl:
        model = model.to(memory_format=torch.channels_last)
    x, labels = _images(batch, nhwc=False)
    xt = torch.from_numpy(x)
    if cl:
        xt = xt.contiguous(memory_format=torch.channels_last)
    return model, xt, torch.from_numpy(np.asarray(labels))


def _first_then_round_robin(fns, task):
    """Times each variant's first call (torch.compile compiles there), then all of them in turns."""
    first = {}
    for variant, run in fns.items():
        t0 = time.perf_counter()
        run()
        first[variant] = time.perf_counter() - t0
    out = _round_robin(fns, task["repeats"], task.get("budget_s"), task["batch"])
    for k in out:
        out[k]["first_call_s"] = first[k]
    return {"variants": out}


def worker_torch_eval(task):
    """torch eval forward, variants ``nchw``, ``cl`` (channels_last) and ``compile`` (torch.compile, channels_last)."""
    import torch

    bf16 = task["dtype"] == "bf16"
    fns = {}
    for variant in task["variants"]:
        model, x, _ = _torch_model(task["arch"], task["batch"], "nchw" if variant == "nchw" else "cl")
        model.eval()
        fn = torch.compile(model) if variant == "compile" else model

        def run(fn=fn, x=x):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                fn(x)

        fns[variant] = run
    return _first_then_round_robin(fns, task)


def worker_torch_train(task):
    """torch train step (SGD momentum), variants ``nchw``, ``cl`` and ``compile``."""
    import torch
    import torch.nn.functional as F

    bf16 = task["dtype"] == "bf16"
    fns = {}
    for variant in task["variants"]:
        model, x, labels = _torch_model(task["arch"], task["batch"], "nchw" if variant == "nchw" else "cl")
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        fn = torch.compile(model) if variant == "compile" else model

        def run(fn=fn, x=x, labels=labels, opt=opt):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(fn(x), labels)
            loss.backward()
            opt.step()

        fns[variant] = run
    return _first_then_round_robin(fns, task)


def worker_compile(task):
    """Lower + compile time and first-call latency (lower + compile + first run) of ``jit``, eval or train step."""
    import jax
    import jax.numpy as jnp

    import flax_resnet

    model = flax_resnet.ResNet(arch=task["arch"], scan_blocks=task["variant"].startswith("scan"), remat=task["variant"].endswith("remat"))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    variables = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    x, labels = _images(task["batch"], nhwc=True)
    x, labels = jax.device_put(x), jax.device_put(labels)
    if task["mode"] == "eval":
        fn, args = (lambda v, x: model.apply(v, x)), (variables, x)
    else:  # the library's train step: loss, gradients, SGD update, BN statistics
        from flax_resnet import training

        fn = functools.partial(training.train_step_fn, label_smoothing=0.0)
        args = (training.create_train_state(model, variables, training.torch_sgd(0.1, momentum=0.9)), x, labels)

    t0 = time.perf_counter()
    lowered = jax.jit(fn, compiler_options=_compiler_options(task)).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    t3 = time.perf_counter()
    # First-call latency as a user sees it: trace + lower + compile + the first run.
    first = t3 - t0
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "run_s": t3 - t2, "first_call_s": first}


def worker_construct(task):
    """A ResNet with converted weights ready to run, from a torch state_dict in memory."""
    import numpy as np
    import torch

    sd_np = _state_dict(task["arch"])
    sd = {k: torch.from_numpy(v) for k, v in sd_np.items()}
    import jax
    import jax.numpy as jnp

    import flax_resnet
    from flax_resnet import convert

    out: dict[str, Any] = {}
    nbytes = sum(v.nbytes for v in sd_np.values())
    out["bytes"] = nbytes
    jax.device_put(np.zeros(4)).block_until_ready()  # start the backend outside the timings

    def copy_tensors():
        return [np.copy(v) for v in sd_np.values()]

    flat = np.concatenate([v.ravel() for v in sd_np.values()])
    out["memcpy_s"], _ = _median_time(copy_tensors, task["repeats"])
    out["memcpy_one_buffer_s"], _ = _median_time(lambda: np.copy(flat), task["repeats"])
    out["torch_to_flax_s"], _ = _median_time(lambda: convert.torch_to_flax(sd), task["repeats"])
    out["torch_to_flax_scan_s"], _ = _median_time(lambda: convert.torch_to_flax(sd, scan_blocks=True), task["repeats"])
    variables = convert.torch_to_flax(sd)
    out["flax_to_torch_s"], _ = _median_time(lambda: convert.flax_to_torch(variables), task["repeats"])

    def ready(scan=False):
        model, v = flax_resnet.from_torch(sd, scan_blocks=scan)
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3))))
        if jax.tree_util.tree_map(lambda s: s.shape, dict(shapes)) != jax.tree_util.tree_map(np.shape, v):
            raise AssertionError("converted tree does not match the model")
        v = jax.device_put(v)
        jax.block_until_ready(v)
        return model, v

    # The first construction in a process pays for tracing Flax's init once; report it, and the median.
    t0 = time.perf_counter()
    ready()
    out["ready_first_s"] = time.perf_counter() - t0
    out["ready_s"], _ = _median_time(ready, task["repeats"], warmup=0)
    out["ready_scan_s"], _ = _median_time(lambda: ready(True), task["repeats"], warmup=0)
    if task.get("jit_init"):
        model = flax_resnet.ResNet(arch=task["arch"])
        t0 = time.perf_counter()
        jax.block_until_ready(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3))))
        out["jit_init_s"] = time.perf_counter() - t0
    return out


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


# ----------------------------------------------------------------------------
# Driver


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
        info["cpu_features"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile") if f in flags]
    except OSError:
        info["cpu"] = platform.processor() or "unknown"
    versions = {}
    for mod in ("jax", "jaxlib", "flax", "optax", "torch", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    info["versions"] = versions
    try:
        import jax

        info["jax_device"] = f"{jax.default_backend()} ({jax.devices()[0].device_kind})"
    except Exception:
        pass
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    return info


def _other_runnable() -> int | None:
    """Threads of other process groups that are running or runnable right now (Linux)."""
    try:
        me = os.getpgid(0)
        n = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[2]) == me:  # fields: state ppid pgrp ...
                    continue
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] == "R":
                            n += 1
            except (OSError, IndexError, ValueError):
                continue
        return n
    except OSError:
        return None


class _Sampler:
    """Samples other processes' runnable threads every ``period`` seconds in the background."""

    def __init__(self, period: float = 0.5):
        import threading

        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _run(self, period):
        while not self._stop.wait(period):
            n = _other_runnable()
            if n is not None:
                self.samples.append(n)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def run_task(task: dict, timeout: float) -> dict:
    load = os.getloadavg()[0]
    sampler = _Sampler()
    sampler.__enter__()
    t0 = time.perf_counter()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(task)], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        line = next((l for l in reversed(p.stdout.splitlines()) if l.startswith("BENCH_RESULT ")), None)
        if line is None:
            tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
            out = {"ok": False, "error": f"exit {p.returncode}: {tail[0][:200]}"}
        else:
            out = json.loads(line[len("BENCH_RESULT ") :])
    except subprocess.TimeoutExpired:
        out = {"ok": False, "error": f"timed out after {timeout:.0f}s"}
    out["wall_s"] = time.perf_counter() - t0
    sampler.__exit__()
    out["load_before"] = load
    out["load_after"] = os.getloadavg()[0]
    out["other_runnable"] = sampler.mean  # mean runnable threads of other processes during the measurement
    return out


def _fmt(v, digits=1, suffix=""):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.{digits}f}{suffix}"


def _img_s(res):
    return res.get("img_s") if res and res.get("ok") else None


def _loaded(results):
    """Whether other processes competed for the CPU during any of these measurements."""
    for r in results:
        if not r:
            continue
        other = r.get("other_runnable")
        if other is not None:
            if other > OTHER_BUSY:
                return True
        elif max(r.get("load_before", 0), r.get("load_after", 0)) > LOADED:
            return True
    return False


class Runner:
    def __init__(self, args):
        self.args = args
        self.results: list[dict] = []
        self.t0 = time.perf_counter()

    def run(self, section: str, row: dict, name: str, task: dict, timeout: float = 900) -> dict:
        if self.args.verbose:
            print(f"  [{time.perf_counter() - self.t0:6.0f}s] {section} {row} {name} ...", file=sys.stderr, flush=True)
        res = run_task(task, timeout)
        if self.args.json:  # progress survives an interrupted run
            with open(self.args.json + ".partial.jsonl", "a") as f:
                f.write(json.dumps({"section": section, "row": row, "name": name, "result": res}) + "\n")
        if self.args.verbose:
            extra = f"{res.get('img_s', 0):.2f} img/s" if res.get("img_s") else (res.get("error") or "")
            print(f"           -> {extra} ({res['wall_s']:.0f}s, load {res['load_before']:.1f})", file=sys.stderr, flush=True)
        self.results.append({"section": section, "row": row, "name": name, "task": task, "result": res})
        return res


def _variant(res: dict, name: str) -> dict | None:
    if not res or not res.get("ok"):
        return None
    return res.get("variants", {}).get(name)


def _speed_rows(r: Runner, args, section: str, batches: list[int]) -> list[list[str]]:
    rows = []
    for arch in args.archs:
        for dtype in args.dtypes:
            for batch in batches:
                row = dict(arch=arch, dtype=dtype, batch=batch)
                if section == "train":
                    rep, budget = args.train_repeats, args.train_budget
                else:
                    rep, budget = (args.repeats, args.budget) if batch > 1 else (max(args.repeats, 10), None)
                base = dict(arch=arch, dtype=dtype, batch=batch, repeats=rep, budget_s=budget)
                other = "fast" if section == "eval" else "plain"
                fl = r.run(section, row, "flax", dict(base, kind=f"flax_{section}", variants=["jit", other], chunk=args.chunk, xla_opts=args.xla_opts))
                to = r.run(section, row, "torch", dict(base, kind=f"torch_{section}", variants=["nchw", "cl"]))
                tc = None
                if arch in args.compile_archs and batch > 1 and (section == "eval" or (args.train_compile and dtype == "fp32")):
                    tc = r.run(section, row, "torch_compile", dict(base, kind=f"torch_{section}", variants=["compile"]), timeout=1800)
                speed = lambda res, k: (_variant(res, k) or {}).get("img_s")
                f, fa = speed(fl, "jit"), speed(fl, other)
                nchw, cl, comp = speed(to, "nchw"), speed(to, "cl"), speed(tc, "compile")
                best = max([v for v in (nchw, cl) if v], default=None)
                ratio = lambda a, b: f"{a / b:.2f}" if a and b else "-"
                err = "; ".join(x.get("error", "") for x in (fl, to, tc) if x and not x.get("ok"))
                flag = " *" if _loaded([fl, to, tc]) else ""
                digits = 1 if section == "eval" else 2
                rss = f"{_fmt(fl.get('peak_rss_mib'), 0)}/{_fmt(to.get('peak_rss_mib'), 0)}" + (f"/{_fmt(tc.get('peak_rss_mib'), 0)}" if tc else "")
                rows.append(
                    [arch, dtype, str(batch), _fmt(f, digits), _fmt(fa, digits), _fmt(nchw, digits), _fmt(cl, digits), _fmt(comp, digits), ratio(f, best), ratio(fa, best), ratio(fa, comp), rss + flag]
                    + ([err] if err else [])
                )
    return rows


SPEED_HEAD = ["arch", "dtype", "batch", "Flax jit", "Flax fast", "torch NCHW", "torch CL", "torch.compile", "Flax/torch", "fast/torch", "fast/compile", "RSS MiB Flax/torch/compile"]
# Train: the second Flax column is the escape hatch (every conv a plain XLA conv), for comparison with the default.
TRAIN_HEAD = [h.replace("Flax fast", "Flax plain XLA").replace("fast/", "plain/") for h in SPEED_HEAD]


def section_eval(r: Runner, args) -> str:
    rows = _speed_rows(r, args, "eval", args.batches)
    note = (
        f"Flax jit = `jax.jit(model.apply)` of the default model. Flax fast = `inference.fast_eval_model` (BN folded into the convs) "
        f"run by `inference.predict_fn(chunk={args.chunk})`. torch.compile runs channels_last. "
        "Ratios are against torch's best eager layout (and torch.compile). RSS: Flax process (both variants) / torch eager process (both layouts) / torch.compile process."
    )
    return "### Eval forward (img/s, higher is better)\n\n" + note + "\n\n" + markdown_table(SPEED_HEAD, [r_[: len(SPEED_HEAD)] for r_ in rows]) + _errors(rows)


def section_train(r: Runner, args) -> str:
    rows = _speed_rows(r, args, "train", args.train_batches)
    note = (
        "One step = forward in train mode (batch statistics), cross-entropy, backward, SGD momentum update, BN running stats. "
        "Flax: the library's `training.train_step_fn` under `jax.jit` with the state donated (Flax jit: the default model, on CPU "
        "with `flax_resnet.kernels`' CPU forms; Flax plain XLA: traced under `kernels.use_plain()`). torch: eager (and torch.compile of the model)."
    )
    return "### Train step (img/s, higher is better)\n\n" + note + "\n\n" + markdown_table(TRAIN_HEAD, [r_[: len(TRAIN_HEAD)] for r_ in rows]) + _errors(rows)


def _errors(rows) -> str:
    errs = [f"- {r_[0]} {r_[1]} batch {r_[2]}: {r_[-1]}" for r_ in rows if len(r_) > len(SPEED_HEAD)]
    return ("\n\nErrors:\n" + "\n".join(errs)) if errs else ""


def section_compile(r: Runner, args) -> str:
    head = ["arch", "step", "unrolled s", "scan s", "scan/unrolled", "scan+remat s", "scan+remat/unrolled", "first call unrolled/scan/scan+remat s", "RSS MiB unrolled/scan/scan+remat"]
    rows = []
    for arch in args.compile_depths:
        for mode in args.compile_modes:
            row = dict(arch=arch, mode=mode)
            res = {}
            for variant in ("unrolled", "scan") + (("scan_remat",) if mode == "train" else ()):
                res[variant] = r.run("compile", row, variant, dict(kind="compile", arch=arch, mode=mode, variant=variant, batch=args.compile_batch, xla_opts=args.xla_opts))
            tot = {k: (v["lower_s"] + v["compile_s"]) if v.get("ok") else None for k, v in res.items()}
            first = {k: v.get("first_call_s") if v.get("ok") else None for k, v in res.items()}
            ratio = lambda k: f"{tot[k] / tot['unrolled']:.2f}" if tot.get(k) and tot["unrolled"] else "-"
            flag = " *" if _loaded(res.values()) else ""
            rss = "/".join(_fmt(v.get("peak_rss_mib"), 0) for v in res.values())
            rows.append(
                [arch, mode, _fmt(tot["unrolled"], 2), _fmt(tot["scan"], 2), ratio("scan"), _fmt(tot.get("scan_remat"), 2), ratio("scan_remat"), "/".join(_fmt(v, 1) for v in first.values()), rss + flag]
            )
    return (
        f"### Compile time (batch {args.compile_batch}, {IMAGE}x{IMAGE}, fp32; `jax.jit(...).lower()` + `.compile()`; first call = lower + compile + first run)\n\n"
        "eval = `model.apply`; train = loss, gradients and an SGD update. scan = `ResNet(scan_blocks=True)`, + remat = `remat=True`.\n\n"
        + markdown_table(head, rows)
    )


def section_construct(r: Runner, args) -> str:
    rows = []
    for arch in args.construct_archs:
        res = r.run("construct", dict(arch=arch), "construct", dict(kind="construct", arch=arch, repeats=args.construct_repeats, jit_init=args.jit_init))
        if not res.get("ok"):
            rows.append([arch, res.get("error", "failed")] + ["-"] * 9)
            continue
        mib = res["bytes"] / 2**20
        flag = " *" if _loaded([res]) else ""
        rows.append(
            [
                arch,
                f"{mib:.0f}",
                _fmt(res["memcpy_s"] * 1e3, 0),
                _fmt(res["torch_to_flax_s"] * 1e3, 0),
                f"{res['torch_to_flax_s'] / res['memcpy_s']:.2f}",
                _fmt(res["torch_to_flax_scan_s"] * 1e3, 0),
                _fmt(res["flax_to_torch_s"] * 1e3, 0),
                _fmt(res["ready_s"], 2) + f" (first {res['ready_first_s']:.2f})",
                _fmt(res["ready_scan_s"], 2),
                _fmt(res.get("jit_init_s"), 1),
                _fmt(res.get("peak_rss_mib"), 0) + flag,
            ]
        )
    head = ["arch", "MiB", "np.copy ms", "torch_to_flax ms", "convert/copy", "…scan_blocks ms", "flax_to_torch ms", "ready to run s", "ready (scan) s", "jit(init) s", "RSS MiB"]
    return (
        "### Construction and conversion (fp32 weights; ready to run = from_torch + eval_shape check + device_put)\n\n" + markdown_table(head, rows)
    )


def section_nnx(r: Runner, args) -> str:
    """Flax NNX against Linen, one process per row (ResNet-50 fp32): eval forward and train step."""
    head = ["mode", "arch", "batch", "Linen jit", "NNX nnx.jit", "NNX cached_partial", "NNX split + jax.jit", "best NNX/Linen", "compile s Linen/nnx.jit"]
    rows = []
    for mode, batches in (("eval", [b for b in args.batches if b > 1] or args.batches), ("train", args.train_batches)):
        for arch in args.nnx_archs:
            for batch in batches:
                rep, budget = (args.train_repeats, args.train_budget) if mode == "train" else (args.repeats, args.budget)
                task = dict(kind="nnx", mode=mode, arch=arch, batch=batch, repeats=rep, budget_s=budget)
                res = r.run("nnx", dict(mode=mode, arch=arch, batch=batch), "nnx", task, timeout=1800 if mode == "train" else 900)  # four train compiles
                v = {k: (_variant(res, k) or {}) for k in ("linen", "nnx_jit", "nnx_cached", "nnx_split")}
                speed = {k: x.get("img_s") for k, x in v.items()}
                best = max([speed[k] for k in ("nnx_jit", "nnx_cached", "nnx_split") if speed[k]], default=None)
                ratio = f"{best / speed['linen']:.2f}" if best and speed["linen"] else "-"
                comp = f"{_fmt(v['linen'].get('compile_s'))}/{_fmt(v['nnx_jit'].get('compile_s'))}"
                flag = " *" if _loaded([res]) else ""
                digits = 1 if mode == "eval" else 2
                rows.append([mode, arch, str(batch)] + [_fmt(speed[k], digits) for k in v] + [ratio + flag, comp] + ([res.get("error", "")] if not res.get("ok") else []))
    note = (
        "The same weights and batch in one process, variants timed in turns. Linen jit: the eval/train rows' code (`inference.predict_fn`; "
        "`training.train_step_fn` under jit, state donated). NNX nnx.jit: `nnx.jit(lambda m, x: m(x))` / `flax_resnet.nnx.training.train_step`, "
        "which walks the model (and optimizer) graph on every call; cached_partial: the same under `nnx.cached_partial` (the walk cached); "
        "split + jax.jit: `nnx.split` once, then `jax.jit` of a pure function of the state (`nnx.merge` inside; train: donated). "
        "compile s: first call (compile included) of Linen and of nnx.jit."
    )
    errs = [f"- {r_[0]} {r_[1]} batch {r_[2]}: {r_[-1]}" for r_ in rows if len(r_) > len(head)]
    return "### Flax NNX vs Linen (img/s, higher is better)\n\n" + note + "\n\n" + markdown_table(head, [r_[: len(head)] for r_ in rows]) + (("\n\nErrors:\n" + "\n".join(errs)) if errs else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="resnet50 only, fewer repeats: a few minutes")
    p.add_argument("--json", metavar="FILE", help="write machine info and every measurement to FILE")
    p.add_argument("--archs", nargs="+", help="eval/train architectures (default resnet50 resnet101 resnet152; quick: resnet50)")
    p.add_argument("--batches", nargs="+", type=int, help="eval batch sizes (default 1 32)")
    p.add_argument("--train-batches", nargs="+", type=int, help="train batch sizes (default 32; quick: 32)")
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], help="default fp32 bf16")
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
