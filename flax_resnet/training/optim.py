"""The optimizer: torch's SGD as optax parts, the paper's learning rate and schedules."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def paper_lr(batch_size: int, base: float = 0.1) -> float:
    """The linear scaling rule of He et al. / Goyal et al.: ``0.1 * batch / 256``."""
    return base * batch_size / 256


def make_schedule(
    peak_lr: float,
    steps_per_epoch: int,
    epochs: int,
    *,
    warmup_epochs: float = 0.0,
    schedule: str = "cosine",
    step_epochs: Sequence[int] = (30, 60, 80),
    step_factor: float = 0.1,
    end_lr: float = 0.0,
) -> optax.Schedule:
    """Learning rate per optimizer step.

    Linear warmup to ``peak_lr`` over ``warmup_epochs`` (step ``s = 0, 1, ...``
    of the ``W`` warmup steps gets ``peak_lr * (s + 1) / W``, so no step has a
    zero rate), then, from ``peak_lr`` at step ``W``:

    * ``"cosine"``: cosine decay to ``end_lr`` at the last step,
    * ``"step"``: multiply by ``step_factor`` at each epoch of ``step_epochs``
      (the paper's divide-by-10; epochs count from the start of training),
    * ``"constant"``: ``peak_lr``.

    Raises:
        ValueError: an unknown ``schedule``.
    """
    total = max(1, int(steps_per_epoch * epochs))
    warmup = min(int(round(warmup_epochs * steps_per_epoch)), total)
    if schedule == "cosine":
        main = optax.cosine_decay_schedule(peak_lr, max(1, total - warmup), alpha=end_lr / peak_lr if peak_lr else 0.0)
    elif schedule == "step":
        boundaries = {int(e * steps_per_epoch) - warmup: step_factor for e in step_epochs if int(e * steps_per_epoch) > warmup}
        main = optax.piecewise_constant_schedule(peak_lr, boundaries)
    elif schedule == "constant":
        main = optax.constant_schedule(peak_lr)
    else:
        raise ValueError(f"unknown schedule {schedule!r}: use 'cosine', 'step' or 'constant'")
    if warmup:
        ramp = lambda count: peak_lr * (count + 1) / warmup
        main = optax.join_schedules([ramp, main], [warmup])

    def lr(count):
        # Float step count: the rate comes out in the default float dtype
        # (float64 under x64, like torch's Python-float lr), not rounded to
        # float32 as optax's int32 count would make it.
        return main(jnp.asarray(count, jnp.result_type(float)))

    return lr


def _names(path) -> list[str]:
    """A parameter's module and leaf names (``["layer1", "0", "conv1", "kernel"]``), from a Linen dict's path or an NNX state's.

    An NNX state's leaves sit inside ``nnx.Param`` variables, whose path ends
    in ``GetAttrKey("value")``: only the dict keys name the parameter.
    """
    return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def decay_mask(params: PyTree) -> PyTree:
    """True for the leaves weight decay applies to when BN params and biases are excluded: kernels (Linen params or an NNX state)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _names(path)[-1:] == ["kernel"], params)


def torch_sgd(
    lr: float | optax.Schedule,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    *,
    nesterov: bool = False,
    mask: PyTree | None = None,
) -> optax.GradientTransformation:
    """``torch.optim.SGD(params, lr, momentum, weight_decay=wd, nesterov=...)``, step for step.

    torch adds ``wd * param`` to the gradient *before* the momentum buffer
    (``dampening=0``), so this is ``chain(add_decayed_weights(wd, mask),
    sgd(lr, momentum))``. The first step's buffer is the gradient itself, as
    in torch. A schedule ``lr`` plays the role of a per-step ``LambdaLR``.

    Args:
        lr: learning rate, or an optax schedule (rate per optimizer step).
        momentum: torch's ``momentum`` (0: plain SGD, no buffer).
        weight_decay: torch's ``weight_decay`` (L2 added to the gradient).
        nesterov: torch's ``nesterov``.
        mask: optional pytree (or function of the params) of booleans: which
            leaves weight decay applies to, e.g. ``decay_mask``; like torch
            param groups with ``weight_decay=0`` for the others.
    """
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=mask))
    parts.append(optax.sgd(lr, momentum=momentum or None, nesterov=nesterov))
    return optax.chain(*parts)


def _is_head(path) -> bool:
    return _names(path)[:1] == ["fc"]


def make_optimizer(
    *,
    batch_size: int = 256,
    steps_per_epoch: int = 1,
    epochs: int = 90,
    lr: float | optax.Schedule | None = None,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 1e-4,
    decay_bn_and_bias: bool = True,
    warmup_epochs: float = 0.0,
    schedule: str = "cosine",
    step_epochs: Sequence[int] = (30, 60, 80),
    step_factor: float = 0.1,
    end_lr: float = 0.0,
    freeze_backbone: bool = False,
) -> optax.GradientTransformation:
    """The ResNet paper's recipe: SGD, momentum 0.9, weight decay 1e-4, lr 0.1 x batch/256.

    ``torch_sgd`` (exactly ``torch.optim.SGD``) driven by the schedule of
    ``make_schedule``, as a per-step ``LambdaLR`` would drive torch's.

    Args:
        batch_size: the global batch, for the default ``lr``.
        steps_per_epoch: optimizer steps per epoch, for the schedule.
        epochs: length of the schedule.
        lr: peak learning rate (or a full optax schedule); default
            ``paper_lr(batch_size)``.
        momentum: of SGD (torch's, ``dampening=0``).
        nesterov: Nesterov momentum.
        weight_decay: L2 coefficient (torch's ``weight_decay``).
        decay_bn_and_bias: ``False`` excludes BN scale/bias and all biases
            from weight decay (only kernels decay, as in Goyal et al.).
        warmup_epochs: see ``make_schedule``.
        schedule: see ``make_schedule``.
        step_epochs: see ``make_schedule``.
        step_factor: see ``make_schedule``.
        end_lr: see ``make_schedule``.
        freeze_backbone: only ``fc`` trains; every other parameter gets a
            zero update (``optax.multi_transform`` + ``set_to_zero``) and
            keeps no optimizer state.
    """
    if lr is None:
        lr = paper_lr(batch_size)
    sched = lr if callable(lr) else make_schedule(
        lr,
        steps_per_epoch,
        epochs,
        warmup_epochs=warmup_epochs,
        schedule=schedule,
        step_epochs=step_epochs,
        step_factor=step_factor,
        end_lr=end_lr,
    )
    tx = torch_sgd(sched, momentum, weight_decay, nesterov=nesterov, mask=None if decay_bn_and_bias else decay_mask)
    if freeze_backbone:
        labels = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: "train" if _is_head(p) else "frozen", params)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx
