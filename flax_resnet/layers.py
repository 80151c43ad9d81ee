"""Layers whose numerics follow PyTorch exactly."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

Dtype = Any
RELU_SIGNS = "relu_signs"


def relu(module: nn.Module, x: jax.Array) -> jax.Array:
    """``nn.relu``; records ``x > 0`` under ``module``'s ``relu_signs/relu`` when an apply makes that collection mutable.

    The parity harness reads these signs (in call order per module, as torch's
    hooks see each module's ``nn.ReLU`` calls) to match fp32 ReLU kinks;
    outside it nothing is recorded or computed.
    """
    if not module.is_initializing():  # init makes every collection mutable; record only when asked
        module.sow(RELU_SIGNS, "relu", x > 0)
    return nn.relu(x)


def max_pool(module: nn.Module, x: jax.Array) -> jax.Array:
    """torch's stem max-pool: 3x3, stride 2, padding 1 with -inf (as ``reduce_window`` pads).

    Records its input under ``module``'s ``relu_signs/max_pool`` when an apply
    makes that collection mutable: a window whose two largest inputs lie
    within rounding of each other is a kink too (its gradient goes to
    either), and the parity harness matches the element each window took.
    """
    if not module.is_initializing():
        module.sow(RELU_SIGNS, "max_pool", x)
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def conv(factory: Any, c: Any, name: str, **kw) -> nn.Module:
    """``factory`` (an ``nn.Conv`` partial) with ``ConvSpec`` ``c``'s shape and torch's explicit symmetric padding ('SAME' pads (0, 1) at stride 2)."""
    p = ((c.padding, c.padding), (c.padding, c.padding))
    return factory(c.out_ch, (c.kernel, c.kernel), strides=(c.stride, c.stride), padding=p, feature_group_count=c.groups, name=name, **kw)


def check_nhwc(x: Any, channels: int | None) -> None:
    """Raises a one-line ValueError unless ``x`` is a 4-d NHWC batch with ``channels`` channels (``None``: any)."""
    shape = tuple(getattr(x, "shape", ()))
    c = channels if channels is not None else "C"
    if len(shape) == 3 and shape[-1] == channels:
        raise ValueError(f"inputs are NHWC batches: got one image of shape {shape} with no batch axis (use x[None])")
    if len(shape) != 4:
        raise ValueError(f"inputs are NHWC batches (N, H, W, {c}): got a {len(shape)}-d array of shape {shape}")
    if channels is not None and shape[-1] != channels:
        hint = " (an NCHW batch? use x.transpose(0, 2, 3, 1))" if shape[1] == channels else ""
        raise ValueError(f"inputs are NHWC: expected {channels} channels in the last axis, got shape {shape}{hint}")


class BatchNorm(nn.Module):
    """``torch.nn.BatchNorm2d`` over the last (channel) axis, NHWC.

    Differs from ``flax.linen.BatchNorm`` where PyTorch does: the running
    variance is updated with the *unbiased* batch variance (n / (n - 1)), as
    torch does, while normalization uses the biased one. Statistics are
    computed two-pass in at least float32, also under bfloat16 compute.

    Attributes:
        momentum: Flax convention, ``new = momentum * old + (1 - momentum) *
            batch``; torch's default momentum 0.1 is 0.9 here.
        epsilon: added to the variance, torch's default 1e-5.
        dtype: output dtype; ``None`` promotes the input with the params.
        param_dtype: dtype of ``scale``/``bias`` and of the running stats.
        axis_name: if set, batch statistics are averaged over this mapped or
            sharded axis (SyncBatchNorm over the global batch).
        scale_init: initializer of ``scale`` (zeros for zero-init residuals).
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None
    scale_init: Any = nn.initializers.ones

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), self.param_dtype)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), self.param_dtype)

        y, stats = batch_norm(
            x, scale, bias, ra_mean.value, ra_var.value, train=train, momentum=self.momentum, epsilon=self.epsilon, axis_name=self.axis_name, dtype=self.dtype
        )
        if stats is not None and not self.is_initializing():  # init only creates the statistics
            ra_mean.value, ra_var.value = stats
        return y


def avg_pool_ceil(x: jax.Array, stride: int) -> jax.Array:
    """``torch.nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)`` over NHWC.

    ``ceil_mode`` adds a last, partial window where the input does not divide
    evenly; it averages only the pixels it covers.
    """
    pads, counts = [], []
    for n in x.shape[1:3]:
        out = -(-(n - 2) // stride) + 1  # ceil((n - 2) / stride) + 1
        pads.append((0, max((out - 1) * stride + 2 - n, 0)))
        starts = np.arange(out) * stride
        counts.append(np.minimum(starts + 2, n) - starts)  # pixels inside each window
    window, strides = (1, 2, 2, 1), (1, stride, stride, 1)
    sums = jax.lax.reduce_window(x, np.zeros((), x.dtype), jax.lax.add, window, strides, [(0, 0), *pads, (0, 0)])
    return sums / np.outer(*counts)[None, :, :, None].astype(x.dtype)


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

    The one implementation behind ``BatchNorm`` here and the NNX BatchNorm
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
        # Shifted two-pass statistics: a first mean, then the mean and square of
        # the deviations from it. In float32 this is as accurate as torch's CPU
        # kernels, which accumulate in float64; a plain float32 mean loses
        # digits where |mean| >> std, and train-mode gradients divide by that std.
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
        # Normalize the centered input: autodiff of the folded form x * alpha + beta
        # would sum dy * x before subtracting the mean, which cancels
        # catastrophically in float32 where |mean| >> std (torch's hand-written
        # backward also works with centered x).
        alpha = scale.astype(stat_dtype) * jax.lax.rsqrt(batch_var + epsilon)
        return (centered * alpha + bias.astype(stat_dtype)).astype(out_dtype), (new_mean, new_var)
    # Eval: torch's inference kernel's affine map, y = x * alpha + beta.
    m, v = mean.astype(stat_dtype), var.astype(stat_dtype)
    alpha = scale.astype(stat_dtype) * jax.lax.rsqrt(v + epsilon)
    beta = bias.astype(stat_dtype) - m * alpha
    return (xs * alpha + beta).astype(out_dtype), None
