"""Training Flax ResNets in JAX: train state, the paper's recipe, data parallelism, checkpoints.

The pieces, each usable alone::

    model = flax_resnet.resnet50(num_classes=10, dtype=jnp.bfloat16)   # bf16 compute, f32 params
    tx = make_optimizer(batch_size=128, steps_per_epoch=11, epochs=30, warmup_epochs=2)
    state = create_train_state(model, jax.random.key(0), tx, input_shape=(1, 32, 32, 1))
    state, metrics = train_step(state, images, labels)        # jitted; updates BN stats
    sums = eval_step(state, images, labels)                   # jitted; loss / correct / count

Modules, one concern each:

* ``state``: ``TrainState`` (``batch_stats`` beside ``params`` and
  ``opt_state``), ``train_step_fn`` (the one train step, pure; BatchNorm
  statistics follow PyTorch exactly), its jit ``train_step``, ``eval_step``.
* ``optim``: ``torch_sgd`` (``torch.optim.SGD`` step for step: weight decay
  joins the gradient before momentum) and ``make_optimizer``, the ResNet
  paper's recipe on top of it (lr 0.1 x batch/256, warmup, cosine/step).
* ``devices``: data parallelism with ``jax.sharding``: ``make_mesh``,
  ``replicate`` the state, ``shard_batch`` the batch, then the same
  ``train_step``. BatchNorm's mean over a sharded batch axis *is* the
  global-batch mean (SyncBatchNorm); ``initialize_distributed`` joins
  several hosts.
* ``checkpointer``: ``Checkpointer``, Orbax checkpoints of the whole state;
  data order depends only on ``(seed, epoch)`` (``flax_resnet.data.batches``),
  so a resumed run continues exactly as the uninterrupted one.
* ``loops``: ``train_epoch`` and ``evaluate``, on ``run_epoch`` /
  ``run_eval``, which drive any front end's step (the NNX one too).
* ``finetune``: ``replace_head``, ``load_pretrained`` and ``weights_identity``.
* ``logs``: a run's ``metrics.jsonl`` and ``curves.png`` (matplotlib only
  when plotting).
"""

from flax_resnet.training.checkpointer import Checkpointer, CheckpointRestoreError
from flax_resnet.training.devices import (
    DATA_AXIS,
    cpu_small_conv_workaround,
    initialize_distributed,
    make_mesh,
    place_local_batch,
    replicate,
    shard_batch,
)
from flax_resnet.training.finetune import load_pretrained, replace_head, weights_identity
from flax_resnet.training.loops import evaluate, run_batches, run_epoch, run_eval, run_eval_batches, train_epoch
from flax_resnet.training.optim import decay_mask, make_optimizer, make_schedule, paper_lr, torch_sgd
from flax_resnet.training.state import TrainState, create_train_state, cross_entropy, eval_step, train_step, train_step_fn

__all__ = [
    "TrainState",
    "create_train_state",
    "paper_lr",
    "make_schedule",
    "make_optimizer",
    "torch_sgd",
    "decay_mask",
    "cross_entropy",
    "train_step_fn",
    "train_step",
    "eval_step",
    "train_epoch",
    "evaluate",
    "run_epoch",
    "run_eval",
    "run_batches",
    "run_eval_batches",
    "place_local_batch",
    "replace_head",
    "load_pretrained",
    "make_mesh",
    "replicate",
    "shard_batch",
    "initialize_distributed",
    "Checkpointer",
    "CheckpointRestoreError",
    "cpu_small_conv_workaround",
    "DATA_AXIS",
]
