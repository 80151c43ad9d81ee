"""Convolution kernels, chosen per platform when a computation is lowered.

``nn.Conv`` in ``flax_resnet.model`` calls ``conv_general_dilated`` (or
``loop_conv_general_dilated`` inside ``nn.scan`` bodies) instead of
``lax.conv_general_dilated``. Each stages out both forms with
``jax.lax.platform_dependent``:

* on CPU, forms that XLA's CPU backend runs much faster, with the same
  products and sums: a 1x1 conv as one matrix product; a conv whose input is
  smaller than its kernel (ResNet's last stages on small images) as one
  matrix product of its kernel taps; a grouped conv whose
  kernel gradient is batched matrix products; inside loops, a conv whose
  gradients are canonical NHWC/HWIO convs;
* on every other platform (GPU, TPU), the plain ``lax.conv_general_dilated``.

Which form runs is fixed at lowering, for the platform lowered for (so a
``jax.export`` for ``"cuda"`` from a CPU machine holds only plain convs).
Set ``FLAX_RESNET_KERNELS=plain`` (or trace inside ``use_plain()``) for plain
XLA convs everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

import jax
import jax.numpy as jnp

__all__ = ["conv_general_dilated", "loop_conv_general_dilated", "use_plain", "plain_only"]

_NHWC = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))
_LOW_PRECISION = (jnp.bfloat16, jnp.float16)
_plain_override = False


def plain_only() -> bool:
    """Whether convs are traced as plain ``lax.conv_general_dilated`` on every platform."""
    return _plain_override or os.environ.get("FLAX_RESNET_KERNELS", "") == "plain"


@contextlib.contextmanager
def use_plain() -> Iterator[None]:
    """Traces convs as plain ``lax.conv_general_dilated`` on every platform.

    Applies to what is *traced* inside the block: ``jax.jit`` reuses earlier
    traces of the same function, so jit a fresh function here.
    """
    global _plain_override
    old, _plain_override = _plain_override, True
    try:
        yield
    finally:
        _plain_override = old


def _pointwise_as_dot(lhs, rhs, strides, precision):
    """A 1x1 NHWC/HWIO conv (any stride) as ``x[:, ::s, ::s, :] @ kernel[0, 0]``.

    XLA's CPU backend runs the dot faster, and in bfloat16 natively with
    float32 accumulation instead of converting to float32 first.
    """
    sh, sw = strides
    if (sh, sw) != (1, 1):
        lhs = lhs[:, ::sh, ::sw, :]
    pref = jnp.float32 if lhs.dtype in _LOW_PRECISION else None
    y = jax.lax.dot_general(lhs, rhs[0, 0], (((3,), (0,)), ((), ())), precision=precision, preferred_element_type=pref)
    return y.astype(jnp.result_type(lhs.dtype, rhs.dtype))


def _tap(xp, i, j, ho, wo, strides):
    """The ``ho x wo`` input view that kernel offset ``(i, j)`` meets in a conv of the padded NHWC ``xp``."""
    sh, sw = strides
    n, _, _, c = xp.shape
    return jax.lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1))


def _taps_as_dot(lhs, rhs, strides, padding, precision):
    """A ``kh x kw`` NHWC/HWIO conv as one matrix product of its ``kh * kw`` shifted input views.

    Once a conv's input is smaller than its kernel (a 3x3 conv at 2x2:
    ResNet's layer4 on 64x64 images, layer3 on 32x32), XLA swaps the conv's
    operands and its CPU backend runs the swapped conv as a generic loop, up to
    90x slower than this product (forward and gradients; 172 ms against 1.8
    ms at 2x2x512, batch 16). The views are concatenated in the kernel's
    (row, column, channel) order, so the product sums the conv's own terms;
    its gradients are slices, pads and products. Larger inputs keep XLA's
    conv: from 3x3 on it is within 1.2-2x of this form and compiles faster.
    """
    (pt, pb), (pl, pr) = padding
    kh, kw, ci, co = rhs.shape
    xp = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho, wo = (xp.shape[1] - kh) // strides[0] + 1, (xp.shape[2] - kw) // strides[1] + 1
    taps = [_tap(xp, i, j, ho, wo, strides) for i in range(kh) for j in range(kw)]
    pref = jnp.float32 if lhs.dtype in _LOW_PRECISION else None
    y = jax.lax.dot_general(jnp.concatenate(taps, axis=3), rhs.reshape(kh * kw * ci, co), (((3,), (0,)), ((), ())), precision=precision, preferred_element_type=pref)
    return y.astype(jnp.result_type(lhs.dtype, rhs.dtype))


def _canonical_grad_conv(x, w, padding, precision):
    """A stride-1, ungrouped NHWC/HWIO conv whose gradients are canonical NHWC/HWIO convs too.

    JAX's transpose rules express the input gradient with the kernel's in/out
    axes swapped and the kernel gradient with batch and features swapped.
    Inside ``while`` loops (``nn.scan``), XLA's CPU backend leaves such
    convolutions uncanonicalized and runs them in a slow generic loop (~10x
    slower training steps); here the swaps are explicit transposes. Same math.
    """
    (pt, pb), (pl, pr) = padding
    dn = ("NHWC", "HWIO", "NHWC")

    @jax.custom_vjp
    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=dn, precision=precision)

    def fwd(x, w):
        return conv(x, w), (x, w)

    def bwd(res, dy):
        x, w = res
        kh, kw = w.shape[0], w.shape[1]
        # dx: correlate dy with the spatially flipped kernel, in/out swapped.
        w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
        dx_pad = ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr))
        dx = jax.lax.conv_general_dilated(dy, w_t, (1, 1), dx_pad, dimension_numbers=dn, precision=precision)
        # dw[kh, kw, i, o] = sum_{b,h,w} x_pad[b, h + kh, w + kw, i] dy[b, h, w, o]:
        # a conv of x_pad as (I, H, W, B) with dy as an (H, W, B, O) kernel.
        xt = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0))).transpose(3, 1, 2, 0)
        dw = jax.lax.conv_general_dilated(xt, dy.transpose(1, 2, 0, 3), (1, 1), "VALID", dimension_numbers=dn, precision=precision)
        return dx.astype(x.dtype), dw.transpose(1, 2, 0, 3).astype(w.dtype)

    conv.defvjp(fwd, bwd)
    return conv(x, w)


def _grouped_conv(x, w, strides, padding, groups, precision):
    """A grouped NHWC/HWIO conv whose kernel gradient is ``kh * kw`` batched matrix products.

    XLA's CPU backend runs the kernel gradient of a grouped conv (a conv with
    ``batch_group_count``) in a slow generic loop: ResNeXt-101's 3x3 convs
    took ~100x longer than an ungrouped conv of the same size. Here each
    kernel offset's gradient is one ``dot_general`` batched over groups,
    contracting batch and space: the same products and sums.
    """
    (pt, pb), (pl, pr) = padding
    dn = ("NHWC", "HWIO", "NHWC")

    def plain(x, w):
        return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn, feature_group_count=groups, precision=precision)

    @jax.custom_vjp
    def conv(x, w):
        return plain(x, w)

    def fwd(x, w):
        return plain(x, w), (x, w)

    def bwd(res, dy):
        x, w = res
        (dx,) = jax.vjp(lambda x: plain(x, w), x)[1](dy)
        kh, kw, ci, out = w.shape
        n, ho, wo, _ = dy.shape
        co = out // groups
        xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
        dyg = dy.reshape(n * ho * wo, groups, co)
        acc = jnp.float32 if dy.dtype in _LOW_PRECISION else None
        taps = []
        for i in range(kh):
            for j in range(kw):
                xs = _tap(xp, i, j, ho, wo, strides).reshape(n * ho * wo, groups, ci)
                # (rows, G, Ci) x (rows, G, Co) -> (G, Ci, Co), batched over groups.
                taps.append(jax.lax.dot_general(xs, dyg, (((0,), (0,)), ((1,), (1,))), precision=precision, preferred_element_type=acc))
        dw = jnp.stack(taps).reshape(kh, kw, groups, ci, co).transpose(0, 1, 3, 2, 4).reshape(kh, kw, ci, out)
        return dx, dw.astype(w.dtype)

    conv.defvjp(fwd, bwd)
    return conv(x, w)


def _cpu_form(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, precision, kwargs, in_loop):
    """The CPU kernel for this conv, or ``None`` where the plain conv is already the best form."""
    explicit_nhwc = (
        dimension_numbers == _NHWC
        and lhs.ndim == 4
        and not isinstance(padding, str)
        and all(d in (None, 1) for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1)))
        and not kwargs
    )
    if not explicit_nhwc:
        return None
    strides = tuple(window_strides)
    pads = tuple(tuple(p) for p in padding)
    if rhs.shape[:2] == (1, 1) and feature_group_count == 1 and all(p == (0, 0) for p in pads):
        return lambda x, w: _pointwise_as_dot(x, w, strides, precision)
    if feature_group_count == 1 and (lhs.shape[1] < rhs.shape[0] or lhs.shape[2] < rhs.shape[1]):
        return lambda x, w: _taps_as_dot(x, w, strides, pads, precision)
    if feature_group_count > 1:
        return lambda x, w: _grouped_conv(x, w, strides, pads, feature_group_count, precision)
    if in_loop and strides == (1, 1):
        return lambda x, w: _canonical_grad_conv(x, w, pads, precision)
    return None


def _conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None, feature_group_count=1, precision=None, *, in_loop=False, **kwargs):
    def plain(x, w):
        return jax.lax.conv_general_dilated(
            x, w, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count, precision=precision, **kwargs,
        )

    cpu = None if plain_only() else _cpu_form(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, precision, kwargs, in_loop)
    if cpu is None:
        return plain(lhs, rhs)
    return jax.lax.platform_dependent(lhs, rhs, cpu=cpu, default=plain)


conv_general_dilated = functools.partial(_conv, in_loop=False)
conv_general_dilated.__doc__ = "``lax.conv_general_dilated`` with the fast CPU form where one applies (plain on GPU/TPU)."
loop_conv_general_dilated = functools.partial(_conv, in_loop=True)
loop_conv_general_dilated.__doc__ = "``conv_general_dilated`` for loop bodies (``nn.scan``): also canonical conv gradients on CPU."
