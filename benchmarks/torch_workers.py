"""torch workers: one measurement each, in a fresh process (``benchmarks/run.py --worker``)."""

from __future__ import annotations

import time

from benchmarks.common import NUM_CLASSES, _images, _round_robin, _state_dict


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


def _torch_variants(task, train: bool, make_run) -> dict:
    """Times ``make_run(model, fn, x, labels)`` of each variant: ``nchw``, ``cl`` (channels_last), ``compile`` (torch.compile, channels_last)."""
    import torch

    fns = {}
    for variant in task["variants"]:
        model, x, labels = _torch_model(task["arch"], task["batch"], "nchw" if variant == "nchw" else "cl")
        model.train(train)
        fns[variant] = make_run(model, torch.compile(model) if variant == "compile" else model, x, labels)
    return _first_then_round_robin(fns, task)


def worker_torch_eval(task):
    """torch eval forward, variants ``nchw``, ``cl`` (channels_last) and ``compile`` (torch.compile, channels_last)."""
    import torch

    bf16 = task["dtype"] == "bf16"

    def make_run(model, fn, x, labels):
        def run():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                fn(x)

        return run

    return _torch_variants(task, False, make_run)


def worker_torch_train(task):
    """torch train step (SGD momentum), variants ``nchw``, ``cl`` and ``compile``."""
    import torch
    import torch.nn.functional as F

    bf16 = task["dtype"] == "bf16"

    def make_run(model, fn, x, labels):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def run():
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(fn(x), labels)
            loss.backward()
            opt.step()

        return run

    return _torch_variants(task, True, make_run)
