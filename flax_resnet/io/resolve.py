"""From a raw ``Checkpoint`` to validated Flax variables, and back out: ``load``, ``save``, ``read_state_dict``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from flax import nnx

from flax_resnet.archs import check_layout, get_arch
from flax_resnet.builder import build, check_api, model_config
from flax_resnet.config import DTYPES, ModelConfig, dtype_of, split_settings
from flax_resnet.convert import (
    ConversionError,
    check_finite,
    check_variables,
    flax_to_torch,
    is_float,
    infer_config,
    infer_flax_config,
    is_stacked,
    leaves,
    normalize_state_dict,
    stack_blocks,
    torch_to_flax,
    unstack_blocks,
)
from flax_resnet.io import formats
from flax_resnet.io.atomic import atomic_output, check_output
from flax_resnet.io.common import (
    FLAX_COLLECTIONS,
    CheckpointError,
    as_dtype,
    cast_tree,
    deferred_interrupts,
    flat,
    path_bytes,
    to_numpy_tree,
    tree_dtype,
    tree_size,
)
from flax_resnet.io.formats import META_VERSION, SAFETENSORS_META_KEY, Checkpoint, read
from flax_resnet.io.sniff import FLAX_NATIVE, FORMATS, format_for_path
from flax_resnet.nnx.convert import from_linen, to_linen
from flax_resnet.nnx.model import ResNet as NNXResNet

OUTPUT_LAYOUTS = ("torchvision", "seed", "transformers", "flax")
TORCH_LAYOUTS = ("torchvision", "seed", "transformers")
BN_STATS = (".running_mean", ".running_var", ".num_batches_tracked")


@dataclasses.dataclass
class Resolved:
    config: ModelConfig  # layout: of ``variables`` (seed = conv biases)
    variables: dict  # unrolled (not stacked)
    num_batches_tracked: Any  # int, {flax BN path: int}, or None (the source had none)
    source: Checkpoint


# ---------------------------------------------------------------------------
# num_batches_tracked (torch-only state, kept in the file's metadata)


def _count(value: Any, where: str) -> int:
    """A ``num_batches_tracked`` as a non-negative int, or a one-line error naming ``where``."""
    a = np.asarray(value)
    if a.size != 1 or not (np.issubdtype(a.dtype, np.integer) or (is_float(a) and np.isfinite(a).all() and float(a.reshape(-1)[0]).is_integer())):
        shown = a.reshape(-1)[0].item() if a.size == 1 else f"an array of shape {a.shape}"
        raise CheckpointError(f"{where}: num_batches_tracked must be a whole number, found {shown!r}")
    n = int(a.reshape(-1)[0])
    if n < 0:
        raise CheckpointError(f"{where}: num_batches_tracked must not be negative, found {n}")
    return n


def nbt_from_torch(sd: Mapping[str, np.ndarray], cfg: ModelConfig, where: str = "state_dict") -> Any:
    to_flax = {
        leaf.torch_key[: -len(".running_mean")]: "/".join(leaf.flax_path[:-1]) for leaf in leaves(cfg) if leaf.torch_key.endswith(".running_mean")
    }
    values = {}
    for prefix, fpath in to_flax.items():
        key = f"{prefix}.num_batches_tracked"
        if key in sd:
            values[fpath] = _count(sd[key], f"{where}: {key}") if np.size(sd[key]) else 0
    if not values:
        return None
    distinct = set(values.values())
    return distinct.pop() if len(distinct) == 1 and len(values) == len(to_flax) else values


def _nbt_from_meta(meta: Mapping, where: str) -> Any:
    nbt = meta.get("num_batches_tracked", 0) if meta else 0
    if nbt is None:
        return None
    field = f"{where}: metadata num_batches_tracked"
    if isinstance(nbt, Mapping):
        return {str(k): _count(v, f"{field}[{k!r}]") for k, v in nbt.items()}
    return _count(nbt, field)


def apply_nbt(sd: dict[str, np.ndarray], cfg: ModelConfig, nbt: Any) -> dict[str, np.ndarray]:
    """Sets (or drops) ``num_batches_tracked`` and puts each after its BN's running_var, as torch does."""
    by_flax = {"/".join(leaf.flax_path[:-1]): leaf.torch_key[: -len(".running_mean")] for leaf in leaves(cfg) if leaf.torch_key.endswith(".running_mean")}
    per_prefix = {by_flax[k]: int(v) for k, v in nbt.items() if k in by_flax} if isinstance(nbt, Mapping) else {}
    out: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        if key.endswith(".num_batches_tracked"):
            continue
        out[key] = value
        if key.endswith(".running_var") and nbt is not None:
            prefix = key[: -len(".running_var")]
            n = per_prefix.get(prefix, 0) if isinstance(nbt, Mapping) else int(nbt)
            out[f"{prefix}.num_batches_tracked"] = np.array(n, dtype=np.int64)
    return out


# ---------------------------------------------------------------------------
# validation


def relayout(variables: dict, cfg: ModelConfig, layout: str) -> dict:
    """Flax variables in another layout: conv biases folded into BN (torchvision) or zero (seed)."""
    if layout == cfg.layout:
        return variables
    return torch_to_flax(flax_to_torch(variables, layout=layout), cfg.arch, layout)


def resolve(ck: Checkpoint, arch: str | None = None, layout: str | None = None, allow_nonfinite: bool = False) -> Resolved:
    """Validates a checkpoint strictly and converts it to (unrolled) Flax variables.

    Args:
        ck: from ``read``.
        arch: the architecture the file must hold (else inferred); a wrong one
            raises a ``ConversionError`` listing mismatching keys and shapes.
        layout: ``"torchvision"`` (bias-free convs) or ``"seed"`` (conv biases)
            for the returned variables; ``None`` keeps the file's.
        allow_nonfinite: accept NaN/Inf weights.
    """
    arch = None if arch in (None, "auto") else get_arch(arch).name
    if arch is None and ck.meta.get("source") == "timm":  # a timm model directory names its architecture
        arch = ck.meta.get("arch")
    if layout not in (None, *TORCH_LAYOUTS):
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(TORCH_LAYOUTS)}")
    where = str(ck.path)
    if ck.keys == "torch":
        sd = ck.tensors
        try:
            cfg = infer_config(sd, arch)
        except ConversionError as e:
            raise ConversionError(f"a ResNet from {where}", e.missing, e.unexpected, e.mismatched, e.other) from None
        try:
            variables = torch_to_flax(sd, cfg.arch, cfg.layout)
        except ConversionError as e:
            target = f"{cfg.arch} ({cfg.layout} layout) from {where}"
            if arch is not None:
                with contextlib.suppress(ConversionError, ValueError):
                    held = infer_config(sd)
                    if held.arch != arch:
                        target += f", which holds a {held.arch}"
            raise ConversionError(target, e.missing, e.unexpected, e.mismatched, e.other) from None
        nbt = nbt_from_torch(sd, cfg, where)
    else:
        tree = ck.tensors
        if is_stacked(tree):  # a ResNet(scan_blocks=True) tree: files and checks use the unrolled one
            try:
                tree = unstack_blocks(tree)
            except ConversionError as e:
                raise ConversionError(f"Flax ResNet variables from {where}", other=e.other) from None
        try:
            fcfg, has_bias = infer_flax_config(tree)
        except ConversionError as e:
            raise ConversionError(f"Flax ResNet variables from {where}", e.missing, e.unexpected, e.mismatched, e.other) from None
        cfg = ModelConfig(fcfg.arch, "seed" if has_bias and fcfg.spec.has_seed_layout else "torchvision", fcfg.num_classes, fcfg.in_channels, conv_bias=has_bias)
        if arch is not None and arch != cfg.arch:
            check_variables(tree, cfg.replace(arch=arch), f"{arch} from {where} (which holds {cfg.arch})")
        check_variables(tree, cfg, f"{cfg.arch} ({cfg.layout} layout) from {where}")
        variables = {c: tree[c] for c in FLAX_COLLECTIONS if c in tree}
        nbt = _nbt_from_meta(ck.meta, where)
    if not allow_nonfinite:
        check_finite(ck.flat(), where, CheckpointError)
    cfg = stored_config(cfg, ck.meta, where, flax_keys=ck.keys != "torch")
    if layout is not None and layout != cfg.layout:
        check_layout(get_arch(cfg.arch), layout)
        variables = relayout(variables, cfg, layout)
        cfg = cfg.replace(layout=layout)
    return Resolved(cfg, variables, nbt, ck)


def stored_config(found: ModelConfig, meta: Mapping, where: str, flax_keys: bool = False) -> ModelConfig:
    """``found`` (what the weights hold) with the settings the file's metadata stores.

    ``meta["config"]`` is the ``ModelConfig.to_dict()`` that ``save`` writes;
    its architecture, classes and input channels must be the weights'. Torch
    keys fix the layout; Flax keys keep the stored one (e.g. ``"transformers"``)
    while it agrees with the conv biases. Older files and model directories
    store at most ``stride_in_1x1``.
    """
    stored = meta.get("config") if meta else None
    if stored is None:
        return found.replace(stride_in_1x1=True) if meta and meta.get("stride_in_1x1") is True else found
    try:
        saved = ModelConfig.from_dict(stored)
    except ValueError as e:
        raise CheckpointError(f"{where}: metadata config: {e}") from None
    held, says = (found.spec, found.num_classes, found.in_channels), (saved.spec, saved.num_classes, saved.in_channels)
    if says != held:
        raise CheckpointError(f"{where}: metadata config describes {saved.spec.name} ({saved.num_classes} classes, {saved.in_channels} channels) but the weights hold {found.spec.name} ({found.num_classes}, {found.in_channels})")
    if flax_keys and saved.conv_bias == found.conv_bias:
        return saved.replace(arch=found.arch, layout=saved.layout, conv_bias=saved.conv_bias)
    return saved.replace(arch=found.arch, layout=found.layout, conv_bias=found.conv_bias)


# ---------------------------------------------------------------------------
# reading API


def torch_state(r: Resolved, layout: str) -> dict[str, np.ndarray]:
    check_layout(get_arch(r.config.arch), layout)
    sd = flax_to_torch(r.variables, layout=layout)
    return apply_nbt(sd, r.config.replace(layout=layout), r.num_batches_tracked)


def read_state_dict(path: str | os.PathLike, layout: str | None = None) -> dict[str, np.ndarray]:
    """A torch-layout state_dict (numpy arrays) from any supported file.

    Torch-key files come back as stored, unwrapped and with prefixes
    stripped (not validated against an architecture). Flax files are
    converted with ``flax_to_torch`` (``layout`` defaults to the variables'
    own: seed if the convs have biases), restoring ``num_batches_tracked``
    from the file's metadata.
    """
    with deferred_interrupts():
        ck = read(path)
        if ck.keys == "torch" and layout is None:
            return ck.tensors
        r = resolve(ck, allow_nonfinite=True)
        return torch_state(r, layout or r.config.layout)


def load_variables(
    path: str | os.PathLike, arch: str | None = None, layout: str | None = None, param_dtype: Any = None, allow_nonfinite: bool = False,
    **settings: Any,
) -> tuple[ModelConfig, dict]:
    """``(config, variables)`` (unrolled) from any supported file; see ``load``.

    The config is the weights' (architecture, layout, classes, input
    channels, param dtype) with the settings the file stores (``save``'s
    metadata, a model directory's ``config.json``), then ``settings``
    (``ModelConfig`` fields) on top.
    """
    with deferred_interrupts():
        r = resolve(read(path), arch, layout, allow_nonfinite)
    variables = cast_tree(r.variables, as_dtype(param_dtype))
    dtype = dtype_of(variables)
    return r.config.replace(**({"param_dtype": dtype} if dtype else {}), **settings), variables


def load(
    path: str | os.PathLike,
    arch: str | None = None,
    layout: str | None = None,
    dtype: Any = None,
    allow_nonfinite: bool = False,
    param_dtype: Any = None,
    api: str = "linen",
    **model_kwargs: Any,
):
    """Loads any checkpoint as a Flax model and its variables (Linen), or as an NNX model.

    Args:
        path: a ``.pth``/``.pt``/``.bin`` (torchvision, timm, a training
            run's checkpoint), ``.safetensors``, ``.npz``, Flax ``.msgpack``
            file, or an Orbax checkpoint directory (also a
            ``CheckpointManager`` step or root directory).
        arch: the architecture the file must hold (else inferred from keys
            and shapes); a wrong one raises a ``ConversionError`` listing
            the mismatching keys and shapes.
        layout: ``"torchvision"`` or ``"seed"`` for the returned variables
            (conv biases folded into BN or added as zeros); ``None`` keeps
            the file's.
        dtype: the model's compute dtype (``ModelConfig.dtype``, e.g.
            ``jnp.bfloat16`` for mixed precision); ``None`` keeps the stored one.
        allow_nonfinite: accept NaN/Inf weights.
        param_dtype: cast floating variables (``"float32"``, ``"bfloat16"``
            or a dtype); ``None`` keeps the file's.
        api: ``"linen"``, or ``"nnx"`` for a ``flax_resnet.nnx.ResNet``
            holding the weights; both are ``flax_resnet.build`` of the one
            config ``load_variables`` returns.
        **model_kwargs: more ``ModelConfig`` fields (``precision``, ...)
            over the stored ones, and ``axis_name``; ``scan_blocks=True``
            returns the stacked variables it needs, whichever tree the file holds.

    Returns:
        ``(model, variables)``: a ``flax_resnet.ResNet`` and
        ``{"params", "batch_stats"}`` of numpy arrays for ``model.apply``;
        with ``api="nnx"``, the NNX model alone (in train mode, as every new
        NNX model). ``flax_resnet.model_config(model, variables)`` is the
        config ``load_variables`` returns.
    """
    check_api(api)
    settings, runtime = split_settings(model_kwargs)
    cfg, variables = load_variables(path, arch, layout, param_dtype, allow_nonfinite, **({"dtype": dtype} if dtype is not None else {}), **settings)
    if cfg.scan_blocks:
        variables = stack_blocks(variables)
    if api == "nnx":
        return from_linen(nnx.eval_shape(lambda: build(cfg, "nnx", **runtime)), variables, allow_nonfinite=True)  # load_variables applied the finite rule
    return build(cfg, **runtime), variables


# ---------------------------------------------------------------------------
# writing API


def _meta_for(cfg: ModelConfig, variables: Mapping, nbt: Any, extra: Mapping | None) -> dict:
    meta = {
        "format_version": META_VERSION,
        "arch": cfg.arch,
        "layout": cfg.layout,
        "num_classes": cfg.num_classes,
        "in_channels": cfg.in_channels,
        "num_batches_tracked": nbt,
        "dtype": tree_dtype(variables.get("params", {})),
    }
    meta.update(extra or {})
    meta["config"] = cfg.replace(**({"param_dtype": meta["dtype"]} if meta["dtype"] in DTYPES else {})).to_dict()
    return meta


def write_resolved(p: Path, fmt: str, r: Resolved, layout: str | None, force: bool, extra_meta: Mapping | None, dtype=None) -> dict:
    """Writes resolved variables as ``fmt`` (re-laid out, then cast to ``dtype``); returns what was written."""
    if layout is not None and layout not in OUTPUT_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(OUTPUT_LAYOUTS)}")
    if layout == "flax" and fmt == "pth":
        raise ValueError("layout 'flax' (flattened Flax keys) is for .safetensors/.npz outputs; a .pth holds a torch state_dict")
    if layout in TORCH_LAYOUTS:
        check_layout(get_arch(r.config.arch), layout)
    flax_keys = fmt in FLAX_NATIVE or layout == "flax"
    if flax_keys:
        if layout in TORCH_LAYOUTS and layout != r.config.layout:
            variables = relayout(r.variables, r.config, layout)
            cfg = r.config.replace(layout=layout)
        else:
            variables, cfg = r.variables, r.config
        variables = cast_tree(variables, dtype)
        tensors = flat({c: variables[c] for c in FLAX_COLLECTIONS if c in variables})
        num_params, num_stats = tree_size(variables["params"]), tree_size(variables.get("batch_stats", {}))
    else:
        cfg = r.config.replace(layout=layout) if layout else r.config
        tensors = cast_tree(torch_state(r, cfg.layout), dtype)  # fold seed biases in full precision, then cast
        variables = cast_tree(r.variables, dtype)
        num_params = sum(int(np.size(v)) for k, v in tensors.items() if not k.endswith(BN_STATS))
        num_stats = sum(int(np.size(v)) for k, v in tensors.items() if k.endswith(BN_STATS[:2]))
    meta = _meta_for(cfg, variables, r.num_batches_tracked, extra_meta)
    with atomic_output(p, fmt, force) as tmp:
        if fmt == "msgpack":
            formats.write_msgpack(tmp, variables, meta)
        elif fmt == "orbax":
            formats.write_orbax(tmp, variables, meta)
        elif fmt == "safetensors":
            header = {"format": "flax" if flax_keys else "pt", SAFETENSORS_META_KEY: json.dumps(meta)}
            formats.write_safetensors(tmp, tensors, header)
        elif fmt == "npz":
            formats.write_npz(tmp, tensors, meta)
        elif fmt == "pth":
            formats.write_pth(tmp, tensors)
        else:
            raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return {
        "path": str(p),
        "format": fmt,
        "keys": "flax" if flax_keys else "torch",
        "layout": cfg.layout,
        "arch": cfg.arch,
        "num_classes": cfg.num_classes,
        "num_params": num_params,
        "num_stats": num_stats,
        "dtype": tree_dtype(variables["params"]),
        "bytes": path_bytes(p),
    }


def save(
    path: str | os.PathLike,
    variables: Mapping[str, Any],
    *,
    format: str | None = None,
    layout: str | None = None,
    dtype: Any = None,
    force: bool = False,
    meta: Mapping[str, Any] | None = None,
    allow_nonfinite: bool = False,
    config: ModelConfig | None = None,
) -> dict:
    """Writes Flax variables (or a torch state_dict) to a checkpoint, atomically.

    Args:
        path: output file, or directory for Orbax; missing parent
            directories are created.
        variables: ``{"params", "batch_stats"}`` (numpy or jax arrays; the
            unrolled tree or the stacked one of ``ResNet(scan_blocks=True)``,
            written unrolled), a torch-layout state_dict, or a
            ``flax_resnet.nnx.ResNet`` (its ``to_linen`` variables).
        format: one of ``FORMATS``; ``None`` follows ``path``'s suffix
            (``.msgpack``, ``.safetensors``, ``.npz``, ``.pth``/``.pt``/``.bin``;
            none: an Orbax checkpoint directory).
        layout: torch key layout of ``.pth``/``.safetensors``/``.npz``
            outputs, ``"torchvision"`` or ``"seed"``, or ``"flax"`` for
            flattened Flax keys in ``.safetensors``/``.npz``; for Flax
            outputs, ``"torchvision"``/``"seed"`` folds or adds conv biases.
            ``None`` keeps the variables' own layout (seed iff conv biases).
        dtype: cast floating leaves (``"float32"``, ``"bfloat16"``).
        force: overwrite an existing output.
        meta: extra metadata to store (e.g. ``{"num_batches_tracked": 3}``).
        allow_nonfinite: write NaN/Inf weights instead of refusing.
        config: the model's ``ModelConfig`` (``flax_resnet.model_config(model,
            variables)``), stored in the metadata of ``.msgpack``, Orbax,
            ``.safetensors`` and ``.npz`` outputs so that ``load`` rebuilds the
            same model (v1 strides, dtypes, precision, BN settings, ...); an
            NNX model's own config is used when ``variables`` is one. Without
            it the settings the weights cannot show take their defaults.

    Returns:
        ``{"path", "format", "keys", "layout", "arch", "num_classes",
        "num_params", "num_stats", "dtype", "bytes"}``.
    """
    fmt = format or format_for_path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_output(path, fmt, force)
    if isinstance(variables, NNXResNet):  # an NNX model: its Linen variables and its config
        config = model_config(variables) if config is None else config
        variables = to_linen(variables)
    if config is not None and not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a flax_resnet.ModelConfig, got {type(config).__name__}")
    stored = {**(meta or {}), **({"config": config.to_dict()} if config is not None else {})}
    with deferred_interrupts():
        if "params" in variables:
            tree = to_numpy_tree({k: variables[k] for k in FLAX_COLLECTIONS if k in variables})
            ck = Checkpoint(Path("<variables>"), "memory", "flax", tree, stored)
        else:
            ck = Checkpoint(Path("<state_dict>"), "memory", "torch", normalize_state_dict(variables), stored)
        r = resolve(ck, allow_nonfinite=allow_nonfinite)
        return write_resolved(Path(path), fmt, r, layout, force, meta, as_dtype(dtype))
