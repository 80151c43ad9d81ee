"""The NNX front end: structure, exact conversion, and the same numbers as the Linen model.

NNX vs Linen is compared in float64 from converted variables: eval outputs,
train-mode outputs and BatchNorm updates, and SGD steps of the library's
train steps, to 1e-12 of each tensor's magnitude. Conversions
(torch -> NNX -> torch, Linen -> NNX -> Linen) are checked byte for byte.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_resnet
import flax_resnet.nnx as frn
import torch_ref
from flax_resnet import training as linen_training
from flax_resnet.archs import ARCHS, PARAM_COUNTS
from flax_resnet.convert import ConversionError, is_stacked, torch_to_flax
from flax_resnet.nnx import training as nnx_training
from parity.fixtures import images, reference_model

TOL = 1e-12


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def _tree_rel(a, b) -> float:
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    return max(_rel(x, y) for (_, x), (_, y) in zip(la, lb))


def _same_bytes(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), k


def _torch_sd(arch: str, layout: str = "torchvision", dtype=torch.float32, num_classes: int = 10) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    sd = torch_ref.ResNet(arch, num_classes=num_classes, layout=layout).state_dict()
    return {k: (v.to(dtype) if v.is_floating_point() else v).numpy() for k, v in sd.items()}


def _abstract(arch: str, **kw) -> frn.ResNet:
    return nnx.eval_shape(lambda: frn.ResNet(arch, rngs=nnx.Rngs(0), **kw))


# --- structure ----------------------------------------------------------------


def test_torch_attribute_names_and_factories():
    m = _abstract("resnet50", num_classes=10)
    assert m.conv1.kernel.shape == (7, 7, 3, 64) and m.bn1.var.shape == (64,)
    assert m.layer1[0].conv2.kernel.shape == (3, 3, 64, 64)
    assert m.layer1[0].downsample[0].kernel.shape == (1, 1, 64, 256) and m.layer1[1].downsample is None
    assert m.layer4[2].bn3.scale.shape == (2048,) and m.fc.kernel.shape == (2048, 10)
    assert isinstance(m.bn1.scale, nnx.Param) and isinstance(m.bn1.mean, nnx.BatchStat)
    # timm's deep stem and avg_down shortcut, as torch's Sequentials.
    d = _abstract("resnet50d")
    assert [d.conv1[i].kernel.shape[-1] for i in (0, 3, 6)] == [32, 32, 64] and d.conv1[1].mean.shape == (32,)
    assert isinstance(d.layer2[0].downsample[0], frn.blocks.AvgDown) and d.layer2[0].downsample[1].kernel.shape == (1, 1, 256, 512)
    # One factory per row of the family table, with the signature.
    assert all(callable(getattr(frn, name)) for name in ARCHS)
    f = nnx.eval_shape(lambda: frn.resnext50_32x4d(num_classes=7, rngs=nnx.Rngs(1), dtype=jnp.bfloat16, param_dtype=jnp.float32))
    assert f.layer1[0].conv2.kernel.shape == (3, 3, 4, 128) and f.fc.kernel.dtype == jnp.float32 and f.dtype == jnp.bfloat16


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d", "resnet10t", "resnet50d"])
def test_parameter_counts_are_published_ones(arch):
    params = nnx.state(_abstract(arch), nnx.Param)
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == PARAM_COUNTS[arch]


def test_train_eval_switch_batchnorm():
    m = _abstract("resnet18")
    modes = lambda: {bn.use_running_average for _, bn in nnx.iter_modules(m) if isinstance(bn, frn.BatchNorm)}  # noqa: E731
    assert modes() == {False}  # new models train, as in torch
    m.eval()
    assert modes() == {True}
    m.train()
    assert modes() == {False}


def test_layers_initialize_like_linen():
    """torchvision's kaiming-normal (fan_out) convs, Linen's fc init, ones/zeros BatchNorm (zeros for zero_init_residual)."""
    from flax_resnet.archs import ConvSpec
    from flax_resnet.nnx.model import _fc_init, _Settings

    conv = _Settings().conv(ConvSpec(64, 256, 3, 1, 1), nnx.Rngs(0))
    assert float(jnp.std(conv.kernel[...])) == pytest.approx(np.sqrt(2 / (3 * 3 * 256)), rel=0.02)
    assert float(jnp.max(jnp.abs(_fc_init(jax.random.key(0), (512, 10))))) <= np.sqrt(1 / 512)
    bn = _Settings().bn(8, zero_scale=True)
    assert not jnp.any(bn.scale[...]) and jnp.all(bn.var[...] == 1) and not jnp.any(bn.mean[...])
    z = nnx.eval_shape(lambda: frn.resnet18(rngs=nnx.Rngs(0), zero_init_residual=True))
    assert z.layer1[0].bn2.scale.shape == (64,)


def _primitives(closed) -> dict[str, int]:
    counts: dict[str, int] = {}

    def walk(jaxpr):
        for e in jaxpr.eqns:
            counts[e.primitive.name] = counts.get(e.primitive.name, 0) + 1
            for v in e.params.values():
                for sub in v if isinstance(v, (list, tuple)) else [v]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(closed.jaxpr)
    return counts


def test_same_kernels_as_linen():
    """The NNX convs trace to Linen's: CPU forms (1x1 as dots, grouped convs' custom gradients) where Linen has them."""
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    graphdef, state = nnx.split(_abstract("resnext50_32x4d", num_classes=10))
    got = _primitives(jax.make_jaxpr(lambda st, x: nnx.merge(graphdef, st)(x))(state, x))
    lmodel = flax_resnet.ResNet(arch="resnext50_32x4d", num_classes=10)
    lvars = jax.eval_shape(lmodel.init, jax.random.key(0), x)
    want = _primitives(jax.make_jaxpr(lambda v, x: lmodel.apply(v, x, train=True, mutable=["batch_stats"]))(lvars, x))
    keys = ("platform_index", "dot_general", "conv_general_dilated", "custom_vjp_call")
    assert {k: got.get(k) for k in keys} == {k: want.get(k) for k in keys} and got["platform_index"] > 0
    # Scanned: each stage's loop body has the loop form (canonical-gradient 3x3 conv); at 256x256 every
    # stage's outputs exceed 4x4 (smaller ones are products of taps, with no conv to canonicalize).
    graphdef, state = nnx.split(_abstract("resnet50", num_classes=10, scan_blocks=True))
    x256 = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    assert _primitives(jax.make_jaxpr(lambda st, x: nnx.merge(graphdef, st)(x))(state, x256)).get("custom_vjp_call") == 4


def test_bad_input_is_one_line_error():
    m = frn.from_torch(_torch_sd("resnet18"))
    with pytest.raises(ValueError, match=r"NHWC: expected 3 channels .* \(2, 3, 32, 32\) \(an NCHW batch"):
        m(jnp.zeros((2, 3, 32, 32)))


# --- conversion ---------------------------------------------------------------


@pytest.mark.parametrize("arch,layout,scan", [("resnet50", "torchvision", False), ("resnet50", "seed", True), ("resnet26d", "torchvision", True)])
def test_torch_nnx_torch_is_bit_exact(arch, layout, scan):
    sd = _torch_sd(arch, layout)
    m = frn.from_torch({"module." + k: v for k, v in sd.items()}, scan_blocks=scan)
    assert m.arch == arch and m.num_classes == 10 and m.conv_bias == (layout == "seed") and m.scan_blocks == scan
    _same_bytes(frn.to_torch(m, layout=layout), sd)  # num_batches_tracked: torch_ref's fresh 0


def test_headless_backbone_round_trip():
    sd = _torch_sd("resnet18", num_classes=0)
    m = frn.from_torch(sd)
    assert m.fc is None and m.num_classes == 0
    _same_bytes(frn.to_torch(m), sd)
    m.eval()
    assert nnx.eval_shape(lambda m, x: m(x), m, jnp.zeros((1, 32, 32, 3))).shape == (1, 512)


def test_float64_state_dict_keeps_dtype_and_casts_on_request():
    sd = _torch_sd("resnet18", dtype=torch.float64)
    with jax.enable_x64(True):
        m = frn.from_torch(sd)
        assert m.layer2[0].conv1.kernel.dtype == jnp.float64 and m.param_dtype == np.float64
        _same_bytes(frn.to_torch(m), sd)
    m32 = frn.from_torch(sd, param_dtype=jnp.float32)
    assert m32.layer2[0].bn1.var.dtype == jnp.float32


@pytest.mark.parametrize("scan", [False, True])
def test_linen_nnx_linen_is_bit_exact_in_both_forms(scan):
    v = torch_to_flax(_torch_sd("resnet34"), scan_blocks=scan)
    m = frn.from_linen("resnet34", v)
    assert m.scan_blocks == scan and isinstance(m.layer3, frn.ScannedStage) == scan
    if scan:
        assert len(m.layer3) == 6 and m.layer3[1].conv1.kernel.shape == (5, 3, 3, 256, 256)
    back = jax.device_get(frn.to_linen(m))
    assert is_stacked(back) == scan
    flat = lambda t: {"/".join(map(str, p)): x for p, x in jax.tree_util.tree_leaves_with_path(t)}  # noqa: E731
    _same_bytes(flat(back), flat(v))
    # The other form: restacked (or unstacked) on the way in, exactly.
    other = frn.from_linen("resnet34", v, scan_blocks=not scan)
    _same_bytes(flat(jax.device_get(frn.to_linen(other))), flat(torch_to_flax(_torch_sd("resnet34"), scan_blocks=not scan)))
    # Into an existing model, in place.
    target = _abstract("resnet34", num_classes=10)
    assert frn.from_linen(target, v) is target
    _same_bytes(flat(jax.device_get(frn.to_linen(target))), flat(torch_to_flax(_torch_sd("resnet34"))))


def test_conversion_errors_are_collected():
    v = torch_to_flax(_torch_sd("resnet18"))
    del v["params"]["layer2"]["0"]["conv1"]
    v["params"]["fc"]["kernel"] = np.zeros((3, 10), np.float32)
    v["batch_stats"]["layer9"] = {"mean": np.zeros(3, np.float32)}
    with pytest.raises(ConversionError) as e:
        frn.from_linen(_abstract("resnet18", num_classes=10), v)
    msg = str(e.value)
    assert "NNX resnet18" in msg and "params/layer2/0/conv1/kernel" in msg and "batch_stats/layer9/mean" in msg
    assert "params/fc/kernel expected (512, 10) found (3, 10)" in msg and "\n" not in msg
    sd = _torch_sd("resnet18")
    del sd["layer1.0.bn1.running_var"]
    sd["extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(ConversionError, match="missing key.*layer1.0.bn1.running_var.*unexpected key.*extra.weight"):
        frn.from_torch(sd)
    with pytest.raises(ConversionError, match="expected Linen variables"):
        frn.from_linen("resnet18", [1, 2])


# --- the same numbers as Linen (float64) ---------------------------------------


@pytest.fixture(scope="module")
def r18():
    """float64 weights with calibrated BN, images, labels, and the Linen model; one optimizer (shared compiles)."""
    sd = {k: v.double() for k, v in reference_model("resnet18", num_classes=10, calibrate_size=32).state_dict().items()}
    x = images(2, 3, 64, 64).double().numpy().transpose(0, 2, 3, 1)
    with jax.enable_x64(True):
        lmodel, lvars = flax_resnet.from_torch(sd)
    tx = linen_training.make_optimizer(batch_size=2, steps_per_epoch=3, epochs=1, warmup_epochs=1)
    return sd, x, np.array([3, 7]), lmodel, lvars, tx


def test_nnx_equals_linen_eval_train_and_sgd_steps(r18):
    sd, x, y, lmodel, lvars, tx = r18
    with jax.enable_x64(True):
        model = frn.from_torch(sd)
        # Eval: every parity point.
        model.eval()
        got = nnx.jit(lambda m, x: m.intermediates(x, blocks=True))(model, x)
        want = jax.jit(lambda v, x: lmodel.apply(v, x, blocks=True, method="intermediates"))(lvars, x)
        assert got.keys() == want.keys()
        assert max(_rel(got[k], want[k]) for k in want) <= TOL
        # Train mode (outputs, BN updates) and SGD steps through the library's steps (the paper's recipe, torch's SGD).
        model.train()
        opt = nnx_training.create_optimizer(model, tx)
        state = linen_training.create_train_state(lmodel, lvars, tx)
        for _ in range(3):
            m = nnx_training.train_step(model, opt, x, y)
            state, lm = linen_training.train_step(state, x, y)
            assert _rel(m["loss"], lm["loss"]) <= TOL and m["accuracy"] == lm["accuracy"]
        assert int(opt.step[...]) == 3
        assert _tree_rel(frn.to_linen(model), state.variables()) <= TOL


def test_scanned_and_rematerialized_step_equals_linen(r18):
    sd, x, y, lmodel, lvars, tx = r18
    with jax.enable_x64(True):
        model = frn.from_torch(sd, scan_blocks=True, remat=True)
        assert isinstance(model.layer1, frn.ScannedStage) and model.remat
        opt = nnx_training.create_optimizer(model, tx)
        state = linen_training.create_train_state(lmodel, lvars, tx)
        m = nnx_training.train_step(model, opt, x, y)
        state, lm = linen_training.train_step(state, x, y)
        assert _rel(m["loss"], lm["loss"]) <= TOL
        assert is_stacked(frn.to_linen(model))
        got = frn.to_linen(frn.from_linen("resnet18", frn.to_linen(model), scan_blocks=False))
        assert _tree_rel(got, state.variables()) <= TOL


def test_frozen_backbone_keeps_running_stats(r18):
    """Linear probing: the model in eval mode, the optimizer's frozen backbone."""
    sd, x, y = r18[:3]
    with jax.enable_x64(True):
        model = frn.from_torch(sd)
        model.eval()
        before = jax.device_get(frn.to_linen(model))
        opt = nnx_training.create_optimizer(model, linen_training.make_optimizer(batch_size=2, freeze_backbone=True))
        nnx_training.train_step(model, opt, x, y)
        after = jax.device_get(frn.to_linen(model))
    assert _tree_rel(after["batch_stats"], before["batch_stats"]) == 0.0
    assert _tree_rel(after["params"]["layer1"], before["params"]["layer1"]) == 0.0
    assert _rel(after["params"]["fc"]["kernel"], before["params"]["fc"]["kernel"]) > 0


@pytest.mark.parametrize("freeze", [False, True], ids=["no-bn-bias-decay", "frozen-backbone"])
def test_masked_optimizers_equal_linen_and_bridge(r18, freeze):
    """Optimizers that pick parameters by name (the weight-decay mask, the frozen backbone) pick the same ones from an NNX state.

    An NNX state's paths end in the variable's ``value``; a name test on the
    last key missed every kernel (no weight decay at all), and the frozen
    backbone's ``MaskedNode`` entries broke ``train --api nnx --freeze-backbone``.
    """
    sd, x, y, lmodel, lvars = r18[:5]
    tx = linen_training.make_optimizer(batch_size=2, weight_decay=0.5, decay_bn_and_bias=False, freeze_backbone=freeze)
    with jax.enable_x64(True):
        model = frn.from_torch(sd)
        opt = nnx_training.create_optimizer(model, tx)
        state = linen_training.create_train_state(lmodel, lvars, tx, frozen_backbone=freeze)
        if freeze:
            model.eval()
        nnx_training.train_step(model, opt, x, y)
        state, _ = linen_training.train_step(state, x, y)
        assert _tree_rel(frn.to_linen(model), state.variables()) <= TOL
        bridge = nnx_training.TrainStateBridge(lmodel, state)  # what train --api nnx resumes through
        assert _tree_rel(bridge.to_state(state).opt_state, state.opt_state) == 0.0
    moved = _rel(state.params["layer1"]["0"]["conv1"]["kernel"], lvars["params"]["layer1"]["0"]["conv1"]["kernel"])
    assert (moved == 0.0) == freeze


# --- hooks: checkpoints, the train command ---------------------------------------


def test_load_and_save_nnx_models(tmp_path):
    """``flax_resnet.load(path, api="nnx")`` from torch and Flax files; ``flax_resnet.save`` of an NNX model, both ways exact."""
    sd = _torch_sd("resnet18")
    np.savez(tmp_path / "w.npz", **sd)
    m = flax_resnet.load(tmp_path / "w.npz", api="nnx")
    assert isinstance(m, frn.ResNet) and m.arch == "resnet18" and m.num_classes == 10
    _same_bytes(frn.to_torch(m), sd)
    for name in ("m.msgpack", "orbax"):
        flax_resnet.save(tmp_path / name, m)
        again = flax_resnet.load(tmp_path / name, api="nnx", scan_blocks=True)
        assert isinstance(again.layer1, frn.ScannedStage)
        _same_bytes(frn.to_torch(again), sd)
    with pytest.raises(ValueError, match="api"):
        flax_resnet.load(tmp_path / "w.npz", api="keras")


def test_train_command_api_nnx(tmp_path, capsys):
    """``flax-resnet train --api nnx --dataset digits``: the NNX modules and step train, checkpoint and resume."""
    from flax_resnet.cli import main as cli_main

    work = tmp_path / "w"

    def train(epochs):
        argv = ["train", "--api", "nnx", "--arch", "resnet18", "--dataset", "digits", "--size", "16", "--epochs", str(epochs),
                "--batch-size", "256", "--lr", "0.1", "--progress", "off", "--workdir", str(work)]
        rc = cli_main(argv)
        out = capsys.readouterr()
        assert rc == 0, out.err
        return [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()], out.err

    recs, err = train(1)
    assert [r["epoch"] for r in recs] == [1] and "test acc" in err
    # The checkpoint is the Linen TrainState (the NNX arrays relabeled): resuming continues the run.
    again, err = train(2)
    assert [r["epoch"] for r in again] == [1, 2] and again[0] == recs[0] and "resuming" in err
    assert again[1]["train_loss"] < again[0]["train_loss"] and all(np.isfinite(r["test_loss"]) for r in again)
