"""The parity harness's results: ``Point``s, the ``Argmax`` check and the ``Report`` (``parity.harness.run_parity``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from parity.constants import KINK_BAND, PERCENTILE_MIN_SIZE


COLUMNS = {
    "max abs err": "largest |flax - reference| of the point, the reference being torch float64 on the same weights and inputs",
    "rel err": "max abs err over the reference's max|value| (grad/steps: its tensor's error statistic over max|grad|, or max|update| for steps)",
    "tolerance": "the largest rel err allowed: 2x the fp32 noise, 1e-6 at least (bfloat16: 2x torch autocast's, 1e-2 at least; float64: 1e-10 eval, 1e-9 otherwise)",
    "fp32 noise": "the largest rel err among equally valid fp32 runs: torch fp32 variants and float64 runs moved by 4 fp32 ulps per value",
    "status": "pass when rel err <= tolerance; FAIL otherwise (the first FAIL in network order says where parity broke)",
}


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

    @property
    def margin(self) -> float:
        """rel err / tolerance: above 1 fails; ``inf`` for a NaN error or a zero tolerance (as far off as can be)."""
        return self.rel / self.tol if np.isfinite(self.rel) and self.tol else float("inf")

    @property
    def label(self) -> str:
        """``mode point`` without repeating the mode: 'grad layer1', 'steps param layer1', 'eval logits'."""
        return f"{self.mode} {self.name.removeprefix(f'{self.mode} ')}"


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
    kinks: int | None = None  # ReLU inputs and max-pool windows at which the gradient/steps reference took Flax's side (None: not matched)
    float64_check: dict[str, Any] | None = None  # a reduced-precision FAIL rerun in float64 (``run_parity(explain=True)``)

    @property
    def explanation(self) -> str | None:
        """What a reduced-precision FAIL is: an fp32 sensitivity (float64 agrees) or a real difference."""
        c = self.float64_check
        if c is None:
            return None
        if c["structural"]:
            return f"float64 differs by {c['max_rel']:.1e} at {c['at']}: a real difference"
        return f"float64 agrees to {c['max_rel']:.0e}: an fp32 sensitivity, not a structural difference"

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
        d["first_failure"] = ff.label if ff else (None if self.passed else "eval argmax")
        d["explanation"] = self.explanation
        d["columns"] = dict(COLUMNS)
        return d

    def footnotes(self) -> list[str]:
        """One line per column of ``format``'s table, and the kinks line."""
        lines = [f"{k}: {v}" for k, v in COLUMNS.items()]
        if self.torch_variants:
            lines.append(f"fp32 noise runs: {', '.join(self.torch_variants)}")
        if any(p.mode in ("grad", "steps") for p in self.points) and self.dtype != "float64":
            lines.append(
                f"grad/steps rows: each tensor's 99th-percentile error (the largest under {PERCENTILE_MIN_SIZE} entries), judged tensor by tensor; "
                "the worst tensor is named"
            )
        if self.kinks is not None:
            lines.append(
                f"kinks: {self.kinks} ReLU input(s) within {KINK_BAND:g} of their tensor's max|x| of zero fell on the other side, or max-pool"
                " window(s) with two inputs that close took the other one, in Flax's training forwards (grad, each SGD step); the float64 reference"
                " takes Flax's side there (a kink's two sides have different gradients)"
            )
        return lines

    def format(self) -> str:
        head = (
            f"flax-resnet parity: {self.arch} ({self.layout} layout), batch {self.batch}, "
            f"{self.size[0]}x{self.size[1]}, {self.dtype}, precision {self.precision}, {self.device}"
            + (", Flax scan_blocks" if self.scan_blocks else "")
            + (", Flax NNX" if self.api == "nnx" else "")
        )
        rows = [("mode", "point", "max abs err", "rel err", "tolerance", "fp32 noise", "status")]
        for p in self.points:
            own = "-" if p.torch_rel is None else f"{p.torch_rel:.2e}"
            status = "pass" if p.passed else "FAIL"
            name = p.label.split(" ", 1)[1]
            name += f" ({p.worst.split(':', 1)[-1]})" if p.worst and (not p.passed or p.mode in ("grad", "steps")) else ""
            rows.append((p.mode, name, f"{p.max_abs:.3e}", f"{p.rel:.3e}", f"{p.tol:.2e}", own, status))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head, ""] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        ff = self.first_failure
        n = len(self.points)
        lines += ["", *self.footnotes()]
        am = self.argmax
        if am is not None:
            ties = f" ({am.near_ties} near tie(s) within rounding)" if am.near_ties else ""
            lines += ["", f"argmax: {am.samples - am.mismatches - am.near_ties}/{am.samples} samples agree with torch float64{ties}"]
        if ff is not None:
            lines += ["", f"FAIL: first failure at {ff.label}"]
            if self.explanation:
                lines.append(f"  {self.explanation}")
        elif not self.passed:
            lines += ["", f"FAIL: argmax differs on {am.mismatches} of {am.samples} samples"]
            if self.explanation:
                lines.append(f"  {self.explanation}")
        else:
            lines += ["", f"PASS: all {n} points within tolerance" + (", argmax agrees" if am is not None else "")]
        return "\n".join(lines)

