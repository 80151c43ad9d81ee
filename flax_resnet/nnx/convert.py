"""Exact conversion between NNX ResNets, Linen variables and torch state_dicts.

An NNX ResNet's state paths are the Linen variable paths (``layer1/0/conv2``,
``layer1/0/downsample/0``, ``layer3/rest`` when scanned) with the collection
given by the variable type (``nnx.Param`` -> ``params``, ``nnx.BatchStat`` ->
``batch_stats``), so Linen <-> NNX is a relabeling that moves no bytes, and
torch <-> NNX goes through the Linen converter (``flax_resnet.convert``),
with its layouts, strictness and collected errors.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx, traverse_util

from flax_resnet.archs import ArchSpec, get_arch
from flax_resnet.config import ModelConfig, dtype_of, split_settings
from flax_resnet.convert import (
    ConversionError,
    check_finite,
    check_variables,
    flax_to_torch,
    infer_flax_config,
    is_stacked,
    stack_blocks,
    state_dict_variables,
    unstack_blocks,
)
from flax_resnet.nnx.model import ResNet

COLLECTIONS = {nnx.Param: "params", nnx.BatchStat: "batch_stats"}


def _collection(var: nnx.Variable, path: tuple) -> str:
    for kind, name in COLLECTIONS.items():
        if isinstance(var, kind):
            return name
    raise ConversionError("Linen variables", other=[f"{'/'.join(map(str, path))} is an {type(var).__name__}, not a Param or BatchStat"])


def _flat_state(node: ResNet | nnx.State) -> list[tuple[tuple[str, ...], str, nnx.Variable]]:
    """``(path, collection, variable)`` of every variable, path parts as strings."""
    state = node if isinstance(node, nnx.State) else nnx.state(node)
    return [(tuple(str(p) for p in path), _collection(var, path), var) for path, var in nnx.to_flat_state(state)]


def to_linen(model: ResNet | nnx.State) -> dict[str, dict]:
    """The Linen variables of ``model``: ``{"params": ..., "batch_stats": ...}``.

    The tree ``flax_resnet.ResNet`` with the same settings applies (stacked
    under ``layerN/rest`` for ``scan_blocks=True``); its leaves are the
    model's own arrays (no copy). An ``nnx.State`` of the model (e.g. the
    gradients of ``nnx.grad``) maps the same way; collections it lacks come
    back empty.
    """
    if not isinstance(model, (ResNet, nnx.State)):
        raise TypeError(f"to_linen expects a flax_resnet.nnx.ResNet or its nnx.State, got {type(model).__name__}")
    flat: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for path, collection, var in _flat_state(model):
        flat[collection][path] = var[...]
    return {c: traverse_util.unflatten_dict(t) for c, t in flat.items()}


def from_linen(model_or_arch: ResNet | ModelConfig | str | ArchSpec, variables: Mapping[str, Any], allow_nonfinite: bool = False, **model_kwargs: Any) -> ResNet:
    """An NNX ResNet holding Linen ResNet variables (exactly; the arrays are placed, not changed).

    Args:
        model_or_arch: an ``flax_resnet.nnx.ResNet`` to fill in place, a
            ``ModelConfig`` to build one for, or an architecture name /
            ``ArchSpec`` (num_classes, input channels, conv bias, param dtype
            and ``scan_blocks`` then come from ``variables``). No weights are
            initialized.
        variables: ``{"params": ..., "batch_stats": ...}`` of
            ``flax_resnet.ResNet``, unrolled or stacked (``scan_blocks``);
            restacked to the model's form.
        **model_kwargs: with an architecture or config, more ``ModelConfig``
            fields (``dtype``, ``scan_blocks``, ``remat``, ``precision``, ...)
            and ``axis_name``.
        allow_nonfinite: accept NaN/Inf values (refused by default: the one
            rule of ``flax_resnet.convert.check_finite``).

    Returns:
        The model (the same object when one was given), in train mode when
        newly built, like any new NNX ResNet.

    Raises:
        ConversionError: every missing, unexpected and mis-shaped leaf at
            once; NaN/Inf values.
    """
    target = f"NNX {getattr(model_or_arch, 'arch', getattr(model_or_arch, 'name', model_or_arch))}"
    if not isinstance(variables, Mapping):
        raise ConversionError(target, other=[f"expected Linen variables (a mapping), got {type(variables).__name__}"])
    if isinstance(model_or_arch, ResNet):
        if model_kwargs:
            raise TypeError(f"model arguments {sorted(model_kwargs)} only apply when building from an architecture name or config")
        model = model_or_arch
    else:
        settings, runtime = split_settings(model_kwargs)
        if isinstance(model_or_arch, ModelConfig):
            cfg = model_or_arch.replace(**settings)
        else:
            found, has_bias = infer_flax_config(variables)
            dtype = dtype_of(variables)
            cfg = ModelConfig(
                model_or_arch, "seed" if has_bias and get_arch(model_or_arch).has_seed_layout else "torchvision", found.num_classes, found.in_channels,
                conv_bias=has_bias, scan_blocks=is_stacked(variables), **({"param_dtype": dtype} if dtype else {}),
            ).replace(**settings)
        model = nnx.eval_shape(lambda: ResNet.from_config(cfg, **runtime))

    unrolled = unstack_blocks(variables) if is_stacked(variables) else variables
    layout = "seed" if model.conv_bias else "torchvision"
    state = _flat_state(model)
    if model.features_only:  # timm's features_only: the full model's variables, the head and later stages dropped
        keep = {p[0] for p, _, _ in state}
        unrolled = {c: {k: v for k, v in t.items() if k in keep} for c, t in unrolled.items() if isinstance(t, Mapping)}
    else:
        check_variables(unrolled, ModelConfig(model.spec, layout, model.num_classes, model.in_channels, conv_bias=model.conv_bias), f"NNX {model.arch}")
    if not allow_nonfinite:
        check_finite(traverse_util.flatten_dict(dict(unrolled), sep="/"), f"NNX {model.arch}")
    tree = stack_blocks(unrolled) if model.scan_blocks else unrolled
    flat = {(c, *map(str, p)): v for c in ("params", "batch_stats") for p, v in traverse_util.flatten_dict(dict(tree.get(c, {}))).items()}
    want = {(c, *p): tuple(var.shape) for p, c, var in state}
    if set(flat) != set(want) or any(np.shape(flat[k]) != shape for k, shape in want.items()):  # the model's paths are Linen's by construction
        missing = sorted("/".join(k) for k in set(want) - set(flat))
        wrong = sorted("/".join(k) for k in set(want) & set(flat) if np.shape(flat[k]) != want[k])
        raise ConversionError(f"NNX {model.arch}", other=[f"missing {', '.join(missing[:5]) or 'nothing'}; mis-shaped {', '.join(wrong[:5]) or 'nothing'}"])
    values = jax.device_put([flat[(c, *p)] for p, c, _ in state])
    for (_, _, var), value in zip(state, values):
        var.set_value(value)
    return model


def from_torch(
    state_dict: Mapping[str, Any], arch: str | None = None, layout: str | None = None, param_dtype: Any = None, scan_blocks: bool = False,
    allow_nonfinite: bool = False, config: ModelConfig | None = None, **model_kwargs: Any,
) -> ResNet:
    """The NNX ResNet of a torch state_dict (every layout ``flax_resnet.from_torch`` reads).

    Args:
        state_dict: a torch ResNet state_dict (tensors or numpy arrays;
            ``module.``/``_orig_mod.`` prefixes are stripped).
        arch: force the architecture (else inferred from keys and shapes).
        layout: force the layout (``"torchvision"``, ``"seed"``, ``"transformers"``).
        param_dtype: cast the weights to this dtype (else the source's).
        scan_blocks: stack each stage's repeated blocks (``nnx.scan``).
        allow_nonfinite: accept NaN/Inf weights (refused by default, as
            ``flax_resnet.from_torch`` does).
        config: the whole model description instead of ``arch``, ``layout``,
            ``param_dtype``, ``scan_blocks`` and settings (as ``flax_resnet.from_torch``).
        **model_kwargs: more ``ModelConfig`` fields (``dtype``, ``precision``,
            ``stride_in_1x1``, ``remat``, ...) and ``axis_name``.

    Returns:
        The model, in train mode (call ``model.eval()`` for inference);
        ``flax_resnet.model_config(model)`` is the config the Linen
        ``from_torch`` gives for the same arguments.

    Raises:
        ConversionError: every missing key, unexpected key and shape mismatch at once.
    """
    settings, runtime = split_settings(model_kwargs)
    cfg, variables = state_dict_variables(state_dict, arch, layout, param_dtype, scan_blocks, allow_nonfinite, config, **settings)
    return from_linen(cfg, variables, allow_nonfinite=True, **runtime)  # state_dict_variables applied the finite rule


def to_torch(model: ResNet, layout: str = "torchvision", num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """A torch state_dict (numpy arrays) of an NNX ResNet; ``flax_to_torch`` of ``to_linen(model)``.

    Loads with ``strict=True`` into ``torch_ref.ResNet(arch, layout=layout)``
    and torchvision/timm; the exact inverse of ``from_torch``.
    """
    return flax_to_torch(jax.device_get(to_linen(model)), layout=layout, num_batches_tracked=num_batches_tracked)


class LinenApply:
    """An NNX ResNet behind the Linen calling convention: ``apply(variables, x, train=..., method=..., mutable=...)``.

    For code written against ``flax_resnet.ResNet`` (the parity harness, the
    benchmarks): each ``apply`` merges the Linen ``variables`` (e.g.
    ``to_linen(model)``) into the NNX model's graph, sets BatchNorm's mode
    from ``train``, and runs the NNX modules; with ``mutable`` it also returns
    the updated ``batch_stats``. Pure, so it works under ``jax.jit`` and
    ``jax.grad`` like ``ResNet.apply``.
    """

    def __init__(self, model: ResNet):
        self.graphdef, state = nnx.split(model)
        self.template = [(path, tuple(str(p) for p in path), _collection(var, path), var) for path, var in nnx.to_flat_state(state)]
        self.arch = model.arch
        self.scan_blocks = model.scan_blocks

    def merge(self, variables: Mapping[str, Any]) -> ResNet:
        """The NNX model holding ``variables`` (Linen tree of this model's form)."""
        flat = []
        for path, keys, collection, var in self.template:
            node = variables[collection]
            for k in keys:
                node = node[k]
            flat.append((path, var.replace(node)))
        return nnx.merge(self.graphdef, nnx.from_flat_state(flat))

    def apply(self, variables: Mapping[str, Any], x: jax.Array, train: bool = False, blocks: bool = False, method: str | None = None, mutable: Any = False):
        """``flax_resnet.ResNet.apply`` of the NNX modules (``method``: None, ``"intermediates"`` or ``"features"``)."""
        model = self.merge(variables)
        if train:
            model.train()
        else:
            model.eval()
        if method is None:
            out = model(x)
        elif method == "intermediates":
            out = model.intermediates(x, blocks=blocks)
        elif method == "features":
            out = model.features(x)
        else:
            raise ValueError(f"unknown method {method!r}: use None, 'intermediates' or 'features'")
        if mutable:
            return out, {"batch_stats": to_linen(model)["batch_stats"]}
        return out
