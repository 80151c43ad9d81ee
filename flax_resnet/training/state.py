"""The train state and the one train step (and its eval counterpart)."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

PyTree = Any


class TrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` plus BatchNorm statistics.

    Attributes:
        batch_stats: the model's ``batch_stats`` collection (running mean/var),
            replaced after every train step.
        frozen_backbone: static; train steps run the model in eval mode (BN
            uses and keeps its running statistics). Pair it with
            ``make_optimizer(freeze_backbone=True)`` for linear probing.
    """

    batch_stats: PyTree = None
    frozen_backbone: bool = struct.field(pytree_node=False, default=False)

    def variables(self) -> dict[str, PyTree]:
        """``{"params": ..., "batch_stats": ...}``, ready for ``model.apply``."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(
    model,
    variables_or_rng: dict | jax.Array,
    tx: optax.GradientTransformation,
    *,
    input_shape: Sequence[int] = (1, 32, 32, 3),
    frozen_backbone: bool = False,
) -> TrainState:
    """A fresh ``TrainState`` for ``model``.

    Args:
        model: a ``flax_resnet.ResNet`` (its ``dtype`` sets the compute dtype;
            params and BN statistics stay in ``param_dtype``, float32).
        variables_or_rng: existing variables (``{"params", "batch_stats"}``,
            e.g. from ``from_torch`` / ``load_pretrained``) or a PRNG key to
            initialize new ones.
        tx: the optimizer, e.g. ``make_optimizer(...)`` or ``torch_sgd(...)``.
        input_shape: NHWC shape used to initialize (only with a key; the
            batch and spatial sizes do not matter, the channels do).
        frozen_backbone: see ``TrainState``.
    """
    if isinstance(variables_or_rng, dict) or hasattr(variables_or_rng, "keys"):
        variables = variables_or_rng
    else:
        dummy = jnp.zeros(tuple(input_shape), model.param_dtype)
        if getattr(model, "in_channels", None) not in (None, dummy.shape[-1]) and dummy.ndim == 4:
            model = model.clone(in_channels=dummy.shape[-1])  # input_shape names the channels
        variables = jax.jit(functools.partial(model.init, train=False))(variables_or_rng, dummy)
    params = variables["params"]
    return TrainState(
        step=jnp.asarray(0, jnp.int32),
        apply_fn=model.apply,
        params=params,
        tx=tx,
        opt_state=tx.init(params),
        batch_stats=variables.get("batch_stats", {}),
        frozen_backbone=frozen_backbone,
    )


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy in (at least) float32, torch's label smoothing.

    With smoothing ``e`` the target is ``(1 - e) * one_hot + e / num_classes``,
    as ``torch.nn.CrossEntropyLoss(label_smoothing=e)``.
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def train_step_fn(state: TrainState, images: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
    """The train step, pure and not jitted: ``(new_state, {"loss", "accuracy"})``.

    Forward in train mode (batch statistics; running stats updated with
    torch's rule) unless ``state.frozen_backbone``, mean cross-entropy,
    gradients, one ``state.tx`` update (e.g. ``torch_sgd``: exactly
    ``torch.optim.SGD.step()``). Loss and accuracy are in at least float32.
    ``train_step`` is its jit; the train command and the benchmarks run it
    (the benchmarks jit it with their own options, e.g.
    ``jax.jit(train_step_fn, donate_argnums=0)``). The parity harness does
    not: it writes out its own loss and SGD update (``parity.harness``), so
    that the torch and Flax sides of a comparison are the same few lines.
    """
    bn_train = not state.frozen_backbone

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        if bn_train:
            logits, updates = state.apply_fn(variables, images, train=True, mutable=["batch_stats"])
            batch_stats = updates["batch_stats"]
        else:
            logits, batch_stats = state.apply_fn(variables, images, train=False), state.batch_stats
        loss = cross_entropy(logits, labels, label_smoothing).mean()
        return loss, (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(loss.dtype))
    return state, {"loss": loss, "accuracy": accuracy}


_train_step = jax.jit(train_step_fn, static_argnums=(3,))


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
    """``train_step_fn`` under ``jax.jit``; returns ``(new_state, {"loss", "accuracy"})``.

    Compiled once per state structure, batch shape and ``label_smoothing``.
    With a sharded batch and a replicated state (``shard_batch`` /
    ``replicate``) this one function is the data-parallel step.
    """
    return _train_step(state, images, labels, float(label_smoothing))


@jax.jit
def eval_step(state: TrainState, images: jax.Array, labels: jax.Array, mask: jax.Array | None = None):
    """Eval-mode sums over a batch: ``{"loss", "correct", "count"}`` (float32).

    ``mask`` (1 for real examples, 0 for padding) lets a short last batch be
    padded to the compiled shape; divide the summed sums by ``count``.
    """
    logits = state.apply_fn(state.variables(), images, train=False)
    loss = cross_entropy(logits, labels)
    if mask is None:
        mask = jnp.ones(labels.shape, loss.dtype)
    mask = mask.astype(loss.dtype)
    correct = (jnp.argmax(logits, -1) == labels).astype(loss.dtype)
    return {"loss": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}
