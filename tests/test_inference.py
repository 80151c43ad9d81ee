"""Speed forms that keep the numbers: BatchNorm folding and the CPU conv kernels.

Both are checked in float64 against the plain model, to 1e-12 of each
output's magnitude (folding and the dot change rounding only).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_resnet
from flax_resnet import inference, kernels
from flax_resnet.convert import ConversionError, from_torch, stack_blocks
from parity.fixtures import reference_model

TOL = 1e-12


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def r50():
    tm = reference_model("resnet50", calibrate_size=32)
    sd = {k: (v.double() if v.is_floating_point() else v) for k, v in tm.state_dict().items()}
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3))
    return sd, x


def test_folded_model_matches_eval(r50):
    sd, x = r50
    with jax.enable_x64(True):
        model, v = from_torch(sd)
        want = jax.jit(lambda v, x: model.apply(v, x, method="features"))(v, x)
        fmodel, fv = inference.fold(model, v)
        assert isinstance(fmodel, inference.FoldedResNet) and set(fv) == {"params"}
        p = fv["params"]
        assert "bn1" not in p and "bn2" not in p["layer2"]["0"] and "1" not in p["layer2"]["0"]["downsample"]
        assert p["layer2"]["0"]["conv2"]["bias"].shape == (128,) and p["layer2"]["0"]["downsample"]["0"]["bias"].shape == (512,)
        # The folded tree is exactly the tree of the folded model.
        shapes = jax.eval_shape(lambda: fmodel.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float64)))
        assert jax.tree_util.tree_map(np.shape, fv) == jax.tree_util.tree_map(lambda a: a.shape, dict(shapes))
        got = jax.jit(lambda v, x: fmodel.apply(v, x, method="features"))(fv, x)
        for k in want:
            assert _rel(got[k], want[k]) <= TOL, k
        assert _rel(jax.jit(fmodel.apply)(fv, x), jax.jit(model.apply)(v, x)) <= TOL
        # Scanned trees fold the same way (leading block axis broadcasts).
        smodel, sv = from_torch(sd, scan_blocks=True)
        sfm, sfv = inference.fold(smodel, sv)
        assert sfv["params"]["layer3"]["rest"]["conv2"]["bias"].shape == (5, 256)
        assert _rel(jax.jit(sfm.apply)(sfv, x), jax.jit(model.apply)(v, x)) <= TOL
        with pytest.raises(ValueError, match="inference only"):
            fmodel.apply(fv, x, train=True)


def test_fold_seed_layout_conv_bias_and_float32():
    tm = reference_model("resnet50", layout="seed", calibrate_size=32)
    sd = tm.state_dict()
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    model, v = from_torch(sd)
    assert model.conv_bias
    fmodel, fv = inference.fold(model, v)
    assert fv["params"]["conv1"]["kernel"].dtype == np.float32
    want, got = jax.jit(model.apply)(v, x), jax.jit(fmodel.apply)(fv, x)
    assert _rel(got, want) <= 1e-4  # float32 rounding through 50 layers


def test_fold_with_conv_bias_matches_torch_in_float64():
    """Seed layout (conv biases folded too) against the torch seed model's float64 eval logits."""
    import torch

    tm = reference_model("resnet50", layout="seed", num_classes=10, calibrate_size=32).double()
    with torch.no_grad():  # large conv biases: a fold that dropped them would show
        for name, p in tm.named_parameters():
            if name.endswith("bias") and "bn" not in name and name != "fc.bias" and ".1." not in name:
                p.normal_(0, 0.5)
    x = np.random.default_rng(4).normal(size=(2, 33, 47, 3))
    with torch.no_grad():
        want = tm.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    with jax.enable_x64(True):
        model, v = from_torch(tm.state_dict())
        fmodel, fv = inference.fold(model, v)
        got = np.asarray(jax.jit(fmodel.apply)(fv, x))
    assert got.dtype == np.float64 and _rel(got, want) <= 1e-10


def test_fold_refuses_missing_statistics(r50):
    sd, _ = r50
    _, v = from_torch(sd)
    with pytest.raises(ConversionError, match="no batch_stats"):
        inference.fold_batchnorm({"params": v["params"]})
    stats = jax.tree_util.tree_map(lambda a: a, v["batch_stats"])
    del stats["layer1"]["0"]["bn2"]
    with pytest.raises(ConversionError, match="layer1/0/bn2 missing"):
        inference.fold_batchnorm({"params": v["params"], "batch_stats": stats})


def test_cpu_kernels_same_numbers_as_plain_convs(r50):
    """The CPU default (1x1 convs and small-output convs as dots) against plain XLA convs everywhere (kernels.use_plain)."""
    sd, x = r50
    with jax.enable_x64(True):
        model, v = from_torch(sd)
        fast = jax.jit(lambda v, x, train: model.apply(v, x, train=train, mutable=["batch_stats"]), static_argnums=2)
        with kernels.use_plain():  # a fresh function: jit caches traces per function
            plain = jax.jit(lambda v, x, train: model.apply(v, x, train=train, mutable=["batch_stats"]), static_argnums=2)
            plain_hlo = plain.lower(v, x, False).as_text()
        assert plain_hlo.count("stablehlo.convolution") == 53
        assert fast.lower(v, x, False).as_text().count("stablehlo.convolution") == 9  # stem + 8 3x3; 36 1x1 convs and the 8 3x3 convs on inputs under 3x3 (layer3 at 2x2, layer4) are dots
        # train mode normalizes with batch statistics of 2 samples at layer4 (1x1), which
        # amplifies rounding differences: the parity harness's float64 train tolerance, 1e-9.
        for train, tol in ((False, TOL), (True, 1e-9)):
            (want, ws), (got, gs) = plain(v, x, train), fast(v, x, train)
            assert _rel(got, want) <= tol
            for a, b in zip(jax.tree_util.tree_leaves(gs), jax.tree_util.tree_leaves(ws)):
                assert _rel(a, b) <= tol


def test_bfloat16_runs_close_to_float32():
    tm = reference_model("resnet18", calibrate_size=32)
    model, v = from_torch(tm.state_dict())
    x = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)
    want = jax.jit(model.apply)(v, x)
    got = jax.jit(model.clone(dtype=jnp.bfloat16).apply)(v, x)
    assert got.dtype == jnp.float32 and _rel(got, want) < 5e-2
    # 1x1 stride-2 projections as dots: the strided slice picks the conv's sampling points.
    with kernels.use_plain():
        want = jax.jit(lambda v, x: model.apply(v, x, method="features"))(v, x)
    feats = jax.jit(lambda v, x: model.apply(v, x, method="features"))(v, x)
    assert _rel(feats["layer4"], want["layer4"]) < 1e-5


def test_predict_fn_chunks_a_batch_that_is_not_a_multiple(r50):
    sd, _ = r50
    model, v = from_torch(sd, param_dtype=np.float32)
    x = np.random.default_rng(3).normal(size=(5, 32, 32, 3)).astype(np.float32)
    want = jax.jit(model.apply)(v, x)
    got = inference.predict_fn(model, chunk=2)(v, x)
    assert got.shape == (5, 1000)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * float(np.abs(want).max()))
    feats = inference.predict_fn(model, chunk=3, method="features")(v, x)
    assert feats["pre_logits"].shape == (5, 2048)


def test_stack_then_fold_equals_fold_then_stack(r50):
    sd, _ = r50
    _, v = from_torch(sd)
    a = inference.fold_batchnorm(stack_blocks(v))
    b = stack_blocks(inference.fold_batchnorm(v))
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.array_equal(x, y)
