"""timm's squeeze-and-excitation ResNets and ResNet-RS: rows of ``ARCHS`` (``attn="se"``, ``stem_pool="conv"``).

What ties them to real timm: ``tests/reference/<arch>.npz`` (``tools/make_reference_fixtures.py``
with timm 1.0.31: keys, shapes, parameter count and float64 eval/train/gradient numbers; checked
for ``torch_ref`` and Flax by ``tests/test_reference.py``) and timm's published parameter counts.
Here: the table's SE rule, parity against ``torch_ref`` through the harness (float64 and fp32 within
torch's own spread), the converter both ways, key/shape inference and ``from_pretrained`` of a
timm hub id through a cache built here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flax_resnet
import torch_ref
from flax_resnet import archs
from flax_resnet.convert import flax_to_torch, infer_config, torch_to_flax
from parity import harness
from parity.fixtures import images, reference_model

SE = ("seresnet50", "seresnext26d_32x4d", "seresnext50_32x4d", "seresnext101_32x8d")
RS = ("resnetrs50", "resnetrs101")
# timm's model cards (huggingface.co/timm/<name>.*): "Params (M)".
PUBLISHED_M = {"seresnet50": 28.1, "seresnext26d_32x4d": 16.8, "seresnext50_32x4d": 27.6, "seresnext101_32x8d": 93.6, "resnetrs50": 35.7, "resnetrs101": 63.6}


def check(report):
    assert report.passed, "\n" + report.format()
    return report


@pytest.fixture(autouse=True)
def _release_compiled():
    yield
    harness._jitted.cache_clear()
    jax.clear_caches()


def _shapes(arch: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in torch_ref.ResNet(arch, num_classes=num_classes).state_dict().items()}


@pytest.mark.parametrize("arch", SE + RS)
def test_rows_have_timms_parameter_counts(arch):
    """Flax's own parameters (Linen init) and torch_ref's: timm's count (``TIMM_PARAM_COUNTS``, measured with timm 1.0.31), which rounds to the model card's."""
    want = flax_resnet.TIMM_PARAM_COUNTS[arch]
    assert round(want / 1e6, 1) == PUBLISHED_M[arch]
    shapes = jax.eval_shape(lambda: flax_resnet.ResNet(arch=arch).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    assert sum(np.prod(a.shape) for a in jax.tree.leaves(shapes["params"])) == want
    assert sum(np.prod(s) for k, s in _shapes(arch).items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))) == want


def test_se_reduction_is_timms_make_divisible():
    """fc1 outputs ``make_divisible(channels * rd_ratio, 8, round_limit=0)``: nearest multiple of 8, at least 8."""
    se, rs = archs.get_arch("seresnet50"), archs.get_arch("resnetrs50")
    assert [se.attn_channels(c) for c in (256, 512, 1024, 2048)] == [16, 32, 64, 128]
    assert [rs.attn_channels(c) for c in (256, 2048)] == [64, 512]
    assert [se.attn_channels(c) for c in (64, 72, 200, 120)] == [8, 8, 16, 8]  # 4 -> 8 (minimum), 4.5 -> 8, 12.5 -> 16, 7.5 -> 8
    b = next(b for b in archs.blocks(rs) if b.name == "layer2.0")
    assert [(c.in_ch, c.out_ch, c.bias) for c in b.attn_convs] == [(512, 128, True), (128, 512, True)]
    names = [layer.torch for layer in archs.layers(rs)]
    assert names[names.index("bn1") + 1 : names.index("bn1") + 3] == ["maxpool.0", "maxpool.1"]  # replace_stem_pool
    assert names.index("layer1.0.bn3") < names.index("layer1.0.se.fc1") < names.index("layer1.0.se.fc2") < names.index("layer1.0.downsample.1")


# float64 proves the structure (eval, train, gradients); fp32 is judged against torch's own fp32 error.
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_seresnext26d_parity_at_odd_size(dtype):
    """SE + grouped 3x3 + deep stem + avg-pool shortcut (partial last window at 33x47)."""
    model = reference_model("seresnext26d_32x4d", calibrate_size=33)
    r = check(harness.run_parity(model, images(2, 3, 33, 47).numpy(), modes=("eval", "train", "grad"), dtype=dtype))
    logits = r.point("eval", "logits")
    assert r.arch == "seresnext26d_32x4d" and logits.rel <= (1e-10 if dtype == "float64" else 2 * logits.torch_rel)


def test_resnetrs50_eval_float64():
    """ResNet-RS's conv stem pool, SE of ratio 1/4, deep stem, avg-pool shortcut: eval in float64 (the fast tier's RS check)."""
    r = check(harness.run_parity(reference_model("resnetrs50", calibrate_size=33), images(2, 3, 33, 33).numpy(), modes=("eval",), dtype="float64"))
    assert r.point("eval", "logits").rel <= 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("arch,dtype", [("resnetrs50", "float64"), ("resnetrs50", "float32"), ("seresnet50", "float64"), ("seresnet50", "float32")])
def test_full_depth_parity(arch, dtype):
    r = check(harness.run_parity(reference_model(arch, calibrate_size=33), images(2, 3, 33, 47).numpy(), modes=("eval", "train", "grad"), dtype=dtype))
    logits = r.point("eval", "logits")
    assert logits.rel <= (1e-10 if dtype == "float64" else 2 * logits.torch_rel)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnetrs101", "seresnext101_32x8d"])
def test_101_layer_rows_float64_scanned(arch):
    r = check(harness.run_parity(reference_model(arch, calibrate_size=33), images(2, 3, 33, 33).numpy(), modes=("eval", "train", "grad"), dtype="float64", scan_blocks=True))
    assert r.point("eval", "logits").rel <= 1e-10


@pytest.mark.parametrize("arch", SE + RS)
def test_converter_round_trip_is_bit_exact(arch):
    """timm's state_dict -> Flax -> torch: the same keys in the same order and the same bytes (SE biases included)."""
    rng = np.random.default_rng(0)
    sd = {k: (np.array(7, np.int64) if k.endswith("num_batches_tracked") else rng.normal(size=s).astype(np.float32)) for k, s in _shapes(arch, 10).items()}
    cfg = infer_config(sd)
    assert (cfg.arch, cfg.layout, cfg.num_classes, cfg.in_channels) == (arch, "torchvision", 10, 3)
    v = torch_to_flax(sd)
    assert v["params"]["layer1"]["0"]["se"]["fc1"]["bias"].shape == sd["layer1.0.se.fc1.bias"].shape
    if arch in RS:
        assert v["params"]["maxpool"]["0"]["kernel"].shape == (3, 3, 64, 64) and "1" in v["batch_stats"]["maxpool"]
    back = flax_to_torch(v, num_batches_tracked=7)
    assert list(back) == list(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and back[k].tobytes() == sd[k].tobytes(), k
    again = torch_to_flax(flax_to_torch(torch_to_flax(sd, scan_blocks=True)))
    assert jax.tree.all(jax.tree.map(lambda a, b: a.tobytes() == b.tobytes(), again, v))


def test_every_row_has_its_own_signature():
    """infer_config matches generated signatures; no two rows may share one (it would raise as ambiguous)."""
    from flax_resnet.mapping import ModelConfig, leaves

    seen = {}
    for name in flax_resnet.ARCHS:
        sig = frozenset((leaf.torch_key, leaf.torch_shape) for leaf in leaves(ModelConfig(name, "torchvision", 1000, 3)))
        assert sig not in seen, f"{name} and {seen.get(sig)} have the same keys and shapes"
        seen[sig] = name


def test_ambiguous_rows_raise(monkeypatch):
    from flax_resnet.convert import ConversionError

    sd = {k: np.zeros(s, np.float32) for k, s in _shapes("seresnext26d_32x4d").items()}
    twin = archs.ArchSpec("seresnext26d_twin", "bottleneck", (2, 2, 2, 2), groups=32, width_per_group=4, stem="deep", shortcut="avg_down", attn="se", source="timm")
    monkeypatch.setitem(archs.ARCHS, twin.name, twin)
    with pytest.raises(ConversionError, match="ambiguous state_dict: rows seresnext26d_32x4d, seresnext26d_twin have the same keys and shapes"):
        infer_config(sd)


def test_se_without_its_se_keys_is_not_another_row():
    """A seresnet50 state_dict missing its SE keys is refused as what it is, not loaded as a resnet50."""
    sd = {k: np.zeros(s, np.float32) for k, s in _shapes("seresnet50").items()}
    sd.pop("layer3.2.se.fc2.bias")
    assert infer_config(sd).arch == "seresnet50"
    from flax_resnet.convert import ConversionError

    with pytest.raises(ConversionError, match="layer3.2.se.fc2.bias"):
        torch_to_flax(sd)


def test_nnx_model_has_timms_names_and_the_linen_numbers():
    """The NNX twin: the same state paths (``layer1[0].se.fc1``, ``maxpool[0]``) and the same logits as Linen (float64)."""
    from flax import nnx

    import flax_resnet.nnx as frn

    model = reference_model("resnetrs50", num_classes=5, calibrate_size=33).double()
    sd = model.state_dict()
    with jax.enable_x64(True):
        m = frn.from_torch(sd)
        m.eval()
        assert m.layer1[0].se.fc1.bias.shape == (64,) and m.maxpool[0].kernel.shape == (3, 3, 64, 64)
        back = frn.to_torch(m)
        assert list(back) == list(sd) and all(np.array_equal(back[k], sd[k].numpy()) for k in sd if not k.endswith("num_batches_tracked"))
        x = images(1, 3, 33, 33, dtype=torch.float64)
        got = np.asarray(nnx.jit(lambda m, x: m(x))(m, x.numpy().transpose(0, 2, 3, 1)))
        with torch.no_grad():
            want = model(x).numpy()
    assert np.max(np.abs(got - want)) <= 1e-10 * np.max(np.abs(want))


def test_from_pretrained_timm_seresnext_through_the_hf_cache(tmp_path, monkeypatch):
    """``from_pretrained("timm/seresnext50_32x4d.racm_in1k")`` reads a Hugging Face cache laid out as huggingface_hub does (built here, offline)."""
    import json

    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    torch.manual_seed(0)
    model = torch_ref.seresnext50_32x4d()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / "hf" / "models--timm--seresnext50_32x4d.racm_in1k"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    cfg = {
        "architecture": "seresnext50_32x4d",
        "num_classes": 1000,
        "pretrained_cfg": {"input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 0.95, "crop_mode": "center", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    }
    (snap / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(snap / "model.safetensors"))

    m, v = flax_resnet.from_pretrained("timm/seresnext50_32x4d.racm_in1k", download=False)
    assert m.spec.name == "seresnext50_32x4d" and m.num_classes == 1000
    want = torch_to_flax(sd)
    assert jax.tree.structure(v) == jax.tree.structure(want)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(want)))


def test_batchnorm_fold_covers_the_stem_pool_conv_and_keeps_se_biases():
    """``inference.fold`` pairs come from ``archs.conv_bn_pairs``: ``maxpool.0``/``maxpool.1`` fold, SE's fc1/fc2 keep their biases (float64)."""
    from flax_resnet import inference

    torch_model = reference_model("resnetrs50", num_classes=5, calibrate_size=33).double()
    with jax.enable_x64(True):
        model, v = flax_resnet.from_torch(torch_model.state_dict())
        fm, fv = inference.fold(model, v)
        assert sorted(fv["params"]["maxpool"]) == ["0"] and np.array_equal(fv["params"]["layer1"]["0"]["se"]["fc1"]["bias"], v["params"]["layer1"]["0"]["se"]["fc1"]["bias"])
        x = np.random.default_rng(0).normal(size=(2, 33, 33, 3))
        a, b = np.asarray(jax.jit(model.apply)(v, x)), np.asarray(jax.jit(fm.apply)(fv, x))
    assert np.max(np.abs(a - b)) <= 1e-12 * np.max(np.abs(a))
