"""Flax workers: one measurement each, in a fresh process (``benchmarks/run.py --worker``); no torch unless the task needs it."""

from __future__ import annotations

import functools
import time
from typing import Any

from benchmarks.common import IMAGE, _images, _median_time, _round_robin, _state_dict


def _flax_model(arch: str, dtype: str, variant: str, kind: str):
    """The default model with converted weights; eval ``fast``: BatchNorm folded (``inference.fold``)."""
    import jax
    import jax.numpy as jnp

    import flax_resnet
    from flax_resnet import inference

    sd = _state_dict(arch)
    model, variables = flax_resnet.from_torch(sd, scan_blocks="scan" in variant, remat="remat" in variant)
    if dtype == "bf16":
        model = model.clone(dtype=jnp.bfloat16)
    if "fast" in variant and kind == "eval":
        model, variables = inference.fold(model, variables)
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
