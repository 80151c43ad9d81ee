"""Flax model mechanics: BatchNorm rule, dtypes, parameter counts (padding: tests/test_padding.py)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flax_resnet
from flax_resnet import ARCHS, PARAM_COUNTS, BatchNorm


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_flax_parameter_count(arch):
    model = flax_resnet.ResNet(arch=arch)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    assert _count(shapes["params"]) == PARAM_COUNTS[arch]


@pytest.mark.parametrize("n", [2, 5])
def test_batchnorm_train_step_matches_torch_exactly(n):
    """Unbiased running_var update, biased normalization, momentum 0.1, in float64."""
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(n, 3, 4, 7))
    tbn = torch.nn.BatchNorm2d(7).double()
    with torch.no_grad():
        tbn.weight.uniform_(0.5, 1.5), tbn.bias.normal_()
        tbn.running_mean.normal_(), tbn.running_var.uniform_(0.5, 2)
    variables = {
        "params": {"scale": tbn.weight.detach().numpy().copy(), "bias": tbn.bias.detach().numpy().copy()},
        "batch_stats": {"mean": tbn.running_mean.numpy().copy(), "var": tbn.running_var.numpy().copy()},
    }
    with jax.enable_x64(True):
        y, new = BatchNorm().apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
        y_eval = BatchNorm().apply(variables, jnp.asarray(x), train=False)
    with torch.no_grad():
        t_eval = tbn.eval()(torch.from_numpy(x).permute(0, 3, 1, 2))
        t = tbn.train()(torch.from_numpy(x).permute(0, 3, 1, 2))
    np.testing.assert_allclose(np.asarray(y), t.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(y_eval), t_eval.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.asarray(new["batch_stats"]["mean"]), tbn.running_mean.numpy(), rtol=1e-13)
    np.testing.assert_allclose(np.asarray(new["batch_stats"]["var"]), tbn.running_var.numpy(), rtol=1e-13)
    # Flax's stock BatchNorm would have used the biased variance.
    m = n * 3 * 4
    biased = 0.9 * variables["batch_stats"]["var"] + 0.1 * x.reshape(-1, 7).var(0)
    assert np.max(np.abs(np.asarray(new["batch_stats"]["var"]) - biased)) > 1e-3 / m


def test_batchnorm_axis_name_uses_global_batch():
    x = np.random.default_rng(1).normal(size=(4, 2, 3, 5)).astype(np.float32)
    bn = BatchNorm(axis_name="d")
    v = bn.init(jax.random.key(0), x[:1], train=False)
    pm = jax.vmap(lambda xi: bn.apply(v, xi, train=True, mutable=["batch_stats"]), axis_name="d")
    y_sharded, new_sharded = pm(x.reshape(2, 2, 2, 3, 5))
    y, new = BatchNorm().apply(v, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(np.asarray(y_sharded).reshape(y.shape), y, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new_sharded["batch_stats"]["var"][0]), new["batch_stats"]["var"], rtol=1e-6)


def test_dtypes():
    # Under jit (eager op-by-op dispatch of a ResNet takes tens of seconds on 2 cores).
    tiny = flax_resnet.ArchSpec("resnet10", "basic", (1, 1, 1, 1))  # dtypes, not depth: the smallest ResNet
    model = flax_resnet.ResNet(arch=tiny, num_classes=10, dtype=jnp.bfloat16)
    x = jnp.ones((2, 32, 32, 3))
    v = jax.jit(model.init)(jax.random.key(0), x)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(v))  # param_dtype
    logits, new = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(v, x)
    assert logits.dtype == jnp.float32  # logits come back in fp32
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(new))
    feats = jax.jit(lambda v, x: model.apply(v, x, method="features"))(v, x)
    assert feats["layer4"].dtype == jnp.bfloat16 and feats["layer4"].shape == (2, 1, 1, 512)
    with jax.enable_x64(True):  # float64 variables and inputs compute in float64
        v64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), v)
        out = jax.jit(model.clone(dtype=None).apply)(v64, np.ones((1, 32, 32, 3)))
        assert out.dtype == jnp.float64


def test_features_and_train_keyword():
    model = flax_resnet.resnet50(num_classes=7)
    x = jnp.ones((2, 64, 64, 3))
    v = jax.eval_shape(model.init, jax.random.key(0), x)  # shapes suffice: no eager init
    feats = jax.eval_shape(lambda v, x: model.apply(v, x, method="features"), v, x)
    assert set(feats) == {"stem", "layer1", "layer2", "layer3", "layer4", "pre_logits"}  # traced dicts come back key-sorted
    assert feats["stem"].shape == (2, 16, 16, 64) and feats["layer4"].shape == (2, 2, 2, 2048)
    assert jax.eval_shape(model.apply, v, x).shape == (2, 7)
    with pytest.raises(flax.errors.ModifyScopeVariableError):  # train=True without mutable batch_stats must not silently pass
        jax.eval_shape(lambda v, x: model.apply(v, x, train=True), v, x)


@pytest.mark.parametrize("stride,groups", [(1, 32), (2, 4)])
def test_grouped_conv_gradients_equal_lax(stride, groups):
    """ResNeXt's grouped convs: custom kernel gradient (batched matmuls) == JAX's conv transpose."""
    from flax_resnet.kernels import _NHWC, conv_general_dilated

    rng = np.random.default_rng(0)
    args = ((stride, stride), ((1, 1), (1, 1)))
    ours = lambda x, w: conv_general_dilated(x, w, *args, dimension_numbers=_NHWC, feature_group_count=groups)  # noqa: E731
    lax = lambda x, w: jax.lax.conv_general_dilated(x, w, *args, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)  # noqa: E731
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((3, 9, 9, 64)))
        w = jnp.asarray(rng.standard_normal((3, 3, 64 // groups, 128)))
        dy = jnp.asarray(rng.standard_normal(lax(x, w).shape))
        want = jax.vjp(lax, x, w)[1](dy)
        got = jax.jit(lambda x, w, dy: jax.vjp(ours, x, w)[1](dy))(x, w, dy)
        for g, wt in zip(got, want):
            assert g.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(g), np.asarray(wt), rtol=0, atol=1e-12 * float(jnp.abs(wt).max()))
    bf = [a.astype(jnp.bfloat16) for a in (x, w, dy)]
    dw = jax.vjp(ours, *bf[:2])[1](bf[2])[1]
    assert dw.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dw, np.float32), np.asarray(want[1], np.float32), rtol=0, atol=2e-2 * float(jnp.abs(want[1]).max()))


def test_nchw_batch_is_refused_with_one_line():
    model = flax_resnet.resnet18(num_classes=3)
    v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    for shape in [(2, 3, 32, 32), (2, 32, 32, 1)]:
        with pytest.raises(ValueError, match=r"inputs are NHWC: expected 3 channels in the last axis, got shape") as e:
            jax.eval_shape(model.apply, v, jnp.zeros(shape))
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"one image of shape \(32, 32, 3\) with no batch axis \(use x\[None\]\)"):
        jax.eval_shape(model.apply, v, jnp.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match=r"NCHW batch\? use x.transpose\(0, 2, 3, 1\)"):
        jax.eval_shape(model.apply, v, jnp.zeros((2, 3, 32, 32)))
    deep = flax_resnet.resnet18d(num_classes=3, in_channels=1)  # the deep stem's first conv is conv1/0
    vd = jax.eval_shape(deep.init, jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
    with pytest.raises(ValueError, match="expected 1 channels"):
        jax.eval_shape(deep.apply, vd, jnp.zeros((2, 32, 32, 3)))
