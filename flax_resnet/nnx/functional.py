"""Pure functions behind the NNX layers (no module state)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Dtype = Any


def batch_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    *,
    train: bool,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
    axis_name: str | None = None,
    dtype: Dtype | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """``torch.nn.BatchNorm2d`` over the last axis, as a pure function.

    The same operations, in the same order, as ``flax_resnet.layers.BatchNorm``
    (so Linen and NNX agree bit for bit): statistics in at least float32,
    shifted two-pass; the running variance is updated with the unbiased batch
    variance ``n / (n - 1)``, normalization uses the biased one.

    Args:
        x: input, channels last.
        scale, bias: the affine parameters (torch's ``weight``/``bias``).
        mean, var: the running statistics.
        train: normalize with batch statistics and return updated running ones.
        momentum: Flax convention, ``new = momentum * old + (1 - momentum) * batch``.
        epsilon: added to the variance.
        axis_name: average batch statistics over this mapped axis (SyncBatchNorm).
        dtype: output dtype; ``None`` promotes ``x`` with ``scale``.

    Returns:
        ``(y, (new_mean, new_var))`` in train mode, ``(y, None)`` in eval mode.
    """
    stat_dtype = jnp.promote_types(jnp.promote_types(x.dtype, jnp.float32), mean.dtype)
    out_dtype = dtype or jnp.result_type(x.dtype, scale.dtype)
    xs = x.astype(stat_dtype)
    if train:
        axes = tuple(range(x.ndim - 1))
        n = 1
        for a in axes:
            n *= x.shape[a]
        shift = jax.lax.stop_gradient(jnp.mean(xs, axes))
        if axis_name is not None:
            shift = jax.lax.pmean(shift, axis_name)
            n = n * jax.lax.psum(1, axis_name)
        d = xs - shift
        moments = jnp.stack([jnp.mean(d, axes), jnp.mean(jnp.square(d), axes)])
        if axis_name is not None:
            moments = jax.lax.pmean(moments, axis_name)
        batch_mean = shift + moments[0]
        batch_var = jnp.maximum(moments[1] - jnp.square(moments[0]), 0.0)
        centered = d - moments[0]
        unbiased = batch_var * (n / (n - 1))
        new_mean = (momentum * mean + (1 - momentum) * batch_mean).astype(mean.dtype)
        new_var = (momentum * var + (1 - momentum) * unbiased).astype(var.dtype)
        alpha = scale.astype(stat_dtype) * jax.lax.rsqrt(batch_var + epsilon)
        return (centered * alpha + bias.astype(stat_dtype)).astype(out_dtype), (new_mean, new_var)
    m, v = mean.astype(stat_dtype), var.astype(stat_dtype)
    alpha = scale.astype(stat_dtype) * jax.lax.rsqrt(v + epsilon)
    beta = bias.astype(stat_dtype) - m * alpha
    return (xs * alpha + beta).astype(out_dtype), None
