"""Training Flax ResNets in JAX: train state, the paper's recipe, data parallelism, checkpoints.

The pieces, each usable alone::

    model = flax_resnet.resnet50(num_classes=10, dtype=jnp.bfloat16)   # bf16 compute, f32 params
    tx = make_optimizer(batch_size=128, steps_per_epoch=11, epochs=30, warmup_epochs=2)
    state = create_train_state(model, jax.random.key(0), tx, input_shape=(1, 32, 32, 1))
    state, metrics = train_step(state, images, labels)        # jitted; updates BN stats
    sums = eval_step(state, images, labels)                   # jitted; loss / correct / count

* ``TrainState`` carries ``batch_stats`` beside ``params`` and ``opt_state``.
  BatchNorm statistics follow PyTorch exactly (``flax_resnet.layers.BatchNorm``:
  unbiased running variance, statistics in float32 under bfloat16 compute).
* ``make_optimizer`` is the ResNet paper's SGD recipe built from optax parts,
  step for step equal to ``torch.optim.SGD(momentum=0.9, weight_decay=1e-4)``
  under the same learning-rate schedule.
* Data parallelism uses ``jax.sharding``: ``make_mesh`` + ``replicate`` the
  state + ``shard_batch`` the batch, then the same jitted ``train_step``.
  XLA (GSPMD) partitions the computation; BatchNorm's mean over the batch axis
  of a sharded array *is* the global-batch mean, i.e. SyncBatchNorm, and the
  gradient mean is an all-reduce. ``initialize_distributed`` joins several
  hosts (``jax.distributed``).
* ``Checkpointer`` saves and restores the whole state with Orbax; data order
  depends only on ``(seed, epoch)`` (``flax_resnet.data.batches``), so a
  resumed run continues exactly as the uninterrupted one.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "TrainState",
    "create_train_state",
    "paper_lr",
    "make_schedule",
    "make_optimizer",
    "decay_mask",
    "cross_entropy",
    "train_step",
    "eval_step",
    "train_epoch",
    "evaluate",
    "replace_head",
    "load_pretrained",
    "make_mesh",
    "replicate",
    "shard_batch",
    "initialize_distributed",
    "Checkpointer",
    "cpu_small_conv_workaround",
]

PyTree = Any
DATA_AXIS = "data"


# --------------------------------------------------------------------------- state


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
        tx: the optimizer, e.g. ``make_optimizer(...)``.
        input_shape: NHWC shape used to initialize (only with a key; the
            batch and spatial sizes do not matter, the channels do).
        frozen_backbone: see ``TrainState``.
    """
    if isinstance(variables_or_rng, dict) or hasattr(variables_or_rng, "keys"):
        variables = variables_or_rng
    else:
        dummy = jnp.zeros(tuple(input_shape), model.param_dtype)
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


# ----------------------------------------------------------------------- optimizer


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


def decay_mask(params: PyTree) -> PyTree:
    """True for the leaves weight decay applies to when BN params and biases are excluded: kernels."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def _is_head(path) -> bool:
    return len(path) > 0 and getattr(path[0], "key", None) == "fc"


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

    Exactly ``torch.optim.SGD(params, lr, momentum, weight_decay=wd)`` driven
    by a per-step ``LambdaLR`` with the same schedule: torch adds
    ``wd * param`` to the gradient *before* the momentum buffer, so this is
    ``chain(add_decayed_weights(wd, mask), sgd(schedule, momentum))``.

    Args:
        batch_size: the global batch, for the default ``lr``.
        steps_per_epoch, epochs: length of the schedule.
        lr: peak learning rate (or a full optax schedule); default
            ``paper_lr(batch_size)``.
        momentum, nesterov: of SGD (torch's ``dampening=0``).
        weight_decay: L2 coefficient (torch's ``weight_decay``).
        decay_bn_and_bias: ``False`` excludes BN scale/bias and all biases
            from weight decay (only kernels decay, as in Goyal et al.).
        warmup_epochs, schedule, step_epochs, step_factor, end_lr: see
            ``make_schedule``.
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
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=None if decay_bn_and_bias else decay_mask))
    parts.append(optax.sgd(sched, momentum=momentum or None, nesterov=nesterov))
    tx = optax.chain(*parts)
    if freeze_backbone:
        labels = lambda params: jax.tree_util.tree_map_with_path(lambda p, _: "train" if _is_head(p) else "frozen", params)
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx


# --------------------------------------------------------------------------- steps


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


def train_step(state: TrainState, images: jax.Array, labels: jax.Array, label_smoothing: float = 0.0):
    """One SGD step on a batch; returns ``(new_state, {"loss", "accuracy"})``.

    Jitted (compiled once per state structure and batch shape). BatchNorm
    runs in train mode (batch statistics, running stats updated with torch's
    rule) unless ``state.frozen_backbone``. Loss and metrics are float32
    whatever the compute dtype. With a sharded batch and a replicated state
    (``shard_batch`` / ``replicate``) this one function is the data-parallel
    step.
    """
    return _train_step(state, images, labels, float(label_smoothing))


@functools.partial(jax.jit, static_argnums=(3,))
def _train_step(state: TrainState, images: jax.Array, labels: jax.Array, label_smoothing: float):
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


# --------------------------------------------------------------------- fine-tuning


def replace_head(model, variables: dict, num_classes: int, rng: jax.Array):
    """A new classifier for ``num_classes``; the backbone keeps its weights.

    Returns ``(model, variables)`` with ``model.num_classes`` changed and
    ``fc`` freshly initialized as the model initializes it (kernel
    ``variance_scaling(1/3, fan_in, uniform)``, zero bias).
    """
    import flax.linen as nn

    from flax_resnet.model import ResNet

    if not isinstance(model, ResNet):
        raise TypeError(f"replace_head expects a flax_resnet.ResNet, got {type(model).__name__}")
    fc = variables["params"]["fc"]
    in_features = fc["kernel"].shape[0]
    dtype = fc["kernel"].dtype
    head = nn.Dense(
        num_classes,
        use_bias="bias" in fc,
        param_dtype=dtype,
        kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
    )
    new_fc = head.init(rng, jnp.zeros((1, in_features), dtype))["params"]
    params = dict(variables["params"])
    params["fc"] = new_fc
    new_variables = dict(variables)
    new_variables["params"] = params
    return model.clone(num_classes=num_classes), new_variables


def load_pretrained(path: str | os.PathLike, num_classes: int | None = None, rng: jax.Array | None = None, **model_kwargs):
    """Loads converted weights (``.pth``, ``.safetensors``, ``.msgpack``, Orbax) for fine-tuning.

    Args:
        path: a checkpoint ``flax_resnet.checkpoint.load`` reads.
        num_classes: if given and different, ``replace_head`` for it.
        rng: key for the new head (default ``jax.random.key(0)``).
        **model_kwargs: ``ResNet`` attributes to override, e.g.
            ``dtype=jnp.bfloat16`` for mixed precision.

    Returns:
        ``(model, variables)``.
    """
    from flax_resnet.checkpoint import load  # a sibling module; imported only when used

    model, variables = load(path, **model_kwargs)
    if num_classes is not None and num_classes != model.num_classes:
        model, variables = replace_head(model, variables, num_classes, jax.random.key(0) if rng is None else rng)
    return model, variables


# ----------------------------------------------------------------- CPU speed-up

CPU_WORKAROUND_FLAG = "--xla_disable_hlo_passes=algsimp"


def _accelerator_expected() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if platforms:
        return any(p.strip() not in ("", "cpu") for p in platforms.split(","))
    import importlib.util
    import pkgutil

    try:
        import jax_plugins  # namespace package of the CUDA / ROCm / TPU plugins

        if any(True for _ in pkgutil.iter_modules(jax_plugins.__path__)):
            return True
    except ImportError:
        pass
    return importlib.util.find_spec("libtpu") is not None


def cpu_small_conv_workaround(force: bool = False) -> bool:
    """Speeds up ResNet training on CPU ~3x for small images (e.g. 32x32).

    Once a 3x3 conv's input is smaller than its kernel (ResNet's layer3/4 at
    2x2 and 1x1 for 32x32 images), XLA's algebraic simplifier swaps the conv's
    operands and the CPU backend runs the swapped conv as a naive loop, which
    then dominates the step. This adds ``--xla_disable_hlo_passes=algsimp``
    to ``XLA_FLAGS`` (an optimization pass only: results are the same up to
    float rounding). It must run before JAX starts its backend (the first
    ``jax.devices()`` or computation) and does nothing when an accelerator
    plugin is installed (unless ``force``) or the backend already started.
    Returns whether the flag is in effect for this process.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if CPU_WORKAROUND_FLAG in flags:
        return True
    try:
        from jax._src import xla_bridge

        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # private API; assume the worst
        started = True
    if started:
        return False
    if not force and _accelerator_expected():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_WORKAROUND_FLAG}".strip()
    return True


# ------------------------------------------------------------------ multi-device


def initialize_distributed(enable: bool | None = None, **kwargs) -> bool:
    """Joins a multi-host run via ``jax.distributed.initialize(**kwargs)``.

    Runs when ``enable`` is true, or, with ``enable=None``, when the
    environment variable ``FLAX_RESNET_DISTRIBUTED=1`` is set. Call it on
    every host before any other JAX call; on Cloud TPU, SLURM and other
    auto-detected clusters no arguments are needed, otherwise pass
    ``coordinator_address``, ``num_processes`` and ``process_id`` (or set
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``).
    Afterwards ``jax.devices()`` lists every host's devices, ``make_mesh``
    spans them, and each host feeds its slice of the global batch
    (``shard_batch`` takes the host's part). Returns whether it initialized.
    """
    if enable is None:
        enable = os.environ.get("FLAX_RESNET_DISTRIBUTED", "") not in ("", "0", "false", "False")
    if not enable:
        return False
    jax.distributed.initialize(**kwargs)
    return True


def make_mesh(devices: int | Sequence[Any] | None = None, axis_name: str = DATA_AXIS) -> Mesh:
    """A 1-D data-parallel mesh: the first ``devices`` devices (all by default)."""
    if devices is None:
        devs = jax.devices()
    elif isinstance(devices, int):
        avail = jax.devices()
        if devices < 1 or devices > len(avail):
            raise ValueError(
                f"asked for {devices} devices but {len(avail)} are available ({avail[0].platform}); "
                "on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts"
            )
        devs = avail[:devices]
    else:
        devs = list(devices)
    return Mesh(np.asarray(devs), (axis_name,))


def _from_host(a: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from the same host copy on every process: each places only its own devices' parts."""
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places every array of ``tree`` (e.g. the train state) on all devices of ``mesh``.

    In a multi-host run every host holds the same values (same seed, same
    checkpoint) and places its own copy on its own devices: arrays that
    already sit on one device are not sent across hosts, which the CPU and
    GPU backends do not support.
    """
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def place(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:  # already global
            return jax.device_put(a, sharding)
        return _from_host(np.asarray(a), sharding)

    return jax.tree.map(place, tree)


def shard_batch(mesh: Mesh | None, *arrays: np.ndarray):
    """Splits arrays along the batch axis over ``mesh`` (``P("data")``).

    Arrays are the *global* batch. In a multi-host run every host passes the
    same global batch (``data.batches`` gives every host the same order) and
    places only the rows of its own devices, wherever they sit in the mesh.
    The batch must divide by the number of devices. ``mesh=None`` just moves
    the arrays to the default device.
    """
    if mesh is None:
        out = tuple(jnp.asarray(a) for a in arrays)
        return out if len(out) > 1 else out[0]
    sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
    n_dev = mesh.devices.size
    out = []
    for a in arrays:
        a = np.asarray(a)
        if a.shape[0] % n_dev:
            raise ValueError(f"batch of {a.shape[0]} does not divide over {n_dev} devices")
        out.append(_from_host(a, sharding))
    return tuple(out) if len(out) > 1 else out[0]


# ------------------------------------------------------------------ epoch loops


def train_epoch(
    state: TrainState,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    epoch: int,
    seed: int = 0,
    max_shift: int = 0,
    label_smoothing: float = 0.0,
    mesh: Mesh | None = None,
    progress: Callable[[int, dict], None] | None = None,
):
    """One pass over the training set (remainder dropped), in ``(seed, epoch)`` order.

    Returns ``(state, {"train_loss", "train_accuracy", "images_per_sec",
    "steps", "seconds"})``; ``images_per_sec`` leaves out the first step of
    the epoch (which carries any compilation). ``progress(step, metrics)``
    is called after each step.
    """
    from flax_resnet.data import batches

    losses, accs = [], []
    t_first = t0 = time.perf_counter()
    steps = 0
    for x, y in batches(images, labels, batch_size, seed=seed, epoch=epoch, max_shift=max_shift):
        x, y = shard_batch(mesh, x, y)
        state, m = train_step(state, x, y, label_smoothing=float(label_smoothing))
        steps += 1
        losses.append(m["loss"])
        accs.append(m["accuracy"])
        if steps == 1:
            jax.block_until_ready(m["loss"])
            t_first = time.perf_counter()
        if progress is not None:
            progress(steps, m)
    if steps == 0:
        raise ValueError(f"batch size {batch_size} is larger than the {len(labels)} training images")
    jax.block_until_ready(state.params)
    t_end = time.perf_counter()
    timed_steps, timed_s = (steps - 1, t_end - t_first) if steps > 1 else (1, t_end - t0)
    return state, {
        "train_loss": float(np.mean(jax.device_get(losses))),
        "train_accuracy": float(np.mean(jax.device_get(accs))),
        "images_per_sec": timed_steps * batch_size / max(timed_s, 1e-9),
        "steps": steps,
        "seconds": t_end - t0,
    }


def evaluate(state: TrainState, images: np.ndarray, labels: np.ndarray, batch_size: int, mesh: Mesh | None = None):
    """Eval-mode loss and accuracy over all of ``images`` (last batch padded and masked)."""
    totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    n = len(labels)
    if mesh is not None:
        batch_size = -(-batch_size // mesh.devices.size) * mesh.devices.size
    sums = []
    for start in range(0, n, batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        k = len(y)
        mask = np.zeros(batch_size, np.float32)
        mask[:k] = 1
        if k < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - k,) + x.shape[1:], x.dtype)])
            y = np.concatenate([y, np.zeros(batch_size - k, y.dtype)])
        sums.append(eval_step(state, *shard_batch(mesh, x, y, mask)))
    for s in jax.device_get(sums):
        for k in totals:
            totals[k] += float(s[k])
    count = max(totals["count"], 1.0)
    return {"loss": totals["loss"] / count, "accuracy": totals["correct"] / count, "count": int(totals["count"])}


# ------------------------------------------------------------------- checkpoints


def _abstract(tree: PyTree, sharding=None) -> PyTree:
    default = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding or default)
        x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

    return jax.tree.map(leaf, tree)


class Checkpointer:
    """Orbax checkpoints of a whole ``TrainState``, one per epoch.

    Saves ``step``, ``params``, ``batch_stats`` and ``opt_state`` plus a
    JSON ``meta`` dict (epoch, seed, anything else). Restoring needs a
    template state built the same way (same model and optimizer); arrays come
    back with the template's shardings, so a replicated template restores a
    replicated state.

    Usage::

        ckpt = Checkpointer(workdir + "/checkpoints")
        ckpt.save(epoch, state, {"seed": 0})
        state, meta = ckpt.restore(state)          # latest epoch
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(os.fspath(directory))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            item_names=("state", "meta"),
        )

    @staticmethod
    def _items(state: TrainState) -> dict:
        return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}

    def save(self, epoch: int, state: TrainState, meta: dict | None = None, wait: bool = True) -> None:
        """Saves ``state`` as checkpoint ``epoch`` (the number of finished epochs)."""
        ocp = self._ocp
        meta = {"epoch": int(epoch), **(meta or {})}
        self.manager.save(
            int(epoch),
            args=ocp.args.Composite(state=ocp.args.StandardSave(self._items(state)), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        if wait:
            self.manager.wait_until_finished()

    def latest_epoch(self) -> int | None:
        return self.manager.latest_step()

    def all_epochs(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, state: TrainState, epoch: int | None = None, sharding=None) -> tuple[TrainState, dict]:
        """``(state, meta)`` of checkpoint ``epoch`` (default: the latest) into ``state``'s structure.

        ``state`` may be abstract, ``jax.eval_shape(lambda: create_train_state(...))``,
        which skips initializing weights that are about to be overwritten; its
        leaves are then placed with ``sharding`` (default: the first device;
        pass ``NamedSharding(mesh, P())`` to restore replicated).
        """
        ocp = self._ocp
        if epoch is None:
            epoch = self.latest_epoch()
            if epoch is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self.manager.restore(
            int(epoch),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(self._items(state), sharding)), meta=ocp.args.JsonRestore()
            ),
        )
        items = restored["state"]
        return state.replace(**items), dict(restored["meta"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
