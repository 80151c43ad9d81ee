"""Strict, two-way conversion between PyTorch state_dicts and Flax variables.

One declarative mapping drives both directions: ``leaves()`` lists every
torch key with its Flax collection, Flax path and a named transform; the
transforms are exact (transposes only), so torch -> Flax -> torch returns the
same bytes. Every problem (missing, unexpected, mis-shaped) is collected and
raised together in one ``ConversionError``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from flax_resnet import archs
from flax_resnet.archs import ARCHS, check_layout, get_arch
from flax_resnet.config import ModelConfig, dtype_of, split_settings
from flax_resnet.model import ResNet

# Re-exported: the mapping, the validator and the stacked-tree helpers are part of this module's API.
from flax_resnet.mapping import (  # noqa: F401
    CONV_KERNEL,
    DENSE_KERNEL,
    FLAX_TO_TORCH_LEAF,
    IDENTITY,
    IGNORED_BN_LEAVES,
    PREFIXES,
    RULES,
    TRANSFORMERS_BASE,
    Leaf,
    Transform,
    _materialize,
    _to_flax_copy,
    _to_torch_copy,
    bn_prefixes,
    leaves,
    modules,
)
from flax_resnet.stacking import SCAN_NAME, is_stacked, stack_blocks, unstack_blocks  # noqa: F401
from flax_resnet.validate import (  # noqa: F401
    ConversionError,
    _check_float_dtype,
    check_finite,
    check_state_dict,
    check_variables,
    is_float,
    nonfinite,
)

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
    if not (np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.bool_) or is_float(a.dtype)):
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

    The architecture is the row of ``ARCHS`` whose key/shape signature,
    generated from the table (``mapping.leaves``), is the state_dict's (two
    rows with one signature raise). Only block kind and stage sizes are read
    from the key names first, to narrow the rows compared.

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

    # No fc: a headless backbone (timm's num_classes=0, transformers' ResNetModel).
    num_classes = int(sd["fc.weight"].shape[0]) if "fc.weight" in sd else 0
    in_channels = int(sd[stem_key].shape[1])
    if arch is None:
        arch = _match_row(sd, layout, num_classes, in_channels)
    return ModelConfig(arch, layout, num_classes, in_channels)


_STATS = ("running_mean", "running_var")


def _signature(name: str, layout: str, num_classes: int, in_channels: int, conv_bias: bool = False) -> dict[str, tuple[int, ...]]:
    """Row ``name``'s torch keys and shapes (``mapping.leaves``; torch-only ``num_batches_tracked`` left out).

    ``conv_bias``: every conv with a bias under torchvision's names (Flax
    variables of ``ResNet(conv_bias=True)``, read by ``infer_flax_config``).
    """
    sig = {leaf.torch_key: leaf.torch_shape for leaf in leaves(ModelConfig(name, layout, num_classes, in_channels))}
    if conv_bias:
        sig.update({f"{p}.bias": (s["weight"][0],) for p, _, kind, s in modules(get_arch(name), layout, num_classes, in_channels) if kind == "conv"})
    return sig


def _match_row(sd: Mapping[str, np.ndarray], layout: str, num_classes: int, in_channels: int) -> str:
    """The one row of ``ARCHS`` whose generated key/shape signature is the state_dict's.

    Rows with the state_dict's block kind and stage sizes (read from the key
    names) are compared key by key; an exact match wins, two exact matches
    raise. Without one, the unique closest row within a few keys (at most
    8, or 5% of the keys) is returned, and the caller's ``check_state_dict``
    names each missing, unexpected or mis-shaped key; a tie, or no row that
    close, raises, describing what the keys show.
    """
    keys = {k for k in sd if not k.endswith(IGNORED_BN_LEAVES)}
    stats = any(k.endswith(_STATS) for k in keys)
    conv_bias = layout == "torchvision" and ("conv1.bias" in keys or "conv1.0.bias" in keys)
    kind = "bottleneck" if "layer1.0.conv3.weight" in keys else "basic"
    sizes = _stage_sizes(keys)
    scored = []
    for spec in ARCHS.values():
        if (spec.block, spec.stage_sizes) != (kind, sizes) or (layout == "seed" and not spec.has_seed_layout):
            continue
        sig = _signature(spec.name, layout, num_classes, in_channels, conv_bias)
        if not stats:  # a params-only tree (infer_flax_config): compare the parameters
            sig = {k: v for k, v in sig.items() if not k.endswith(_STATS)}
        distance = len(keys ^ sig.keys()) + sum(tuple(sd[k].shape) != shape for k, shape in sig.items() if k in keys)
        scored.append((distance, spec.name))
    best = sorted(d for d, _ in scored)[:1]
    names = [n for d, n in scored if [d] == best]
    if len(names) > 1:
        kind_ = "same keys and shapes" if best == [0] else "keys and shapes equally close"
        raise ConversionError("a ResNet", other=[f"ambiguous state_dict: rows {', '.join(names)} have the {kind_}; pass arch="])
    if names and best[0] <= max(8, len(keys) // 20):  # exact, or a few keys off: check_state_dict names them
        return names[0]
    raise ConversionError("a ResNet", other=[f"no known architecture has {_describe(sd, keys, kind, sizes)}"])


def _describe(sd: Mapping[str, np.ndarray], keys: set, kind: str, sizes: tuple) -> str:
    """What the keys show, for the error of a state_dict no row fits."""
    found = f"{kind} blocks, stage sizes {sizes}"
    w2 = sd.get("layer1.0.conv2.weight")
    if kind == "bottleneck" and w2 is not None and w2.ndim == 4 and w2.shape[1]:
        found += f", groups {w2.shape[0] // w2.shape[1]}, width/group {w2.shape[1]}"
    if "conv1.3.weight" in keys:
        found += f", deep stem of width {sd['conv1.3.weight'].shape[0]}"
    else:
        found += ", 7x7 stem"
    found += ", avg_down shortcut" if any(k.startswith("layer") and ".downsample.2." in k for k in keys) else ", conv shortcut"
    if any(".se.fc1." in k for k in keys):
        found += ", squeeze-and-excitation"
    return found




def _torchvision_view(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A transformers-layout state_dict under torchvision's key names (for ``infer_config``; unmapped keys left out)."""
    out = {}
    for key, value in sd.items():
        module, _, leaf = key.rpartition(".")
        name = archs.from_transformers_name(module)
        if name is not None:
            out[f"{name}.{leaf}"] = value
    return out



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
    return _convert(sd, infer_config(sd, arch, layout), dtype, scan_blocks)


def _convert(sd: Mapping[str, np.ndarray], cfg: ModelConfig, dtype: Any, scan_blocks: bool) -> dict[str, dict]:
    """``torch_to_flax`` of a normalized state_dict whose config is known."""
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


def state_dict_variables(
    state_dict: Mapping[str, Any], arch: str | None = None, layout: str | None = None, param_dtype: Any = None, scan_blocks: bool = False,
    allow_nonfinite: bool = False, config: ModelConfig | None = None, **settings: Any,
) -> tuple[ModelConfig, dict]:
    """``(config, variables)`` of a torch state_dict: what each front end's ``from_torch`` builds from.

    The state_dict is normalized and its config inferred once; ``settings``
    (``ModelConfig`` fields: ``dtype``, ``precision``, ``stride_in_1x1``, ...)
    complete the config. A whole ``config`` instead is the model to build:
    the weights must be its architecture, classes and channels, and are cast
    to its ``param_dtype`` (stacked when it has ``scan_blocks``).
    """
    if config is not None:
        given = [name for name, v in (("arch", arch), ("layout", layout), ("param_dtype", param_dtype), ("scan_blocks", scan_blocks)) if v] + sorted(settings)
        if given:
            raise ValueError(f"from_torch: pass config, or {', '.join(given)}, not both (config.replace({given[0]}=...) changes the config)")
        arch, layout, param_dtype, scan_blocks = config.arch if isinstance(config.arch, str) else None, config.layout, config.param_dtype, config.scan_blocks
    _check_float_dtype(param_dtype)
    sd = normalize_state_dict(state_dict)
    cfg = infer_config(sd, arch, layout)
    if config is not None:
        if (cfg.spec, cfg.num_classes, cfg.in_channels) != (config.spec, config.num_classes, config.in_channels):
            raise ConversionError(f"{config.spec.name} ({config.num_classes} classes, {config.in_channels} channels)", other=[
                f"the state_dict holds a {cfg.spec.name} with {cfg.num_classes} classes and {cfg.in_channels} input channels"])
        cfg = config
    variables = _convert(sd, cfg, param_dtype, scan_blocks)
    if not allow_nonfinite:
        check_finite({leaf.torch_key: sd[leaf.torch_key] for leaf in leaves(cfg)}, "Flax variables")
    if config is not None:
        return config, variables
    dtype = dtype_of(variables)
    cfg = cfg.replace(**({"param_dtype": dtype} if dtype else {}), scan_blocks=scan_blocks, **settings)
    return cfg, variables


def from_torch(
    state_dict: Mapping[str, Any],
    arch: str | None = None,
    layout: str | None = None,
    param_dtype: Any = None,
    scan_blocks: bool = False,
    allow_nonfinite: bool = False,
    config: ModelConfig | None = None,
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
        config: the whole model description instead of ``arch``, ``layout``,
            ``param_dtype``, ``scan_blocks`` and settings: the weights must
            be its architecture, classes and channels.
        **model_kwargs: more ``ModelConfig`` fields (``dtype``, ``precision``,
            ``stride_in_1x1``, ``remat``, ...) and ``axis_name``.

    Returns:
        ``(model, variables)``; the variables own their memory and
        ``flax_resnet.model_config(model)`` is the inferred config (or ``config``).

    Raises:
        ConversionError: the state_dict does not fit (every problem at once),
            holds NaN/Inf, or ``param_dtype`` is not floating.
        ValueError: ``config`` together with ``arch``, ``layout`` or settings.
    """
    settings, runtime = split_settings(model_kwargs)
    cfg, variables = state_dict_variables(state_dict, arch, layout, param_dtype, scan_blocks, allow_nonfinite, config, **settings)
    return ResNet.from_config(cfg, **runtime), variables


# ---------------------------------------------------------------------------
# Flax -> torch


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
    for path, v in _flat(params).items():
        a = np.empty(np.shape(v), np.bool_)
        if path[-1] == "kernel":
            a = (CONV_KERNEL if a.ndim == 4 else DENSE_KERNEL).to_torch(a)
        as_torch[".".join((*path[:-1], FLAX_TO_TORCH_LEAF.get(path[-1], path[-1])))] = a
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
    flat = {(c, *p): v for c in ("params", "batch_stats") for p, v in _flat(variables.get(c, {})).items()}

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
        for conv, bn in archs.conv_bn_pairs(get_arch(cfg.arch)):
            key = target[("batch_stats", *bn.flax, "mean")]
            out[key] = out[key] - np.asarray(flat[("params", *conv.flax, "bias")])
    return out


def _flat(tree: Mapping) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(dict(tree))
