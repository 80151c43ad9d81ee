"""Every constructor setting that changes numbers, at a non-default value, in both front ends against torch.

BatchNorm momentum and eps, ResNet v1 strides (``stride_in_1x1``), conv
biases (the seed layout), ``zero_init_residual``, compute/param dtypes and
precision: the torch side is ``torch_ref.build(config)``, the Flax side (Linen
and NNX) is built by the harness from the same ``ModelConfig``. Each setting
is also planted as a bug (the Flax side left at its default while torch has
the setting): every one must FAIL, so a front end that drops a setting fails
here.
"""

import jax
import numpy as np
import pytest

import flax_resnet
import torch_ref
from flax_resnet.config import ModelConfig
from parity import fixtures, harness

APIS = ["linen", "nnx"]
# A bottleneck row (stride placement matters) with every BatchNorm setting off its default.
SETTINGS = ModelConfig("resnet14t", bn_momentum=0.7, bn_eps=1e-3, stride_in_1x1=True)


def x_(batch=2, size=32, channels=3):
    return fixtures.images(batch, channels, size, size).numpy()


@pytest.fixture(scope="module")
def model():
    return fixtures.calibrated(SETTINGS, seed=2)


def test_torch_ref_build_applies_the_settings(model):
    bns = [m for m in model.modules() if type(m).__name__ == "BatchNorm2d"]
    assert {(m.momentum, m.eps) for m in bns} == {(1 - 0.7, 1e-3)}  # Flax's momentum convention: torch's is 1 - it
    assert model.layer2[0].conv1.stride == (2, 2) and model.layer2[0].conv2.stride == (1, 1)  # v1: the 1x1 conv strides


@pytest.mark.parametrize("api", APIS)
def test_non_default_batchnorm_and_strides_match_torch_in_float64(model, api):
    r = harness.run_parity(model, x_(), modes=("eval", "train"), dtype="float64", api=api, config=SETTINGS)
    assert r.passed, r.format()
    assert r.point("train", "running_var layer4").rel <= 1e-9


BUGGY = {  # the Flax side's setting left at its default; the point that must fail
    "bn_momentum": ("train", "running_mean layer1"),
    "bn_eps": ("eval", "stem"),
    "stride_in_1x1": ("eval", "layer2.0"),
}


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("field", list(BUGGY))
def test_planted_setting_bugs_fail(model, api, field):
    """A front end that drops a setting fails: Flax built with the default, torch with the setting."""
    mode, point = BUGGY[field]
    dropped = SETTINGS.replace(**{field: getattr(ModelConfig("resnet14t"), field)})
    r = harness.run_parity(model, x_(), modes=(mode,), dtype="float64", api=api, config=dropped)
    assert not r.passed and not r.point(mode, point).passed, r.format()
    assert r.first_failure.mode == mode


@pytest.mark.parametrize("api", APIS)
def test_zero_init_residual_in_both_front_ends_and_torch(api):
    """The same BatchNorm scales start at zero in torch_ref.build, Linen and NNX; such a model matches torch in float64."""
    config = ModelConfig("resnet10t", zero_init_residual=True)
    torch_model = torch_ref.build(config)
    zero_torch = {k for k, v in torch_model.state_dict().items() if k.endswith(".weight") and v.ndim == 1 and not v.any()}
    assert zero_torch == {f"layer{s}.0.bn2.weight" for s in (1, 2, 3, 4)}
    if api == "linen":
        v = jax.jit(flax_resnet.build(config).init)(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    else:
        import flax_resnet.nnx as frn

        v = frn.to_linen(flax_resnet.build(config, api="nnx"))
    sd = flax_resnet.convert.flax_to_torch(jax.device_get(v))
    assert {k for k, a in sd.items() if k.endswith(".weight") and a.ndim == 1 and not np.asarray(a).any()} == zero_torch
    r = harness.run_parity(torch_model, x_(), modes=("eval", "train", "grad"), dtype="float64", api=api, config=config)
    assert r.passed, r.format()


@pytest.mark.slow
@pytest.mark.parametrize("api", APIS)
def test_conv_bias_seed_layout_with_batchnorm_settings(api):
    """Conv biases (seed layout) with momentum and eps off their defaults, in float64."""
    config = ModelConfig("resnet50", "seed", num_classes=10, bn_momentum=0.8, bn_eps=1e-4)
    r = harness.run_parity(fixtures.calibrated(config, seed=3), x_(2, 32), modes=("eval", "train"), dtype="float64", api=api, config=config)
    assert r.passed, r.format()
    assert r.layout == "seed"


@pytest.mark.parametrize("api", ["linen", pytest.param("nnx", marks=pytest.mark.slow)])
def test_compute_dtype_and_precision_off_default(model, api):
    """bfloat16 compute against torch autocast, and precision "highest" from the config, in both front ends."""
    r = harness.run_parity(model, x_(), modes=("eval",), dtype="bfloat16", api=api, config=SETTINGS)
    assert r.passed, r.format()
    assert r.point("eval", "logits").rel > 1e-4  # bfloat16 is far from fp32: the comparison is not vacuous
    precise = SETTINGS.replace(precision="highest")
    r = harness.run_parity(model, x_(), modes=("eval",), dtype="float32", precision="default", api=api, config=precise)
    assert r.passed, r.format()
