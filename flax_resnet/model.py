"""Flax Linen ResNets that mirror ``torch_ref`` block for block (NHWC).

Module names are torch's (``conv1``, ``bn1``, ``layer1/0/conv2``,
``layer1/0/downsample/0``, ``fc``), so the converter is a walk over names.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from flax_resnet.archs import STEM_CHANNELS, ArchSpec, BlockSpec, ConvSpec, blocks, get_arch
from flax_resnet.layers import BatchNorm

Dtype = Any

# torchvision's init: kaiming normal, fan_out, for every conv.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class _Common(nn.Module):
    """Settings shared by every layer of a ResNet."""

    conv_bias: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    axis_name: str | None = None
    bn_momentum: float = 0.9
    bn_eps: float = 1e-5
    fold_bn: bool = False
    conv_as_dot: bool = False
    # Internal: set inside nn.scan bodies (see Stage) to spell conv gradients as canonical convs.
    canonical_conv_grads: bool = False

    def conv(self, c: ConvSpec, name: str) -> nn.Conv:
        # Explicit symmetric padding as in torch; 'SAME' would pad (0, 1) at stride 2.
        return nn.Conv(
            c.out_ch,
            (c.kernel, c.kernel),
            strides=(c.stride, c.stride),
            padding=((c.padding, c.padding), (c.padding, c.padding)),
            feature_group_count=c.groups,
            use_bias=self.conv_bias or self.fold_bn,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=_conv_init,
            conv_general_dilated=_conv_fn(self.conv_as_dot, self.canonical_conv_grads),
            name=name,
        )

    def bn(self, name: str, zero_init: bool = False) -> BatchNorm:
        if self.fold_bn:  # inference: the BatchNorm lives in the conv's kernel and bias
            return _folded_bn
        return BatchNorm(
            momentum=self.bn_momentum,
            epsilon=self.bn_eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            axis_name=self.axis_name,
            scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
            name=name,
        )

    def common(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in _Common.__dataclass_fields__ if f not in ("parent", "name")}


_NHWC = jax.lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))
_LOW_PRECISION = (jnp.bfloat16, jnp.float16)


def pointwise_conv_as_dot(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated`` that runs 1x1 convs (any stride) as one matrix product.

    A 1x1 conv over NHWC is ``x[:, ::s, ::s, :] @ kernel[0, 0]``: the same
    products and sums, which XLA's CPU backend runs faster as a dot (and, in
    bfloat16, natively with float32 accumulation instead of converting to
    float32 first). Every other conv goes to ``lax.conv_general_dilated``.
    """
    dims = dimension_numbers
    if isinstance(dims, jax.lax.ConvDimensionNumbers) or dims is None:
        nhwc = dims == _NHWC
    else:
        nhwc = False
    pointwise = (
        nhwc
        and lhs.ndim == 4
        and rhs.shape[:2] == (1, 1)
        and feature_group_count == 1
        and all(tuple(p) == (0, 0) for p in padding)
        and all(d in (None, 1) for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1)))
        and not kwargs
    )
    if not pointwise:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count, precision=precision, **kwargs,
        )
    sh, sw = window_strides
    if (sh, sw) != (1, 1):
        lhs = lhs[:, ::sh, ::sw, :]
    pref = jnp.float32 if lhs.dtype in _LOW_PRECISION else None
    y = jax.lax.dot_general(lhs, rhs[0, 0], (((3,), (0,)), ((), ())), precision=precision, preferred_element_type=pref)
    return y.astype(jnp.result_type(lhs.dtype, rhs.dtype))


def _conv_nhwc_stride1(x, w, padding, precision):
    """A stride-1, ungrouped NHWC/HWIO conv whose gradients are canonical NHWC/HWIO convs too.

    JAX's own transpose rules express the input gradient with the kernel's
    in/out axes swapped and the kernel gradient with batch and features
    swapped. Inside ``while`` loops (``nn.scan``), XLA's CPU backend leaves
    such convolutions uncanonicalized and runs them in a slow generic loop
    (~10x slower training steps); here the swaps are explicit transposes, so
    every conv of the backward pass is an ordinary one. Same math.
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


def _explicit_nhwc(lhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, kwargs) -> bool:
    """An undilated NHWC/HWIO conv with explicit padding: the form the custom convs below handle."""
    return (
        dimension_numbers == _NHWC
        and lhs.ndim == 4
        and not isinstance(padding, str)
        and all(d in (None, 1) for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1)))
        and not kwargs
    )


def _canonical_grad_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    simple = tuple(window_strides) == (1, 1) and feature_group_count == 1 and _explicit_nhwc(lhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, kwargs)
    if not simple:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count, precision=precision, **kwargs,
        )
    return _conv_nhwc_stride1(lhs, rhs, tuple(tuple(p) for p in padding), precision)


def _grouped_conv_nhwc(x, w, strides, padding, groups, precision):
    """A grouped NHWC/HWIO conv whose kernel gradient is ``kh * kw`` batched matrix products.

    XLA's CPU backend runs the kernel gradient of a grouped conv (a conv with
    ``batch_group_count``) in a slow generic loop: ResNeXt-101's 3x3 convs
    took ~100x longer than an ungrouped conv of the same size. Here each
    kernel offset's gradient is one ``dot_general`` batched over groups,
    contracting batch and space: the same products and sums.
    """
    (pt, pb), (pl, pr) = padding
    sh, sw = strides
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
                xs = jax.lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, xp.shape[3]), (1, sh, sw, 1))
                xs = xs.reshape(n * ho * wo, groups, ci)
                # (rows, G, Ci) x (rows, G, Co) -> (G, Ci, Co), batched over groups.
                taps.append(jax.lax.dot_general(xs, dyg, (((0,), (0,)), ((1,), (1,))), precision=precision, preferred_element_type=acc))
        dw = jnp.stack(taps).reshape(kh, kw, groups, ci, co).transpose(0, 1, 3, 2, 4).reshape(kh, kw, ci, out)
        return dx, dw.astype(w.dtype)

    conv.defvjp(fwd, bwd)
    return conv(x, w)


def _grouped_or_default(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    grouped = feature_group_count > 1 and _explicit_nhwc(lhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, kwargs)
    if grouped:
        return _grouped_conv_nhwc(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding), feature_group_count, precision)
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count, precision=precision, **kwargs,
    )


@functools.lru_cache(maxsize=None)
def _conv_fn(as_dot: bool, canonical_grads: bool):
    """The ``conv_general_dilated`` for ``nn.Conv`` (one stable function per setting)."""

    def conv(lhs, rhs, window_strides, padding, **kw):
        if as_dot and rhs.shape[:2] == (1, 1):
            return pointwise_conv_as_dot(lhs, rhs, window_strides, padding, **kw)
        if kw.get("feature_group_count", 1) > 1:
            return _grouped_or_default(lhs, rhs, window_strides, padding, **kw)
        if canonical_grads:
            return _canonical_grad_conv(lhs, rhs, window_strides, padding, **kw)
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kw)

    return conv


def _folded_bn(x: jax.Array, train: bool = False) -> jax.Array:
    if train:
        raise ValueError("a model with fold_bn=True is for inference only (train=False)")
    return x


class Downsample(_Common):
    """The shortcut projection: 1x1 conv (``0``) then BatchNorm (``1``)."""

    spec: ConvSpec = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.conv(self.spec, "0")(x)
        return self.bn("1")(x, train)


class Block(_Common):
    """A basic (2 convs) or bottleneck (3 convs) residual block."""

    spec: BlockSpec = None
    zero_init_residual: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        return self._forward(x, train)

    def _forward(self, x, train: bool):
        residual = x
        n = len(self.spec.convs)
        for i, c in enumerate(self.spec.convs, start=1):
            x = self.conv(c, f"conv{i}")(x)
            x = self.bn(f"bn{i}", zero_init=self.zero_init_residual and i == n)(x, train)
            if i < n:
                x = nn.relu(x)
        if self.spec.downsample is not None:
            residual = Downsample(spec=self.spec.downsample, name="downsample", **self.common())(residual, train)
        return nn.relu(x + residual)


class _ScanBody(Block):
    """A block as the body of ``nn.scan``: ``x -> (x, per-block output)``.

    ``train`` is an attribute (not an argument) so that the scan broadcasts
    no Python values; ``emit`` says whether each block's output is stacked
    as scan output (only ``intermediates(..., blocks=True)`` needs it).
    """

    train: bool = False
    emit: bool = False

    @nn.compact
    def __call__(self, x):  # type: ignore[override]
        y = self._forward(x, self.train)
        return y, (y if self.emit else None)


class Stage(_Common):
    """``layerN``: its blocks, named ``0``, ``1``, ... as in torch.

    Attributes:
        scan_blocks: run blocks ``1..n-1`` (identical in shape: stride 1, no
            projection) as one ``nn.scan`` named ``rest``, whose variables
            carry a leading axis of length ``n - 1``; block ``0`` (which may
            stride and project) stays a module named ``0``. XLA then compiles
            one block body per stage instead of ``n``.
        remat: recompute each block's activations in the backward pass
            (``nn.remat``) instead of keeping them: less training memory, one
            more forward pass of compute.
    """

    specs: tuple[BlockSpec, ...] = ()
    zero_init_residual: bool = False
    scan_blocks: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False, blocks: bool = True):
        kw = dict(zero_init_residual=self.zero_init_residual, **self.common())
        block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        if not self.scan_blocks or len(self.specs) < 2:
            outs = []
            for b in self.specs:
                x = block(spec=b, name=str(b.index), **kw)(x, train)
                outs.append(x)
            return x, outs
        first, rest = self.specs[0], self.specs[1:]
        y0 = block(spec=first, name=str(first.index), **kw)(x, train)
        body = nn.remat(_ScanBody, prevent_cse=False) if self.remat else _ScanBody
        scan = nn.scan(
            body,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            length=len(rest),
        )
        x, ys = scan(spec=rest[0], train=train, emit=blocks, name="rest", **dict(kw, canonical_conv_grads=True))(y0)
        # Per-block outputs come back stacked from the scan (only when asked).
        outs = [y0] + ([ys[i] for i in range(len(rest))] if blocks else [])
        return x, outs


class ResNet(_Common):
    """ResNet v1.5 (torchvision) or v1, any row of ``flax_resnet.ARCHS``.

    Input is NHWC. Logits come back in at least float32.

    Attributes:
        arch: architecture name (``"resnet50"``) or an ``ArchSpec``.
        num_classes: outputs of ``fc``.
        conv_bias: convs carry a bias (the seed layout) or not (torchvision).
        stride_in_1x1: ResNet v1 (stride in the first 1x1 conv of a
            bottleneck) instead of v1.5 (stride in the 3x3 conv).
        zero_init_residual: initialize each block's last BN scale to zero.
        dtype: compute dtype (e.g. ``jnp.bfloat16``); ``None`` follows the
            inputs and params, so float64 variables compute in float64.
        param_dtype: dtype of freshly initialized params and BN stats.
        precision: ``jax.lax.Precision`` for convs and ``fc`` (``"highest"``
            disables TF32 on GPUs).
        axis_name: mapped/sharded batch axis for global BN statistics.
        bn_momentum: Flax convention; 0.9 equals torch's momentum 0.1.
        bn_eps: BatchNorm epsilon, torch's 1e-5.
        scan_blocks: compile each stage's repeated blocks once (``nn.scan``):
            blocks ``1..n-1`` of ``layerN`` live under ``layerN/rest`` with a
            leading axis of length ``n - 1`` (``convert.stack_blocks`` /
            ``unstack_blocks`` convert between the two trees). Same numbers,
            a fraction of the compile time for deep models.
        remat: rematerialize each block in the backward pass (``nn.remat``):
            activation memory of one block per stage instead of all.
        conv_as_dot: run 1x1 convs as matrix products
            (``pointwise_conv_as_dot``): same parameters, same math, faster
            on XLA's CPU backend.
        fold_bn: inference-only variant whose BatchNorms are folded into the
            preceding convs (each conv has a bias, there is no
            ``batch_stats``); build its variables with
            ``flax_resnet.inference.fold_batchnorm``.
    """

    arch: str | ArchSpec = "resnet50"
    num_classes: int = 1000
    stride_in_1x1: bool = False
    zero_init_residual: bool = False
    scan_blocks: bool = False
    remat: bool = False

    @property
    def spec(self) -> ArchSpec:
        return get_arch(self.arch)

    def setup(self):
        spec = self.spec
        stem = ConvSpec(-1, STEM_CHANNELS, 7, 2, 3)
        self.conv1 = self.conv(stem, None)
        self.bn1 = self.bn(None)
        all_blocks = list(blocks(spec, self.stride_in_1x1))
        stages = [tuple(b for b in all_blocks if b.stage == s) for s in (1, 2, 3, 4)]
        kw = dict(zero_init_residual=self.zero_init_residual, scan_blocks=self.scan_blocks, remat=self.remat, **self.common())
        self.layer1 = Stage(specs=stages[0], **kw)
        self.layer2 = Stage(specs=stages[1], **kw)
        self.layer3 = Stage(specs=stages[2], **kw)
        self.layer4 = Stage(specs=stages[3], **kw)
        self.fc = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
        )

    def intermediates(self, x: jax.Array, train: bool = False, blocks: bool = False) -> dict[str, jax.Array]:
        """Runs the network and returns every parity point in order.

        Args:
            x: NHWC images.
            train: BatchNorm uses batch statistics and updates ``batch_stats``
                (apply with ``mutable=["batch_stats"]``).
            blocks: also return each block's output (``"layer1.0"``, ...).

        Returns:
            An ordered dict: ``stem`` (after the max-pool), [each block],
            ``layer1``..``layer4``, ``pre_logits`` (pooled features) and
            ``logits``, the same points as ``torch_ref``'s
            ``forward_intermediates``.
        """
        out: dict[str, jax.Array] = {}
        x = nn.relu(self.bn1(self.conv1(x), train))
        # torch pads max-pool with -inf; so does reduce_window here.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        out["stem"] = x
        for i, stage in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), start=1):
            x, block_outs = stage(x, train, blocks)
            if blocks:
                out.update({f"layer{i}.{j}": y for j, y in enumerate(block_outs)})
            out[f"layer{i}"] = x
        x = jnp.mean(x, axis=(1, 2))
        out["pre_logits"] = x
        logits = self.fc(x)
        out["logits"] = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        return out

    def features(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        """Backbone features for detection/segmentation: stem, layer1..4, pre_logits."""
        out = self.intermediates(x, train)
        return {k: out[k] for k in ("stem", "layer1", "layer2", "layer3", "layer4", "pre_logits")}

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits of NHWC images ``x``; ``train=True`` uses and updates batch statistics."""
        return self.intermediates(x, train)["logits"]


def _factory(name: str):
    def make(
        num_classes: int = 1000, conv_bias: bool = False, dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32, **kwargs: Any
    ) -> ResNet:
        return ResNet(arch=name, num_classes=num_classes, conv_bias=conv_bias, dtype=dtype, param_dtype=param_dtype, **kwargs)

    make.__name__ = make.__qualname__ = name
    make.__doc__ = (
        f"Flax {name} (v1.5, torchvision topology).\n\n"
        "Args:\n"
        "    num_classes: outputs of the classifier.\n"
        "    conv_bias: convs with bias (the seed layout of resnet50/101/152).\n"
        "    dtype: compute dtype (``None``: follow the inputs; ``jnp.bfloat16``: mixed precision).\n"
        "    param_dtype: dtype of parameters and BatchNorm statistics.\n"
        "    **kwargs: any other ``ResNet`` attribute (``zero_init_residual``, ``axis_name``, ...).\n"
    )
    return make


resnet18 = _factory("resnet18")
resnet34 = _factory("resnet34")
resnet50 = _factory("resnet50")
resnet101 = _factory("resnet101")
resnet152 = _factory("resnet152")
wide_resnet50_2 = _factory("wide_resnet50_2")
wide_resnet101_2 = _factory("wide_resnet101_2")
resnext50_32x4d = _factory("resnext50_32x4d")
resnext101_32x8d = _factory("resnext101_32x8d")
resnext101_64x4d = _factory("resnext101_64x4d")
