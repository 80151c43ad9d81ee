"""Backend kernels: fast forms on CPU, plain convolutions on GPU/TPU, chosen at lowering.

Exports need no device: ``jax.export`` lowers for ``cuda`` and ``tpu`` from
this CPU machine. A train-mode gradient of every model kind must lower to
convolutions only, with ``dot_general`` only for the classifier ``fc``
(forward and its two backward products); on CPU the 1x1 convs are dots.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_resnet
from flax_resnet import kernels

CLASSES = 7  # every fc dot_general, forward or backward, has a dimension of 7
TINY = {
    "bottleneck": flax_resnet.ArchSpec("tiny50", "bottleneck", (2, 1, 1, 2)),
    "grouped": flax_resnet.ArchSpec("tiny_resnext", "bottleneck", (1, 1, 1, 1), groups=8, width_per_group=4),
    "timm_d": flax_resnet.ArchSpec("tiny50d", "bottleneck", (1, 2, 1, 1), stem="deep", shortcut="avg_down", source="timm"),
}
CASES = [("bottleneck", False), ("bottleneck", True), ("grouped", False), ("grouped", True), ("timm_d", True)]


def _grad_fn(model):
    def loss(params, stats, x):
        out, _ = model.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(jax.nn.log_softmax(out)[:, 0])

    return jax.jit(jax.grad(loss))


def _export_text(arch, scan, platform):
    model = flax_resnet.ResNet(arch=TINY[arch], num_classes=CLASSES, scan_blocks=scan)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    v = jax.eval_shape(model.init, jax.random.key(0), x)
    exp = jax.export.export(_grad_fn(model), platforms=[platform])(v["params"], v["batch_stats"], x)
    return exp.mlir_module()


def _dots(text):
    return [line for line in text.splitlines() if "stablehlo.dot_general" in line]


def _is_fc(line):
    return re.search(rf"\b{CLASSES}x|x{CLASSES}x", line) is not None


@pytest.mark.parametrize(
    "arch,scan,platform", [(a, s, "cuda") for a, s in CASES] + [("bottleneck", False, "tpu"), ("grouped", True, "tpu")]
)
def test_accelerators_get_plain_convolutions(arch, scan, platform):
    text = _export_text(arch, scan, platform)
    dots = _dots(text)
    assert len(dots) == 3 and all(_is_fc(d) for d in dots), dots  # fc forward, d(input), d(kernel)
    assert "stablehlo.convolution" in text and "custom_call" not in text.replace("@Sharding", "")


@pytest.mark.parametrize("arch,scan", [("bottleneck", False), ("grouped", True)])
def test_cpu_gets_the_fast_forms(arch, scan):
    text = _export_text(arch, scan, "cpu")
    conv_dots = [d for d in _dots(text) if not _is_fc(d)]
    assert len(conv_dots) > 0  # 1x1 convs (and grouped kernel gradients) as matrix products
    if arch == "grouped":
        # the grouped 3x3 kernel gradient: 9 taps batched over the 8 groups
        assert sum("batching_dims = [1] x [1]" in d for d in conv_dots) >= 9


def test_plain_escape_hatch_on_cpu(monkeypatch):
    monkeypatch.setenv("FLAX_RESNET_KERNELS", "plain")
    assert kernels.plain_only()
    dots = _dots(_export_text("grouped", True, "cpu"))
    assert len(dots) == 3 and all(_is_fc(d) for d in dots)


def test_cpu_kernels_match_plain_gradients_in_float64():
    """Same numbers: the fast CPU gradient of a scanned grouped model equals the plain one."""
    arch = flax_resnet.ArchSpec("tiny_resnext_2", "bottleneck", (1, 2, 1, 1), groups=8, width_per_group=4)  # layer2 scans
    model = flax_resnet.ResNet(arch=arch, num_classes=CLASSES, scan_blocks=True)
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, 13, 11, 3)))
        shapes = jax.eval_shape(model.init, jax.random.key(0), x)  # random variables without compiling init
        v = jax.tree_util.tree_map(lambda s: rng.uniform(0.5, 1.5, s.shape) / np.sqrt(np.prod(s.shape[:-1]) or 1), shapes)
        fast = _grad_fn(model)(v["params"], v["batch_stats"], x)
        with kernels.use_plain():
            plain = _grad_fn(model)(v["params"], v["batch_stats"], x)
        # the float64 gradient tolerance of the parity harness (train-mode BN over 2 samples at layer4)
        # (gradients that are zero in exact arithmetic, ~1e-36 here, are judged against the largest one)
        top = max(float(np.max(np.abs(b))) for b in jax.tree_util.tree_leaves(plain))
        for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(plain)):
            a, b = np.asarray(a), np.asarray(b)
            assert a.dtype == np.float64 and np.max(np.abs(a - b)) <= 1e-9 * max(np.max(np.abs(b)), 1e-6 * top)


# (input NHWC, kernel HWIO, strides, padding): inputs smaller than the kernel in height or width, which
# XLA's CPU backend runs as a swapped-operand loop: 2x2 and 1x1 under a 3x3, stride 2, uneven padding, the
# stem's 7x7/2 on a tiny image.
SMALL = [
    ((2, 2, 2, 8), (3, 3, 8, 6), (1, 1), ((1, 1), (1, 1))),
    ((2, 1, 1, 8), (3, 3, 8, 6), (1, 1), ((1, 1), (1, 1))),
    ((2, 2, 3, 8), (3, 3, 8, 6), (2, 2), ((1, 1), (1, 1))),
    ((3, 3, 2, 5), (3, 3, 5, 4), (1, 1), ((1, 0), (0, 1))),
    ((1, 5, 7, 3), (7, 7, 3, 4), (2, 2), ((3, 3), (3, 3))),
]


def _conv_and_grads(conv, x, w, strides, padding):
    def f(x, w):
        y = conv(x, w, strides, padding, dimension_numbers=kernels._NHWC)
        return jnp.sum(jnp.sin(y)), y

    (_, y), g = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, w)
    return y, *g


@pytest.mark.parametrize("xs,ws,strides,padding", SMALL)
def test_small_outputs_are_one_product_of_taps_on_cpu(xs, ws, strides, padding):
    """No convolution is left on CPU (forward or gradients), and the numbers are the conv's to float64 rounding."""
    dn = ("NHWC", "HWIO", "NHWC")
    plain = lambda x, w, s, p, dimension_numbers: jax.lax.conv_general_dilated(x, w, s, p, dimension_numbers=dn)  # noqa: E731
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x, w = jnp.asarray(rng.normal(size=xs)), jnp.asarray(rng.normal(size=ws))
        fast = jax.jit(lambda x, w: _conv_and_grads(kernels.conv_general_dilated, x, w, strides, padding))
        assert "convolution" not in fast.lower(x, w).as_text()
        for a, b in zip(fast(x, w), _conv_and_grads(plain, x, w, strides, padding)):
            assert a.shape == b.shape and a.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-12 * float(np.max(np.abs(b))))


def test_inputs_the_kernels_size_stay_convolutions_on_cpu():
    """From the kernel's size on, XLA's conv is within 1.2-2x of the taps' product and compiles faster: it stays."""
    x, w = jnp.zeros((2, 3, 3, 8)), jnp.zeros((3, 3, 8, 6))
    text = jax.jit(lambda x, w: kernels.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=kernels._NHWC)).lower(x, w).as_text()
    assert "convolution" in text and "dot_general" not in text
