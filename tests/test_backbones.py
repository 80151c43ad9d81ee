"""timm-style backbones: ``features_only=True, out_indices=...`` (Linen and NNX) against timm's own ``features_only`` model.

``tests/reference/features/<arch>.npz`` holds what timm 1.0.31's ``FeatureListNet``
(``timm.create_model(arch, features_only=True, out_indices=(0, 1, 2, 3, 4))``) computes in float64
on weights ``parity.reference_weights`` regenerates from the key names
(``tools/make_reference_fixtures.py --features``): each map's shape, pooled channels, a digest and
channel 0. The Flax maps must agree to 1e-10 of their magnitude.
"""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_resnet
from parity import reference_weights as rw

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = {os.path.basename(p)[:-4]: p for p in sorted(glob.glob(os.path.join(HERE, "reference", "features", "*.npz")))}
FAST = ("resnet18", "seresnext26d_32x4d")
TOL = 1e-10


def _fixture(arch):
    with np.load(FIXTURES[arch], allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    return json.loads(bytes(arrays.pop("meta"))), arrays


def _close(errors, name, got, want, scale=None):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = scale or float(np.max(np.abs(want))) or 1.0
    if got.shape != want.shape or not np.max(np.abs(got - want)) <= TOL * scale:
        errors.append(f"{name}: {got.shape} vs {want.shape}, rel err {np.max(np.abs(got - want)) / scale if got.shape == want.shape else 'n/a'}")


def _compare(arch, run):
    """``run(x_nhwc) -> list of 5 NHWC maps`` against the fixture at both sizes."""
    meta, want = _fixture(arch)
    errors = []
    assert [d["module"] for d in meta["feature_info"]] == list(flax_resnet.model.FEATURE_NAMES)
    for size in rw.SIZES:
        maps = run(rw.images(size).transpose(0, 2, 3, 1))
        for d, f in zip(meta["feature_info"], maps):
            f = np.asarray(f).transpose(0, 3, 1, 2)
            name = f"{size} {d['module']}"
            shape = tuple(want[f"{size}/{d['module']}/shape"])
            if f.shape != shape:
                errors.append(f"{name}: shape {f.shape} != {shape}")
                continue
            _close(errors, f"{name} pooled", rw.pooled(f), want[f"{size}/{d['module']}/pooled"])
            got, scale = rw.digest_scale(d["module"], f)
            _close(errors, f"{name} digest", got, want[f"{size}/{d['module']}/digest"], scale=scale)
            _close(errors, f"{name} channel 0", f[:, 0], want[f"{size}/{d['module']}/channel0"])
    assert not errors, f"{arch} features differ from timm's features_only model:\n" + "\n".join(errors)


def _weights(arch):
    meta, _ = _fixture(arch)
    return rw.reference_weights({k: tuple(s) for k, s in meta["keys"]})  # timm's features_only keys: no fc


def _check_arch(arch):
    import flax_resnet.nnx as frn
    from flax import nnx

    weights = _weights(arch)
    with jax.enable_x64(True):
        model, variables = flax_resnet.from_torch(weights, arch=arch)  # headless: num_classes 0
        feat = model.clone(features_only=True)
        fn = jax.jit(lambda v, x: feat.apply(v, x))
        _compare(arch, lambda x: fn(variables, x))
        m = frn.from_torch(weights, arch=arch, features_only=True)
        m.eval()
        nfn = nnx.jit(lambda m, x: m(x))
        _compare(arch, lambda x: nfn(m, x))


def test_feature_fixtures_exist():
    assert set(FAST) <= set(FIXTURES)


@pytest.mark.parametrize("arch", FAST)
def test_feature_maps_match_timm(arch):
    _check_arch(arch)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [a for a in FIXTURES if a not in FAST])
def test_feature_maps_match_timm_full_depth(arch):
    _check_arch(arch)


def test_out_indices_select_maps_and_drop_the_rest():
    """timm's ``out_indices``: the chosen maps in order, strides 2..32; no fc and no stage past the last one."""
    from flax import nnx

    import flax_resnet.nnx as frn

    x = jnp.zeros((2, 64, 64, 3))
    model = flax_resnet.resnet18(features_only=True, out_indices=(1, 3))
    v = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    assert sorted(v["params"]) == ["bn1", "conv1", "layer1", "layer2", "layer3"]
    maps = jax.eval_shape(model.apply, v, x)
    assert [m.shape for m in maps] == [(2, 16, 16, 64), (2, 4, 4, 256)]
    full = flax_resnet.resnetrs50(features_only=True)  # every stride: 2 (act1, before the conv stem pool), 4, 8, 16, 32
    maps = jax.eval_shape(lambda: full.apply(full.init(jax.random.key(0), x), x))
    assert [(m.shape[1], m.shape[3]) for m in maps] == [(32, 64), (16, 256), (8, 512), (4, 1024), (2, 2048)]
    n = frn.resnet18(features_only=True, out_indices=(0, 2), rngs=nnx.Rngs(0))
    assert n.fc is None and not hasattr(n, "layer3")
    for bad in ((5,), (), (1, 1)):
        with pytest.raises(ValueError, match=r"out_indices .*choose distinct indices from 0..4 \(act1, layer1, layer2, layer3, layer4\)"):
            flax_resnet.resnet18(features_only=True, out_indices=bad).init(jax.random.key(0), x)
