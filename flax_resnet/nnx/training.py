"""Training NNX ResNets: ``nnx.Optimizer`` with the library's recipe, a jitted step, data parallelism.

::

    model = flax_resnet.nnx.resnet50(num_classes=10, rngs=nnx.Rngs(0))   # train mode
    optimizer = create_optimizer(model, make_optimizer(batch_size=128, steps_per_epoch=11, epochs=30))
    metrics = train_step(model, optimizer, images, labels)   # updates params and BN stats in place
    model.eval(); sums = eval_step(model, images, labels)

The optimizer recipe (``flax_resnet.training.make_optimizer``, exactly
``torch.optim.SGD``), the loss (``cross_entropy``) and the data-parallel
placement (``make_mesh``, ``shard_batch``) are the Linen ones; only the
state handling differs: NNX modules and optimizers are updated in place.
The step runs the model in its current mode: ``model.train()`` (batch
statistics, running stats updated as torch does) or ``model.eval()``
(running statistics kept: linear probing with a frozen backbone).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from flax_resnet.builder import model_config
from flax_resnet.nnx.convert import from_linen, to_linen
from flax_resnet.training import cross_entropy, make_optimizer, run_epoch, run_eval
from flax_resnet.training import replicate as _replicate_tree

__all__ = [
    "create_optimizer",
    "make_optimizer",
    "train_step_fn",
    "train_step",
    "eval_step",
    "replicate",
    "train_epoch",
    "evaluate",
]


def create_optimizer(model: nnx.Module, tx: optax.GradientTransformation) -> nnx.Optimizer:
    """``nnx.Optimizer(model, tx, wrt=nnx.Param)``: BatchNorm statistics are not optimized."""
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def train_step_fn(model: nnx.Module, optimizer: nnx.Optimizer, images: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> dict[str, jax.Array]:
    """One step, not jitted: mean cross-entropy, gradients of the params, one optimizer update.

    ``model`` and ``optimizer`` are updated in place (params, optimizer state,
    and in train mode the BatchNorm running statistics). Returns
    ``{"loss", "accuracy"}`` in at least float32.
    """

    def loss_fn(m):
        logits = m(images)
        return cross_entropy(logits, labels, label_smoothing).mean(), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(loss.dtype))
    return {"loss": loss, "accuracy": accuracy}


_train_step = nnx.jit(train_step_fn, static_argnums=(4,))


def train_step(model: nnx.Module, optimizer: nnx.Optimizer, images: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> dict[str, jax.Array]:
    """``train_step_fn`` under ``nnx.jit`` (compiled once per model structure, mode and batch shape).

    With a replicated model and optimizer (``replicate``) and a sharded
    batch (``shard_batch``) this is the data-parallel step: BatchNorm's mean
    over the sharded batch axis is the global-batch mean, and the gradient
    mean an all-reduce, as for the Linen step.
    """
    return _train_step(model, optimizer, images, labels, float(label_smoothing))


@nnx.jit
def eval_step(model: nnx.Module, images: jax.Array, labels: jax.Array, mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Sums over a batch in the model's current mode (``model.eval()`` first): ``{"loss", "correct", "count"}``.

    ``mask`` (1 for real examples, 0 for padding) lets a short last batch be
    padded to the compiled shape.
    """
    logits = model(images)
    loss = cross_entropy(logits, labels)
    mask = jnp.ones(labels.shape, loss.dtype) if mask is None else mask.astype(loss.dtype)
    correct = (jnp.argmax(logits, -1) == labels).astype(loss.dtype)
    return {"loss": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}


def replicate(node: Any, mesh: Mesh) -> Any:
    """Places every array of an NNX model or optimizer on all devices of ``mesh``, in place.

    ``flax_resnet.training.replicate`` of ``nnx.state(node)`` (each host
    places its own copy in a multi-host run). Returns ``node``.
    """
    nnx.update(node, _replicate_tree(nnx.state(node), mesh))
    return node


def train_epoch(
    model: nnx.Module, optimizer: nnx.Optimizer, images: np.ndarray, labels: np.ndarray, batch_size: int, *, label_smoothing: float = 0.0, **loop: Any
) -> dict[str, float]:
    """One pass of ``train_step`` over the training set (``flax_resnet.training.run_epoch``), in place.

    The same batches, in the same ``(seed, epoch)`` order, as the Linen
    ``train_epoch``; the step is ``nnx.cached_partial`` of the jitted one
    (the model and optimizer graphs are traversed once, not per step).
    ``loop``: ``run_epoch``'s keywords, ``epoch`` (required), ``seed``,
    ``max_shift``, ``mesh`` and ``progress``. Returns ``run_epoch``'s metrics.
    """
    step = nnx.cached_partial(_train_step, model, optimizer)
    smoothing = float(label_smoothing)
    metrics = run_epoch(lambda x, y: step(x, y, smoothing), images, labels, batch_size, **loop)
    jax.block_until_ready(nnx.state(model))
    return metrics


def evaluate(model: nnx.Module, images: np.ndarray, labels: np.ndarray, batch_size: int, mesh: Mesh | None = None) -> dict[str, float]:
    """Eval-mode loss and accuracy over all of ``images`` (``flax_resnet.training.run_eval``).

    Runs an eval view of the model (``nnx.view(model,
    use_running_average=True)``, sharing its variables), so the model keeps
    its own mode.
    """
    view = nnx.view(model, use_running_average=True)
    return run_eval(lambda x, y, mask: eval_step(view, x, y, mask), images, labels, batch_size, mesh)


def _key_name(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _opt_variables(optimizer: nnx.Optimizer) -> dict[tuple[str, ...], nnx.Variable]:
    """The optimizer state's variables by path, as Linen's ``opt_state`` spells it (``("1", "0", "trace", "layer1", "0", ...)``).

    Variables that hold no array are left out, as Linen's flattened tree
    leaves them out: ``optax.masked``'s ``MaskedNode`` for a parameter it
    does not update (``freeze_backbone``).
    """
    flat = nnx.to_flat_state(nnx.state(optimizer))
    return {tuple(str(p) for p in path[1:]): var for path, var in flat if path[0] == "opt_state" and jax.tree.leaves(var.get_raw_value())}


class TrainStateBridge:
    """The NNX model and ``nnx.Optimizer`` holding a Linen ``TrainState``'s arrays, and back.

    ``flax-resnet train --api nnx`` trains with the NNX modules, optimizer and
    step, and checkpoints the Linen ``TrainState`` (the same Orbax layout),
    so a run resumes under either API. Every conversion is a relabeling of
    the same arrays: params and BatchNorm statistics through
    ``to_linen``/``from_linen``, the optimizer state (same optax
    transformation, same tree under other names) by path.
    """

    def __init__(self, linen_model: Any, state: Any):
        variables = state.variables()
        self.model = from_linen(model_config(linen_model, variables), variables, allow_nonfinite=True, axis_name=linen_model.axis_name)  # a training state, not input
        self.optimizer = create_optimizer(self.model, state.tx)
        self.load(state)

    def load(self, state: Any) -> None:
        """Puts ``state``'s step, params, BatchNorm statistics and optimizer state into the NNX objects."""
        from_linen(self.model, state.variables(), allow_nonfinite=True)
        opt = _opt_variables(self.optimizer)
        given = {tuple(_key_name(k) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]}
        if set(given) != set(opt):
            raise ValueError(f"optimizer states differ: {sorted(set(given) ^ set(opt))[:4]}")
        for path, var in opt.items():
            var.set_value(given[path])
        self.optimizer.step.set_value(jnp.asarray(state.step, self.optimizer.step[...].dtype))
        if state.frozen_backbone:
            self.model.eval()
        else:
            self.model.train()

    def to_state(self, state: Any) -> Any:
        """``state`` with the NNX objects' step, params, BatchNorm statistics and optimizer state."""
        variables = to_linen(self.model)
        opt = _opt_variables(self.optimizer)
        opt_state = jax.tree_util.tree_map_with_path(lambda path, _: opt[tuple(_key_name(k) for k in path)][...], state.opt_state)
        step = jnp.asarray(self.optimizer.step[...], jnp.asarray(state.step).dtype)
        return state.replace(step=step, params=variables["params"], batch_stats=variables["batch_stats"], opt_state=opt_state)
