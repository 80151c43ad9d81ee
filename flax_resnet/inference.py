"""Inference helpers: BatchNorm folded into the convolutions.

In eval mode a BatchNorm is a per-channel affine map of the conv before it,
``BN(conv(x, K) + b) = conv(x, K * alpha) + (b - mean) * alpha + bias`` with
``alpha = scale / sqrt(var + eps)``, so the pair becomes one conv with a
bias: one pass over each activation less. The fold is computed in float64
and cast back to each kernel's dtype, so a folded model agrees with the
unfolded one to the rounding of its dtype (float64: ~1e-15; float32: a few
ulps per layer), not bit for bit.

Works on the unrolled tree and on the stacked one of
``ResNet(scan_blocks=True)`` (leading block axes broadcast).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import numpy as np
from flax import traverse_util

from flax_resnet import archs
from flax_resnet.archs import get_arch
from flax_resnet.convert import ConversionError, infer_flax_config, is_stacked, stack_blocks, unstack_blocks
from flax_resnet.model import ResNet

__all__ = ["fold_batchnorm", "fold", "FoldedResNet", "predict_fn", "FAST_COMPILE_OPTIONS"]


def fold_batchnorm(variables: Mapping[str, Any], eps: float = 1e-5) -> dict[str, Any]:
    """Variables of the folded model (``fold``): every BatchNorm folded into its conv.

    The pairs come from ``archs.conv_bn_pairs`` (the one conv -> BN pairing).

    Args:
        variables: ``{"params": ..., "batch_stats": ...}`` of a ResNet
            (unrolled or stacked; with or without conv biases).
        eps: the BatchNorms' epsilon (``ResNet.bn_eps``, torch's 1e-5).

    Returns:
        ``{"params": ...}`` (numpy arrays; stacked if the input was): each
        conv with ``kernel`` and ``bias``, no BatchNorm parameters and no
        ``batch_stats``.

    Raises:
        ConversionError: a BatchNorm lacks its running statistics.
    """
    if "batch_stats" not in variables:
        raise ConversionError("folded Flax variables", other=["no batch_stats: the running statistics are needed to fold"])
    stacked = is_stacked(variables)
    if stacked:
        variables = unstack_blocks(variables)
    cfg, _ = infer_flax_config(variables)
    params = traverse_util.flatten_dict(variables["params"])
    stats = traverse_util.flatten_dict(variables["batch_stats"])
    problems, f64 = [], np.float64
    for conv, bn in archs.conv_bn_pairs(get_arch(cfg.arch)):
        c, b = conv.flax, bn.flax
        if (*b, "mean") not in stats or (*b, "var") not in stats:
            problems.append(f"batch_stats/{'/'.join(b)} missing (mean and var are needed to fold)")
            continue
        kernel = np.asarray(params[(*c, "kernel")])
        alpha = np.asarray(params.pop((*b, "scale")), f64) / np.sqrt(np.asarray(stats[(*b, "var")], f64) + eps)
        bias = (np.asarray(params.get((*c, "bias"), 0.0), f64) - np.asarray(stats[(*b, "mean")], f64)) * alpha
        params[(*c, "kernel")] = (kernel.astype(f64) * alpha).astype(kernel.dtype)  # alpha scales the output (last) axis
        params[(*c, "bias")] = (bias + np.asarray(params.pop((*b, "bias")), f64)).astype(kernel.dtype)
    if problems:
        raise ConversionError("folded Flax variables", other=problems)
    folded = {"params": traverse_util.unflatten_dict(params)}
    return stack_blocks(folded) if stacked else folded


class _FoldedBN(nn.Module):
    """The BatchNorm after folding: its affine map lives in the conv before it."""

    scale_init: Any = None

    def __call__(self, x, train: bool = False):
        if train:
            raise ValueError("a folded model (inference.fold) is for inference only (train=False)")
        return x


class FoldedResNet(ResNet):
    """``ResNet`` whose BatchNorms are folded into its convs (eval only; see ``fold``)."""

    def conv_def(self):
        return functools.partial(super().conv_def(), use_bias=True)

    def norm_def(self):
        return _FoldedBN


def fold(model: ResNet, variables: Mapping[str, Any]) -> tuple[FoldedResNet, dict[str, Any]]:
    """``(FoldedResNet, fold_batchnorm(variables))``: a faster eval-only equivalent of ``(model, variables)``."""
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(ResNet) if f.init and f.name not in ("parent", "name")}
    return FoldedResNet(**fields), fold_batchnorm(variables, eps=model.bn_eps)


# XLA CPU options: the legacy (non-MLIR) fusion emitters. They halved the
# compile of ResNet-152's train step with scan_blocks (23.6 s -> 11.7 s) but
# slowed the unrolled model's gradient compile (21.3 s -> 34.0 s, batch 4,
# 64x64) and ResNet-50 eval by ~4%: measure before using. Per executable:
# ``jax.jit(f, compiler_options=FAST_COMPILE_OPTIONS)``
# (``predict_fn(..., compiler_options=...)``); other computations keep the
# defaults. Measured with jaxlib 0.10.2; ignore on other backends.
FAST_COMPILE_OPTIONS: dict[str, Any] = {"xla_cpu_use_fusion_emitters": False}


def predict_fn(model, chunk: int | None = None, method: str | None = None, compiler_options: Mapping[str, Any] | None = None) -> Callable:
    """A jitted eval-mode forward ``f(variables, images) -> logits``.

    Args:
        model: a ``ResNet`` (e.g. the folded one of ``fold``).
        chunk: run the batch as micro-batches of ``chunk`` images, one after
            another (``lax.map``), so each layer's activations stay in the
            CPU's caches; the batch is padded up to a multiple of ``chunk``
            and the padding dropped. Eval-mode outputs are per image, so this
            changes nothing but speed. ``None``: the whole batch at once.
        method: a ``ResNet`` method instead of ``__call__`` (e.g.
            ``"features"``); its outputs must have the batch as first axis.
        compiler_options: XLA options for this executable only
            (e.g. ``FAST_COMPILE_OPTIONS`` on CPU).
    """
    import jax
    import jax.numpy as jnp

    def apply(variables, x):
        return model.apply(variables, x, method=method) if method else model.apply(variables, x)

    if not chunk:
        return jax.jit(apply, compiler_options=compiler_options)

    def chunked(variables, x):
        n = x.shape[0]
        if n <= chunk:
            return apply(variables, x)
        pad = -n % chunk
        if pad:
            x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
        xs = x.reshape(x.shape[0] // chunk, chunk, *x.shape[1:])
        ys = jax.lax.map(lambda xi: apply(variables, xi), xs)
        return jax.tree_util.tree_map(lambda y: y.reshape(-1, *y.shape[2:])[:n], ys)

    return jax.jit(chunked, compiler_options=compiler_options)
