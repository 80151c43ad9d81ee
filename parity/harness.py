"""Runs PyTorch and Flax on the same weights and inputs and reports the gap.

Every comparison is relative to a float64 torch run of the same model:

* ``float32``: a point passes when Flax's error is at most 2x the *fp32
  noise* at that point, never tighter than ``FP32_FLOOR``. The fp32 noise is
  measured, tensor by tensor: the largest error among equally valid fp32
  executions, namely torch fp32 in each of ``torch_variants()`` (the default
  run, channels_last, and one thread on a multi-threaded CPU or cuDNN autotuning on CUDA) and,
  in every mode, ``SENSITIVITY_RUNS`` float64 runs whose weights, inputs
  and every conv/BN/linear output are moved by up to 4 fp32 ulps
  (``torch_side._rounding_noise``). The latter measure each tensor's fp32
  *sensitivity* directly: where small batches make train-mode BatchNorm
  ill-conditioned (batch 1-2, a 2x2 layer4), rounding at fp32 level moves
  its gradients by 1e-3 and more, and the tolerance knows it; where the
  computation is well-conditioned it stays at ~1e-6. In eval mode, torch's
  few fp32 runs alone can agree more closely than fp32 rounding allows (a
  batch-2 resnet18's pooled features: Flax at 0.96 of twice torch's largest
  error, before the eval points had sensitivity runs). ``python -m
  parity.sweep`` measures the rule: seeds x batch 1/2/4/8 x architecture
  kinds without a false FAIL, and each planted bug failing on every seed
  (docs/parity.md).
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
whole channel and every layer below it. So

* the float64 reference for Flax's gradients, and for its SGD steps (each
  step's forward), is taken on Flax's side of every ReLU kink
  (``_kinks_like``; Linen and NNX): ReLU inputs whose sign differs within
  ``KINK_BAND`` of zero are mirrored in the float64 run, stem max-pool
  windows whose largest input lies within ``KINK_BAND`` of the one Flax
  took output Flax's choice, and the report counts both (``Report.kinks``); likewise each torch run that measures the
  fp32 noise is taken on the float64 reference's side, so the tolerance
  holds the same smooth rounding error Flax is judged by and no kink flip
  of its own (one flip in a torch run made a 1% BN-bias gradient error pass
  at seed 7, batch 4; in the steps, before they were matched, one noise
  realization flipped a kink at batch 1 and the next did not, so the
  tolerance moved by 1e4x between runs of the same point);
* each tensor is judged by its own statistic: the 99th percentile of
  ``|flax - ref|`` (isolated flips are rounding, not structure), or the
  largest error for tensors under ``PERCENTILE_MIN_SIZE`` entries, over the
  tensor's ``max|ref|``; for ``steps`` over the largest *update*
  ``max|ref - initial param|``, not the parameter;
* the rule is the same 2x of the fp32 noise, tensor by tensor; a point (a
  stage) passes when all its tensors do and reports its worst tensor.

A 1% error in ``fc.bias``'s gradient, in one BatchNorm's bias gradient or in
one SGD update fails this rule in fp32 (tests/test_parity.py).
float64 (max, 1e-9) is what proves the gradients' structure: with
``explain=True`` a reduced-precision FAIL reruns its failing modes in float64
and says whether float64 agrees (an fp32 sensitivity) or differs (a real
difference, and where). Points are reported in network order, so the first
failing one says where parity broke. Eval mode also compares the predicted
classes (argmax) with the float64 run's; a flip is excused only where the
reference's top-2 margin is within twice the logits' tolerance (a near tie
that rounding may flip).
"""

from __future__ import annotations

import copy
import functools
from typing import Sequence

import numpy as np
import torch

import jax
import jax.numpy as jnp
import optax

from flax import traverse_util

import flax_resnet
from flax_resnet.config import ModelConfig
from flax_resnet.convert import flax_to_torch, infer_config
from flax_resnet.layers import RELU_SIGNS
from flax_resnet.stacking import SCAN_NAME
from parity.constants import BF16_FLOOR, FP32_FLOOR, FP64_TOL, KINK_BAND, MODES, NOISE_FACTOR, PERCENTILE_MIN_SIZE, SENSITIVITY_RUNS, SGD
from parity.compare import _argmax, _errors, _float64_check, _points
from parity.report import Argmax, Point, Report
from parity.torch_side import (
    MAX_POOL,
    _kinks_like,
    _logits32,
    _np,
    _numpy,
    _pool_choices,
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
]  # fmt: skip


def _relu_masks(signs: dict) -> dict[str, list[np.ndarray]]:
    """Every ReLU input's sign (``x > 0``, NHWC) of a Linen forward, per module, in call order, and the max-pool's choices.

    ``signs``: the ``relu_signs`` collection (``flax_resnet.layers.relu`` records
    each ReLU under the module that calls it; blocks of a scanned stage are
    stacked under ``rest``). Keys are torch module names (``""`` for the
    model, ``"layer1.0"``, ``"layer1.0.se"``, ``"conv1"``): the parents of the
    ``nn.ReLU`` modules whose calls ``_kinks_like`` matches, so no list of
    ReLUs is kept anywhere but in the two forwards; and ``MAX_POOL``, each
    stem max-pool window's choice (``layers.max_pool`` records its input).
    """
    out: dict[str, list[np.ndarray]] = {}
    for path, calls in traverse_util.flatten_dict(dict(signs)).items():
        if path[-1] == "max_pool":  # the stem max-pool's input: each window's choice (``_pool_choices``)
            out[MAX_POOL] = [_pool_choices(torch.from_numpy(np.asarray(a).astype(np.float32).transpose(0, 3, 1, 2))) for a in calls]
            continue
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
    if what == "signs":  # a Linen twin's train-mode forward: the NNX model's ReLU inputs (``_flax_side``)

        def signs(v, x):
            return model.apply(v, x, train=True, blocks=True, method="intermediates", **capture)[1][RELU_SIGNS]

        return jax.jit(signs)
    if what == "update":  # steps reuse the "grad" executable: one compile of the backward pass
        tx = make_sgd()

        def update(params, g, opt_state):
            updates, opt_state = tx.update(g, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return jax.jit(update), tx
    raise ValueError(what)


def _flax_from_torch(api: str, state_dict, config: ModelConfig):
    """``(model, variables)`` of ``config`` for ``_flax_side``: the Linen model, or the NNX one behind Linen's ``apply`` (``flax_resnet.nnx.LinenApply``)."""
    if api == "nnx":
        import flax_resnet.nnx as frn

        model = frn.from_torch(state_dict, config=config)
        apply = frn.LinenApply(model)
        # The Linen model of the same config gives the kink matching its BatchNorm outputs' signs.
        apply.linen_twin = flax_resnet.build(flax_resnet.model_config(model))
        return apply, frn.to_linen(model)
    return flax_resnet.from_torch(state_dict, config=config)


def _flax_side(
    model, variables, x: np.ndarray, labels: np.ndarray, layout: str, modes: Sequence[str], steps: int, match_kinks: bool = True
) -> dict[str, dict[str, np.ndarray]]:
    """Flax's results per mode; with ``match_kinks``, also the ReLU masks of the grad forward and of each SGD step's (for ``_kinks_like``)."""
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

    def masks(signs, v) -> dict[str, list[np.ndarray]] | None:
        if not match_kinks:
            return None
        if not signs and hasattr(model, "linen_twin"):  # NNX: the ReLU inputs' signs of the Linen twin (the same numerics)
            signs = _jitted(model.linen_twin, "signs")(v, x)
        return _relu_masks(signs) if signs else None

    if "grad" in modes:
        loss, g, feats, stats, signs = _jitted(model, "grad")(variables, x, y)
        new = {"batch_stats": stats}
        out["relu_masks"] = masks(signs, variables)
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
        step_masks = []
        for _ in range(steps):
            v = {"params": params, "batch_stats": stats}
            _, g, _, stats, signs = grad(v, x, y)
            step_masks.append(masks(signs, v))
            params, opt_state = update(params, g, opt_state)
        out["step_masks"] = step_masks if all(m is not None for m in step_masks) else None
        new = {"params": params, "batch_stats": stats}
        res = as_torch(new, "param", lambda k: not is_stat(k) and "num_batches" not in k)
        res.update(as_torch(new, "stat", is_stat))
        out["steps"] = res
    return out


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
    explain: bool = False,
    config: ModelConfig | None = None,
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
            the same points and rules.
        config: the ``flax_resnet.ModelConfig`` both sides were built from
            (``torch_ref.build``): the Flax side is this config (its dtypes
            and ``scan_blocks`` set by the run), so every setting the weights
            do not show (``stride_in_1x1``, BatchNorm momentum and eps,
            ``precision``) comes from it. Without it, the config the weights
            show, with the torch model's ``stride_in_1x1``.
        explain: on a reduced-precision FAIL, rerun the failing modes in
            float64 and say whether the failure is structural
            (``Report.float64_check``, ``Report.explanation``).

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
    if config is None:  # what the weights show, and the torch model's stride placement
        config = infer_config(sd).replace(stride_in_1x1=bool(getattr(torch_model, "stride_in_1x1", False)))
    cfg = config.replace(scan_blocks=scan_blocks, dtype=None, param_dtype="float32")
    init = {k: v.detach().double().numpy() for k, v in torch_model.named_parameters()}  # steps are judged against the update
    if labels is None:
        labels = np.random.default_rng(0).integers(0, cfg.num_classes, size=x.shape[0])
    labels = np.asarray(labels, np.int64)
    x64 = np.asarray(x, np.float64)
    kinks = None

    def flax64(run_modes):
        with jax.enable_x64(True):
            model, variables = _flax_from_torch(api, sd, cfg.replace(param_dtype="float64"))
            return _flax_side(model, variables, x64, labels, cfg.layout, run_modes, steps, match_kinks=False)

    with pinned_precision(precision):
        ref = ref64 = _torch_side(copy.deepcopy(torch_model).double(), x64, labels, modes, steps, record_signs=dtype != "float64")
        ref_signs, ref_step_signs = ref.pop("relu_signs", None), ref.pop("step_signs", None)
        if dtype == "float64":
            flax = flax64(modes)
            own = None
            rule = lambda mode, _: FP64_TOL[mode]  # noqa: E731
        else:
            x32, bf16 = x64.astype(np.float32), dtype == "bfloat16"
            own = {m: [] for m in modes}
            runs = [(modes, dict(variant=v, autocast_bf16=bf16)) for v in torch_variants()]
            if not bf16:
                runs += [(modes, dict(noise_seed=s)) for s in range(SENSITIVITY_RUNS)]
            for run_modes, run in runs:  # reduced to errors at once: the 100M-parameter models' tensors add up
                x_run = x64 if "noise_seed" in run else x32
                # Each noise run's gradient and steps on the reference's side of every kink, as Flax's are compared on their own.
                res = _torch_side(copy.deepcopy(torch_model).float(), x_run, labels, run_modes, steps, relu_masks=ref_signs, step_masks=ref_step_signs, **run)
                for mode in run_modes:
                    own[mode].append(_errors(mode, dtype, ref[mode], res.pop(mode), init))
            model, variables = _flax_from_torch(api, sd, cfg.replace(dtype="bfloat16") if dtype == "bfloat16" else cfg)
            flax = _flax_side(model, variables, x64.astype(np.float32), labels, cfg.layout, modes, steps)
            relu_masks, step_masks = flax.pop("relu_masks", None), flax.pop("step_masks", None)
            matched_modes = tuple(m for m, masks in (("grad", relu_masks), ("steps", step_masks)) if masks is not None)
            if matched_modes:  # the float64 gradient and steps references on Flax's side of every kink (``_kinks_like``)
                matched = _torch_side(
                    copy.deepcopy(torch_model).double(), x64, labels, matched_modes, steps, relu_masks=relu_masks, step_masks=step_masks
                )
                ref = {**ref, **{m: matched[m] for m in matched_modes}}
                kinks = matched["kinks"]
            floor = BF16_FLOOR if dtype == "bfloat16" else FP32_FLOOR
            rule = lambda mode, torch_rel: max(NOISE_FACTOR * torch_rel, floor)  # noqa: E731

    points: list[Point] = []
    for mode in modes:
        errors = _errors(mode, dtype, ref[mode], flax[mode], init)
        points += _points(mode, ref[mode], errors, own[mode] if own else None, rule, init)
    variants = (torch_variants() + (tuple(f"float64+noise{s}" for s in range(SENSITIVITY_RUNS)) if dtype != "bfloat16" else ())) if own else ()
    argmax = None
    if "eval" in modes:
        tol = next(p.tol for p in points if p.mode == "eval" and p.name == "logits")
        argmax = _argmax(flax["eval"]["logits"].astype(np.float64), ref["eval"]["logits"], tol)
    size = (int(x.shape[2]), int(x.shape[3]))
    report = Report(cfg.spec.name, cfg.layout, dtype, precision, int(x.shape[0]), size, describe_devices(), points, variants, argmax, scan_blocks, api, kinks)
    if explain and dtype != "float64" and not report.passed:
        failing = [p for p in points if not p.passed] or [p for p in points if p.mode == "eval" and p.name == "logits"]
        run_modes = tuple(m for m in modes if any(p.mode == m for p in failing))
        with pinned_precision(precision):
            check = _float64_check(failing, ref64, flax64(run_modes), init)
        report.float64_check = check
    return report
