"""``flax-resnet train``: train a Flax ResNet in JAX on digits, your own .npz, or a folder of images.

Writes WORKDIR/metrics.jsonl (one JSON object per epoch), WORKDIR/curves.png
and Orbax checkpoints in WORKDIR/checkpoints; rerunning with the same
WORKDIR resumes from the newest checkpoint that restores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from typing import Any

# JAX-side modules (training, data, builder) are imported inside the command, so that
# `flax-resnet --help` and every other command start without importing JAX.
from flax_resnet.archs import ARCHS
from flax_resnet.cli import UsageError, add_command
from flax_resnet.config import ModelConfig
from flax_resnet.train_loop import RECIPE_KEYS, announce_recipe, check_run, newest_meta

DEFAULTS = dict(epochs=12, batch_size=64, warmup_epochs=1.0, max_shift=2, seed=0)
DTYPES = ("float32", "bfloat16", "float16")
TRAIN_EXTRA = ("sklearn", "matplotlib", "tqdm")  # digits and data splits, the plot, the progress bar


def register(subparsers) -> None:
    from flax_resnet.imagedata import stream

    p = add_command(subparsers, "train", "train a ResNet in JAX (digits, a .npz, an image folder or a datasets directory)", __doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("--arch", default=None, type=_arch, metavar="ARCH",
                   help=f"architecture: {', '.join(ARCHS)} (default: resnet50, or the --init checkpoint's)")
    p.add_argument("--dataset", default="digits", help="'digits' (scikit-learn's, 32x32) or a .npz with arrays images and labels")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="epochs to train")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="global batch size")
    p.add_argument("--workdir", default=None, help="output directory: metrics.jsonl, curves.png, checkpoints/ (default: runs/ARCH-DATASET)")
    p.add_argument("--devices", type=int, default=None, help="data-parallel over K devices, on CPU K virtual ones (default: one device; under --distributed: every process's devices, K per process on CPU)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype (params and BN statistics stay float32)")
    p.add_argument("--init", default=None, metavar="FILE", help="start from converted weights (.pth/.safetensors/.msgpack/Orbax); the head is replaced")
    p.add_argument("--freeze-backbone", action="store_true", help="train only fc (BN statistics frozen too); needs --init")
    p.add_argument("--api", default="linen", choices=("linen", "nnx"),
                   help="train the Linen model (jit of training.train_step) or the Flax NNX one (nnx.Optimizer, nnx.jit); same checkpoints")
    d = p.add_argument_group("data")
    d.add_argument("--size", type=int, default=None, help="image size (default: digits 32, upscaled from 8x8; .npz images as they are)")
    d.add_argument("--normalize", default="dataset", choices=("dataset", "imagenet", "none"),
                   help="per-channel (x - mean) / std with the training set's own mean/std, ImageNet's (for ImageNet weights), or none; "
                   "integer images are divided by 255 first")
    d.add_argument("--num-classes", type=int, default=None, help="classes of the head (default: from the labels, when they use every id 0..K-1)")
    d.add_argument("--channels-first", action="store_true", help="the .npz images are (N, C, H, W): transpose them to NHWC")
    stream.add_arguments(p)
    g = p.add_argument_group("recipe (He et al. 2016)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 0.1 x batch/256)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="L2 weight decay, as torch's SGD applies it")
    g.add_argument("--no-bn-bias-decay", action="store_true", help="exclude BN params and biases from weight decay")
    g.add_argument("--schedule", default="cosine", choices=("cosine", "step", "constant"), help="learning-rate schedule after warmup")
    g.add_argument("--step-epochs", default="30,60,80", help="epochs where the step schedule divides the lr by 10")
    g.add_argument("--warmup-epochs", type=float, default=DEFAULTS["warmup_epochs"], help="linear warmup")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="as torch's CrossEntropyLoss(label_smoothing=)")
    g.add_argument("--max-shift", type=int, default=DEFAULTS["max_shift"], help="random-shift augmentation in pixels (0: none)")
    g.add_argument("--no-zero-init-residual", action="store_true", help="don't zero the last BN scale of each block")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of init, data order and augmentation")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default: the larger of the batch size and 128")
    p.add_argument("--no-resume", action="store_true", help="start over even if WORKDIR has checkpoints (they are removed)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="how many epoch checkpoints to keep")
    p.add_argument("--progress", default="auto", choices=("auto", "on", "off"), help="progress bar (auto: on a terminal)")
    p.add_argument("--no-cpu-workaround", action="store_true", help=argparse.SUPPRESS)  # a no-op: flax_resnet.kernels made the workaround unneeded
    p.add_argument("--distributed", action="store_true", help="multi-host: call jax.distributed.initialize() first (or set FLAX_RESNET_DISTRIBUTED=1)")
    p.set_defaults(func=run)


def _arch(name: str) -> str:
    """``--arch``'s type: a name of ``ARCHS``, else argparse's one line with the nearest name."""
    from flax_resnet.archs import get_arch

    try:
        return get_arch(name).name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _usage(msg: str):
    return UsageError(msg)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the steps of run


def _validate(args) -> None:
    """Everything checkable before JAX starts: extras, numbers, files."""
    import importlib.util

    from flax_resnet.imagedata import stream

    stream.check_arguments(args, _usage)
    missing = [m for m in TRAIN_EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise _usage(f"needs {', '.join('scikit-learn' if m == 'sklearn' else m for m in missing)}: pip install 'flax-resnet[train]'")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise _usage(f"--{name.replace('_', '-')} must be >= 1")
    if args.devices is not None and args.devices < 1:
        raise _usage("--devices must be >= 1")
    if args.devices and args.batch_size % args.devices:
        raise _usage(f"--batch-size {args.batch_size} must divide over --devices {args.devices}")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise _usage("--label-smoothing must be in [0, 1)")
    if args.max_shift < 0 or (args.size is not None and args.size < 1):
        raise _usage("--max-shift must be >= 0 and --size >= 1")
    if args.num_classes is not None and args.num_classes < 1:
        raise _usage("--num-classes must be >= 1")
    if args.data is None and args.dataset == "digits":
        if args.num_classes not in (None, 10):
            raise _usage(f"digits has 10 classes, not --num-classes {args.num_classes}")
        if args.channels_first:
            raise _usage("--channels-first applies to .npz datasets, not digits")
    elif args.data is None and not os.path.exists(args.dataset):
        raise FileNotFoundError(f"no such dataset file: {args.dataset} (use 'digits' or a .npz path)")
    if args.init is not None and not os.path.exists(args.init):
        raise FileNotFoundError(f"no such checkpoint: {args.init}")
    if args.freeze_backbone and args.init is None:
        raise _usage("--freeze-backbone needs --init (a pretrained backbone)")
    try:
        args.step_epochs_list = tuple(int(e) for e in args.step_epochs.split(",") if e.strip())
    except ValueError:
        raise _usage(f"--step-epochs must be comma-separated integers, got {args.step_epochs!r}") from None
    if args.workdir is not None and os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
        raise _usage(f"--workdir {args.workdir} exists and is not a directory")


def _request_devices(k: int | None) -> None:
    """Lets the CPU backend expose ``k`` devices if JAX hasn't started a backend yet."""
    if not k or k < 2:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={k}".strip()


def _start_jax(args) -> bool:
    """XLA flags, quiet Orbax logging, several hosts; returns whether this is the main process."""
    _request_devices(args.devices)
    from flax_resnet import training

    try:  # Orbax logs routine waits at WARNING through absl
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    import jax

    if training.initialize_distributed(True if args.distributed else None):
        _say(f"jax.distributed: process {jax.process_index()} of {jax.process_count()}")
    return jax.process_index() == 0


def _input_channels(params) -> int:
    """Input channels of the stem's first conv (``conv1/kernel``, or ``conv1/0/kernel`` for deep stems)."""
    import numpy as np
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params["conv1"])
    return int(np.shape(flat[min(k for k in flat if k[-1] == "kernel")])[2])


def _build_model(args, dtype):
    """``(model, variables, in_channels)``: from --init's checkpoint, or a fresh ``ResNet`` (variables None)."""
    from flax_resnet import training

    if args.init:
        model, variables = training.load_pretrained(args.init, dtype=dtype)
        if args.arch is not None and args.arch != model.spec.name:
            raise _usage(f"--arch {args.arch} but {args.init} holds a {model.spec.name}")
        return model, variables, _input_channels(variables["params"])
    from flax_resnet.builder import build

    config = ModelConfig(args.arch or "resnet50", num_classes=10, dtype=dtype, zero_init_residual=not args.no_zero_init_residual)
    return build(config), None, None


def _load_data(args, in_ch):
    from flax_resnet import data
    from flax_resnet.imagedata import stream

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", data.DatasetWarning)
        ds = stream.open_data(args, in_ch)
    for w in caught:  # one line each on stderr, as the command's other notes
        if issubclass(w.category, data.DatasetWarning):
            _say(f"warning: {w.message}")
    return ds


def _fit_head(model, variables, num_classes: int, rng, in_channels: int):
    from flax_resnet import training

    if variables is None:  # a fresh model takes the data's channels (digits: 1)
        return model.clone(num_classes=num_classes, in_channels=in_channels), None
    if model.num_classes != num_classes:
        return training.replace_head(model, variables, num_classes, rng)
    return model, variables


def _optimizer(args, steps_per_epoch: int):
    """``(tx, schedule)``: the paper's SGD under the command's schedule (the schedule also labels the log)."""
    from flax_resnet import training

    sched = training.make_schedule(
        args.lr if args.lr is not None else training.paper_lr(args.batch_size),
        steps_per_epoch,
        args.epochs,
        warmup_epochs=args.warmup_epochs,
        schedule=args.schedule,
        step_epochs=args.step_epochs_list,
    )
    tx = training.make_optimizer(
        lr=sched,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        decay_bn_and_bias=not args.no_bn_bias_decay,
        freeze_backbone=args.freeze_backbone,
    )
    return tx, sched


def _resume(args, ckpt, new_state, config, sched, steps_per_epoch, mesh):
    """``(state, finished_epochs, meta)``: restored from the newest checkpoint that restores, or fresh."""
    import jax

    fresh = lambda: new_state() if mesh is None else _replicated(new_state(), mesh)
    if not ckpt.all_epochs():
        return fresh(), 0, {}
    if args.no_resume:
        _say(f"--no-resume: starting over in {args.workdir}; its checkpoints of epochs {', '.join(map(str, ckpt.all_epochs()))} are removed")
        for e in ckpt.all_epochs():
            ckpt.delete(e)
        return fresh(), 0, {}
    newest = newest_meta(ckpt)
    if newest is not None:
        check_run(args.workdir, newest[1].get("config", {}), config)
    from jax.sharding import NamedSharding, PartitionSpec

    try:
        # Resuming needs only the state's structure: no weights are initialized.
        state, meta = ckpt.restore(jax.eval_shape(new_state), sharding=NamedSharding(mesh, PartitionSpec()) if mesh is not None else None)
    except Exception as e:  # noqa: BLE001 - every checkpoint damaged, or from another model
        raise _usage(f"cannot resume: {e}; use --no-resume or another --workdir") from None
    done = int(meta["epoch"])
    for e, why in ckpt.skipped:
        _say(f"checkpoint {e} in {ckpt.directory} does not restore ({why}): resuming after epoch {done}; it will be rewritten")
        ckpt.delete(e)
    announce_recipe(args.workdir, meta.get("config", {}), config, sched, steps_per_epoch, done)
    return state, done, meta


def _replicated(state, mesh):
    from flax_resnet import training

    return training.replicate(state, mesh)


@dataclasses.dataclass
class _Run:
    """What the epoch loop needs."""

    args: Any
    model: Any
    ds: Any  # stream.ArrayData or stream.ImageData
    state: Any
    sched: Any
    mesh: Any
    ckpt: Any
    config: dict
    steps_per_epoch: int
    main: bool
    steps_done: int = 0  # in this invocation


def _train(run: _Run, start_epoch: int, records: list[dict]) -> None:
    """Epochs ``start_epoch + 1 .. --epochs``: train, evaluate, checkpoint, log, plot."""
    from flax_resnet import train_loop, training
    from flax_resnet.training import logs

    args = run.args
    metrics_path = os.path.join(args.workdir, "metrics.jsonl")
    show = run.main and (args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty()))
    eval_bs = args.eval_batch_size or max(args.batch_size, 128)
    t_run = time.perf_counter()
    if run.main and start_epoch < args.epochs:
        _say("compiling the train step (the first step of the first epoch includes it)...")
    nnx_run = None
    if args.api == "nnx":  # the NNX modules, optimizer and step; checkpoints stay the Linen TrainState (relabeled arrays)
        from flax import nnx

        from flax_resnet.nnx import training as nnx_training

        nnx_run = nnx_training.TrainStateBridge(run.model, run.state)
    for epoch in range(start_epoch, args.epochs):
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=run.steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, file=sys.stderr)
        first_step = {}
        t0 = time.perf_counter()

        def progress(step, m, bar=bar):
            if step == 1:
                first_step["s"] = time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
                if step % 5 == 0 or step == run.steps_per_epoch:
                    bar.set_postfix(loss=f"{float(m['loss']):.4f}")

        kw = dict(epoch=epoch, seed=args.seed, max_shift=args.max_shift, label_smoothing=args.label_smoothing, mesh=run.mesh,
                  progress=train_loop.checkpointing(run, epoch, progress, nnx_run), batches=run.ds.train_batches(epoch), place=run.ds.place)
        if nnx_run is None:
            tm = train_loop.linen_epoch(run, kw)
        else:
            tm = nnx_training.train_epoch(nnx_run.model, nnx_run.optimizer, None, None, args.batch_size, **kw)
            run.state = nnx_run.to_state(run.state)
        state = run.state
        if bar is not None:
            bar.close()
        if nnx_run is None:
            ev_fn = lambda x, y, m: training.eval_step(state, x, y, m)  # noqa: E731
        else:
            view = nnx.view(nnx_run.model, use_running_average=True)
            ev_fn = lambda x, y, m: nnx_training.eval_step(view, x, y, m)  # noqa: E731
        ebs = train_loop.eval_batch(eval_bs, run.mesh)
        ev = training.run_eval_batches(ev_fn, run.ds.eval_batches(ebs), run.ds.host_batch(ebs), run.mesh, run.ds.place)
        record = {
            "epoch": epoch + 1,
            "train_loss": tm["train_loss"],
            "train_accuracy": tm["train_accuracy"],
            "test_loss": ev["loss"],
            "test_accuracy": ev["accuracy"],
            "images_per_sec": tm["images_per_sec"],
            "lr": float(run.sched((epoch + 1) * run.steps_per_epoch - 1)),
            "epoch_seconds": tm["seconds"],
            "elapsed_seconds": time.perf_counter() - t_run,
        }
        records.append(record)
        # Asynchronous: Orbax writes while the next epoch trains (close() waits).
        run.ckpt.save(train_loop.checkpoint_key(run, epoch + 1), state, {"config": run.config, "epoch": epoch + 1, "test_accuracy": ev["accuracy"], "data": run.ds.state()}, wait=False)
        if run.main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            logs.plot_curves(records, os.path.join(args.workdir, "curves.png"), f"{run.config['arch']} on {run.ds.name} (batch {args.batch_size}, {args.dtype})")
            compiling = f" ({first_step['s']:.1f}s of it the first step, compiling)" if epoch == start_epoch and "s" in first_step else ""
            _say(
                f"epoch {epoch + 1}/{args.epochs}: train loss {tm['train_loss']:.4f}, test loss {ev['loss']:.4f}, "
                f"test acc {100 * ev['accuracy']:.2f}%, {tm['images_per_sec']:.1f} img/s, {tm['seconds']:.1f}s{compiling}"
            )


def run(args: argparse.Namespace) -> int:
    """``flax-resnet train``: validate, start JAX, model, data, head, optimizer, resume, train, summarize."""
    _validate(args)
    main = _start_jax(args)

    import jax
    import jax.numpy as jnp

    from flax_resnet import train_loop, training
    from flax_resnet.training import logs

    dtype = {"float32": None, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[args.dtype]
    init_rng, head_rng = jax.random.split(jax.random.key(args.seed))
    model, variables, in_ch = _build_model(args, dtype)
    ds = _load_data(args, in_ch)
    if args.batch_size > ds.num_train:
        raise _usage(f"--batch-size {args.batch_size} exceeds the {ds.num_train} training images")
    model, variables = _fit_head(model, variables, ds.num_classes, head_rng, ds.image_shape[-1])
    if args.workdir is None:
        args.workdir = os.path.join("runs", f"{model.spec.name}-{ds.name}")
        if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
            raise _usage(f"{args.workdir} exists and is not a directory; pass --workdir")
    steps_per_epoch = ds.steps_per_epoch
    tx, sched = _optimizer(args, steps_per_epoch)
    mesh = None
    if args.devices or jax.process_count() > 1:  # several hosts: one mesh over every process's devices
        try:
            mesh = training.make_mesh(args.devices if jax.process_count() == 1 else None)
        except ValueError as e:
            raise _usage(str(e)) from None
        if args.batch_size % mesh.devices.size:
            raise _usage(f"--batch-size {args.batch_size} must divide over the {mesh.devices.size} devices of {jax.process_count()} processes")

    def new_state():
        return training.create_train_state(
            model, variables if variables is not None else init_rng, tx, input_shape=(1,) + ds.image_shape, frozen_backbone=args.freeze_backbone
        )

    config = {"arch": model.spec.name, "dataset": ds.name, "num_classes": ds.num_classes, "normalize": args.normalize,
              "channels_first": args.channels_first, "size": args.size,
              "init": training.weights_identity(args.init) if args.init else None, "init_file": args.init,
              "data": ds.identity if ds.streaming else None, "augment": args.augment if ds.streaming else None,
              "classes": list(ds.classes) if ds.classes else None}
    config.update({k: getattr(args, k) for k in ("batch_size", "seed", "dtype") + RECIPE_KEYS})
    os.makedirs(args.workdir, exist_ok=True)
    if not os.access(args.workdir, os.W_OK):  # a read-only mount or directory: say so before any checkpoint is tried
        raise _usage(f"--workdir {args.workdir} is not writable")
    ckpt = training.Checkpointer(os.path.join(args.workdir, "checkpoints"), max_to_keep=args.keep_checkpoints)
    state, start_epoch, meta = _resume(args, ckpt, new_state, config, sched, steps_per_epoch, mesh)
    ds.restore(meta.get("data"))
    metrics_path = os.path.join(args.workdir, "metrics.jsonl")
    records = logs.read_metrics(metrics_path, start_epoch)
    if main:
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        n_dev = mesh.devices.size if mesh is not None else 1
        resumed = train_loop.resume_note(ds, start_epoch)
        dropped = ds.num_train - steps_per_epoch * args.batch_size
        _say(
            f"{model.spec.name} ({sum(x.size for x in jax.tree.leaves(state.params)):,} params, {args.dtype}) on {ds!r}; "
            f"{n_dev} {jax.devices()[0].platform} device(s), batch {args.batch_size}, lr {float(sched(0)):.3g} at step 1 "
            f"(peak {args.lr if args.lr is not None else training.paper_lr(args.batch_size):g}, {args.schedule}), "
            f"{steps_per_epoch} steps/epoch; writing {args.workdir}{resumed}"
        )
        if dropped:
            _say(_dropped_note(ds.num_train, args.batch_size, dropped))
        if start_epoch >= args.epochs:
            done = f"all {args.epochs} epochs are" if start_epoch == args.epochs else f"{start_epoch} epochs (--epochs {args.epochs}) are"
            _say(
                f"{args.workdir}: {done} done, nothing to train; "
                f"pass a larger --epochs to continue the run, --no-resume to start over, or another --workdir"
            )
    t_run = time.perf_counter()
    try:
        _train(_Run(args, model, ds, state, sched, mesh, ckpt, config, steps_per_epoch, main), start_epoch, records)
    except train_loop.Stopped:
        return train_loop.stopped(args, ckpt, ds)
    if not records and start_epoch:  # metrics.jsonl gone (or never written): the newest checkpoint's meta has the accuracy
        epoch, meta = newest_meta(ckpt) or (start_epoch, {})
        records = [{"epoch": epoch, "test_accuracy": meta.get("test_accuracy")}]
    ckpt.close()
    train_loop.close_data(ds, main)
    if main and records:
        accuracies = [r["test_accuracy"] for r in records if r.get("test_accuracy") is not None]
        summary = {
            "workdir": args.workdir,
            "epochs": records[-1]["epoch"],
            "test_accuracy": records[-1]["test_accuracy"],
            "best_test_accuracy": max(accuracies) if accuracies else None,
            "train_seconds": round(time.perf_counter() - t_run, 1),
        }
        print(json.dumps(summary))
    return 0


def _dropped_note(n: int, batch_size: int, dropped: int) -> str:
    """One line on the images past the last full batch: how many, why, and a batch size that uses all."""
    fit = next((b for b in range(batch_size, batch_size // 2, -1) if n % b == 0), None)
    hint = f"; --batch-size {fit} uses every image" if fit is not None else ""
    return (
        f"{dropped} of the {n} training images are left out of each epoch: every step takes a full batch of {batch_size} "
        f"(one shape, one compilation); the order is reshuffled each epoch, so a different {dropped} sit out{hint}"
    )
