"""The one declarative mapping between torch state_dict keys and Flax variables.

``leaves(cfg)`` lists every torch key of a model with its Flax collection,
Flax path, shape and a named transform (``IDENTITY``, ``CONV_KERNEL``,
``DENSE_KERNEL``); the names come from ``archs.layers``. The transforms are
exact (transposes only), so torch -> Flax -> torch returns the same bytes.
``flax_resnet.convert`` walks this mapping in both directions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from flax_resnet import archs
from flax_resnet.archs import ArchSpec, check_layout, get_arch
from flax_resnet.config import ModelConfig

# ---------------------------------------------------------------------------
# The mapping


@dataclasses.dataclass(frozen=True)
class Transform:
    """A named, exact, invertible map between a torch and a Flax array."""

    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda a: a, lambda a: a)
# Conv OIHW -> HWIO; grouped convs keep I = in / groups on both sides.
CONV_KERNEL = Transform("conv_oihw_to_hwio", lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1))
# Linear (out, in) -> Dense (in, out).
DENSE_KERNEL = Transform("linear_to_dense", lambda a: a.T, lambda a: a.T)


def _reverse_axes3(a: np.ndarray, strip: int = 16) -> np.ndarray:
    """``np.ascontiguousarray(a.transpose(2, 1, 0))`` for a 3-d array, faster.

    Copies strips of ``strip`` rows of the first axis at a time, so each
    strip's source rows and destination cache lines stay in cache (numpy's
    plain transposed copy gathers one element per cache line). Exact: a copy.
    """
    out = np.empty(a.shape[::-1], a.dtype)
    view = out.transpose(2, 1, 0)
    for i in range(0, a.shape[0], strip):
        np.copyto(view[i : i + strip], a[i : i + strip])
    return out


def _oihw_to_hwio(a: np.ndarray) -> np.ndarray:
    o, i, h, w = a.shape
    return _reverse_axes3(np.ascontiguousarray(a).reshape(o, i, h * w)).reshape(h, w, i, o)


def _hwio_to_oihw(a: np.ndarray) -> np.ndarray:
    h, w, i, o = a.shape
    return _reverse_axes3(np.ascontiguousarray(a).reshape(h * w, i, o)).reshape(o, i, h, w)


def _transpose2(a: np.ndarray) -> np.ndarray:
    m, n = a.shape
    return _reverse_axes3(np.ascontiguousarray(a).reshape(m, 1, n)).reshape(n, m)


# The same maps, materialized (contiguous copies) fast; keyed by transform name.
_COPY_TO_FLAX = {"conv_oihw_to_hwio": _oihw_to_hwio, "linear_to_dense": _transpose2}
_COPY_TO_TORCH = {"conv_oihw_to_hwio": _hwio_to_oihw, "linear_to_dense": _transpose2}
_PARALLEL_BYTES = 8 << 20  # thread the copies of trees larger than this


def _materialize(jobs: list[tuple[Callable[[], np.ndarray], int]]) -> list[np.ndarray]:
    """Runs copy jobs ``(fn, nbytes)``, on a few threads when there is enough work (numpy releases the GIL)."""
    import os

    total = sum(n for _, n in jobs)
    workers = min(os.cpu_count() or 1, 8)
    if workers < 2 or total < _PARALLEL_BYTES:
        return [fn() for fn, _ in jobs]
    from concurrent.futures import ThreadPoolExecutor

    order = sorted(range(len(jobs)), key=lambda k: -jobs[k][1])  # largest first balances the threads
    out: list[Any] = [None] * len(jobs)
    with ThreadPoolExecutor(workers) as ex:
        for k, value in zip(order, ex.map(lambda k: jobs[k][0](), order)):
            out[k] = value
    return out


def _to_flax_copy(leaf: "Leaf", value: np.ndarray, dtype: Any) -> np.ndarray:
    fast = _COPY_TO_FLAX.get(leaf.transform.name)
    out = fast(value) if fast is not None and np.ndim(value) == len(leaf.torch_shape) else np.array(leaf.transform.to_flax(value), order="C")
    return out.astype(dtype, copy=False) if dtype is not None else out


def _to_torch_copy(leaf: "Leaf", value: np.ndarray) -> np.ndarray:
    fast = _COPY_TO_TORCH.get(leaf.transform.name)
    if fast is not None and np.ndim(value) == len(leaf.torch_shape):
        return fast(value)
    return np.array(leaf.transform.to_torch(value), order="C")


# torch leaf -> (Flax collection, Flax leaf, transform), per module kind.
RULES: dict[str, tuple[tuple[str, str, str, Transform], ...]] = {
    "conv": (("weight", "params", "kernel", CONV_KERNEL), ("bias", "params", "bias", IDENTITY)),
    "bn": (
        ("weight", "params", "scale", IDENTITY),
        ("bias", "params", "bias", IDENTITY),
        ("running_mean", "batch_stats", "mean", IDENTITY),
        ("running_var", "batch_stats", "var", IDENTITY),
    ),
    "linear": (("weight", "params", "kernel", DENSE_KERNEL), ("bias", "params", "bias", IDENTITY)),
}
# Flax leaf name -> torch leaf name (the rules read backwards; every kind agrees).
FLAX_TO_TORCH_LEAF = {f_leaf: t_leaf for rules in RULES.values() for t_leaf, _, f_leaf, _ in rules}
# torch-only state, dropped on the way in and written back on the way out.
IGNORED_BN_LEAVES = ("num_batches_tracked",)
PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
TRANSFORMERS_BASE = ("embedder.embedder.", "encoder.stages.")


@dataclasses.dataclass(frozen=True)
class Leaf:
    torch_key: str
    collection: str
    flax_path: tuple[str, ...]
    transform: Transform
    torch_shape: tuple[int, ...]

    @property
    def flax_shape(self) -> tuple[int, ...]:
        return tuple(self.transform.to_flax(np.empty(self.torch_shape, np.bool_)).shape)


def modules(spec: ArchSpec, layout: str, num_classes: int, in_channels: int):
    """Yields ``(torch_prefix, flax_path, kind, torch_shapes)`` for every module (from ``archs.layers``)."""
    for layer in archs.layers(spec, layout, num_classes, in_channels):
        if layer.kind == "conv":
            c = layer.conv
            shapes = {"weight": (c.out_ch, c.in_ch // c.groups, c.kernel, c.kernel)}
            if layout == "seed" or c.bias:
                shapes["bias"] = (c.out_ch,)
        elif layer.kind == "bn":
            shapes = {k: (layer.features,) for k in ("weight", "bias", "running_mean", "running_var")}
        else:
            shapes = {"weight": (layer.features, layer.in_features), "bias": (layer.features,)}
        yield layer.torch, layer.flax, layer.kind, shapes


def leaves(cfg: ModelConfig) -> list[Leaf]:
    """The full mapping for one model: every torch key and where it goes."""
    spec = get_arch(cfg.arch)
    check_layout(spec, cfg.layout)
    out = []
    for prefix, path, kind, shapes in modules(spec, cfg.layout, cfg.num_classes, cfg.in_channels):
        for t_leaf, collection, f_leaf, transform in RULES[kind]:
            if t_leaf in shapes:
                out.append(Leaf(f"{prefix}.{t_leaf}", collection, (*path, f_leaf), transform, shapes[t_leaf]))
    return out


def bn_prefixes(cfg: ModelConfig) -> list[str]:
    spec = get_arch(cfg.arch)
    return [p for p, _, kind, _ in modules(spec, cfg.layout, cfg.num_classes, cfg.in_channels) if kind == "bn"]
