"""Strict, two-way conversion between PyTorch state_dicts and Flax variables.

One declarative mapping drives both directions: ``leaves()`` lists every
torch key with its Flax collection, Flax path and a named transform; the
transforms are exact (transposes only), so torch -> Flax -> torch returns the
same bytes. Every problem (missing, unexpected, mis-shaped) is collected and
raised together in one ``ConversionError``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from flax_resnet.archs import ARCHS, STEM_CHANNELS, ArchSpec, blocks, check_layout, get_arch

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
    out = fast(value) if fast is not None and np.ndim(value) == len(leaf.torch_shape) else np.ascontiguousarray(leaf.transform.to_flax(value))
    return out.astype(dtype) if dtype is not None else out


def _to_torch_copy(leaf: "Leaf", value: np.ndarray) -> np.ndarray:
    fast = _COPY_TO_TORCH.get(leaf.transform.name)
    if fast is not None and np.ndim(value) == len(leaf.torch_shape):
        return fast(value)
    return np.ascontiguousarray(leaf.transform.to_torch(value))


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
SHORTCUT = {"seed": "identity_downsample", "torchvision": "downsample"}
PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile


@dataclasses.dataclass(frozen=True)
class Leaf:
    torch_key: str
    collection: str
    flax_path: tuple[str, ...]
    transform: Transform
    torch_shape: tuple[int, ...]


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
    """Yields ``(torch_prefix, flax_path, kind, torch_shapes)`` for every module."""
    bias = layout == "seed"

    def conv(c_in, c_out, k, groups=1):
        shapes = {"weight": (c_out, c_in // groups, k, k)}
        if bias:
            shapes["bias"] = (c_out,)
        return "conv", shapes

    def bn(c):
        return "bn", {"weight": (c,), "bias": (c,), "running_mean": (c,), "running_var": (c,)}

    yield ("conv1", ("conv1",), *conv(in_channels, STEM_CHANNELS, 7))
    yield ("bn1", ("bn1",), *bn(STEM_CHANNELS))
    for b in blocks(spec):
        t, f = f"layer{b.stage}.{b.index}", (f"layer{b.stage}", str(b.index))
        for i, c in enumerate(b.convs, start=1):
            yield (f"{t}.conv{i}", (*f, f"conv{i}"), *conv(c.in_ch, c.out_ch, c.kernel, c.groups))
            yield (f"{t}.bn{i}", (*f, f"bn{i}"), *bn(c.out_ch))
        if b.downsample is not None:
            d = b.downsample
            yield (f"{t}.{SHORTCUT[layout]}.0", (*f, "downsample", "0"), *conv(d.in_ch, d.out_ch, 1))
            yield (f"{t}.{SHORTCUT[layout]}.1", (*f, "downsample", "1"), *bn(d.out_ch))
    yield ("fc", ("fc",), "linear", {"weight": (num_classes, spec.num_features), "bias": (num_classes,)})


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
    """Flax paths of every conv and the BatchNorm that follows it."""
    yield ("conv1",), ("bn1",)
    for b in blocks(spec):
        f = (f"layer{b.stage}", str(b.index))
        for i in range(1, len(b.convs) + 1):
            yield (*f, f"conv{i}"), (*f, f"bn{i}")
        if b.downsample is not None:
            yield (*f, "downsample", "0"), (*f, "downsample", "1")


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


def _to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (without importing torch) or array-like, as numpy."""
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16; reinterpret the bits
            import ml_dtypes

            import torch

            return value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


def normalize_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Keys without ``module.``/``_orig_mod.`` prefixes, values as numpy arrays."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a state_dict (a mapping of key to tensor), got {type(state_dict).__name__}")
    out = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict key {key!r} is not a string")
        k = key
        for p in PREFIXES:
            while k.startswith(p):
                k = k[len(p) :]
        out[k] = _to_numpy(value)
    return out


def infer_config(state_dict: Mapping[str, Any], arch: str | None = None, layout: str | None = None) -> ModelConfig:
    """Architecture, layout, num_classes and input channels from keys and shapes.

    Args:
        state_dict: a torch state_dict (tensors or numpy arrays).
        arch: force the architecture instead of inferring it.
        layout: force the layout instead of inferring it.

    Raises:
        ConversionError: the keys fit no known ResNet.
    """
    sd = state_dict if all(isinstance(v, np.ndarray) for v in state_dict.values()) else normalize_state_dict(state_dict)
    keys = set(sd)
    required = [k for k in ("conv1.weight", "fc.weight", "layer1.0.conv1.weight") if k not in keys]
    if required:
        raise ConversionError("a ResNet", other=[f"not a ResNet state_dict (no {', '.join(required)})"])

    if layout is None:
        seed = any(".identity_downsample." in k for k in keys) or "conv1.bias" in keys
        if seed and any(".downsample." in k for k in keys):
            raise ConversionError("a ResNet", other=["state_dict mixes 'identity_downsample' and 'downsample' keys"])
        layout = "seed" if seed else "torchvision"

    if arch is None:
        kind = "bottleneck" if "layer1.0.conv3.weight" in keys else "basic"
        sizes = tuple(len({k.split(".")[1] for k in keys if k.startswith(f"layer{s}.")}) for s in (1, 2, 3, 4))
        w2 = sd.get("layer1.0.conv2.weight")
        groups = width = None
        if kind == "bottleneck" and w2 is not None and w2.ndim == 4 and w2.shape[1]:
            groups = w2.shape[0] // w2.shape[1]
            width = w2.shape[0] // groups
        for spec in ARCHS.values():
            if spec.block == kind and spec.stage_sizes == sizes:
                if kind == "basic" or (spec.groups, spec.width_per_group) == (groups, width):
                    arch = spec.name
                    break
        else:
            found = f"{kind} blocks, stage sizes {sizes}" + (f", groups {groups}, width/group {width}" if groups else "")
            raise ConversionError("a ResNet", other=[f"no known architecture has {found}"])

    return ModelConfig(arch, layout, int(sd["fc.weight"].shape[0]), int(sd["conv1.weight"].shape[1]))


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
        dtype: cast floating leaves to this dtype; ``None`` keeps the source
            dtype (a float64 state_dict gives float64 variables).
        scan_blocks: return the stacked tree of ``ResNet(scan_blocks=True)``
            (see ``stack_blocks``).

    Returns:
        ``{"params": ..., "batch_stats": ...}`` of numpy arrays, ready for
        ``model.apply`` (``jax.device_put`` them to place them once).

    Raises:
        ConversionError: with every missing key, unexpected key and shape
            mismatch at once.
    """
    sd = normalize_state_dict(state_dict)
    cfg = infer_config(sd, arch, layout)
    mapping = leaves(cfg)
    known = {leaf.torch_key for leaf in mapping} | {f"{p}.{i}" for p in bn_prefixes(cfg) for i in IGNORED_BN_LEAVES}
    missing = [leaf.torch_key for leaf in mapping if leaf.torch_key not in sd]
    unexpected = [k for k in sd if k not in known]
    mismatched = [
        (leaf.torch_key, leaf.torch_shape, sd[leaf.torch_key].shape)
        for leaf in mapping
        if leaf.torch_key in sd and tuple(sd[leaf.torch_key].shape) != leaf.torch_shape
    ]
    nonfloat = [
        f"{leaf.torch_key} has dtype {sd[leaf.torch_key].dtype}, expected floating point"
        for leaf in mapping
        if leaf.torch_key in sd and not _is_float(sd[leaf.torch_key].dtype)
    ]
    if missing or unexpected or mismatched or nonfloat:
        raise ConversionError(f"{cfg.arch} ({cfg.layout} layout)", missing, unexpected, mismatched, nonfloat)

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
    **model_kwargs: Any,
):
    """Builds the Flax model that matches a state_dict, and its variables.

    Args:
        state_dict: a torch ResNet state_dict (see ``torch_to_flax``).
        arch: force the architecture (else inferred).
        layout: force the layout (else inferred).
        param_dtype: cast the variables to this dtype (else the source's).
        scan_blocks: build ``ResNet(scan_blocks=True)`` and return its
            stacked variables.
        **model_kwargs: more ``ResNet`` attributes (``dtype``, ``precision``,
            ``stride_in_1x1``, ``axis_name``, ``remat``, ...).

    Returns:
        ``(model, variables)``.
    """
    from flax_resnet.model import ResNet

    sd = normalize_state_dict(state_dict)
    cfg = infer_config(sd, arch, layout)
    variables = torch_to_flax(sd, cfg.arch, cfg.layout, dtype=param_dtype, scan_blocks=scan_blocks)
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


def infer_flax_config(variables: Mapping[str, Any], layout: str = "torchvision") -> tuple[ModelConfig, bool]:
    """``(config, has_conv_bias)`` of Flax ResNet variables (unrolled or stacked), from their tree."""
    if isinstance(variables, Mapping) and is_stacked(variables):
        variables = unstack_blocks(variables)
    params = variables.get("params", {}) if isinstance(variables, Mapping) else {}
    try:
        as_torch = {
            "conv1.weight": np.empty(np.shape(params["conv1"]["kernel"])[::-1]),
            "fc.weight": np.empty(np.shape(params["fc"]["kernel"])[::-1]),
            "layer1.0.conv1.weight": np.empty(0),
        }
    except (KeyError, TypeError):
        raise ConversionError("torch", other=["not Flax ResNet variables (need params/conv1/kernel and params/fc/kernel)"]) from None
    for s in (1, 2, 3, 4):
        for i in params.get(f"layer{s}", {}):
            as_torch[f"layer{s}.{i}.x"] = np.empty(0)
    block0 = params.get("layer1", {}).get("0", {})
    if "conv3" in block0:
        as_torch["layer1.0.conv3.weight"] = np.empty(0)
        k = np.shape(block0["conv2"]["kernel"])  # HWIO
        as_torch["layer1.0.conv2.weight"] = np.empty((k[3], k[2], k[0], k[1]))
    # The layout is the caller's choice on the way out; arch comes from the tree.
    cfg = infer_config(as_torch, layout="torchvision")
    return ModelConfig(cfg.arch, layout, cfg.num_classes, cfg.in_channels), "bias" in params["conv1"]


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
        A state_dict (numpy arrays) that loads with ``strict=True`` into
        ``torch_ref.ResNet(arch, layout=layout)`` and into torchvision/timm.

    Raises:
        ConversionError: with every missing, unexpected or mis-shaped leaf.
    """
    if isinstance(variables, Mapping) and is_stacked(variables):
        variables = unstack_blocks(variables)
    cfg, has_bias = infer_flax_config(variables, layout)
    flat = {(c, *p): v for c in ("params", "batch_stats") for p, v in _flatten(variables.get(c, {})).items()}
    src_cfg = ModelConfig(cfg.arch, "seed" if has_bias else "torchvision", cfg.num_classes, cfg.in_channels)
    src_mapping = leaves(src_cfg)
    expected = {(leaf.collection, *leaf.flax_path): leaf for leaf in src_mapping}
    missing = ["/".join(k) for k in expected if k not in flat]
    unexpected = ["/".join(k) for k in flat if k not in expected]
    mismatched = []
    for k, leaf in expected.items():
        if k in flat:
            want = tuple(leaf.transform.to_flax(np.empty(leaf.torch_shape, np.bool_)).shape)
            if tuple(np.shape(flat[k])) != want:
                mismatched.append(("/".join(k), want, np.shape(flat[k])))
    if missing or unexpected or mismatched:
        raise ConversionError(f"torch {cfg.arch} (from Flax variables)", missing, unexpected, mismatched)

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
    if has_bias and layout == "torchvision":
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
