"""torch_ref reproduces the seed code exactly and torchvision's key layout."""

import pytest
import torch

import seed_oracle
import torch_ref
from flax_resnet import ARCHS, PARAM_COUNTS
from parity.fixtures import images, randomize_and_calibrate

SEED_DEPTHS = ["resnet50", "resnet101", "resnet152"]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_torchvision_layout_parameter_count(arch):
    """torchvision's and timm's published counts (1000 classes, 3 channels)."""
    with torch.device("meta"):  # shapes only: no memory, no init
        model = torch_ref.ResNet(arch, layout="torchvision")
    assert n_params(model) == PARAM_COUNTS[arch]


@pytest.mark.parametrize("arch", SEED_DEPTHS)
def test_seed_layout_keys_and_shapes_equal_the_seed_code(arch):
    ours = torch_ref.ResNet(arch, layout="seed").state_dict()
    seed = getattr(seed_oracle, arch)().state_dict()
    assert list(ours) == list(seed)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in seed.items()}
    assert "layer1.0.identity_downsample.0.bias" in ours and "conv1.bias" in ours


@pytest.mark.parametrize(
    "arch,img_channels,num_classes",
    [("resnet50", 3, 1000), ("resnet101", 3, 1000), ("resnet152", 3, 1000), ("resnet50", 1, 10)],
)
def test_seed_state_dict_loads_strictly_and_gives_bit_identical_outputs(arch, img_channels, num_classes):
    torch.manual_seed(0)
    seed = getattr(seed_oracle, arch)(img_channels=img_channels, num_classes=num_classes)
    randomize_and_calibrate(seed, in_channels=img_channels, size=32, batches=2, batch_size=4)
    ours = getattr(torch_ref, arch)(img_channels=img_channels, num_classes=num_classes, layout="seed")
    ours.load_state_dict(seed.state_dict(), strict=True)
    ours.eval()
    x = images(2, img_channels, 45, 61)
    with torch.no_grad():
        assert torch.equal(ours(x), seed(x))
    # Train mode too: same batch statistics and running-stat updates.
    ours.train(), seed.train()
    with torch.no_grad():
        assert torch.equal(ours(x), seed(x))
    for (k, a), (_, b) in zip(ours.state_dict().items(), seed.state_dict().items()):
        assert torch.equal(a, b), k


def test_torchvision_keys():
    sd = torch_ref.resnet50(layout="torchvision").state_dict()
    assert "layer1.0.downsample.0.weight" in sd and "layer1.0.downsample.1.running_var" in sd
    assert "bn1.num_batches_tracked" in sd
    assert not any(k.endswith(".bias") and ".conv" in k or k == "conv1.bias" for k in sd)
    assert not any("identity_downsample" in k for k in sd)
    # Basic blocks: no shortcut in layer1 (64 -> 64 channels), one in layer2.
    sd18 = torch_ref.resnet18().state_dict()
    assert not any(k.startswith("layer1.0.downsample") for k in sd18)
    assert sd18["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)


def test_seed_layout_only_for_bottleneck_50_101_152():
    with pytest.raises(ValueError, match="only for resnet50/101/152"):
        torch_ref.ResNet("resnext50_32x4d", layout="seed")
    with pytest.raises(ValueError, match="unknown architecture"):
        torch_ref.ResNet("resnet51")


def test_v1_moves_the_stride_to_the_first_1x1_conv():
    v15 = torch_ref.ResNet("resnet50")
    v1 = torch_ref.ResNet("resnet50", stride_in_1x1=True)
    assert v15.layer2[0].conv2.stride == (2, 2) and v15.layer2[0].conv1.stride == (1, 1)
    assert v1.layer2[0].conv1.stride == (2, 2) and v1.layer2[0].conv2.stride == (1, 1)


@pytest.mark.parametrize(
    "module,forbidden",
    [("torch_ref", ("jax", "flax", "jaxlib")), ("flax_resnet", ("torch",)), ("flax_resnet.archs", ("jax", "torch"))],
)
def test_import_isolation(module, forbidden):
    """``import torch_ref`` needs no JAX (it reads only ``flax_resnet.archs``); ``import flax_resnet`` needs no torch."""
    import subprocess
    import sys

    code = f"import sys, {module}; print(sorted(m for m in {forbidden!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_factory_defaults_to_the_torchvision_layout():
    for name in ARCHS:
        assert getattr(torch_ref, name).__defaults__[2] == "torchvision", name
    assert "layer1.0.downsample.0.weight" in torch_ref.resnet50().state_dict()
    assert "layer1.0.identity_downsample.0.bias" in torch_ref.resnet50(layout="seed").state_dict()
