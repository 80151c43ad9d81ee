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

from typing import Any, Callable, Mapping

import numpy as np

from flax_resnet.convert import ConversionError

__all__ = ["fold_batchnorm", "fold", "predict_fn", "fast_eval_model", "FAST_COMPILE_OPTIONS"]


def _bn_name(conv_name: str, siblings: Mapping[str, Any]) -> str | None:
    """The BatchNorm that follows conv ``conv_name`` among its siblings (torch's names)."""
    if conv_name.startswith("conv") and conv_name[4:].isdigit():
        bn = "bn" + conv_name[4:]
    elif conv_name == "0" and "1" in siblings:  # downsample: 0 = conv, 1 = BN
        bn = "1"
    else:
        return None
    node = siblings.get(bn)
    return bn if isinstance(node, Mapping) and "scale" in node else None


def _fold_tree(params: Mapping[str, Any], stats: Mapping[str, Any], eps: float, path: tuple, problems: list) -> dict:
    out: dict[str, Any] = {}
    folded_bns = set()
    for name, node in params.items():
        if not isinstance(node, Mapping) or "kernel" not in node or np.ndim(node["kernel"]) < 4:
            continue
        bn = _bn_name(name, params)
        if bn is None:
            continue
        st = stats.get(bn)
        if not isinstance(st, Mapping) or "mean" not in st or "var" not in st:
            problems.append(f"batch_stats/{'/'.join((*path, bn))} missing (mean and var are needed to fold)")
            continue
        kernel = np.asarray(node["kernel"])
        f64 = np.float64
        alpha = np.asarray(params[bn]["scale"], f64) / np.sqrt(np.asarray(st["var"], f64) + eps)
        b = np.asarray(node["bias"], f64) if "bias" in node else 0.0
        bias = (b - np.asarray(st["mean"], f64)) * alpha + np.asarray(params[bn]["bias"], f64)
        # alpha (..., C) against a kernel (..., kh, kw, in, C): insert the three conv axes.
        a = alpha.reshape(alpha.shape[:-1] + (1, 1, 1) + alpha.shape[-1:])
        out[name] = {"kernel": (kernel.astype(f64) * a).astype(kernel.dtype), "bias": bias.astype(kernel.dtype)}
        folded_bns.add(bn)
    for name, node in params.items():
        if name in out or name in folded_bns:
            continue
        if isinstance(node, Mapping):
            sub = stats.get(name, {}) if isinstance(stats, Mapping) else {}
            out[name] = _fold_tree(node, sub if isinstance(sub, Mapping) else {}, eps, (*path, name), problems)
        else:
            out[name] = node
    return out


def fold_batchnorm(variables: Mapping[str, Any], eps: float = 1e-5) -> dict[str, Any]:
    """Variables of ``ResNet(fold_bn=True)``: every BatchNorm folded into its conv.

    Args:
        variables: ``{"params": ..., "batch_stats": ...}`` of a ResNet
            (unrolled or stacked; with or without conv biases).
        eps: the BatchNorms' epsilon (``ResNet.bn_eps``, torch's 1e-5).

    Returns:
        ``{"params": ...}`` (numpy arrays): each conv with ``kernel`` and
        ``bias``, no BatchNorm parameters and no ``batch_stats``.

    Raises:
        ConversionError: a BatchNorm lacks its running statistics.
    """
    if "batch_stats" not in variables:
        raise ConversionError("folded Flax variables", other=["no batch_stats: the running statistics are needed to fold"])
    problems: list[str] = []
    params = _fold_tree(variables["params"], variables["batch_stats"], eps, (), problems)
    if problems:
        raise ConversionError("folded Flax variables", other=problems)
    return {"params": params}


def fold(model, variables: Mapping[str, Any]):
    """``(model.clone(fold_bn=True), fold_batchnorm(variables))``: a faster eval-only model."""
    return model.clone(fold_bn=True), fold_batchnorm(variables, eps=model.bn_eps)


# XLA CPU options: the legacy (non-MLIR) fusion emitters. They halved the
# compile of ResNet-152's train step with scan_blocks (23.6 s -> 11.7 s) but
# slowed the unrolled model's gradient compile (21.3 s -> 34.0 s, batch 4,
# 64x64) and ResNet-50 eval by ~4%: measure before using. Per executable:
# ``jax.jit(f, compiler_options=FAST_COMPILE_OPTIONS)``
# (``predict_fn(..., compiler_options=...)``); other computations keep the
# defaults. Measured with jaxlib 0.10.2; ignore on other backends.
FAST_COMPILE_OPTIONS: dict[str, Any] = {"xla_cpu_use_fusion_emitters": False}


def fast_eval_model(model, variables: Mapping[str, Any]):
    """The fastest eval-mode equivalent of ``(model, variables)`` on CPU.

    BatchNorm folded into the convs (``fold``) and 1x1 convs run as matrix
    products (``conv_as_dot``); the logits agree with ``model`` to rounding.
    """
    return fold(model.clone(conv_as_dot=True), variables)


def predict_fn(model, chunk: int | None = None, method: str | None = None, compiler_options: Mapping[str, Any] | None = None) -> Callable:
    """A jitted eval-mode forward ``f(variables, images) -> logits``.

    Args:
        model: a ``ResNet`` (e.g. from ``fast_eval_model``).
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
