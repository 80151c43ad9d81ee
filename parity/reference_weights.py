"""Weights, inputs and digests that need only numpy: the reference fixtures' shared recipe.

``tools/make_reference_fixtures.py`` (run against the real torchvision/timm
models) and ``tests/test_reference.py`` (run against ``torch_ref`` and the
Flax models) both build their weights here, so the checked-in fixtures hold
outputs, never weights. Every tensor is drawn from a numpy generator seeded by
its state_dict key, so it depends on nothing but the key and its shape.

This module imports neither torch nor jax (the fixture script's environment
has no jax, the tests' has an older torch).
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterable, Mapping

import numpy as np

# Batch 2 and few classes; an odd and an even size. At the even size 'SAME'
# padding differs from torch's at every stride-2 layer; the odd one is
# non-square and exercises odd sizes after each stride.
BATCH = 2
NUM_CLASSES = 7
SIZES = {"odd": (35, 45), "even": (40, 32)}
FEATURES = ("stem", "layer1", "layer2", "layer3", "layer4", "pre_logits")
STATS = ("running_mean", "running_var")


def generator(name: str) -> np.random.Generator:
    """A numpy generator seeded by ``name`` (the first 8 bytes of its SHA-256)."""
    return np.random.default_rng(int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little"))


def _last_bns(keys: Iterable[str]) -> set[str]:
    """``layerS.B.bnK`` with the largest K of each block: the last BN of a residual branch."""
    last: dict[str, int] = {}
    for k in keys:
        m = re.fullmatch(r"(layer\d+\.\d+)\.bn(\d+)\.weight", k)
        if m:
            last[m.group(1)] = max(last.get(m.group(1), 0), int(m.group(2)))
    return {f"{b}.bn{i}" for b, i in last.items()}


def reference_weights(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """A float64 state_dict (int64 ``num_batches_tracked``) for the given keys and shapes.

    Convs and ``fc.weight`` are N(0, 1/fan_in); BatchNorm scale is U(0.5, 1.5)
    (U(0.1, 0.5) for the last BN of a residual branch, so 200 layers stay
    O(1)), bias N(0, 0.2^2), running mean N(0, 0.1^2), running var U(0.5, 2)
    and ``num_batches_tracked`` a count in [1, 10000); other biases
    N(0, 0.1^2). Floats are float64 holding float32-exact values.

    Args:
        shapes: state_dict key -> shape.

    Returns:
        key -> numpy array, in the order of ``shapes``.
    """
    bns = {k.rsplit(".", 1)[0] for k in shapes if k.endswith(".running_var")}
    last = _last_bns(shapes)
    out = {}
    for key, shape in shapes.items():
        g = generator(key)
        prefix, leaf = key.rsplit(".", 1)
        shape = tuple(int(s) for s in shape)
        if leaf == "num_batches_tracked":
            out[key] = np.asarray(g.integers(1, 10_000), np.int64).reshape(shape)
            continue
        if prefix in bns:
            if leaf == "weight":
                lo, hi = (0.1, 0.5) if prefix in last else (0.5, 1.5)
                a = g.uniform(lo, hi, shape)
            elif leaf == "bias":
                a = 0.2 * g.standard_normal(shape)
            elif leaf == "running_mean":
                a = 0.1 * g.standard_normal(shape)
            elif leaf == "running_var":
                a = g.uniform(0.5, 2.0, shape)
            else:
                raise ValueError(f"unexpected BatchNorm key {key!r}")
        elif len(shape) >= 2:
            a = g.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        else:
            a = 0.1 * g.standard_normal(shape)
        # float32-exact, so a float32 model that loads them and then casts to float64 holds the same numbers.
        out[key] = a.astype(np.float32).astype(np.float64)
    return out


def images(size: str, channels: int = 3) -> np.ndarray:
    """The float64 NCHW input batch of ``SIZES[size]``."""
    h, w = SIZES[size]
    return generator(f"input:{size}").standard_normal((BATCH, channels, h, w))


def labels(size: str) -> np.ndarray:
    """The int64 class labels of ``images(size)``."""
    return generator(f"labels:{size}").integers(0, NUM_CLASSES, BATCH).astype(np.int64)


def digest(name: str, a: np.ndarray) -> float:
    """``sum(w * a)`` with fixed N(0, 1) weights ``w`` seeded by ``name``: one number that every entry moves.

    ``a`` is in torch's layout (NCHW activations, OIHW kernels).
    """
    a = np.asarray(a, np.float64).ravel()
    return float(generator(f"digest:{name}").standard_normal(a.size) @ a)


def digest_scale(name: str, a: np.ndarray) -> tuple[float, float]:
    """``(digest(name, a), sum(|w * a|))``: the digest and the magnitude its error is measured against, from one draw of ``w``."""
    a = np.asarray(a, np.float64).ravel()
    w = generator(f"digest:{name}").standard_normal(a.size)
    return float(w @ a), float(np.abs(w) @ np.abs(a))


def pooled(a: np.ndarray, channels: int = 8) -> np.ndarray:
    """The spatial mean of the first ``channels`` channels of an NCHW tensor (or the first entries of NC)."""
    a = np.asarray(a, np.float64)
    if a.ndim == 4:
        a = a.mean(axis=(2, 3))
    return a[:, :channels]


def stem_conv_key(keys: Iterable[str]) -> str:
    """The first conv of the stem: ``conv1.weight``, or ``conv1.0.weight`` of a deep stem."""
    return next(k for k in keys if k.startswith("conv1.") and k.endswith("weight"))


def last_bn_bias_key(keys: Iterable[str]) -> str:
    """The bias of the network's last BatchNorm that is not a shortcut's (in layer4)."""
    keys = list(keys)
    last = _last_bns(keys)
    return [f"{b}.bias" for b in sorted(last, key=lambda b: keys.index(f"{b}.weight")) if b.startswith("layer4.")][-1]
