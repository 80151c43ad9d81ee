"""``torch_ref`` and the Flax models against the real torchvision and timm ResNets.

The parity suite compares Flax with ``torch_ref``, and both are built from
one table (``flax_resnet.archs``), so a table bug that keeps shapes and
counts would pass it. The fixtures in ``tests/reference/`` were computed by
the libraries themselves (``tools/make_reference_fixtures.py``: torch 2.14.1,
torchvision 0.29.1, timm) on weights that ``parity.reference_weights``
regenerates from each key's name, in float64. Every architecture there must
be in ``flax_resnet.ARCHS``, have the same state_dict keys and shapes in
``torch_ref``, and reproduce the library's eval outputs, one train-mode pass
(logits and updated running statistics) and its gradients, at an odd and an
even input size (100+-layer rows: the odd one), to 1e-10 of the reference's magnitude in both ``torch_ref``
and Flax (float64).
"""

from __future__ import annotations

import functools
import glob
import json
import os

import numpy as np
import pytest

from parity import reference_weights as rw

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = sorted(glob.glob(os.path.join(HERE, "reference", "*.npz")))
ARCHS = [os.path.basename(p)[: -len(".npz")] for p in FIXTURES]
TOL = 1e-10
TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2", "wide_resnet101_2", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d")


@functools.lru_cache(maxsize=1)
def fixture(arch: str) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(os.path.join(HERE, "reference", f"{arch}.npz"), allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    return json.loads(bytes(arrays.pop("meta"))), arrays


def shapes(meta: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(s) for k, s in meta["keys"]}


def deep(arch: str) -> bool:
    """100+ layers: the Flax side runs ``scan_blocks=True`` (a third of the compile time; same block code)."""
    from flax_resnet import ARCHS as FLAX_ARCHS

    return sum(FLAX_ARCHS[arch].stage_sizes) > 16


class Mismatch:
    """Collects every disagreement of one comparison, so a failure names all of them at once."""

    def __init__(self, who: str):
        self.who, self.errors = who, []

    def close(self, name: str, got, want, scale: float | None = None, tol: float = TOL):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        if got.shape != want.shape:
            self.errors.append(f"{name}: shape {got.shape} != {want.shape}")
            return
        scale = scale if scale is not None else float(np.max(np.abs(want))) or 1.0
        err = float(np.max(np.abs(got - want))) if got.size else 0.0
        if not err <= tol * scale:
            self.errors.append(f"{name}: rel err {err / scale:.2e} > {tol:.0e}")

    def digests(self, name: str, tensors: dict[str, np.ndarray], want: np.ndarray, tol: float = TOL):
        """Each tensor's digest against the fixture's, relative to its own magnitude."""
        for (key, a), w in zip(tensors.items(), want):
            got, scale = rw.digest_scale(key, a)
            self.close(f"{name} {key}", got, w, scale=scale or 1.0, tol=tol)

    def check(self):
        assert not self.errors, f"{self.who} differs from the real library at {len(self.errors)} point(s):\n" + "\n".join(self.errors[:25])


def compare(m: Mismatch, meta: dict, want: dict[str, np.ndarray], size: str, ev: dict, tr: dict, stats: dict, grads: dict, loss: float):
    """``ev``/``tr``: feature name -> NCHW array; ``stats``/``grads``: torch key -> array."""
    m.close(f"{size} eval logits", ev["logits"], want[f"{size}/eval/logits"])
    for f, w in zip(rw.FEATURES, want[f"{size}/eval/pooled"]):
        m.close(f"{size} eval {f} (pooled)", rw.pooled(ev[f]), w)
    m.digests(f"{size} eval", {f: ev[f] for f in rw.FEATURES}, want[f"{size}/eval/digest"])
    m.close(f"{size} eval stem channel 0", ev["stem"][:, 0], want[f"{size}/eval/stem_map"])
    m.close(f"{size} train logits", tr["logits"], want[f"{size}/train/logits"])
    m.digests(f"{size} train", {f: tr[f] for f in rw.FEATURES}, want[f"{size}/train/digest"])
    bns = [k[: -len(".running_var")] for k in shapes(meta) if k.endswith(".running_var")]
    m.digests(f"{size} train", {f"{b}.{s}": stats[f"{b}.{s}"] for b in bns for s in rw.STATS}, want[f"{size}/train/stats"])
    m.close(f"{size} loss", loss, want[f"{size}/train/loss"])
    params = [k for k in shapes(meta) if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    missing = [k for k in params if k not in grads]
    if missing:
        m.errors.append(f"{size} grad: no gradient for {missing[:5]}")
        return
    m.digests(f"{size} grad", {k: grads[k] for k in params}, want[f"{size}/grad/digest"], tol=1e-9)
    m.close(f"{size} grad fc.bias", grads["fc.bias"], want[f"{size}/grad/fc.bias"])
    m.close(f"{size} grad {meta['bn_bias']}[:16]", grads[meta["bn_bias"]][:16], want[f"{size}/grad/bn_bias"])
    m.close(f"{size} grad {meta['stem_conv']}[0]", grads[meta["stem_conv"]][0], want[f"{size}/grad/stem_conv"])


def test_fixtures_cover_every_library_architecture():
    """The fixtures hold every torchvision ResNet, each with the library's published parameter count."""
    from flax_resnet import TORCHVISION_PARAM_COUNTS

    assert set(TORCHVISION) <= set(ARCHS)
    for arch in TORCHVISION:
        meta, _ = fixture(arch)
        assert meta["library"].startswith("torchvision") and meta["param_count"] == TORCHVISION_PARAM_COUNTS[arch], arch


def test_weights_are_regenerated_from_key_names():
    a = rw.reference_weights({"layer1.0.bn3.weight": (4,), "layer1.0.bn3.running_var": (4,), "layer1.0.bn3.bias": (4,), "fc.weight": (3, 8)})
    b = rw.reference_weights({"fc.weight": (3, 8)})
    np.testing.assert_array_equal(a["fc.weight"], b["fc.weight"])  # depends on the key alone
    assert np.all((a["layer1.0.bn3.weight"] >= 0.1) & (a["layer1.0.bn3.weight"] <= 0.5))  # a branch's last BN
    assert np.all(a["layer1.0.bn3.running_var"] >= 0.5)


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_is_available(arch):
    """Every fixture architecture is a row of ``flax_resnet.ARCHS`` (a missing one fails, never skips)."""
    from flax_resnet import ARCHS as FLAX_ARCHS

    assert arch in FLAX_ARCHS, f"{arch} ({fixture(arch)[0]['library']}) is not in flax_resnet.ARCHS"


@pytest.mark.parametrize("arch", ARCHS)
def test_torch_ref_matches_library(arch):
    """``torch_ref``: the library's keys and shapes, and its numbers in float64 (eval, one train pass, gradients)."""
    import copy

    import torch
    import torch.nn.functional as F

    import torch_ref

    meta, want = fixture(arch)
    with torch.device("meta"):  # no init: the float64 weights are assigned below
        model = torch_ref.ResNet(arch, num_classes=meta["num_classes"], layout="torchvision")
    got_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got_shapes == shapes(meta), {k: (got_shapes.get(k), shapes(meta).get(k)) for k in set(got_shapes) ^ set(shapes(meta))}
    model.load_state_dict({k: torch.from_numpy(v) for k, v in rw.reference_weights(shapes(meta)).items()}, strict=True, assign=True)
    m = Mismatch(f"torch_ref {arch}")
    # 100+ layers at the odd size only: their blocks are the shallower rows' code, checked at both sizes.
    for size in ("odd",) if deep(arch) else rw.SIZES:
        x = torch.from_numpy(rw.images(size))
        with torch.no_grad():
            ev = {k: v.numpy() for k, v in model.eval().forward_intermediates(x).items()}
        train = copy.deepcopy(model).train()
        out = train.forward_intermediates(x)
        loss = F.cross_entropy(out["logits"], torch.from_numpy(rw.labels(size)))
        loss.backward()
        tr = {k: v.detach().numpy() for k, v in out.items()}
        stats = {k: v.numpy() for k, v in train.state_dict().items()}
        grads = {k: p.grad.numpy() for k, p in train.named_parameters()}
        compare(m, meta, want, size, ev, tr, stats, grads, loss.item())
    m.check()


@functools.lru_cache(maxsize=4)
def _flax_fn(model):
    import jax
    import optax

    def run(v, x, y):
        ev = model.apply(v, x, train=False, method="intermediates")

        def loss_fn(params):
            out, new = model.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True, method="intermediates", mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(out["logits"], y).mean(), (out, new["batch_stats"])

        (loss, (tr, stats)), g = jax.value_and_grad(loss_fn, has_aux=True)(v["params"])
        return ev, tr, stats, g, loss

    return jax.jit(run)


# One architecture per distinct code path of the Flax model: basic and bottleneck blocks, grouped
# convs, the deep (tiered) stem with average-pool shortcuts (resnet10t). Every other fixture
# architecture is tied to the library through torch_ref above, and torch_ref to Flax by
# tests/test_parity.py and tests/test_variants.py (float64, eval/train/grad; resnet50d at 64x64):
# keeping CI's compile time within budget.
FLAX_CHECKED = ("resnet18", "resnext50_32x4d", "resnet10t", "seresnext26d_32x4d")  # the last: squeeze-and-excitation


@pytest.mark.parametrize("arch", [*FLAX_CHECKED, pytest.param("resnetrs50", marks=pytest.mark.slow)])  # ResNet-RS: conv stem pool
def test_flax_matches_library(arch):
    """The Flax model on the library's weights: its numbers in float64 (eval, one train pass, gradients)."""
    import jax

    import flax_resnet
    from flax_resnet.convert import flax_to_torch

    meta, want = fixture(arch)
    weights = rw.reference_weights(shapes(meta))
    nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2) if np.ndim(a) == 4 else np.asarray(a)  # noqa: E731
    m = Mismatch(f"Flax {arch}")
    try:
        with jax.enable_x64(True):
            model, variables = flax_resnet.from_torch(weights, arch=arch, layout="torchvision", scan_blocks=deep(arch))
            n = sum(np.size(a) for a in jax.tree.leaves(variables["params"]))
            assert n + (1000 - meta["num_classes"]) * (shapes(meta)["fc.weight"][1] + 1) == meta["param_count"]
            back = flax_to_torch(variables)  # export on non-default stats: swapped or transposed leaves show
            for k, w in weights.items():
                if k in back and w.dtype.kind == "f":
                    m.close(f"export {k}", back[k], w, tol=0)
            variables = jax.device_put(variables)
            fn = _flax_fn(model)
            for size in rw.SIZES:
                x = rw.images(size).transpose(0, 2, 3, 1)
                ev, tr, new_stats, g, loss = jax.device_get(fn(variables, x, rw.labels(size)))
                stats = flax_to_torch({"params": variables["params"], "batch_stats": new_stats})
                grads = flax_to_torch({"params": g, "batch_stats": variables["batch_stats"]})
                compare(m, meta, want, size, {k: nchw(v) for k, v in ev.items()}, {k: nchw(v) for k, v in tr.items()}, stats, grads, float(loss))
    finally:
        _flax_fn.cache_clear()
        jax.clear_caches()
    m.check()
