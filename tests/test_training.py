"""Mechanics of ``flax_resnet.training`` on tiny configs: the optimizer, train steps, checkpoints (the ``train`` command: test_training_cli.py)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flax_resnet
from flax_resnet import training

# ----------------------------------------------------------------- fixtures

SHAPE = (16, 16, 3)  # tiny images: compile time is the cost, not FLOPs
N_CLASSES = 4


# One basic block per stage: a real ResNet of the family, half of resnet18's
# graph, so each compilation takes half as long.
TINY_ARCH = flax_resnet.ArchSpec("resnet10", "basic", (1, 1, 1, 1))


@pytest.fixture(scope="module")
def tiny():
    """A 4-class ResNet-10, its variables, a fixed optimizer and a batch."""
    model = flax_resnet.ResNet(arch=TINY_ARCH, num_classes=N_CLASSES)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1,) + SHAPE))
    tx = training.make_optimizer(batch_size=8, steps_per_epoch=2, epochs=2, lr=0.05, warmup_epochs=0.5)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(16,) + SHAPE).astype(np.float32)
    labels = rng.integers(0, N_CLASSES, size=16).astype(np.int32)
    return model, variables, tx, images, labels


def _tree_max_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0)), a, b)
    return max(jax.tree.leaves(diffs), default=0.0)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------- optimizer


def _toy_params():
    rng = np.random.default_rng(1)
    return {
        "conv1": {"kernel": rng.normal(size=(3, 3, 2, 4))},
        "bn1": {"scale": 1 + 0.1 * rng.normal(size=4), "bias": rng.normal(size=4)},
        "fc": {"kernel": rng.normal(size=(4, 3)), "bias": rng.normal(size=3)},
    }


def _toy_loss(p, t):
    # A non-separable smooth loss over every leaf; targets t of the same structure.
    s = sum(jnp.sum(jnp.sin(x) * tt + 0.5 * (x - tt) ** 2) for x, tt in zip(jax.tree.leaves(p), jax.tree.leaves(t)))
    return s + 0.1 * jnp.sum(p["fc"]["kernel"]) * jnp.sum(p["bn1"]["scale"])


@pytest.mark.parametrize("decay_bn_and_bias,nesterov,schedule", [(True, False, "cosine"), (False, True, "step")])
def test_optimizer_equals_torch_sgd(decay_bn_and_bias, nesterov, schedule):
    torch = pytest.importorskip("torch")
    with jax.enable_x64(True):
        params = jax.tree.map(jnp.asarray, _toy_params())
        targets = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(2).normal(size=x.shape)), params)
        steps_per_epoch, epochs = 3, 4
        kw = dict(batch_size=512, steps_per_epoch=steps_per_epoch, epochs=epochs, weight_decay=1e-2, warmup_epochs=1,
                  schedule=schedule, step_epochs=(2, 3), decay_bn_and_bias=decay_bn_and_bias, nesterov=nesterov)
        tx = training.make_optimizer(**kw)
        sched = training.make_schedule(training.paper_lr(512), steps_per_epoch, epochs, warmup_epochs=1, schedule=schedule, step_epochs=(2, 3))
        assert training.paper_lr(512) == pytest.approx(0.2)

        # torch: per-step LambdaLR with the same schedule; BN/bias excluded via param groups.
        names = [("conv1", "kernel"), ("bn1", "scale"), ("bn1", "bias"), ("fc", "kernel"), ("fc", "bias")]
        tp = {n: torch.tensor(np.asarray(params[n[0]][n[1]]), requires_grad=True) for n in names}
        if decay_bn_and_bias:
            groups = [{"params": list(tp.values())}]
        else:
            groups = [
                {"params": [tp[n] for n in names if n[1] == "kernel"]},
                {"params": [tp[n] for n in names if n[1] != "kernel"], "weight_decay": 0.0},
            ]
        opt = torch.optim.SGD(groups, lr=0.2, momentum=0.9, weight_decay=1e-2, nesterov=nesterov)
        lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(sched(s)) / 0.2)

        def torch_loss():
            p = {"conv1": {"kernel": tp[names[0]]}, "bn1": {"scale": tp[names[1]], "bias": tp[names[2]]},
                 "fc": {"kernel": tp[names[3]], "bias": tp[names[4]]}}
            tt = jax.tree.map(lambda x: torch.tensor(np.asarray(x)), targets)
            s = sum(torch.sum(torch.sin(x) * t + 0.5 * (x - t) ** 2) for x, t in zip(jax.tree.leaves(p), jax.tree.leaves(tt)))
            return s + 0.1 * torch.sum(p["fc"]["kernel"]) * torch.sum(p["bn1"]["scale"])

        state = tx.init(params)
        grad = jax.jit(jax.grad(_toy_loss))
        for _ in range(steps_per_epoch * epochs):
            updates, state = tx.update(grad(params, targets), state, params)
            params = optax.apply_updates(params, updates)
            opt.zero_grad()
            torch_loss().backward()
            opt.step()
            lr_sched.step()
        for n in names:
            np.testing.assert_allclose(np.asarray(params[n[0]][n[1]]), tp[n].detach().numpy(), rtol=1e-12, atol=1e-12)


def test_torch_sgd_equals_torch_optim_sgd():
    """``torch_sgd(lr, momentum, weight_decay)``, the harness's optimizer, against ``torch.optim.SGD`` over 4 steps."""
    import torch

    with jax.enable_x64(True):
        params = jax.tree.map(jnp.asarray, _toy_params())
        targets = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(3).normal(size=x.shape)), params)
        names = [("conv1", "kernel"), ("bn1", "scale"), ("bn1", "bias"), ("fc", "kernel"), ("fc", "bias")]
        tp = {n: torch.tensor(np.asarray(params[n[0]][n[1]]), requires_grad=True) for n in names}
        opt = torch.optim.SGD(list(tp.values()), lr=0.1, momentum=0.9, weight_decay=1e-2)
        tx = training.torch_sgd(0.1, 0.9, 1e-2)
        state, grad = tx.init(params), jax.grad(_toy_loss)
        for _ in range(4):
            g = grad(params, targets)
            updates, state = tx.update(g, state, params)
            params = optax.apply_updates(params, updates)
            for n in names:
                tp[n].grad = torch.tensor(np.asarray(g[n[0]][n[1]]))
            opt.step()
        for n in names:
            np.testing.assert_allclose(np.asarray(params[n[0]][n[1]]), tp[n].detach().numpy(), rtol=1e-13, atol=1e-13)


def test_schedule_shapes():
    s = training.make_schedule(1.0, steps_per_epoch=10, epochs=10, warmup_epochs=2)
    assert [float(s(k)) for k in (0, 9, 19, 20)] == pytest.approx([0.05, 0.5, 1.0, 1.0])
    assert float(s(60)) == pytest.approx(0.5 * (1 + np.cos(np.pi * 40 / 80)))
    assert float(s(100)) == pytest.approx(0.0, abs=1e-7)
    st = training.make_schedule(1.0, steps_per_epoch=10, epochs=90, schedule="step")
    assert [float(st(k)) for k in (0, 299, 300, 600, 800)] == pytest.approx([1, 1, 0.1, 0.01, 0.001])
    with pytest.raises(ValueError, match="unknown schedule"):
        training.make_schedule(1.0, 1, 1, schedule="linear")


def test_weight_decay_mask_excludes_bn_and_bias():
    model = flax_resnet.resnet18(num_classes=10, conv_bias=True)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    mask = jax.tree_util.tree_leaves_with_path(training.decay_mask(params))
    flat = {jax.tree_util.keystr(p): m for p, m in mask}
    assert flat["['conv1']['kernel']"] and flat["['fc']['kernel']"] and flat["['layer1']['0']['conv2']['kernel']"]
    assert not flat["['conv1']['bias']"] and not flat["['fc']['bias']"]
    assert not flat["['bn1']['scale']"] and not flat["['bn1']['bias']"] and not flat["['layer2']['0']['downsample']['1']['scale']"]
    # Every decayed leaf is a kernel (ndim > 1); every 1-D leaf is excluded.
    shapes = {jax.tree_util.keystr(p): x.ndim for p, x in jax.tree_util.tree_leaves_with_path(params)}
    assert all(flat[k] == (shapes[k] > 1) for k in flat)
    # And the optimizer leaves them undecayed: with zero grads only kernels move.
    tx = training.make_optimizer(lr=1.0, weight_decay=0.5, decay_bn_and_bias=False, momentum=0.0)
    p = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), params)
    upd, _ = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
    moved = {jax.tree_util.keystr(k): bool(jnp.any(u != 0)) for k, u in jax.tree_util.tree_leaves_with_path(upd)}
    assert moved == flat


def test_default_recipe_is_the_papers():
    """No arguments: lr 0.1 x batch/256, momentum 0.9, weight decay 1e-4 on every parameter (torch's order)."""
    with jax.enable_x64(True):
        tx = training.make_optimizer(batch_size=512, steps_per_epoch=100)
        p = {"conv": {"kernel": jnp.full(3, 2.0)}, "bn": {"scale": jnp.full(2, -3.0)}}
        zero = jax.tree.map(jnp.zeros_like, p)
        sched = training.make_schedule(0.2, 100, 90)
        u1, st = tx.update(zero, tx.init(p), p)  # torch: buf = wd * p; p -= lr * buf
        p1 = optax.apply_updates(p, u1)
        u2, _ = tx.update(zero, st, p1)  # buf = 0.9 * buf + wd * p1
        for k in (("conv", "kernel"), ("bn", "scale")):
            p0, q1 = p[k[0]][k[1]], p1[k[0]][k[1]]
            np.testing.assert_allclose(u1[k[0]][k[1]], -0.2 * 1e-4 * p0, rtol=1e-14)
            np.testing.assert_allclose(u2[k[0]][k[1]], -float(sched(1)) * (0.9 * 1e-4 * p0 + 1e-4 * q1), rtol=1e-14)
        assert float(sched(0)) == 0.2 and 0.2 > float(sched(1)) > 0.19999  # cosine, no warmup


def test_batchnorm_statistics_in_float32_under_bfloat16():
    """bf16 compute: batch statistics and running stats are float32 computations of the bf16 activations."""
    rng = np.random.default_rng(0)
    # |mean| >> std: a bf16 (8-bit mantissa) mean or variance would be off by ~1e-2 relative.
    x = jnp.asarray(100 + rng.normal(size=(8, 5, 5, 4)), jnp.bfloat16)
    bn = flax_resnet.BatchNorm(dtype=jnp.bfloat16)
    v = bn.init(jax.random.key(0), x, train=True)
    y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16 and upd["batch_stats"]["mean"].dtype == jnp.float32
    x64 = np.asarray(x, np.float64)
    mean, var = x64.mean((0, 1, 2)), x64.var((0, 1, 2), ddof=1)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * mean, rtol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * var, rtol=1e-5)
    # and the output is normalized with them: mean 0, std 1 before rounding to bf16
    yn = np.asarray(y, np.float64)
    assert np.abs(yn.mean((0, 1, 2))).max() < 2e-2 and np.abs(yn.std((0, 1, 2)) - 1).max() < 2e-2


def test_cross_entropy_label_smoothing_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, size=6)
    for eps in (0.0, 0.1, 0.3):
        ours = np.asarray(training.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), eps).mean())
        ref = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels), label_smoothing=eps).item()
        assert ours == pytest.approx(ref, rel=1e-6)
    bf = training.cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels))
    assert bf.dtype == jnp.float32


# --------------------------------------------------------------- train steps


def test_train_step_updates_params_and_torch_bn_stats(tiny):
    model, variables, tx, images, labels = tiny
    state = training.create_train_state(model, variables, tx)
    new, m = training.train_step(state, images[:8], labels[:8])
    assert int(new.step) == 1 and m["loss"].dtype == jnp.float32 and 0 <= float(m["accuracy"]) <= 1
    # The stem BN's running stats follow torch's rule: momentum 0.1 and the *unbiased* batch variance.
    # Recovered from the update, the batch variance is accurate to ~1e-6 relative in float32; biased
    # and unbiased differ by 1/(n-1) = 2e-3 here (n = 8 x 8 x 8 positions), so rtol 1e-4 tells them apart.
    y = jax.lax.conv_general_dilated(
        jnp.asarray(images[:8]), variables["params"]["conv1"]["kernel"], (2, 2), ((3, 3), (3, 3)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    y = np.asarray(y, np.float64)
    n = y.size // y.shape[-1]
    mean, unbiased, biased = y.mean((0, 1, 2)), y.var((0, 1, 2), ddof=1), y.var((0, 1, 2))
    assert n == 512 and np.all(unbiased / biased - 1 > 1.9e-3)
    old = jax.tree.map(np.asarray, variables["batch_stats"]["bn1"])
    batch_mean = (np.asarray(new.batch_stats["bn1"]["mean"], np.float64) - 0.9 * old["mean"]) / 0.1
    batch_var = (np.asarray(new.batch_stats["bn1"]["var"], np.float64) - 0.9 * old["var"]) / 0.1
    np.testing.assert_allclose(batch_mean, mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(batch_var, unbiased, rtol=1e-4)
    assert not np.allclose(batch_var, biased, rtol=1e-4, atol=0)
    assert _tree_max_diff(new.params, state.params) > 0
    ones, half = np.ones(8, np.float32), np.repeat(np.float32([1, 0]), 4)
    a = training.eval_step(new, images[:8], labels[:8], ones)
    b = training.eval_step(new, images[8:], labels[8:], half)
    assert float(a["count"]) == 8 and float(b["count"]) == 4
    ev = training.evaluate(new, images[:12], labels[:12], batch_size=8)  # 8 + 4 (padded, masked)
    assert ev["count"] == 12
    assert ev["loss"] == pytest.approx((float(a["loss"]) + float(b["loss"])) / 12, rel=1e-5)
    assert ev["accuracy"] == pytest.approx((float(a["correct"]) + float(b["correct"])) / 12)


def test_train_step_fn_under_a_callers_jit_is_train_step(tiny):
    """The pure step jitted with donation (as the benchmarks and the parity harness do) gives train_step's result."""
    model, variables, tx, images, labels = tiny
    state = training.create_train_state(model, variables, tx)
    ref, m_ref = training.train_step(state, images[:8], labels[:8], label_smoothing=0.1)
    own = jax.jit(training.train_step_fn, static_argnums=3, donate_argnums=0)
    new, m = own(training.create_train_state(model, jax.tree.map(jnp.array, variables), tx), images[:8], labels[:8], 0.1)
    _assert_trees_equal((new.params, new.batch_stats, new.opt_state, new.step), (ref.params, ref.batch_stats, ref.opt_state, ref.step))
    assert float(m["loss"]) == float(m_ref["loss"])


def test_bfloat16_step_keeps_float32_params_and_stats(tiny):
    model, variables, tx, images, labels = tiny
    bf_model = model.clone(dtype=jnp.bfloat16)
    state = training.create_train_state(bf_model, variables, tx)
    new, m = training.train_step(state, images[:8], labels[:8])
    for tree in (new.params, new.batch_stats, new.opt_state):
        for leaf in jax.tree.leaves(tree):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert leaf.dtype == jnp.float32
    assert m["loss"].dtype == jnp.float32 and np.isfinite(float(m["loss"]))
    # bf16 compute really happens: the logits differ from float32 ones, a little.
    f32 = jax.jit(model.apply)(variables, images[:8])
    bf = jax.jit(bf_model.apply)(variables, images[:8])
    assert bf.dtype == jnp.float32
    d = float(jnp.max(jnp.abs(f32 - bf)))
    assert 0 < d < 0.1 * float(jnp.max(jnp.abs(f32))) + 0.1


def test_replace_head_and_frozen_backbone(tiny):
    model, variables, _, images, labels = tiny
    model7, v7 = training.replace_head(model, variables, 7, jax.random.key(3))
    assert model7.num_classes == 7 and v7["params"]["fc"]["kernel"].shape == (512, 7)
    assert v7["params"]["fc"]["bias"].shape == (7,)
    _assert_trees_equal({k: v for k, v in v7["params"].items() if k != "fc"}, {k: v for k, v in variables["params"].items() if k != "fc"})
    tx = training.make_optimizer(lr=0.5, steps_per_epoch=1, epochs=1, freeze_backbone=True)
    state = training.create_train_state(model7, v7, tx, frozen_backbone=True)
    new, _ = training.train_step(state, images[:8], labels[:8] % 7)
    _assert_trees_equal({k: v for k, v in new.params.items() if k != "fc"}, {k: v for k, v in state.params.items() if k != "fc"})
    _assert_trees_equal(new.batch_stats, state.batch_stats)
    assert _tree_max_diff(new.params["fc"], state.params["fc"]) > 0
    # Frozen params keep no optimizer state (no momentum buffers for the backbone).
    n_state = sum(x.size for x in jax.tree.leaves(new.opt_state))
    assert n_state < 512 * 7 * 2 + 100


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_resume_equals_uninterrupted(tiny, tmp_path):
    model, variables, tx, images, labels = tiny
    kw = dict(batch_size=8, seed=5, max_shift=2)

    def fresh():
        return training.create_train_state(model, variables, tx)

    full = fresh()
    for epoch in range(2):
        full, _ = training.train_epoch(full, images, labels, epoch=epoch, **kw)

    half = fresh()
    half, _ = training.train_epoch(half, images, labels, epoch=0, **kw)
    with training.Checkpointer(tmp_path / "ckpt") as ck:
        ck.save(1, half, {"seed": 5})
        assert ck.latest_epoch() == 1
    del half
    with training.Checkpointer(tmp_path / "ckpt") as ck:
        resumed, meta = ck.restore(fresh())
    assert meta == {"epoch": 1, "seed": 5} and int(resumed.step) == 2
    resumed, _ = training.train_epoch(resumed, images, labels, epoch=meta["epoch"], **kw)
    assert int(resumed.step) == int(full.step) == 4
    _assert_trees_equal(resumed.params, full.params)
    _assert_trees_equal(resumed.batch_stats, full.batch_stats)
    _assert_trees_equal(resumed.opt_state, full.opt_state)


# ---------------------------------------------------------------------- misc


def test_cpu_workaround_is_a_no_op_once_jax_started(monkeypatch):
    jax.devices()  # the backend is up: XLA_FLAGS can no longer change anything
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert training.cpu_small_conv_workaround(force=True) is False
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"

