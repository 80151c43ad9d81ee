"""The one validator: keys, shapes, dtypes and finiteness, every problem collected into one ``ConversionError``."""

from __future__ import annotations

from typing import Any, Collection, Mapping

import numpy as np
from flax import traverse_util

from flax_resnet.mapping import IGNORED_BN_LEAVES, ModelConfig, bn_prefixes, leaves

class ConversionError(ValueError):
    """Every mismatch between a state_dict and a model, collected.

    Attributes:
        missing: keys the model needs that the source lacks.
        unexpected: source keys the model has no place for.
        mismatched: ``(key, expected_shape, found_shape)`` triples.
        other: any other problem, as text.
    """

    def __init__(self, target: str, missing=(), unexpected=(), mismatched=(), other=()):
        self.target = target
        self.missing, self.unexpected = list(missing), list(unexpected)
        self.mismatched, self.other = list(mismatched), list(other)
        super().__init__(self._message())

    def _message(self, limit: int = 12) -> str:
        def listed(items):
            items = list(items)
            more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
            return ", ".join(items[:limit]) + more

        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing key(s): {listed(self.missing)}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected key(s): {listed(self.unexpected)}")
        if self.mismatched:
            shapes = (f"{k} expected {tuple(e)} found {tuple(f)}" for k, e, f in self.mismatched)
            parts.append(f"{len(self.mismatched)} shape mismatch(es): {listed(shapes)}")
        parts.extend(self.other)
        return f"cannot convert to {self.target}: " + "; ".join(parts)


def is_float(a: Any) -> bool:
    """Whether an array (or dtype) is floating point, bfloat16 included: the project's one such test."""
    d = np.dtype(getattr(a, "dtype", a))
    return np.issubdtype(d, np.floating) or d.name == "bfloat16"


def _check_leaves(found: Mapping[str, Any], expected: Mapping[str, tuple], target: str, ignored: Collection[str] = ()) -> None:
    """The one key/shape/dtype validator: every problem collected into one ``ConversionError``."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected and k not in ignored]
    mismatched = [(k, shape, tuple(np.shape(found[k]))) for k, shape in expected.items() if k in found and tuple(np.shape(found[k])) != tuple(shape)]
    nonfloat = [
        f"{k} has dtype {_dtype_of(found[k])}, expected floating point"
        for k in expected
        if k in found and not is_float(_dtype_of(found[k]))
    ]
    if missing or unexpected or mismatched or nonfloat:
        raise ConversionError(target, missing, unexpected, mismatched, nonfloat)


def _dtype_of(a: Any):
    return a.dtype if hasattr(a, "dtype") else np.asarray(a).dtype


def check_state_dict(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig, target: str | None = None) -> None:
    """Checks a (normalized) torch state_dict against ``cfg``: keys, shapes, floating dtypes.

    ``num_batches_tracked`` keys are accepted (torch-only state).

    Raises:
        ConversionError: with every missing, unexpected, mis-shaped and
            non-floating key at once.
    """
    mapping = leaves(cfg)
    ignored = {f"{p}.{i}" for p in bn_prefixes(cfg) for i in IGNORED_BN_LEAVES}
    _check_leaves(state_dict, {leaf.torch_key: leaf.torch_shape for leaf in mapping}, target or f"{cfg.arch} ({cfg.layout} layout)", ignored)


def check_variables(variables: Mapping[str, Any], cfg: ModelConfig, target: str | None = None) -> None:
    """Checks Flax variables (``params``/``batch_stats``, unrolled) against ``cfg``.

    Every leaf of the model must be present, known, rightly shaped and
    floating. ``cfg.layout == "seed"`` expects conv biases.

    Raises:
        ConversionError: with every missing, unexpected, mis-shaped and
            non-floating leaf (``params/layer1/0/conv1/kernel``) at once.
    """
    try:
        mapping = leaves(cfg)
    except ValueError as e:
        raise ConversionError(target or "Flax variables", other=[str(e)]) from None
    expected = {"/".join((leaf.collection, *leaf.flax_path)): leaf.flax_shape for leaf in mapping}
    found = {"/".join((c, *k)): v for c in ("params", "batch_stats") for k, v in traverse_util.flatten_dict(dict(variables.get(c, {}))).items()}
    _check_leaves(found, expected, target or f"{cfg.arch} ({cfg.layout} layout) Flax variables")


def nonfinite(arrays: Mapping[str, Any]) -> list[tuple[str, int, int, int]]:
    """``(key, n_nan, n_inf, size)`` of every floating array with NaN or Inf values."""
    bad = []
    for key, a in arrays.items():
        a = np.asarray(a)
        if is_float(a.dtype) and a.size:
            finite = np.isfinite(a)
            if not finite.all():
                n_nan = int(np.isnan(a).sum())
                bad.append((key, n_nan, int(a.size - finite.sum()) - n_nan, int(a.size)))
    return bad


def check_finite(arrays: Mapping[str, Any], where: str, error: type[Exception] | None = None) -> None:
    """The one rule for NaN/Inf weights: refuse them, naming the first tensor.

    Raises:
        ConversionError (or ``error``): some floating array holds NaN or Inf.
    """
    bad = nonfinite(arrays)
    if bad:
        key, n_nan, n_inf, size = bad[0]
        more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
        msg = f"non-finite values in {key} ({n_nan} NaN, {n_inf} Inf of {size}){more}; refusing it (use allow_nonfinite / --allow-nonfinite to accept)"
        if error is not None:
            raise error(f"{where}: {msg}")
        raise ConversionError(where, other=[msg])


def _check_float_dtype(dtype: Any) -> None:
    if dtype is not None and not is_float(np.dtype(dtype)):
        raise ConversionError("Flax variables", other=[f"dtype {np.dtype(dtype).name} is not a floating dtype (weights would be truncated)"])
