"""timm's ResNet variants: deep stems (``deep``, ``deep_tiered``) and avg-pool shortcuts.

Parity against ``torch_ref`` (which mirrors timm's modules and key names) at
odd input sizes, where the shortcut's ``AvgPool2d(2, 2, ceil_mode=True,
count_include_pad=False)`` has a partial last window: eval, train and grad
in float64 (<= 1e-10 / 1e-9 of the reference) and in float32 (the harness's
rule against torch's own fp32 error). Small models; one ResNet-50-D.
"""

import numpy as np
import pytest
import torch

import flax_resnet
from flax_resnet.layers import avg_pool_ceil
from parity import harness
from parity.fixtures import images, reference_model

# (arch, what it covers)
CASES = [
    ("resnet10t", "deep_tiered stem, avg_down, basic blocks"),
    ("resnet18d", "deep stem, avg_down, basic blocks (layer1 without shortcut)"),
    ("resnet26d", "deep stem, avg_down at stride 1 (identity pool) and 2, bottlenecks"),
]


def check(report):
    assert report.passed, "\n" + report.format()
    return report


@pytest.fixture(autouse=True)
def _release_compiled():
    yield
    import jax

    harness._jitted.cache_clear()
    jax.clear_caches()


# float64 proves the structure of each; fp32 (the noise-floor rule) for one basic and one bottleneck model.
@pytest.mark.parametrize("arch,dtype", [(a, "float64") for a, _ in CASES] + [("resnet10t", "float32"), ("resnet26d", "float32")])
def test_variant_parity_at_odd_size(arch, dtype):
    model = reference_model(arch, calibrate_size=33)
    x = images(2, 3, 33, 47).numpy()  # 33x47 -> ... -> 3x2: odd at every avg-pool
    r = check(harness.run_parity(model, x, modes=("eval", "train", "grad"), dtype=dtype))
    assert r.arch == arch
    logits = r.point("eval", "logits")
    assert logits.rel <= (1e-10 if dtype == "float64" else 2 * logits.torch_rel)


def test_resnet50d_64x64_float64():
    r = check(harness.run_parity(reference_model("resnet50d"), images(2, 3, 65, 63).numpy(), modes=("eval", "train", "grad"), dtype="float64"))
    assert r.point("eval", "logits").rel <= 1e-10


@pytest.mark.parametrize("size,stride", [((7, 9), 2), ((1, 2), 2), ((6, 5), 2), ((5, 5), 1)])
def test_avg_pool_ceil_equals_torch(size, stride):
    """ceil_mode's partial last window, averaged over the pixels it covers, in float64."""
    import jax

    x = np.random.default_rng(0).normal(size=(2, *size, 3))
    want = torch.nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)(torch.from_numpy(x).permute(0, 3, 1, 2))
    with jax.enable_x64(True):
        got = np.asarray(jax.jit(avg_pool_ceil, static_argnums=1)(x, stride))
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-15)


def test_flax_module_names_mirror_timm():
    import jax
    import jax.numpy as jnp

    shapes = jax.eval_shape(flax_resnet.resnet26t(num_classes=5).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    p = shapes["params"]
    assert sorted(p["conv1"]) == ["0", "1", "3", "4", "6"] and p["conv1"]["0"]["kernel"].shape == (3, 3, 3, 24)
    assert sorted(p["layer1"]["0"]["downsample"]) == ["1", "2"] and sorted(p["layer3"]["0"]["downsample"]) == ["1", "2"]
    assert p["layer3"]["0"]["downsample"]["1"]["kernel"].shape == (1, 1, 512, 1024)
