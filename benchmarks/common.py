"""Worker-side helpers of the benchmarks: settings, weights and images, timing, peak RSS."""

from __future__ import annotations

import os
import statistics
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADED = 1.5  # load average above which a row is flagged (when other processes cannot be sampled)
OTHER_BUSY = 0.5  # mean runnable threads of other processes above which a row is flagged
IMAGE = 224
NUM_CLASSES = 1000


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
