"""Strict, two-way conversion between PyTorch state_dicts and Flax variables.

One declarative mapping drives both directions: ``leaves()`` lists every
torch key with its Flax collection, Flax path and a named transform; the
transforms are exact (transposes only), so torch -> Flax -> torch returns the
same bytes. Every problem (missing, unexpected, mis-shaped) is collected and
raised together in one ``ConversionError``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Collection, Mapping

import numpy as np

from flax_resnet import archs
from flax_resnet.archs import ARCHS, ArchSpec, check_layout, get_arch

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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What a state_dict says about its model."""

    arch: str
    layout: str
    num_classes: int
    in_channels: int

    @property
    def conv_bias(self) -> bool:
        return self.layout == "seed"


def modules(spec: ArchSpec, layout: str, num_classes: int, in_channels: int):
    """Yields ``(torch_prefix, flax_path, kind, torch_shapes)`` for every module (from ``archs.layers``)."""
    for layer in archs.layers(spec, layout, num_classes, in_channels):
        if layer.kind == "conv":
            c = layer.conv
            shapes = {"weight": (c.out_ch, c.in_ch // c.groups, c.kernel, c.kernel)}
            if layout == "seed":
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


def conv_bn_pairs(spec: ArchSpec):
    """Flax paths of every conv and the BatchNorm that follows it (``archs.conv_bn_pairs``)."""
    for conv, bn in archs.conv_bn_pairs(spec):
        yield conv.flax, bn.flax


def bn_prefixes(cfg: ModelConfig) -> list[str]:
    spec = get_arch(cfg.arch)
    return [p for p, _, kind, _ in modules(spec, cfg.layout, cfg.num_classes, cfg.in_channels) if kind == "bn"]


# ---------------------------------------------------------------------------
# Errors


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


# ---------------------------------------------------------------------------
# torch -> Flax


def _to_numpy(key: str, value: Any) -> np.ndarray:
    """A torch tensor (without importing torch) or array-like, as numpy; ``ConversionError`` naming ``key`` otherwise."""
    if type(value).__module__.startswith("torch"):
        layout, device, dtype = str(getattr(value, "layout", "")), str(getattr(value, "device", "")), str(getattr(value, "dtype", ""))
        if layout not in ("torch.strided", ""):
            raise ConversionError("a ResNet", other=[f"{key} is a {layout.removeprefix('torch.')} tensor; expected a dense one"])
        if device == "meta":
            raise ConversionError("a ResNet", other=[f"{key} is on the meta device (it holds no values)"])
        try:
            value = value.detach().cpu()
            if dtype == "torch.bfloat16":  # numpy has no bfloat16; reinterpret the bits
                import ml_dtypes
                import torch

                return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            return value.numpy()
        except (TypeError, RuntimeError, NotImplementedError) as e:
            raise ConversionError("a ResNet", other=[f"{key} has dtype {dtype.removeprefix('torch.')}, which cannot be converted ({type(e).__name__})"]) from None
    if isinstance(value, (str, bytes, Mapping)) or value is None:
        raise ConversionError("a ResNet", other=[f"{key} is a {type(value).__name__}, not a tensor"])
    a = np.asarray(value)
    if not (np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.bool_) or _is_float(a.dtype)):
        raise ConversionError("a ResNet", other=[f"{key} has dtype {a.dtype}, not a numeric tensor"])
    return a


def normalize_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Keys without ``module.``/``_orig_mod.`` prefixes, values as numpy arrays.

    Raises:
        ConversionError: with every key whose value is not a dense numeric
            tensor (str/None/dict values, meta-device, sparse or float8
            tensors), or a key that is not a string.
    """
    if not isinstance(state_dict, Mapping):
        raise ConversionError("a ResNet", other=[f"expected a state_dict (a mapping of key to tensor), got {type(state_dict).__name__}"])
    out, problems = {}, []
    for key, value in state_dict.items():
        if not isinstance(key, str):
            problems.append(f"state_dict key {key!r} is not a string")
            continue
        k = key
        for p in PREFIXES:
            while k.startswith(p):
                k = k[len(p) :]
        if k.startswith(TRANSFORMERS_BASE):  # transformers' ResNetModel/ResNetBackbone: no "resnet." prefix
            k = "resnet." + k
        try:
            out[k] = _to_numpy(key, value)
        except ConversionError as e:
            problems.extend(e.other)
    if problems:
        raise ConversionError("a ResNet", other=problems)
    return out


def _stage_sizes(keys) -> tuple[int, ...]:
    return tuple(len({k.split(".")[1] for k in keys if k.startswith(f"layer{s}.") and k.count(".") >= 2}) for s in (1, 2, 3, 4))


def infer_config(state_dict: Mapping[str, Any], arch: str | None = None, layout: str | None = None) -> ModelConfig:
    """Architecture, layout, num_classes and input channels from keys and shapes.

    Tells every row of ``ARCHS`` apart: block kind and stage sizes from the
    block keys; groups and width from ``layer1.0.conv2``; the stem from
    ``conv1.weight`` (7x7) or ``conv1.0/.3.weight`` (deep; widths give
    ``deep`` 32 or 64, or ``deep_tiered``); the shortcut from
    ``downsample.2`` keys (``avg_down``) or not (``conv``).

    Args:
        state_dict: a torch state_dict (tensors or numpy arrays).
        arch: force the architecture instead of inferring it.
        layout: force the layout instead of inferring it.

    Raises:
        ConversionError: the keys fit no known ResNet, or a key the
            inference reads has the wrong rank or is not a tensor.
    """
    sd = state_dict if all(isinstance(v, np.ndarray) for v in state_dict.values()) else normalize_state_dict(state_dict)
    if layout == "transformers" or (layout is None and any(k.startswith("resnet.embedder.") for k in sd)):
        cfg = infer_config(_torchvision_view(sd), arch=arch, layout="torchvision")
        check_layout(get_arch(cfg.arch), "transformers")
        return dataclasses.replace(cfg, layout="transformers")
    keys = set(sd)
    deep = "conv1.0.weight" in keys
    stem_key = "conv1.0.weight" if deep else "conv1.weight"
    required = [k for k in (stem_key, "layer1.0.conv1.weight") if k not in keys]
    if required:
        raise ConversionError("a ResNet", other=[f"not a ResNet state_dict (no {', '.join(required)})"])
    ranks = {stem_key: 4, "fc.weight": 2, "layer1.0.conv1.weight": 4, "conv1.3.weight": 4, "layer1.0.conv2.weight": 4}
    bad = [f"{k} has shape {tuple(sd[k].shape)}, expected a {n}-d weight" for k, n in ranks.items() if k in sd and sd[k].ndim != n]
    if bad:
        raise ConversionError("a ResNet", other=bad)

    if layout is None:
        seed = any(".identity_downsample." in k for k in keys) or "conv1.bias" in keys
        if seed and any(".downsample." in k for k in keys):
            raise ConversionError("a ResNet", other=["state_dict mixes 'identity_downsample' and 'downsample' keys"])
        layout = "seed" if seed else "torchvision"

    if arch is None:
        kind = "bottleneck" if "layer1.0.conv3.weight" in keys else "basic"
        sizes = _stage_sizes(keys)
        w2 = sd.get("layer1.0.conv2.weight")
        groups = width = None
        if kind == "bottleneck" and w2 is not None and w2.shape[1]:
            groups = w2.shape[0] // w2.shape[1]
            width = w2.shape[0] // groups
        stem, stem_width = "7x7", None
        if deep and "conv1.3.weight" in keys:
            first, stem_width = sd["conv1.0.weight"].shape[0], sd["conv1.3.weight"].shape[0]
            stem = "deep" if first == stem_width else "deep_tiered"
        shortcut = "avg_down" if any(k.startswith("layer") and ".downsample.2." in k for k in keys) else "conv"
        for spec in ARCHS.values():
            if (spec.block, spec.stage_sizes, spec.stem, spec.shortcut) != (kind, sizes, stem, shortcut):
                continue
            if stem != "7x7" and spec.stem_width != stem_width:
                continue
            if kind == "basic" or (spec.groups, spec.width_per_group) == (groups, width):
                arch = spec.name
                break
        else:
            found = f"{kind} blocks, stage sizes {sizes}" + (f", groups {groups}, width/group {width}" if groups else "")
            found += f", {stem} stem" + (f" of width {stem_width}" if stem_width else "") + f", {shortcut} shortcut"
            raise ConversionError("a ResNet", other=[f"no known architecture has {found}"])

    # No fc: a headless backbone (timm's num_classes=0, transformers' ResNetModel).
    num_classes = int(sd["fc.weight"].shape[0]) if "fc.weight" in sd else 0
    return ModelConfig(arch, layout, num_classes, int(sd[stem_key].shape[1]))


def _torchvision_view(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A transformers-layout state_dict under torchvision's key names (for ``infer_config``; unmapped keys left out)."""
    out = {}
    for key, value in sd.items():
        module, _, leaf = key.rpartition(".")
        name = archs.from_transformers_name(module)
        if name is not None:
            out[f"{name}.{leaf}"] = value
    return out


def _check_leaves(found: Mapping[str, Any], expected: Mapping[str, tuple], target: str, ignored: Collection[str] = ()) -> None:
    """The one key/shape/dtype validator: every problem collected into one ``ConversionError``."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected and k not in ignored]
    mismatched = [(k, shape, tuple(np.shape(found[k]))) for k, shape in expected.items() if k in found and tuple(np.shape(found[k])) != tuple(shape)]
    nonfloat = [
        f"{k} has dtype {_dtype_of(found[k])}, expected floating point"
        for k in expected
        if k in found and not _is_float(_dtype_of(found[k]))
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
    found = {"/".join((c, *k)): v for c in ("params", "batch_stats") for k, v in _flatten(variables.get(c, {})).items()}
    _check_leaves(found, expected, target or f"{cfg.arch} ({cfg.layout} layout) Flax variables")


def nonfinite(arrays: Mapping[str, Any]) -> list[tuple[str, int, int, int]]:
    """``(key, n_nan, n_inf, size)`` of every floating array with NaN or Inf values."""
    bad = []
    for key, a in arrays.items():
        a = np.asarray(a)
        if _is_float(a.dtype) and a.size:
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
    if dtype is not None and not _is_float(np.dtype(dtype)):
        raise ConversionError("Flax variables", other=[f"dtype {np.dtype(dtype).name} is not a floating dtype (weights would be truncated)"])


def torch_to_flax(
    state_dict: Mapping[str, Any],
    arch: str | None = None,
    layout: str | None = None,
    dtype: Any = None,
    scan_blocks: bool = False,
) -> dict[str, dict]:
    """Converts a PyTorch ResNet state_dict to Flax variables.

    Args:
        state_dict: ``model.state_dict()`` as it is (torch tensors) or numpy
            arrays; ``module.`` prefixes are stripped.
        arch: architecture name; inferred from keys and shapes if omitted.
        layout: ``"torchvision"`` or ``"seed"``; inferred if omitted.
        dtype: cast floating leaves to this (floating) dtype; ``None`` keeps
            the source dtype (a float64 state_dict gives float64 variables).
        scan_blocks: return the stacked tree of ``ResNet(scan_blocks=True)``
            (see ``stack_blocks``).

    Returns:
        ``{"params": ..., "batch_stats": ...}`` of numpy arrays that own
        their memory (changing the source afterwards changes nothing here),
        ready for ``model.apply``.

    Raises:
        ConversionError: with every missing key, unexpected key, shape
            mismatch and bad value at once; or a non-floating ``dtype``.
    """
    _check_float_dtype(dtype)
    sd = normalize_state_dict(state_dict)
    cfg = infer_config(sd, arch, layout)
    check_state_dict(sd, cfg)
    mapping = leaves(cfg)
    values = _materialize([(lambda leaf=leaf: _to_flax_copy(leaf, sd[leaf.torch_key], dtype), sd[leaf.torch_key].nbytes) for leaf in mapping])
    variables: dict[str, dict] = {}
    for leaf, value in zip(mapping, values):
        node = variables.setdefault(leaf.collection, {})
        for name in leaf.flax_path[:-1]:
            node = node.setdefault(name, {})
        node[leaf.flax_path[-1]] = value
    return stack_blocks(variables) if scan_blocks else variables


def _is_float(dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or str(dtype) == "bfloat16"


def from_torch(
    state_dict: Mapping[str, Any],
    arch: str | None = None,
    layout: str | None = None,
    param_dtype: Any = None,
    scan_blocks: bool = False,
    allow_nonfinite: bool = False,
    **model_kwargs: Any,
):
    """Builds the Flax model that matches a state_dict, and its variables.

    Args:
        state_dict: a torch ResNet state_dict (see ``torch_to_flax``).
        arch: force the architecture (else inferred).
        layout: force the layout (else inferred).
        param_dtype: cast the variables to this floating dtype (else the source's).
        scan_blocks: build ``ResNet(scan_blocks=True)`` and return its
            stacked variables.
        allow_nonfinite: accept NaN/Inf weights (refused by default, as
            ``load`` and ``flax-resnet convert`` refuse them).
        **model_kwargs: more ``ResNet`` attributes (``dtype``, ``precision``,
            ``stride_in_1x1``, ``axis_name``, ``remat``, ...).

    Returns:
        ``(model, variables)``; the variables own their memory.

    Raises:
        ConversionError: the state_dict does not fit (every problem at once),
            holds NaN/Inf, or ``param_dtype`` is not floating.
    """
    from flax_resnet.model import ResNet

    _check_float_dtype(param_dtype)
    sd = normalize_state_dict(state_dict)
    cfg = infer_config(sd, arch, layout)
    variables = torch_to_flax(sd, cfg.arch, cfg.layout, dtype=param_dtype, scan_blocks=scan_blocks)
    if not allow_nonfinite:
        check_finite({leaf.torch_key: sd[leaf.torch_key] for leaf in leaves(cfg)}, "Flax variables")
    kwargs = dict(param_dtype=param_dtype) if param_dtype is not None else {}
    kwargs.update(model_kwargs)
    model = ResNet(arch=cfg.arch, num_classes=cfg.num_classes, conv_bias=cfg.conv_bias, scan_blocks=scan_blocks, **kwargs)
    return model, variables


# ---------------------------------------------------------------------------
# Flax -> torch


def _flatten(tree: Mapping, prefix=()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


_FLAX_TO_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def infer_flax_config(variables: Mapping[str, Any], layout: str = "torchvision") -> tuple[ModelConfig, bool]:
    """``(config, has_conv_bias)`` of Flax ResNet variables (unrolled or stacked), from their tree.

    The tree is read as the torch keys and shapes it maps to, then
    ``infer_config`` decides; ``layout`` is the caller's choice.
    """
    if isinstance(variables, Mapping) and is_stacked(variables):
        variables = unstack_blocks(variables)
    params = variables.get("params", {}) if isinstance(variables, Mapping) else {}
    if not isinstance(params, Mapping) or not isinstance(params.get("conv1"), Mapping) or not isinstance(params.get("layer1"), Mapping):
        raise ConversionError("torch", other=["not Flax ResNet variables (need params/conv1 and params/layer1)"])
    as_torch = {}
    for path, v in _flatten(params).items():
        shape = tuple(np.shape(v))
        if path[-1] == "kernel":
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        as_torch[".".join((*path[:-1], _FLAX_TO_TORCH_LEAF.get(path[-1], path[-1])))] = np.empty(shape, np.bool_)
    cfg = infer_config(as_torch, layout="torchvision")
    stem = params["conv1"]
    has_bias = isinstance(stem, Mapping) and "bias" in stem
    return ModelConfig(cfg.arch, layout, cfg.num_classes, cfg.in_channels), has_bias


def flax_to_torch(variables: Mapping[str, Any], layout: str = "torchvision", num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """Converts Flax ResNet variables to a PyTorch state_dict of numpy arrays.

    The exact inverse of ``torch_to_flax``. Conv biases (seed-layout
    variables) exported to ``layout="torchvision"`` are folded into the
    following BatchNorm's running mean: ``BN(conv(x) + b)`` equals
    ``BN'(conv(x))`` with ``running_mean' = running_mean - b``, in eval mode
    and (the bias cancels against the batch mean) in train mode. Bias-free
    variables exported to ``"seed"`` get zero biases.

    Args:
        variables: ``{"params": ..., "batch_stats": ...}``, the unrolled
            tree or the stacked one of ``ResNet(scan_blocks=True)``.
        layout: ``"torchvision"`` or ``"seed"``.
        num_batches_tracked: value of every BN's ``num_batches_tracked``
            (torch-only state; Flax does not keep it).

    Returns:
        A state_dict (numpy arrays that own their memory) that loads with
        ``strict=True`` into ``torch_ref.ResNet(arch, layout=layout)`` and
        into torchvision/timm.

    Raises:
        ConversionError: with every missing, unexpected or mis-shaped leaf.
    """
    if isinstance(variables, Mapping) and is_stacked(variables):
        variables = unstack_blocks(variables)
    cfg, has_bias = infer_flax_config(variables, layout)
    src_cfg = ModelConfig(cfg.arch, "seed" if has_bias else "torchvision", cfg.num_classes, cfg.in_channels)
    check_variables(variables, src_cfg, f"torch {cfg.arch} (from Flax variables)")
    flat = {(c, *p): v for c in ("params", "batch_stats") for p, v in _flatten(variables.get(c, {})).items()}

    out: dict[str, np.ndarray] = {}
    mapping = leaves(cfg)
    present = [leaf for leaf in mapping if (leaf.collection, *leaf.flax_path) in flat]
    copies = dict(
        zip(
            (leaf.torch_key for leaf in present),
            _materialize([(lambda leaf=leaf: _to_torch_copy(leaf, np.asarray(flat[(leaf.collection, *leaf.flax_path)])), int(np.size(flat[(leaf.collection, *leaf.flax_path)])) * 4) for leaf in present]),
        )
    )
    for leaf in mapping:
        key = (leaf.collection, *leaf.flax_path)
        if key in flat:
            out[leaf.torch_key] = copies[leaf.torch_key]
        else:  # a seed-layout conv bias the bias-free source lacks
            like = np.asarray(flat[("params", *leaf.flax_path[:-1], "kernel")])
            out[leaf.torch_key] = np.zeros(leaf.torch_shape, like.dtype)
        if leaf.torch_key.endswith(".running_var"):  # torch's key order
            for name in IGNORED_BN_LEAVES:
                out[f"{leaf.torch_key.rsplit('.', 1)[0]}.{name}"] = np.array(num_batches_tracked, dtype=np.int64)
    if has_bias and layout != "seed":
        target = {(leaf.collection, *leaf.flax_path): leaf.torch_key for leaf in leaves(cfg)}
        for conv, bn in conv_bn_pairs(get_arch(cfg.arch)):
            key = target[("batch_stats", *bn, "mean")]
            out[key] = out[key] - np.asarray(flat[("params", *conv, "bias")])
    return out


# ---------------------------------------------------------------------------
# Scanned (stacked) trees


SCAN_NAME = "rest"  # the nn.scan over blocks 1..n-1 of a stage


def _is_stage(name: Any) -> bool:
    return isinstance(name, str) and name.startswith("layer") and name[5:].isdigit()


def is_stacked(variables: Mapping[str, Any]) -> bool:
    """Whether ``variables`` is the stacked tree of ``ResNet(scan_blocks=True)``."""
    for tree in variables.values():
        if isinstance(tree, Mapping):
            for name, stage in tree.items():
                if _is_stage(name) and isinstance(stage, Mapping) and SCAN_NAME in stage:
                    return True
    return False


def _stack(arrays: list) -> Any:
    if all(isinstance(a, np.ndarray) for a in arrays):
        return np.stack(arrays)
    import jax.numpy as jnp

    return jnp.stack(arrays)


def _tree_structure(tree: Any, prefix: tuple = ()) -> dict[tuple, tuple]:
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_tree_structure(v, (*prefix, k)))
        return out
    return {prefix: (tuple(np.shape(tree)), str(getattr(tree, "dtype", type(tree).__name__)))}


def _map_blocks(fn: Callable[[list], Any], blocks: list[Mapping]) -> Any:
    """Applies ``fn`` to the lists of corresponding leaves of identical trees."""
    first = blocks[0]
    if isinstance(first, Mapping):
        return {k: _map_blocks(fn, [b[k] for b in blocks]) for k in first}
    return fn(blocks)


def stack_blocks(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The unrolled tree -> the stacked tree of ``ResNet(scan_blocks=True)``.

    In every collection, blocks ``1..n-1`` of each ``layerN`` become one
    subtree ``layerN/rest`` whose leaves carry a leading axis of length
    ``n - 1`` (block ``i`` at index ``i - 1``); block ``0`` and everything
    else are kept as they are (not copied). Exact: ``unstack_blocks`` gives
    back the same bytes.

    Raises:
        ConversionError: the tree is already stacked, a stage's block names
            are not ``0..n-1``, or its repeated blocks differ in structure,
            shape or dtype.
    """
    if is_stacked(variables):
        raise ConversionError("stacked Flax variables", other=["variables are already stacked (have a layerN/rest subtree)"])
    problems = []
    out: dict[str, Any] = {}
    for collection, tree in variables.items():
        if not isinstance(tree, Mapping):
            out[collection] = tree
            continue
        new: dict[str, Any] = {}
        for name, stage in tree.items():
            if not (_is_stage(name) and isinstance(stage, Mapping)):
                new[name] = stage
                continue
            n = len(stage)
            if sorted(stage) != sorted(str(i) for i in range(n)):
                problems.append(f"{collection}/{name} has blocks {sorted(stage)}, expected 0..{n - 1}")
                continue
            if n < 2:
                new[name] = dict(stage)
                continue
            rest = [stage[str(i)] for i in range(1, n)]
            want = _tree_structure(rest[0])
            bad = [str(i) for i, b in enumerate(rest, start=1) if _tree_structure(b) != want]
            if bad:
                problems.append(f"{collection}/{name} blocks {', '.join(bad)} differ in structure, shape or dtype from block 1")
                continue
            new[name] = {"0": stage["0"], SCAN_NAME: _map_blocks(_stack, rest)}
        out[collection] = new
    if problems:
        raise ConversionError("stacked Flax variables", other=problems)
    return out


def unstack_blocks(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The stacked tree of ``ResNet(scan_blocks=True)`` -> the unrolled tree.

    The inverse of ``stack_blocks``: ``layerN/rest`` leaves of leading size
    ``n - 1`` become blocks ``1..n-1`` (numpy leaves as views, no copy).
    An unrolled tree comes back as it is.

    Raises:
        ConversionError: a stage has names other than ``0`` and ``rest``, or
            the leading sizes of its ``rest`` leaves differ.
    """
    problems = []
    out: dict[str, Any] = {}
    for collection, tree in variables.items():
        if not isinstance(tree, Mapping):
            out[collection] = tree
            continue
        new: dict[str, Any] = {}
        for name, stage in tree.items():
            if not (_is_stage(name) and isinstance(stage, Mapping) and SCAN_NAME in stage):
                new[name] = stage
                continue
            extra = sorted(k for k in stage if k not in ("0", SCAN_NAME))
            if extra:
                problems.append(f"{collection}/{name} mixes stacked blocks with unrolled ones ({', '.join(extra)})")
                continue
            sizes = {np.shape(a)[0] if np.ndim(a) else None for a in _tree_structure_leaves(stage[SCAN_NAME])}
            if len(sizes) != 1 or None in sizes:
                problems.append(f"{collection}/{name}/{SCAN_NAME} leaves have leading sizes {sorted(map(str, sizes))}, expected one")
                continue
            (m,) = sizes
            unrolled = {"0": stage["0"]} if "0" in stage else {}
            for i in range(m):
                unrolled[str(i + 1)] = _map_blocks(lambda a, i=i: a[0][i], [stage[SCAN_NAME]])
            new[name] = unrolled
        out[collection] = new
    if problems:
        raise ConversionError("unrolled Flax variables", other=problems)
    return out


def _tree_structure_leaves(tree: Any) -> list:
    if isinstance(tree, Mapping):
        return [leaf for v in tree.values() for leaf in _tree_structure_leaves(v)]
    return [tree]
