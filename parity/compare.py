"""Comparing the two sides: points grouped by stage, per-tensor statistics, the argmax check, the float64 explanation of a FAIL."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from flax_resnet.archs import from_transformers_name
from parity.constants import FP64_TOL, PERCENTILE_MIN_SIZE
from parity.report import Argmax, Point



def _group(key: str) -> str:
    """'grad:layer2.3.conv1.weight' -> 'grad layer2'; stem modules -> 'stem'; fc -> 'fc'.

    transformers' names go by the torch_ref module they map to
    ('grad:resnet.encoder.stages.1.layers.3.layer.0.convolution.weight' -> 'grad layer2').
    """
    kind, name = key.split(":", 1)
    top = name.split(".")[0]
    if top in ("resnet", "classifier"):
        top = (from_transformers_name(name.rpartition(".")[0]) or top).split(".")[0]
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
    """Points in network order; ``torch_rel`` is the fp32 noise: the largest error among the equally valid fp32 runs ``own``.

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
                torch_rel = float(np.max([o[name][k][0] for o in own])) / scale if own else None
                tol = tol_rule(mode, torch_rel)
                judged.append((err / scale / tol if tol > 0 else np.inf, k, err, err / scale, tol, torch_rel))
            _, k, err, rel, tol, torch_rel = max(judged, key=lambda j: (j[0], j[3]))
            points.append(Point(mode, name, err, rel, tol, torch_rel, k))
            continue
        scale = max(_scale(mode, k, ref, init) for k in keys) or 1.0
        err, worst = f
        torch_rel = float(np.max([o[name][0] for o in own])) / scale if own else None
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


def _module_of(key: str) -> str:
    """'grad:layer2.0.bn1.weight' -> 'layer2.0.bn1'."""
    name = key.split(":", 1)[-1]
    return name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias", ".running_mean", ".running_var")) else name


def _float64_check(failing: Sequence[Point], ref: dict, flax: dict, init: dict) -> dict[str, Any]:
    """The failing points again, in float64: ``{"max_rel", "at", "structural", "points"}``.

    ``structural``: some point exceeds ``FP64_TOL`` in float64 too; ``at`` is
    then the first such point in network order (its worst module) and
    ``max_rel`` its float64 error; otherwise ``max_rel`` is the largest
    float64 error of the failing points (how well float64 agrees).
    """
    rows = []
    for p in failing:
        errors = _errors(p.mode, "float64", ref[p.mode], flax[p.mode], init)
        (q,) = [q for q in _points(p.mode, ref[p.mode], errors, None, lambda mode, _: FP64_TOL[mode], init) if q.name == p.name]
        where = _module_of(q.worst) if q.worst else q.name
        rows.append({"mode": p.mode, "point": p.name, "rel": q.rel, "tol": q.tol, "at": where})
    structural = [r for r in rows if not r["rel"] <= r["tol"]]  # NaN is structural
    first = structural[0] if structural else max(rows, key=lambda r: r["rel"] / r["tol"])
    return {"max_rel": first["rel"], "at": f"{first['mode']} {first['at']}", "structural": bool(structural), "points": rows}
