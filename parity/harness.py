"""Runs PyTorch and Flax on the same weights and inputs and reports the gap.

Every comparison is relative to a float64 torch run of the same model:

* ``float32``: a point passes when Flax's error is at most 2x torch fp32's own
  error at that point (the fp32 noise floor), never tighter than
  ``FP32_FLOOR``.
* ``float64``: Flax and torch must agree to ``FP64_TOL`` (1e-10 of the
  reference's max magnitude in eval; 1e-9 for train, gradients and steps).
* reduced precision (``bfloat16`` compute, or TF32 with ``precision
  "default"`` on a GPU): the same 2x rule against torch at the same reduced
  precision (``torch.autocast`` bfloat16; TF32 allowed), never tighter than
  ``BF16_FLOOR``/``FP32_FLOOR``.

Errors are ``max|flax - ref| / max|ref|`` per point.

Gradients and optimizer steps (every dtype but float64) are judged
differently, because in fp32 they are chaotic: a train-mode gradient passes
through every ReLU, and an activation within rounding of a kink lands on
either side depending on the summation order, changing that position's
gradient by O(1); train-mode BatchNorm then spreads the change over the
whole channel and every layer below it. Torch disagrees with itself this
way: on the ResNet-101 fixture of the tests, the median of its three runs is
4.3e-3 of max|grad| from the float64 truth in the stem. So

* the float64 reference for Flax's gradients is taken on Flax's side of
  every ReLU kink (``_kinks_like``; Linen only): ReLU inputs whose sign
  differs within ``KINK_BAND`` of zero are mirrored in the float64 run, and
  the report counts them (``Report.kinks``);
* each tensor is judged by its own statistic: the 99th percentile of
  ``|flax - ref|`` (isolated flips are rounding, not structure), or the
  largest error for tensors under ``PERCENTILE_MIN_SIZE`` entries, over the
  tensor's ``max|ref|``; for ``steps`` over the largest *update*
  ``max|ref - initial param|``, not the parameter;
* torch's own error on that tensor is the median over ``torch_variants()``
  (the default run, channels_last, and one thread on CPU or cuDNN autotuned
  algorithms on CUDA): the typical fp32 execution, not the worst;
* the rule is the same 2x, tensor by tensor; a point (a stage) passes when
  all its tensors do and reports its worst tensor.

A 1% error in ``fc.bias``'s gradient, in one BatchNorm's bias gradient or in
one SGD update fails this rule in fp32 (tests/test_parity.py).
float64 (max, 1e-9) is what proves the gradients' structure.
Points are reported in network order, so the first failing one says where
parity broke. Eval mode also compares the predicted classes (argmax) with
the float64 run's; a flip is excused only where the reference's top-2 margin
is within twice the logits' tolerance (a near tie that rounding may flip).
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Sequence

import numpy as np
import torch

import jax
import jax.numpy as jnp
import optax

from flax import traverse_util

import flax_resnet
from flax_resnet.convert import flax_to_torch, infer_config
from flax_resnet.layers import RELU_SIGNS
from flax_resnet.stacking import SCAN_NAME
from parity.constants import BF16_FLOOR, FP32_FLOOR, FP64_TOL, KINK_BAND, MODES, PERCENTILE_MIN_SIZE, SGD
from parity.report import Argmax, Point, Report
from parity.torch_side import (
    _kinks_like,
    _logits32,
    _np,
    _numpy,
    _stats,
    _torch_side,
    _torch_variant,
    describe_devices,
    pinned_precision,
    torch_device,
    torch_variants,
)

# The names other code and the tests use from here, including the helpers that moved out.
__all__ = [
    "MODES", "FP32_FLOOR", "KINK_BAND", "FP64_TOL", "BF16_FLOOR", "SGD", "PERCENTILE_MIN_SIZE",
    "Point", "Argmax", "Report", "pinned_precision", "torch_device", "describe_devices", "torch_variants", "make_sgd", "run_parity",
    "_kinks_like", "_logits32", "_np", "_numpy", "_stats", "_torch_side", "_torch_variant",
]  # fmt: skip


def _relu_masks(signs: dict) -> dict[str, list[np.ndarray]]:
    """Every ReLU input's sign (``x > 0``, NHWC) of a Linen forward, per module, in call order.

    ``signs``: the ``relu_signs`` collection (``flax_resnet.layers.relu`` records
    each ReLU under the module that calls it; blocks of a scanned stage are
    stacked under ``rest``). Keys are torch module names (``""`` for the
    model, ``"layer1.0"``, ``"layer1.0.se"``, ``"conv1"``): the parents of the
    ``nn.ReLU`` modules whose calls ``_kinks_like`` matches, so no list of
    ReLUs is kept anywhere but in the two forwards.
    """
    out: dict[str, list[np.ndarray]] = {}
    for path, calls in traverse_util.flatten_dict(dict(signs)).items():
        parent = path[:-1]
        if len(parent) >= 2 and parent[1] == SCAN_NAME:  # layerN/rest/...: blocks 1..n-1 stacked
            for i in range(np.shape(calls[0])[0]):
                out[".".join((parent[0], str(i + 1), *parent[2:]))] = [np.asarray(a[i]) for a in calls]
        else:
            out[".".join(parent)] = [np.asarray(a) for a in calls]
    return out


def make_sgd(lr: float | None = None, momentum: float | None = None, weight_decay: float | None = None) -> optax.GradientTransformation:
    """The library's ``torch_sgd``: ``torch.optim.SGD(lr, momentum, weight_decay)`` exactly.

    Unset arguments take the harness's ``SGD`` settings.
    """
    from flax_resnet.training import torch_sgd

    lr = SGD["lr"] if lr is None else lr
    momentum = SGD["momentum"] if momentum is None else momentum
    weight_decay = SGD["weight_decay"] if weight_decay is None else weight_decay
    return torch_sgd(lr, momentum, weight_decay)


@functools.lru_cache(maxsize=8)
def _jitted(model, what: str):
    """jit-compiled Flax computations, cached per (model, what)."""

    # The Linen model also returns the sign of every ReLU input (for ``_kinks_like``).
    capture = dict(mutable=["batch_stats", RELU_SIGNS]) if isinstance(model, flax_resnet.ResNet) else {}

    def loss_fn(params, batch_stats, x, y):
        feats, new = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, blocks=True, method="intermediates", **({"mutable": ["batch_stats"]} | capture)
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(feats["logits"], y).mean()
        signs = new.get(RELU_SIGNS, {})
        return loss, (feats, new["batch_stats"], signs)

    if what == "eval":
        return jax.jit(lambda v, x: model.apply(v, x, train=False, blocks=True, method="intermediates"))
    if what == "train":
        return jax.jit(lambda v, x: model.apply(v, x, train=True, blocks=True, method="intermediates", mutable=["batch_stats"]))
    if what == "grad":  # the train-mode forward comes with it: one compile for both modes

        def grad(v, x, y):
            (loss, (feats, stats, signs)), g = jax.value_and_grad(loss_fn, has_aux=True)(v["params"], v["batch_stats"], x, y)
            return loss, g, feats, stats, signs

        return jax.jit(grad)
    if what == "update":  # steps reuse the "grad" executable: one compile of the backward pass
        tx = make_sgd()

        def update(params, g, opt_state):
            updates, opt_state = tx.update(g, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return jax.jit(update), tx
    raise ValueError(what)


def _flax_from_torch(api: str, state_dict, **kwargs):
    """``(model, variables)`` for ``_flax_side``: the Linen model, or the NNX one behind Linen's ``apply`` (``flax_resnet.nnx.LinenApply``)."""
    if api == "nnx":
        import flax_resnet.nnx as frn

        model = frn.from_torch(state_dict, **kwargs)
        return frn.LinenApply(model), frn.to_linen(model)
    return flax_resnet.from_torch(state_dict, **kwargs)


def _flax_side(model, variables, x: np.ndarray, labels: np.ndarray, layout: str, modes: Sequence[str], steps: int) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    x = jnp.asarray(x.transpose(0, 2, 3, 1))
    y = jnp.asarray(labels)
    variables = jax.device_put(variables)

    def as_torch(tree, prefix, keep):
        sd = flax_to_torch(jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64) if a.dtype == jnp.bfloat16 else np.asarray(a), tree), layout=layout)
        return {f"{prefix}:{k}": v for k, v in sd.items() if keep(k)}

    is_stat = lambda k: k.endswith(("running_mean", "running_var"))  # noqa: E731
    if "eval" in modes:
        out["eval"] = {k: np.asarray(v) for k, v in _jitted(model, "eval")(variables, x).items()}
    if "grad" in modes:
        loss, g, feats, stats, signs = _jitted(model, "grad")(variables, x, y)
        new = {"batch_stats": stats}
        if signs:
            out["relu_masks"] = _relu_masks(signs)
    elif "train" in modes:
        feats, new = _jitted(model, "train")(variables, x)
    if "train" in modes:
        res = {k: np.asarray(v) for k, v in feats.items()}
        res.update(as_torch({"params": variables["params"], **new}, "stat", is_stat))
        out["train"] = res
    if "grad" in modes:
        res = {"loss": np.asarray(loss)}
        res.update(as_torch({"params": g, "batch_stats": variables["batch_stats"]}, "grad", lambda k: not is_stat(k) and "num_batches" not in k))
        out["grad"] = res
    if "steps" in modes:
        grad, (update, tx) = _jitted(model, "grad"), _jitted(model, "update")
        params, stats = variables["params"], variables["batch_stats"]
        opt_state = tx.init(params)
        for _ in range(steps):
            _, g, _, stats, _ = grad({"params": params, "batch_stats": stats}, x, y)
            params, opt_state = update(params, g, opt_state)
        new = {"params": params, "batch_stats": stats}
        res = as_torch(new, "param", lambda k: not is_stat(k) and "num_batches" not in k)
        res.update(as_torch(new, "stat", is_stat))
        out["steps"] = res
    return out


# ---------------------------------------------------------------------------
# Comparing


def _group(key: str) -> str:
    """'grad:layer2.3.conv1.weight' -> 'grad layer2'; stem modules -> 'stem'; fc -> 'fc'."""
    kind, name = key.split(":", 1)
    top = name.split(".")[0]
    top = "stem" if top in ("conv1", "bn1") else top
    if kind == "stat":
        kind = "running_var" if name.endswith("running_var") else "running_mean"
    return f"{kind} {top}"


def _abs_diff(a: np.ndarray, ref: np.ndarray, robust: bool) -> np.ndarray:
    d = np.abs(a.astype(np.float64) - ref)
    # float32 suffices for ranking differences and halves the memory of the 100M-entry stages.
    return d.astype(np.float32).ravel() if robust else d


def _groups(ref: dict) -> dict[str, list[str]]:
    """Point name -> its tensors; keyed tensors ('grad:...', 'stat:...') are grouped by stage."""
    groups: dict[str, list[str]] = {}
    for k in ref:
        groups.setdefault(_group(k) if ":" in k else k, []).append(k)
    return groups


def _robust(dtype: str, mode: str, name: str) -> bool:
    # Running stats are not behind a kink of this step's gradient; params are.
    return dtype != "float64" and mode in ("grad", "steps") and not name.startswith("running_")



def _scale(mode: str, key: str, ref: dict, init: dict | None) -> float:
    """What a tensor's error is relative to: max|ref|, or for ``steps`` params max|update| (the change from ``init``)."""
    r = ref[key]
    if mode == "steps" and key.startswith("param:") and init is not None:
        r = r - init[key.split(":", 1)[1]]
    return float(np.max(np.abs(r))) if r.size else 0.0


def _errors(mode: str, dtype: str, ref: dict, side: dict, init: dict | None = None) -> dict[str, Any]:
    """Per point: ``(absolute error, the worst tensor of a group)``; for robust points, per tensor ``(statistic, scale)``."""
    out: dict[str, Any] = {}
    for name, keys in _groups(ref).items():
        rob = _robust(dtype, mode, name)
        diffs = [_abs_diff(side[k], ref[k], rob) for k in keys]
        if rob:
            out[name] = {
                k: (float(np.quantile(d, 0.99)) if d.size >= PERCENTILE_MIN_SIZE else float(d.max()) if d.size else 0.0, _scale(mode, k, ref, init))
                for k, d in zip(keys, diffs)
            }
            continue
        maxes = [float(d.max()) if d.size else 0.0 for d in diffs]
        worst = int(np.argmax(maxes))  # the tensor with the largest error, named in reports
        out[name] = (maxes[worst], keys[worst] if len(keys) > 1 else None)
    return out


def _points(mode: str, ref: dict, flax: dict[str, Any], own: list[dict[str, Any]] | None, tol_rule, init: dict | None = None) -> list[Point]:
    """Points in network order; ``torch_rel`` is the median of torch's own runs (the typical fp32 execution).

    A robust (fp32/bf16 gradient or step) point is judged tensor by tensor,
    each against torch's error on the same tensor, and reports its worst
    tensor (the largest error/tolerance ratio); any other point is the largest
    error of its group over the group's scale.
    """
    points = []
    for name, keys in _groups(ref).items():
        f = flax[name]
        if isinstance(f, dict):
            judged = []
            for k in keys:
                err, scale = f[k]
                scale = scale or 1.0
                torch_rel = float(np.median([o[name][k][0] for o in own])) / scale if own else None
                tol = tol_rule(mode, torch_rel)
                judged.append((err / scale / tol if tol > 0 else np.inf, k, err, err / scale, tol, torch_rel))
            _, k, err, rel, tol, torch_rel = max(judged, key=lambda j: (j[0], j[3]))
            points.append(Point(mode, name, err, rel, tol, torch_rel, k))
            continue
        scale = max(_scale(mode, k, ref, init) for k in keys) or 1.0
        err, worst = f
        torch_rel = float(np.median([o[name][0] for o in own])) / scale if own else None
        points.append(Point(mode, name, err, err / scale, tol_rule(mode, torch_rel), torch_rel, worst))
    return points


def _argmax(logits: np.ndarray, ref: np.ndarray, tol: float) -> Argmax:
    """Compares predicted classes; a flip is excused only where the reference's top-2 margin is within rounding.

    Each logit may be off by ``tol * max|ref|`` and still pass, so a margin of
    twice that can flip in an equally valid run.
    """
    if ref.shape[1] < 2:  # one logit: nothing to rank
        return Argmax(int(ref.shape[0]), 0, 0)
    top2 = np.sort(ref, axis=1)[:, -2:]
    near = (top2[:, 1] - top2[:, 0]) <= 2 * tol * float(np.max(np.abs(ref)))
    differ = logits.argmax(1) != ref.argmax(1)
    return Argmax(int(ref.shape[0]), int(np.sum(differ & ~near)), int(np.sum(differ & near)))


def run_parity(
    torch_model: torch.nn.Module,
    x: np.ndarray,
    labels: np.ndarray | None = None,
    modes: Sequence[str] = ("eval",),
    dtype: str = "float32",
    precision: str = "highest",
    steps: int = 2,
    scan_blocks: bool = False,
    api: str = "linen",
) -> Report:
    """Compares a ``torch_ref.ResNet`` with its Flax conversion.

    Args:
        torch_model: a float32 ``torch_ref.ResNet`` (seed or torchvision layout).
        x: NCHW float images (converted to NHWC for Flax).
        labels: integer class labels for ``grad``/``steps`` (seeded if omitted).
        modes: any of ``"eval"`` (logits and every block, running stats),
            ``"train"`` (train-mode forward: outputs and updated running
            stats), ``"grad"`` (loss and gradients of mean cross-entropy),
            ``"steps"`` (params and stats after ``steps`` SGD steps, torch
            ``SGD(lr=0.1, momentum=0.9, weight_decay=1e-4)`` vs ``make_sgd``).
        dtype: ``"float32"``, ``"float64"`` or ``"bfloat16"`` (Flax compute).
        precision: ``"highest"`` pins fp32 on GPUs; ``"default"`` allows TF32.
        steps: optimizer steps for ``"steps"``.
        scan_blocks: run the Flax side as ``ResNet(scan_blocks=True)`` (each
            stage's repeated blocks as one ``nn.scan``; about 3x faster to
            compile for 100+ layers).
        api: ``"linen"`` (``flax_resnet.ResNet``) or ``"nnx"``
            (``flax_resnet.nnx.ResNet``, converted by ``flax_resnet.nnx.from_torch``):
            the same points and rules (kinks are matched for Linen only).

    Returns:
        A ``Report`` of every point in network order and, with ``"eval"``,
        whether the predicted classes agree (``Report.argmax``; a flip counts
        only where the float64 reference's top-2 margin exceeds twice the
        logits' tolerance).
    """
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown parity mode(s) {bad}; choose from {', '.join(MODES)}")
    if dtype not in ("float32", "float64", "bfloat16"):
        raise ValueError(f"unknown dtype {dtype!r}; choose float32, float64 or bfloat16")
    if api not in ("linen", "nnx"):
        raise ValueError(f"unknown api {api!r}; choose linen or nnx")
    sd = torch_model.state_dict()
    cfg = infer_config(sd)
    init = {k: v.detach().double().numpy() for k, v in torch_model.named_parameters()}  # steps are judged against the update
    if labels is None:
        labels = np.random.default_rng(0).integers(0, cfg.num_classes, size=x.shape[0])
    labels = np.asarray(labels, np.int64)
    x64 = np.asarray(x, np.float64)
    kinks = None
    v1 = bool(getattr(torch_model, "stride_in_1x1", False))  # not visible in the weights

    with pinned_precision(precision):
        ref = _torch_side(copy.deepcopy(torch_model).double(), x64, labels, modes, steps)
        if dtype == "float64":
            with jax.enable_x64(True):
                model, variables = _flax_from_torch(api, copy.deepcopy(torch_model).double().state_dict(), stride_in_1x1=v1, scan_blocks=scan_blocks)
                flax = _flax_side(model, variables, x64, labels, cfg.layout, modes, steps)
            own = None
            rule = lambda mode, _: FP64_TOL[mode]  # noqa: E731
        else:
            x32, bf16 = x64.astype(np.float32), dtype == "bfloat16"
            keyed = [m for m in modes if m in ("grad", "steps")]
            own = {m: [] for m in modes}
            for variant, run in zip(torch_variants(), (modes, keyed, keyed)):
                if run:  # reduced to errors at once: the 100M-parameter models' tensors add up
                    res = _torch_side(copy.deepcopy(torch_model).float(), x32, labels, run, steps, autocast_bf16=bf16, variant=variant)
                    for mode in run:
                        own[mode].append(_errors(mode, dtype, ref[mode], res.pop(mode), init))
            model, variables = _flax_from_torch(api, sd, param_dtype=np.float32, dtype=jnp.bfloat16 if dtype == "bfloat16" else None, stride_in_1x1=v1, scan_blocks=scan_blocks)
            flax = _flax_side(model, variables, x64.astype(np.float32), labels, cfg.layout, modes, steps)
            if "relu_masks" in flax:  # the gradient reference on Flax's side of every kink (``_kinks_like``)
                matched = _torch_side(copy.deepcopy(torch_model).double(), x64, labels, ("grad",), steps, relu_masks=flax.pop("relu_masks"))
                ref = {**ref, "grad": matched["grad"]}
                kinks = matched["kinks"]
            floor = BF16_FLOOR if dtype == "bfloat16" else FP32_FLOOR
            rule = lambda mode, torch_rel: max(2.0 * torch_rel, floor)  # noqa: E731

    points: list[Point] = []
    for mode in modes:
        errors = _errors(mode, dtype, ref[mode], flax[mode], init)
        points += _points(mode, ref[mode], errors, own[mode] if own else None, rule, init)
    variants = torch_variants() if own and any(m in ("grad", "steps") for m in modes) else ()
    argmax = None
    if "eval" in modes:
        tol = next(p.tol for p in points if p.mode == "eval" and p.name == "logits")
        argmax = _argmax(flax["eval"]["logits"].astype(np.float64), ref["eval"]["logits"], tol)
    size = (int(x.shape[2]), int(x.shape[3]))
    return Report(cfg.arch, cfg.layout, dtype, precision, int(x.shape[0]), size, describe_devices(), points, variants, argmax, scan_blocks, api, kinks)
