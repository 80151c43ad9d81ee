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

import contextlib
import copy
import dataclasses
import functools
import platform
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import jax
import jax.numpy as jnp
import optax

import flax_resnet
from flax_resnet.convert import flax_to_torch, infer_config

MODES = ("eval", "train", "grad", "steps")
FP32_FLOOR = 1e-6
# A ReLU input within this fraction of its tensor's max|x| of zero is a kink that rounding may
# flip: the float64 gradient reference takes the reduced-precision run's side of it (see
# ``_kinks_like``). fp32 forward errors are ~1e-6 of max|x| (the eval points), so 1e-4 leaves 100x.
KINK_BAND = 1e-4
FP64_TOL = {"eval": 1e-10, "train": 1e-9, "grad": 1e-9, "steps": 1e-9}
BF16_FLOOR = 1e-2
SGD = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)


@dataclasses.dataclass
class Point:
    """One compared tensor (or group of tensors)."""

    mode: str
    name: str
    max_abs: float
    rel: float
    tol: float
    torch_rel: float | None = None  # torch's own error at this dtype, when measured
    worst: str | None = None  # the worst tensor of a group

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.rel) and self.rel <= self.tol)


@dataclasses.dataclass
class Argmax:
    """Predicted classes (eval mode): Flax against the float64 torch run."""

    samples: int
    mismatches: int  # differing argmax where the reference's top-2 margin exceeds the noise
    near_ties: int  # differing argmax where the margin is within 2x the logits' tolerance (rounding may flip it)

    @property
    def passed(self) -> bool:
        return self.mismatches == 0


@dataclasses.dataclass
class Report:
    arch: str
    layout: str
    dtype: str
    precision: str
    batch: int
    size: tuple[int, int]
    device: str
    points: list[Point]
    torch_variants: tuple[str, ...] = ()  # torch runs whose median error is "torch own" for grad/steps
    argmax: Argmax | None = None  # with "eval"
    scan_blocks: bool = False  # the Flax side ran ResNet(scan_blocks=True)
    api: str = "linen"  # the Flax side: the Linen model or the NNX one (flax_resnet.nnx)
    kinks: int | None = None  # ReLU inputs at which the gradient reference took Flax's side (None: not matched)

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.points) and (self.argmax is None or self.argmax.passed)

    @property
    def first_failure(self) -> Point | None:
        return next((p for p in self.points if not p.passed), None)

    def point(self, mode: str, name: str) -> Point:
        return next(p for p in self.points if p.mode == mode and p.name == name)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for p, pd in zip(self.points, d["points"]):
            pd["passed"] = p.passed
        d["passed"] = self.passed
        ff = self.first_failure
        d["first_failure"] = f"{ff.mode} {ff.name}" if ff else (None if self.passed else "eval argmax")
        return d

    def format(self) -> str:
        head = (
            f"flax-resnet parity: {self.arch} ({self.layout} layout), batch {self.batch}, "
            f"{self.size[0]}x{self.size[1]}, {self.dtype}, precision {self.precision}, {self.device}"
            + (", Flax scan_blocks" if self.scan_blocks else "")
            + (", Flax NNX" if self.api == "nnx" else "")
        )
        rows = [("mode", "point", "max abs err", "rel err", "tolerance", "torch own", "status")]
        for p in self.points:
            own = "-" if p.torch_rel is None else f"{p.torch_rel:.2e}"
            status = "pass" if p.passed else "FAIL"
            name = p.name + (f" ({p.worst.split(':', 1)[-1]})" if p.worst and (not p.passed or p.mode in ("grad", "steps")) else "")
            rows.append((p.mode, name, f"{p.max_abs:.3e}", f"{p.rel:.3e}", f"{p.tol:.2e}", own, status))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head, ""] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        ff = self.first_failure
        n = len(self.points)
        if self.torch_variants and any(p.mode in ("grad", "steps") for p in self.points):
            lines += [
                "",
                f"grad/steps: each tensor's p99 error (max under {PERCENTILE_MIN_SIZE} entries) over its max|grad| (steps: max|update|),"
                f" against 2x torch's on it (the median of torch runs {', '.join(self.torch_variants)}); the worst tensor is shown",
            ]
        if self.kinks is not None:
            lines += [
                f"kinks: {self.kinks} ReLU input(s) within {KINK_BAND:g} of their tensor's max|x| of zero fell on the other side in Flax's"
                " forward; the float64 gradient reference follows Flax there"
            ]
        am = self.argmax
        if am is not None:
            ties = f" ({am.near_ties} near tie(s) within rounding)" if am.near_ties else ""
            lines += ["", f"argmax: {am.samples - am.mismatches - am.near_ties}/{am.samples} samples agree with torch float64{ties}"]
        if ff is not None:
            lines += ["", f"FAIL: first failure at {ff.mode} {ff.name}"]
        elif not self.passed:
            lines += ["", f"FAIL: argmax differs on {am.mismatches} of {am.samples} samples"]
        else:
            lines += ["", f"PASS: all {n} points within tolerance" + (", argmax agrees" if am is not None else "")]
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# Precision pinning


@contextlib.contextmanager
def pinned_precision(precision: str) -> Iterator[None]:
    """Pins matmul/conv precision in JAX and torch, restoring both afterwards.

    ``"highest"`` is true fp32 on GPUs (no TF32) in both frameworks;
    ``"default"`` leaves each framework's default (TF32 on Ampere+ GPUs).
    """
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    try:
        if precision == "highest":
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
            with jax.default_matmul_precision("highest"):
                yield
        else:
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cuda.matmul.allow_tf32 = True
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def torch_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_devices() -> str:
    jd = jax.devices()[0]
    td = torch_device()
    tname = torch.cuda.get_device_name(0) if td.type == "cuda" else platform.processor() or "cpu"
    return f"jax {jax.default_backend()} ({jd.device_kind}) / torch {td.type} ({tname})"


# ---------------------------------------------------------------------------
# Running each side


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()


def _np(t: torch.Tensor) -> np.ndarray:
    a = _numpy(t)
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a  # NCHW -> NHWC for comparison


# CPU: one thread changes how every reduction is split; CUDA: cuDNN's
# autotuner picks other algorithms.
def torch_variants() -> tuple[str, ...]:
    """The torch executions whose spread is the gradient noise floor (see ``run_parity``)."""
    return ("default", "channels_last", "cudnn_benchmark" if torch_device().type == "cuda" else "one_thread")


@contextlib.contextmanager
def _torch_variant(variant: str) -> Iterator[None]:
    threads, bench = torch.get_num_threads(), torch.backends.cudnn.benchmark
    try:
        if variant == "one_thread":
            torch.set_num_threads(1)
        elif variant == "cudnn_benchmark":
            torch.backends.cudnn.benchmark = True
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = bench


def _torch_side(
    model: torch.nn.Module,
    x: np.ndarray,
    labels: np.ndarray,
    modes: Sequence[str],
    steps: int,
    autocast_bf16: bool = False,
    variant: str = "default",
    relu_masks: Sequence[np.ndarray] | None = None,
) -> dict[str, Any]:
    dev = torch_device()
    dtype = next(model.parameters()).dtype
    xt = torch.from_numpy(x).to(dev, dtype)
    yt = torch.from_numpy(labels).to(dev)
    if variant == "channels_last":
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        xt = xt.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
    out: dict[str, dict[str, np.ndarray]] = {}
    with ctx, _torch_variant(variant):
        if "eval" in modes:
            m = copy.deepcopy(model).to(dev).eval()
            with torch.no_grad():
                out["eval"] = {k: _np(v) for k, v in m.forward_intermediates(xt, blocks=True).items()}
        if "train" in modes:
            m = copy.deepcopy(model).to(dev).train()
            with torch.no_grad():
                res = {k: _np(v) for k, v in m.forward_intermediates(xt, blocks=True).items()}
            res.update(_stats(m))
            out["train"] = res
        if "grad" in modes:
            m = copy.deepcopy(model).to(dev).train()
            with _kinks_like(m, relu_masks) if relu_masks is not None else contextlib.nullcontext() as kinks:
                loss = F.cross_entropy(_logits32(m(xt)), yt)
            loss.backward()
            if kinks is not None:
                out["kinks"] = kinks["moved"]
            res = {"loss": np.asarray(loss.item())}
            res.update({f"grad:{k}": _numpy(p.grad) for k, p in m.named_parameters()})
            out["grad"] = res
        if "steps" in modes:
            m = copy.deepcopy(model).to(dev).train()
            opt = torch.optim.SGD(m.parameters(), **SGD)
            for _ in range(steps):
                opt.zero_grad()
                F.cross_entropy(_logits32(m(xt)), yt).backward()
                opt.step()
            res = {f"param:{k}": _numpy(p) for k, p in m.named_parameters()}
            res.update(_stats(m))
            out["steps"] = res
    return out


@contextlib.contextmanager
def _kinks_like(model: torch.nn.Module, relu_masks: Sequence[np.ndarray]) -> Iterator[dict[str, int]]:
    """Makes a torch forward take another run's side of every ReLU kink.

    A train-mode gradient is the exact gradient of the piecewise-linear net
    on one side of each kink; an activation within rounding of zero lands
    on either side depending on summation order alone, and the two sides'
    gradients differ by O(1) at that position and, through train-mode
    BatchNorm, by ~1e-3 in every layer below (the ResNeXt-50 fixture: one
    input of 4e-6 in layer3.3). So the float64 reference is taken on the
    fp32 run's side: each ``nn.ReLU`` call (in network order, matching
    ``relu_masks``: NHWC booleans ``x > 0`` of the other run) whose input
    has the other sign *and* lies within ``KINK_BAND`` of its tensor's
    max|x| of zero gets its input mirrored (``x -> -x``, a move of at most
    2e-4 of max|x|, the gradient passing unchanged). A sign that differs
    farther from zero is left alone: that is a real discrepancy.

    Yields:
        ``{"moved": n}``, filled in by the forward.

    Raises:
        ValueError: the forward made more or fewer ReLU calls than
            ``relu_masks`` has, or one of another shape.
    """
    state = {"calls": 0, "moved": 0}

    def hook(module, inputs, output):
        i = state["calls"]
        state["calls"] += 1
        z = inputs[0]
        if i >= len(relu_masks):
            raise ValueError(f"kink matching: ReLU call {i + 1} of the torch forward has no Flax mask (Flax has {len(relu_masks)})")
        want = torch.from_numpy(np.ascontiguousarray(relu_masks[i].transpose(0, 3, 1, 2))).to(z.device)
        if want.shape != z.shape:
            raise ValueError(f"kink matching: ReLU call {i + 1} has shape {tuple(z.shape)} in torch, {tuple(want.shape)} in Flax")
        flip = ((z > 0) != want) & (z.abs() <= KINK_BAND * z.abs().max())
        state["moved"] += int(flip.sum())
        return F.relu(z + torch.where(flip, -2 * z, torch.zeros_like(z)).detach())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.ReLU)]
    try:
        yield state
    finally:
        for h in handles:
            h.remove()
    if state["calls"] != len(relu_masks):
        raise ValueError(f"kink matching: the torch forward made {state['calls']} ReLU calls, Flax {len(relu_masks)}")


def _relu_masks(model: flax_resnet.ResNet, captured: dict, feats: dict) -> list[np.ndarray]:
    """Every ReLU input's sign (``x > 0``, NHWC) in network order, from a Linen forward.

    ``captured``: the BatchNorm outputs (``capture_intermediates``; blocks of
    a scanned stage stacked under ``rest``); ``feats``: the block outputs,
    whose sign is that of the residual sum's ReLU input.
    """
    masks = []
    stem = captured.get("conv1", {})  # timm's deep stem: BNs 1 and 4 before ReLUs
    masks += [np.asarray(stem[k]["__call__"][0]) for k in sorted(stem, key=int)]
    masks.append(np.asarray(captured["bn1"]["__call__"][0]))
    for b in flax_resnet.archs.blocks(model.spec, model.stride_in_1x1):
        stage = captured[f"layer{b.stage}"]
        node, at = (stage[str(b.index)], None) if str(b.index) in stage else (stage["rest"], b.index - 1)
        for i in range(1, len(b.convs)):
            a = np.asarray(node[f"bn{i}"]["__call__"][0])
            masks.append(a if at is None else a[at])
        masks.append(np.asarray(feats[f"layer{b.stage}.{b.index}"]) > 0)
    return masks


def _logits32(logits: torch.Tensor) -> torch.Tensor:
    """Loss in at least float32, as on the Flax side (float64 stays float64)."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


def _stats(m: torch.nn.Module) -> dict[str, np.ndarray]:
    return {f"stat:{k}": _numpy(v) for k, v in m.state_dict().items() if k.endswith(("running_mean", "running_var"))}


def make_sgd(lr: float | None = None, momentum: float | None = None, weight_decay: float | None = None) -> optax.GradientTransformation:
    """The library's ``torch_sgd``: ``torch.optim.SGD(lr, momentum, weight_decay)`` exactly.

    Unset arguments take the harness's ``SGD`` settings.
    """
    from flax_resnet.training import torch_sgd

    lr = SGD["lr"] if lr is None else lr
    momentum = SGD["momentum"] if momentum is None else momentum
    weight_decay = SGD["weight_decay"] if weight_decay is None else weight_decay
    return torch_sgd(lr, momentum, weight_decay)


def _is_norm(module, method_name: str) -> bool:
    return isinstance(module, flax_resnet.layers.BatchNorm) and method_name == "__call__"


@functools.lru_cache(maxsize=8)
def _jitted(model, what: str):
    """jit-compiled Flax computations, cached per (model, what)."""

    # The Linen model also returns the sign of every BatchNorm output (the ReLU inputs, for ``_kinks_like``).
    capture = dict(capture_intermediates=_is_norm, mutable=["batch_stats", "intermediates"]) if isinstance(model, flax_resnet.ResNet) else {}

    def loss_fn(params, batch_stats, x, y):
        feats, new = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, blocks=True, method="intermediates", **({"mutable": ["batch_stats"]} | capture)
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(feats["logits"], y).mean()
        signs = jax.tree.map(lambda a: a > 0, new.get("intermediates", {}))
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
            out["relu_masks"] = _relu_masks(model, signs, {k: np.asarray(v) for k, v in feats.items()})
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


# Tensors smaller than this are judged by their largest error, larger ones by the 99th percentile.
PERCENTILE_MIN_SIZE = 100


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
