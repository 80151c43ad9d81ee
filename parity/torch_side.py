"""The torch side of the parity harness: precision pinning, torch's runs and their variants, kink matching."""

from __future__ import annotations

import contextlib
import copy
import functools
import platform
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import jax

from parity.constants import FP32_ULP, KINK_BAND, MODES, SGD


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


DEVICES = ("auto", "cpu", "gpu")
_forced: list[str] = []  # on_device's choice while it is active


def torch_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and "cpu" not in _forced else "cpu")


def check_device(choice: str) -> None:
    """Raises ``ValueError`` (one line) for an unknown choice, or ``"gpu"`` where torch or JAX sees no GPU."""
    if choice not in DEVICES:
        raise ValueError(f"unknown device {choice!r}; choose one of {', '.join(DEVICES)}")
    if choice == "gpu" and not (torch.cuda.is_available() and jax.default_backend() == "gpu"):
        seen = f"torch sees {'a' if torch.cuda.is_available() else 'no'} CUDA GPU, JAX's backend is {jax.default_backend()}"
        raise ValueError(f"--device gpu needs a GPU in both frameworks ({seen}): install jax[cuda12] and a CUDA torch, or use --device cpu")


@contextlib.contextmanager
def on_device(choice: str = "auto") -> Iterator[None]:
    """Where both frameworks run: ``"auto"`` (each one's default: the GPU if it sees one), ``"cpu"`` or ``"gpu"`` (both).

    Raises:
        ValueError: an unknown choice, or ``"gpu"`` where torch or JAX sees no GPU.
    """
    check_device(choice)
    if choice != "cpu":
        yield
        return
    _forced.append("cpu")
    try:
        with jax.default_device(jax.devices("cpu")[0]):
            yield
    finally:
        _forced.pop()


def describe_devices() -> str:
    jd = jax.devices("cpu")[0] if "cpu" in _forced else jax.devices()[0]
    td = torch_device()
    tname = torch.cuda.get_device_name(0) if td.type == "cuda" else platform.processor() or "cpu"
    return f"jax {jd.platform} ({jd.device_kind}) / torch {td.type} ({tname})"


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
    if torch_device().type == "cuda":
        return ("default", "channels_last", "cudnn_benchmark")
    # One thread is another execution only where the default runs more than one (a run of it would repeat "default").
    return ("default", "channels_last") + (("one_thread",) if torch.get_num_threads() > 1 else ())


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


@contextlib.contextmanager
def _rounding_noise(model: torch.nn.Module, rel: float, seed: int) -> Iterator[None]:
    """A float64 ``model`` whose weights, BN statistics and every conv/BN/linear output carry rounding-level noise.

    Each value is multiplied by ``1 + rel * U(-1, 1)`` (``FP32_ULP``: 4 fp32
    ulps): a float64 execution as unsure of every number as an fp32 one,
    so its distance from the exact float64 run is the fp32 *sensitivity* of
    each tensor (what ill-conditioned BatchNorm at small batches amplifies),
    measured rather than assumed. Restores the weights and removes the hooks.
    """
    g = torch.Generator().manual_seed(seed)

    def noise(t: torch.Tensor) -> torch.Tensor:
        return 1 + rel * (2 * torch.rand(t.shape, generator=g, dtype=torch.float64) - 1).to(t.device, t.dtype)

    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.mul_(noise(t))

    def hook(module, inputs, output):
        return output * noise(output).detach()

    kinds = (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Linear)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        model.load_state_dict(saved)


def _torch_side(
    model: torch.nn.Module,
    x: np.ndarray,
    labels: np.ndarray,
    modes: Sequence[str],
    steps: int,
    autocast_bf16: bool = False,
    variant: str = "default",
    relu_masks: Mapping[str, Sequence[np.ndarray]] | None = None,
    noise_seed: int | None = None,
    record_signs: bool = False,
    step_masks: Sequence[Mapping[str, Sequence[np.ndarray]]] | None = None,
) -> dict[str, Any]:
    """Runs ``model`` in ``modes``.

    ``noise_seed`` makes it a float64 sensitivity run (``_rounding_noise``,
    inputs included; each mode draws its own noise, so what one mode
    measures does not depend on which modes ran before it).
    ``relu_masks`` puts the ``grad`` forward on another run's side of every
    ReLU kink and ``step_masks`` each SGD step's forward of ``steps``
    (``_kinks_like``; ``out["kinks"]``: how many inputs moved in all);
    ``record_signs`` returns those forwards' ReLU signs (``out["relu_signs"]``
    and ``out["step_signs"]``, one per step: the masks for other runs).
    """
    if noise_seed is not None:
        model = copy.deepcopy(model).double()
        x = x * (1 + FP32_ULP * (2 * np.random.default_rng(noise_seed).random(x.shape) - 1))
        out: dict[str, Any] = {"kinks": 0}
        for mode in modes:
            with _rounding_noise(model, FP32_ULP, noise_seed * len(MODES) + MODES.index(mode)):
                res = _torch_side(model, x, labels, (mode,), steps, relu_masks=relu_masks, step_masks=step_masks)
            out["kinks"] += res.pop("kinks", 0)
            out.update(res)
        return out
    dev = torch_device()
    dtype = next(model.parameters()).dtype
    xt = torch.from_numpy(x).to(dev, dtype)
    yt = torch.from_numpy(labels).to(dev)
    if variant == "channels_last":
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        xt = xt.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
    out: dict[str, Any] = {}
    kinks = 0

    def forward(m: torch.nn.Module, masks, signs: list | None) -> torch.Tensor:
        """The training loss, its ReLUs on ``masks``' side of each kink, or recording their signs into ``signs``."""
        nonlocal kinks
        hooks = _kinks_like(m, masks) if masks is not None else _relu_signs(m) if signs is not None else contextlib.nullcontext()
        with hooks as seen:
            loss = F.cross_entropy(_logits32(m(xt)), yt)
        if masks is not None:
            kinks += seen["moved"]
        elif signs is not None:
            signs.append(seen)
        return loss

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
            signs: list | None = [] if record_signs else None
            loss = forward(m, relu_masks, signs)
            loss.backward()
            if signs:
                out["relu_signs"] = signs[0]
            res = {"loss": np.asarray(loss.item())}
            res.update({f"grad:{k}": _numpy(p.grad) for k, p in m.named_parameters()})
            out["grad"] = res
        if "steps" in modes:
            m = copy.deepcopy(model).to(dev).train()
            opt = torch.optim.SGD(m.parameters(), **SGD)
            signs = [] if record_signs else None
            for i in range(steps):
                opt.zero_grad()
                forward(m, None if step_masks is None else step_masks[i], signs).backward()
                opt.step()
            if signs:
                out["step_signs"] = signs
            res = {f"param:{k}": _numpy(p) for k, p in m.named_parameters()}
            res.update(_stats(m))
            out["steps"] = res
    if relu_masks is not None or step_masks is not None:
        out["kinks"] = kinks
    return out


MAX_POOL = "max-pool"  # a run's kink masks: the stem max-pool's window choices, beside the ReLU owners' signs


def _pool_windows(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, Ho, Wo, 9)``: every window of torch's stem max-pool (3x3, stride 2, padding 1 with -inf), row-major."""
    return F.pad(x, (1, 1, 1, 1), value=-float("inf")).unfold(2, 3, 2).unfold(3, 3, 2).flatten(-2)


def _pool_choices(x: torch.Tensor) -> np.ndarray:
    """Which element (0-8, row-major) each stem max-pool window of NCHW ``x`` takes, NHWC ``uint8`` (a ``MAX_POOL`` mask)."""
    return _pool_windows(x).argmax(-1).permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


@contextlib.contextmanager
def _kink_calls(model: torch.nn.Module, relu_fn: Callable[[str, int, torch.Tensor], torch.Tensor | None], pool_fn: Callable) -> Iterator[None]:
    """Calls ``relu_fn(owner, i, x)`` on the input of every ``nn.ReLU`` call of ``model``'s forward, ``pool_fn(i, x, out)`` on every ``nn.MaxPool2d`` call's.

    ``owner``: the name of the torch_ref module that owns the ReLU (``""``,
    ``"layer1.0"``, ``"layer1.0.se"``; a model whose modules have other names
    maps them with its ``relu_owner(name)``), ``i``: the call's number
    there. A tensor either returns replaces the module's output. The
    max-pool (the stem's, the only one in the family) must be torch_ref's
    3x3/2 with padding 1 (``_pool_windows``).
    """
    seen: dict[str, int] = {}
    owner = getattr(model, "relu_owner", lambda name: name.rpartition(".")[0])

    def hook(parent, fn, module, inputs, output):
        i = seen.get(parent, 0)
        seen[parent] = i + 1
        return fn(i, inputs[0], output) if parent == MAX_POOL else fn(parent, i, inputs[0])

    handles = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.MaxPool2d):
            pool = tuple(getattr(m, a) if isinstance(getattr(m, a), tuple) else (getattr(m, a),) * 2 for a in ("kernel_size", "stride", "padding"))
            if pool != ((3, 3), (2, 2), (1, 1)) or m.dilation not in (1, (1, 1)) or m.ceil_mode:
                raise ValueError(f"kink matching: the max-pool {name!r} is not the stem's 3x3/2 with padding 1 ({m})")
            handles.append(m.register_forward_hook(functools.partial(hook, MAX_POOL, pool_fn)))
        elif isinstance(m, torch.nn.ReLU):
            handles.append(m.register_forward_hook(functools.partial(hook, owner(name), relu_fn)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _relu_signs(model: torch.nn.Module) -> Iterator[dict[str, list[np.ndarray]]]:
    """Records every ReLU input's sign (``x > 0``, NHWC) of a forward, per owning module, in call order, and the max-pool's choices (``_kinks_like``'s masks)."""
    signs: dict[str, list[np.ndarray]] = {}

    def record(parent, i, z):
        signs.setdefault(parent, []).append((z > 0).permute(0, 2, 3, 1).cpu().numpy())

    with _kink_calls(model, record, lambda i, z, out: signs.setdefault(MAX_POOL, []).append(_pool_choices(z))):
        yield signs


@contextlib.contextmanager
def _kinks_like(model: torch.nn.Module, relu_masks: Mapping[str, Sequence[np.ndarray]]) -> Iterator[dict[str, int]]:
    """Makes a torch forward take another run's side of every ReLU kink and max-pool near-tie.

    A train-mode gradient is the exact gradient of the piecewise-linear net
    on one side of each kink; an activation within rounding of zero lands
    on either side depending on summation order alone, and the two sides'
    gradients differ by O(1) at that position and, through train-mode
    BatchNorm, by ~1e-3 in every layer below (the ResNeXt-50 fixture: one
    input of 4e-6 in layer3.3). So every gradient is compared on one side:
    the float64 reference is taken on the fp32 Flax run's side, and each
    equally valid torch run that measures the fp32 noise on the float64
    reference's side. Each ``nn.ReLU`` call whose input has the other sign
    *and* lies within ``KINK_BAND`` of its tensor's max|x| of zero gets its
    input mirrored (``x -> -x``, a move of at most 2e-3 of max|x|, the
    gradient passing unchanged). A sign that differs farther from zero is
    left alone: that is a real discrepancy. ``relu_masks`` maps the owner of
    each ReLU (``_kink_calls``) to the other run's NHWC booleans ``x > 0``
    of its calls, in call order.

    The stem max-pool is the family's other kink: a window whose two largest
    inputs lie within rounding of each other sends its gradient to either
    (at batch 4, two SGD steps of a ResNet-18 made one such window pick
    another element in Flax fp32 than in float64: the stem conv's weight
    then moved 1e-4 of its update away, 100x the fp32 noise). Under
    ``MAX_POOL`` the masks hold the other run's choice per window
    (``_pool_choices``); a window whose own maximum is another element,
    larger than that run's choice by at most ``KINK_BAND`` of max|x|,
    outputs the other run's choice instead, and its gradient goes there.

    Yields:
        ``{"moved": n}``, filled in by the forward (ReLU inputs and windows).

    Raises:
        ValueError: the forward made more or fewer ReLU or max-pool calls
            than ``relu_masks`` has, or one of another shape.
    """
    state = {"calls": 0, "moved": 0}
    total = sum(len(v) for v in relu_masks.values())

    def other_run(parent: str, i: int, shape) -> torch.Tensor:
        state["calls"] += 1
        masks = relu_masks.get(parent, ())
        what = "max-pool call" if parent == MAX_POOL else f"ReLU call {i + 1} of torch module {parent or 'model'!r}"
        if i >= len(masks):
            raise ValueError(f"kink matching: {what} has no mask (the other run has {len(masks)})")
        want = torch.tensor(masks[i].transpose(0, 3, 1, 2))  # a copy: the masks may be read-only JAX outputs
        if want.shape != shape:
            raise ValueError(f"kink matching: {what} has shape {tuple(shape)} here, {tuple(want.shape)} in the other run")
        return want

    def match(parent, i, z):
        want = other_run(parent, i, z.shape).to(z.device)
        flip = ((z > 0) != want) & (z.abs() <= KINK_BAND * z.abs().max())
        state["moved"] += int(flip.sum())
        return F.relu(z + torch.where(flip, -2 * z, torch.zeros_like(z)).detach())

    def match_pool(i, z, out):
        want = other_run(MAX_POOL, i, out.shape).to(z.device, torch.int64)
        chosen = _pool_windows(z).gather(-1, want.unsqueeze(-1)).squeeze(-1)
        flip = (chosen < out) & (out - chosen <= KINK_BAND * z.abs().max())
        state["moved"] += int(flip.sum())
        return torch.where(flip, chosen, out)

    with _kink_calls(model, match, match_pool):
        yield state
    if state["calls"] != total:
        raise ValueError(f"kink matching: the torch forward made {state['calls']} ReLU and max-pool calls, the other run {total}")


def _logits32(logits: torch.Tensor) -> torch.Tensor:
    """Loss in at least float32, as on the Flax side (float64 stays float64)."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


def _stats(m: torch.nn.Module) -> dict[str, np.ndarray]:
    return {f"stat:{k}": _numpy(v) for k, v in m.state_dict().items() if k.endswith(("running_mean", "running_var"))}

