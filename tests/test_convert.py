"""The converter: strict both ways, bit-exact round trips, collected errors."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import flax_resnet
import torch_ref
from flax_resnet import ARCHS, ConversionError, flax_to_torch, from_torch, infer_config, torch_to_flax
from parity.fixtures import images, randomize_and_calibrate, reference_model

# Every torchvision row, one timm row per stem/shortcut/block combination (small ones), the seed layout.
TIMM_SMALL = ["resnet10t", "resnet14t", "resnet18d", "resnet26", "resnet26d", "resnet26t", "resnet50c", "resnet50s"]
CASES = (
    [(a, "torchvision") for a in ARCHS if ARCHS[a].source == "torchvision"]
    + [(a, "torchvision") for a in TIMM_SMALL]
    + [(a, "seed") for a in ("resnet50", "resnet101", "resnet152")]
)


def _sd(arch, layout, **kw):
    torch.manual_seed(0)
    return torch_ref.ResNet(arch, layout=layout, **kw).state_dict()


@pytest.fixture(scope="module")
def r50_tv():
    return _sd("resnet50", "torchvision")


@pytest.mark.parametrize("arch,layout", CASES)
def test_round_trip_is_bit_exact_and_loads_strictly(arch, layout):
    sd = _sd(arch, layout)
    g = torch.Generator().manual_seed(1)
    for v in sd.values():  # distinct, non-default values everywhere: two swapped leaves cannot round-trip
        if v.dtype == torch.int64:
            v.fill_(5)
        else:
            v.copy_(torch.rand(v.shape, generator=g) + 0.5)
    cfg = infer_config(sd)
    assert (cfg.arch, cfg.layout, cfg.num_classes, cfg.in_channels) == (arch, layout, 1000, 3)
    variables = torch_to_flax(sd)
    back = flax_to_torch(variables, layout=layout, num_batches_tracked=5)
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.numpy().dtype and back[k].tobytes() == v.numpy().tobytes(), k
    model = torch_ref.ResNet(arch, layout=layout)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_num_batches_tracked_is_written_back():
    sd = _sd("resnet18", "torchvision")
    back = flax_to_torch(torch_to_flax(sd), num_batches_tracked=7)
    assert back["bn1.num_batches_tracked"].dtype == np.int64 and int(back["layer4.1.bn2.num_batches_tracked"]) == 7


def test_flax_tree_mirrors_torch_names(r50_tv):
    v = torch_to_flax(r50_tv)
    assert v["params"]["layer1"]["0"]["downsample"]["0"]["kernel"].shape == (1, 1, 64, 256)
    assert v["batch_stats"]["layer3"]["5"]["bn2"]["var"].shape == (256,)
    np.testing.assert_array_equal(v["params"]["conv1"]["kernel"], r50_tv["conv1.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(v["params"]["fc"]["kernel"], r50_tv["fc.weight"].numpy().T)
    # The Flax model's own tree has exactly these shapes.
    model = flax_resnet.resnet50()
    import jax

    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)))
    got = jax.tree_util.tree_map(np.shape, v)
    want = jax.tree_util.tree_map(lambda s: s.shape, dict(shapes))
    assert got == want


def test_grouped_conv_weights(r50_tv):
    sd = _sd("resnext50_32x4d", "torchvision")
    w = sd["layer1.0.conv2.weight"]
    assert tuple(w.shape) == (128, 4, 3, 3)  # OIHW with I = in / groups
    k = torch_to_flax(sd)["params"]["layer1"]["0"]["conv2"]["kernel"]
    assert k.shape == (3, 3, 4, 128)


def test_keeps_source_dtype_and_casts_on_request():
    sd = {k: (v.double() if v.is_floating_point() else v) for k, v in _sd("resnet18", "torchvision").items()}
    v = torch_to_flax(sd)
    assert v["params"]["conv1"]["kernel"].dtype == np.float64 and v["batch_stats"]["bn1"]["var"].dtype == np.float64
    assert torch_to_flax(sd, dtype=np.float32)["params"]["fc"]["bias"].dtype == np.float32
    bf = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in sd.items()}
    assert str(torch_to_flax(bf)["params"]["fc"]["kernel"].dtype) == "bfloat16"


def test_strips_data_parallel_prefix(r50_tv):
    wrapped = {f"module.{k}": v for k, v in r50_tv.items()}
    model, v = from_torch(wrapped)
    assert model.arch == "resnet50" and not model.conv_bias
    np.testing.assert_array_equal(v["params"]["fc"]["bias"], r50_tv["fc.bias"].numpy())


def test_numpy_input_needs_no_torch(tmp_path, r50_tv):
    np.savez(tmp_path / "sd.npz", **{k: v.numpy() for k, v in r50_tv.items()})
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, flax_resnet\n"
        f"sd = dict(np.load(r'{tmp_path / 'sd.npz'}'))\n"
        "model, v = flax_resnet.from_torch(sd)\n"
        "back = flax_resnet.flax_to_torch(v)\n"
        "assert all(np.array_equal(back[k], sd[k]) for k in sd)\n"
        "print(model.arch)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "resnet50"


def test_infers_num_classes_and_channels():
    cfg = infer_config(_sd("resnet101", "seed", img_channels=1, num_classes=10))
    assert (cfg.arch, cfg.layout, cfg.num_classes, cfg.in_channels) == ("resnet101", "seed", 10, 1)


# --- errors: every problem collected into one exception --------------------


def test_resnet101_weights_into_resnet50():
    with pytest.raises(ConversionError) as e:
        torch_to_flax(_sd("resnet101", "torchvision"), arch="resnet50")
    err = e.value
    assert not err.missing and not err.mismatched
    assert "layer3.6.conv1.weight" in err.unexpected and "layer3.22.bn3.running_var" in err.unexpected
    assert len(err.unexpected) == 17 * 18  # 17 extra bottlenecks: 3 conv weights + 3 BNs x 5 keys
    msg = str(err)
    assert "\n" not in msg and "resnet50" in msg and "306 unexpected key(s)" in msg


def test_missing_extra_and_misshapen_keys_are_reported_together(r50_tv):
    sd = dict(r50_tv)
    del sd["layer2.1.bn2.running_mean"]
    sd["layer2.1.bn2.extra"] = torch.zeros(3)
    sd["fc.bias"] = torch.zeros(999)
    with pytest.raises(ConversionError) as e:
        torch_to_flax(sd)
    err = e.value
    assert err.missing == ["layer2.1.bn2.running_mean"]
    assert err.unexpected == ["layer2.1.bn2.extra"]
    assert err.mismatched == [("fc.bias", (1000,), (999,))]
    msg = str(err)
    for needle in ("layer2.1.bn2.running_mean", "layer2.1.bn2.extra", "fc.bias expected (1000,) found (999,)"):
        assert needle in msg


def test_wrong_conv_shape_is_named(r50_tv):
    sd = dict(r50_tv)
    sd["layer2.1.conv1.weight"] = sd["layer2.1.conv1.weight"][:, :100]
    with pytest.raises(ConversionError, match=r"layer2.1.conv1.weight expected \(128, 512, 1, 1\) found \(128, 100, 1, 1\)"):
        torch_to_flax(sd)


def test_not_a_resnet():
    with pytest.raises(ConversionError, match="not a ResNet state_dict"):
        torch_to_flax({"encoder.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ConversionError, match="no known architecture"):
        sd = _sd("resnet50", "torchvision")
        torch_to_flax({k: v for k, v in sd.items() if not k.startswith("layer4.2.")})


def test_flax_to_torch_is_strict(r50_tv):
    v = torch_to_flax(r50_tv)
    del v["batch_stats"]["layer1"]["0"]["bn1"]["mean"]
    v["params"]["layer1"]["0"]["bn1"]["bias"] = np.zeros(5, np.float32)
    with pytest.raises(ConversionError) as e:
        flax_to_torch(v)
    assert e.value.missing == ["batch_stats/layer1/0/bn1/mean"]
    assert e.value.mismatched == [("params/layer1/0/bn1/bias", (64,), (5,))]


# --- seed -> torchvision: conv biases fold into running_mean ----------------


@pytest.mark.parametrize("arch", ["resnet50"])
def test_seed_to_torchvision_fold_is_exact(arch):
    seed = reference_model(arch, "seed", num_classes=10).double()
    with torch.no_grad():  # large conv biases, so a missing fold would show
        for name, p in seed.named_parameters():
            if name.endswith("bias") and "bn" not in name and name != "fc.bias" and ".1." not in name:
                p.normal_(0, 0.5)
        randomize_and_calibrate(seed, size=32, batches=2)
    folded = torch_ref.ResNet(arch, num_classes=10, layout="torchvision").double()
    folded.load_state_dict({k: torch.from_numpy(v) for k, v in flax_to_torch(torch_to_flax(seed.state_dict()), layout="torchvision").items()}, strict=True)
    x = images(2, 3, 40, 56, dtype=torch.float64)
    with torch.no_grad():
        ref = seed.eval()(x)
        np.testing.assert_allclose(folded.eval()(x).numpy(), ref.numpy(), rtol=0, atol=1e-10 * ref.abs().max().item())
    # One train-mode SGD step: same logits, weights and running_var; each
    # running_mean stays shifted by exactly its (pre-step) conv bias.
    old_bias = {k: v.clone() for k, v in seed.state_dict().items() if k.endswith("bias")}
    outs = []
    for m in (seed, folded):
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        y = m(x)
        torch.nn.functional.cross_entropy(y, torch.tensor([1, 2])).backward()
        opt.step()
        outs.append((y.detach(), m.state_dict()))
    (y_seed, s_seed), (y_fold, s_fold) = outs
    np.testing.assert_allclose(y_fold.numpy(), y_seed.numpy(), rtol=0, atol=1e-10 * y_seed.abs().max().item())
    for k, v in s_fold.items():
        seed_key = k.replace(".downsample.", ".identity_downsample.")
        if k.endswith("running_mean"):
            prefix = k.rsplit(".", 1)[0]
            if prefix == "bn1":
                conv = "conv1"
            elif prefix.endswith(".1"):
                conv = prefix.replace(".downsample.1", ".identity_downsample.0")
            else:
                conv = prefix.rsplit(".", 1)[0] + ".conv" + prefix[-1]
            np.testing.assert_allclose(v.numpy(), (s_seed[seed_key] - old_bias[conv + ".bias"]).numpy(), rtol=0, atol=1e-12)
        elif k.endswith(("running_var", "weight")):
            np.testing.assert_allclose(v.numpy(), s_seed[seed_key].numpy(), rtol=1e-10, atol=1e-14)


# --- timm variants: told apart from keys and shapes alone ---------------------


def _shapes_only(arch):
    """A state_dict of zero-memory arrays with the real keys and shapes (meta-device torch model)."""
    with torch.device("meta"):
        m = torch_ref.ResNet(arch)
    return {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in m.state_dict().items()}


@pytest.mark.parametrize("arch", [a for a in ARCHS if ARCHS[a].source == "timm"])
def test_infer_config_tells_every_timm_row_apart(arch):
    cfg = infer_config(_shapes_only(arch))
    assert (cfg.arch, cfg.layout, cfg.num_classes, cfg.in_channels) == (arch, "torchvision", 1000, 3)


def test_timm_key_names():
    d = torch_ref.resnet50d().state_dict()
    for k in ("conv1.0.weight", "conv1.1.running_var", "conv1.3.weight", "conv1.4.bias", "conv1.6.weight", "bn1.weight"):
        assert k in d, k
    assert d["conv1.0.weight"].shape == (32, 3, 3, 3) and d["conv1.6.weight"].shape == (64, 32, 3, 3)
    assert "layer2.0.downsample.1.weight" in d and "layer2.0.downsample.2.running_var" in d
    assert not any(k.startswith("layer2.0.downsample.0.") for k in d)  # the avg-pool has no state
    assert "layer1.0.downsample.1.weight" in d  # stride 1: identity pool, conv and BN keep their indices
    t = torch_ref.resnet50t().state_dict()
    assert [t[f"conv1.{i}.weight"].shape[0] for i in (0, 3, 6)] == [24, 32, 64]
    s = torch_ref.resnet50s().state_dict()
    assert [s[f"conv1.{i}.weight"].shape[0] for i in (0, 3, 6)] == [64, 64, 128] and s["layer1.0.conv1.weight"].shape[1] == 128
    c = torch_ref.resnet50c().state_dict()
    assert "layer2.0.downsample.0.weight" in c and not any(".downsample.2." in k for k in c)
    v = torch_to_flax(d)
    assert set(v["params"]["conv1"]) == {"0", "1", "3", "4", "6"} and set(v["params"]["layer2"]["0"]["downsample"]) == {"1", "2"}


def test_unknown_variant_is_named():
    sd = _shapes_only("resnet18d")
    sd = {k.replace(".downsample.1.", ".downsample.0.").replace(".downsample.2.", ".downsample.1."): v for k, v in sd.items()}
    with pytest.raises(ConversionError, match=r"no known architecture has basic blocks.*deep stem of width 32, conv shortcut"):
        infer_config(sd)


# --- ownership: results never share memory with their source (issue 12) -----


def test_conversion_results_own_their_memory():
    tm = torch_ref.resnet18(num_classes=10)
    sd = tm.state_dict()
    _, v = from_torch(sd)
    before = {k: t.clone() for k, t in sd.items()}
    with torch.no_grad():  # keep training the torch model in place
        for t in sd.values():
            t.add_(1)
    back = flax_to_torch(v, num_batches_tracked=0)
    for k, t in before.items():
        assert np.array_equal(back[k], t.numpy()), k
    # and the other way: editing the Flax arrays leaves the exported state_dict alone
    import jax

    snapshot = {k: a.copy() for k, a in back.items()}
    for leaf in jax.tree_util.tree_leaves(v):
        leaf += 1
    for k, a in back.items():
        assert np.array_equal(a, snapshot[k]), k
    for k, a in back.items():
        assert a.flags.owndata or a.base is None or not np.shares_memory(a, sd[k].numpy()), k


# --- bad input: one ConversionError naming the key (issue 12) ---------------


def test_non_float_param_dtype_is_refused(r50_tv):
    for dt in (np.int32, np.int8, np.bool_):
        with pytest.raises(ConversionError, match="not a floating dtype"):
            from_torch(r50_tv, param_dtype=dt)


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("conv1.weight", np.zeros(64, np.float32), r"conv1.weight has shape \(64,\), expected a 4-d weight"),
        ("fc.weight", np.float32(1.0), r"fc.weight has shape \(\), expected a 2-d weight"),
        ("layer1.0.bn1.weight", "oops", "layer1.0.bn1.weight is a str, not a tensor"),
        ("layer1.0.bn1.bias", None, "layer1.0.bn1.bias is a NoneType, not a tensor"),
        ("layer2.0.bn1.weight", {"a": 1}, "layer2.0.bn1.weight is a dict, not a tensor"),
    ],
)
def test_bad_values_name_the_key(r50_tv, key, value, needle):
    sd = dict(r50_tv)
    sd[key] = value
    for fn in (infer_config, torch_to_flax, from_torch):
        with pytest.raises(ConversionError, match=needle) as e:
            fn(sd)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["float8", "meta", "sparse"])
def test_unsupported_tensors_name_the_key(r50_tv, kind):
    sd = dict(r50_tv)
    w = sd["layer3.1.bn2.weight"]
    sd["layer3.1.bn2.weight"] = {"float8": lambda: w.to(torch.float8_e4m3fn), "meta": lambda: w.to("meta"), "sparse": lambda: w.to_sparse()}[kind]()
    with pytest.raises(ConversionError, match=r"layer3.1.bn2.weight (has dtype float8_e4m3fn|is on the meta device|is a sparse_coo tensor)") as e:
        from_torch(sd)
    assert "\n" not in str(e.value)


def test_nonfinite_weights_are_refused_like_load(r50_tv):
    sd = dict(r50_tv)
    w = sd["layer2.0.conv2.weight"].clone()
    w[0, 0, 0, 0], w[1, 0, 0, 0] = float("nan"), float("inf")
    sd["layer2.0.conv2.weight"] = w
    with pytest.raises(ConversionError, match=r"non-finite values in layer2.0.conv2.weight \(1 NaN, 1 Inf of 147456\)"):
        from_torch(sd)
    _, v = from_torch(sd, allow_nonfinite=True)
    assert np.isnan(v["params"]["layer2"]["0"]["conv2"]["kernel"]).sum() == 1
