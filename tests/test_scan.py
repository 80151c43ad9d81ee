"""``ResNet(scan_blocks=True)`` and ``remat``: the same numbers as the unrolled model.

The scanned model runs blocks ``1..n-1`` of each stage as one ``nn.scan``
over stacked variables; ``stack_blocks``/``unstack_blocks`` convert between
the trees exactly. Compared in float64, to 1e-12 of each output's magnitude.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import flax_resnet
import torch_ref
from flax_resnet import convert
from flax_resnet.convert import ConversionError, flax_to_torch, from_torch, stack_blocks, torch_to_flax, unstack_blocks
from parity.fixtures import reference_model

TOL = 1e-12


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _tree_rel(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    return max(_rel(x, y) for x, y in zip(la, lb))


@pytest.fixture(scope="module", params=["resnet18", "resnet50"])
def case(request):
    arch = request.param
    torch.manual_seed(0)
    sd64 = {k: (v.double() if v.is_floating_point() else v) for k, v in torch_ref.ResNet(arch).state_dict().items()}
    return arch, sd64


def test_stack_unstack_round_trip_is_bit_exact(case):
    arch, sd = case
    v = torch_to_flax(sd)
    s = stack_blocks(v)
    assert convert.is_stacked(s) and not convert.is_stacked(v)
    n3 = flax_resnet.get_arch(arch).stage_sizes[2]
    assert sorted(s["params"]["layer3"]) == ["0", "rest"]
    assert s["params"]["layer3"]["rest"]["conv1"]["kernel"].shape == (n3 - 1, *v["params"]["layer3"]["1"]["conv1"]["kernel"].shape)
    assert s["batch_stats"]["layer3"]["rest"]["bn2"]["var"].shape[0] == n3 - 1
    back = unstack_blocks(s)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(v)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(v), jax.tree_util.tree_leaves(back)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == np.asarray(b).tobytes(), path
    # The scanned model's own tree has exactly the stacked shapes.
    model = flax_resnet.ResNet(arch=arch, scan_blocks=True)
    with jax.enable_x64(True):
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float64)))
    assert jax.tree_util.tree_map(np.shape, s) == jax.tree_util.tree_map(lambda a: a.shape, dict(shapes))
    # torch_to_flax(scan_blocks=True) is the stacked tree; unstack of an unrolled tree is a no-op.
    assert jax.tree_util.tree_map(lambda a: a.tobytes(), torch_to_flax(sd, scan_blocks=True)) == jax.tree_util.tree_map(lambda a: a.tobytes(), s)
    assert unstack_blocks(v) == v


def test_flax_to_torch_of_stacked_equals_unrolled(case):
    _, sd = case
    v = torch_to_flax(sd)
    a, b = flax_to_torch(v, num_batches_tracked=3), flax_to_torch(stack_blocks(v), num_batches_tracked=3)
    assert list(a) == list(b) == list(sd)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
        assert a[k].tobytes() == sd[k].numpy().tobytes() or k.endswith("num_batches_tracked"), k


def test_scanned_model_matches_unrolled():
    """eval (every parity point), train-mode logits and running stats, and gradients, in float64.

    resnet50: scans of length 2, 3, 5 and 2; with and without remat.
    """
    tm = reference_model("resnet50", calibrate_size=32)
    sd = {k: (v.double() if v.is_floating_point() else v) for k, v in tm.state_dict().items()}
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)))
        m_u, v_u = from_torch(sd)
        m_s, v_s = from_torch(sd, scan_blocks=True)
        assert m_s.scan_blocks and convert.is_stacked(v_s)

        # eval, every parity point including per-block outputs
        iu = jax.jit(lambda v, x: m_u.apply(v, x, blocks=True, method="intermediates"))(v_u, x)
        is_ = jax.jit(lambda v, x: m_s.apply(v, x, blocks=True, method="intermediates"))(v_s, x)
        assert list(iu) == list(is_) and "layer3.5" in iu
        for k in iu:
            assert iu[k].dtype == jnp.float64 and _rel(is_[k], iu[k]) <= TOL, k

        # train mode: logits, updated running statistics and gradients
        def step(m, v):
            def loss(p):
                out, new = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True, mutable=["batch_stats"])
                return jnp.mean(jax.nn.log_softmax(out)[:, 0]) + 1e-3 * jnp.sum(out**2), (out, new)

            return jax.jit(jax.grad(loss, has_aux=True))(v["params"])

        gu, (lu, nu) = step(m_u, v_u)
        for m in (m_s, m_s.clone(remat=True)):
            gs, (ls, ns) = step(m, v_s)
            assert _rel(ls, lu) <= TOL
            assert _tree_rel(unstack_blocks(dict(ns))["batch_stats"], nu["batch_stats"]) <= TOL
            gs = unstack_blocks({"params": gs})["params"]
            assert jax.tree_util.tree_structure(gs) == jax.tree_util.tree_structure(gu)
            for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gu), jax.tree_util.tree_leaves(gs)):
                assert _rel(b, a) <= 1e-11, jax.tree_util.keystr(path)


def test_remat_unrolled_keeps_tree_and_numbers():
    torch.manual_seed(0)
    model, v = from_torch(torch_ref.ResNet("resnet18", num_classes=10).state_dict())
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    shapes = jax.eval_shape(lambda: model.clone(remat=True).init(jax.random.key(0), x))
    assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(shapes)
    assert "kernel" in v["params"]["layer1"]["0"]["conv1"]

    def grad(m):
        def loss(p):
            out, _ = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True, mutable=["batch_stats"])
            return jnp.sum(out**2)

        return jax.jit(jax.grad(loss))(v["params"])

    assert _tree_rel(grad(model.clone(remat=True)), grad(model)) <= 1e-5


def test_scanned_init_and_default_stays_unrolled():
    x = jnp.ones((1, 16, 16, 3))
    shapes = jax.eval_shape(lambda: flax_resnet.resnet18(num_classes=10, scan_blocks=True).init(jax.random.key(0), x))
    assert convert.is_stacked(shapes)
    assert shapes["params"]["layer1"]["rest"]["conv1"]["kernel"].shape == (1, 3, 3, 64, 64)
    d = flax_resnet.resnet18(num_classes=10)
    assert not d.scan_blocks and not d.remat
    assert sorted(jax.eval_shape(lambda: d.init(jax.random.key(0), x))["params"]["layer1"]) == ["0", "1"]
    # Each scanned block gets its own initialization (split rngs): one stage, small input.
    specs = tuple(b for b in flax_resnet.archs.blocks(flax_resnet.get_arch("resnet50")) if b.stage == 1)
    r = flax_resnet.ResNet()
    stage = flax_resnet.model.Stage(specs=specs, conv=r.conv_def(), norm=r.norm_def(), scan_blocks=True)
    v = jax.jit(stage.init)(jax.random.key(0), jnp.ones((1, 4, 4, 64)))
    k = np.asarray(v["params"]["rest"]["conv2"]["kernel"])
    assert k.shape == (2, 3, 3, 64, 64) and not np.array_equal(k[0], k[1])


def test_stack_and_unstack_refuse_bad_trees():
    torch.manual_seed(0)
    v = torch_to_flax(torch_ref.ResNet("resnet34").state_dict())
    s = stack_blocks(v)
    with pytest.raises(ConversionError, match="already stacked"):
        stack_blocks(s)
    bad = jax.tree_util.tree_map(lambda a: a, v)
    del bad["params"]["layer2"]["2"]["conv1"]
    with pytest.raises(ConversionError, match="layer2 blocks 2 differ"):
        stack_blocks(bad)
    bad = jax.tree_util.tree_map(lambda a: a, v)
    del bad["batch_stats"]["layer3"]["4"]
    with pytest.raises(ConversionError, match="expected 0..4"):
        stack_blocks(bad)
    bad = jax.tree_util.tree_map(lambda a: a, s)
    bad["params"]["layer4"]["1"] = bad["params"]["layer4"]["0"]
    with pytest.raises(ConversionError, match="mixes stacked"):
        unstack_blocks(bad)
    with pytest.raises(ConversionError):
        flax_to_torch(bad)
    bad = jax.tree_util.tree_map(lambda a: a, s)
    bad["params"]["layer3"]["rest"]["conv1"]["kernel"] = bad["params"]["layer3"]["rest"]["conv1"]["kernel"][:2]
    with pytest.raises(ConversionError, match="leading sizes"):
        unstack_blocks(bad)
