"""``flax-resnet train``: train a Flax ResNet in JAX on digits or your own .npz.

Writes ``WORKDIR/metrics.jsonl`` (one JSON object per epoch), ``WORKDIR/curves.png``
and Orbax checkpoints in ``WORKDIR/checkpoints``; rerunning with the same
``WORKDIR`` resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULTS = dict(epochs=12, batch_size=64, warmup_epochs=1.0, max_shift=2, seed=0)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a ResNet in JAX (digits or a .npz of images and labels)",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
    )
    p.add_argument("--arch", default=None, help="architecture (default resnet50, or the --init checkpoint's)")
    p.add_argument("--dataset", default="digits", help="'digits' (scikit-learn's, 32x32) or a .npz with images and labels")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="epochs to train (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="global batch size (default %(default)s)")
    p.add_argument("--workdir", required=True, help="output directory: metrics.jsonl, curves.png, checkpoints/")
    p.add_argument("--devices", type=int, default=None, help="data-parallel over K devices (on CPU: K virtual devices)")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 or bfloat16 (params stay float32)")
    p.add_argument("--init", default=None, metavar="FILE", help="start from converted weights (.pth/.safetensors/.msgpack/Orbax); the head is replaced")
    p.add_argument("--freeze-backbone", action="store_true", help="train only fc (BN statistics frozen too); needs --init")
    g = p.add_argument_group("recipe (He et al. 2016 defaults)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 0.1 x batch/256)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--no-bn-bias-decay", action="store_true", help="exclude BN params and biases from weight decay")
    g.add_argument("--schedule", default="cosine", choices=("cosine", "step", "constant"))
    g.add_argument("--step-epochs", default="30,60,80", help="epochs where 'step' divides the lr by 10")
    g.add_argument("--warmup-epochs", type=float, default=DEFAULTS["warmup_epochs"])
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--max-shift", type=int, default=DEFAULTS["max_shift"], help="random-shift augmentation in pixels (0: none)")
    g.add_argument("--no-zero-init-residual", action="store_true", help="don't zero the last BN scale of each block")
    p.add_argument("--size", type=int, default=None, help="image size: digits default 32 (upscaled from 8x8); .npz images are resized only if given")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of init, data order and augmentation")
    p.add_argument("--eval-batch-size", type=int, default=None, help="default: the batch size")
    p.add_argument("--no-resume", action="store_true", help="start over even if WORKDIR has checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="how many epoch checkpoints to keep")
    p.add_argument("--progress", default="auto", choices=("auto", "on", "off"), help="progress bar (auto: on a terminal)")
    p.add_argument("--no-cpu-workaround", action="store_true", help="don't disable XLA's algsimp pass on CPU (see training.cpu_small_conv_workaround)")
    p.add_argument("--distributed", action="store_true", help="multi-host: call jax.distributed.initialize() first (or FLAX_RESNET_DISTRIBUTED=1)")
    p.set_defaults(func=run)


def _usage(msg: str):
    from flax_resnet.cli import UsageError

    return UsageError(msg)


TRAIN_EXTRA = ("sklearn", "matplotlib", "tqdm")  # digits and data splits, the plot, the progress bar


def _validate(args) -> None:
    import importlib.util

    from flax_resnet.archs import ARCHS

    missing = [m for m in TRAIN_EXTRA if importlib.util.find_spec(m) is None]
    if missing:
        raise _usage(f"needs {', '.join('scikit-learn' if m == 'sklearn' else m for m in missing)}: pip install 'flax-resnet[train]'")

    if args.arch is not None and args.arch not in ARCHS:
        raise _usage(f"unknown architecture {args.arch!r}; choose one of {', '.join(ARCHS)}")
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise _usage(f"--{name.replace('_', '-')} must be >= 1")
    if args.devices is not None and args.devices < 1:
        raise _usage("--devices must be >= 1")
    if args.devices and args.batch_size % args.devices:
        raise _usage(f"--batch-size {args.batch_size} must divide over --devices {args.devices}")
    if args.dtype not in ("float32", "bfloat16", "float16"):
        raise _usage(f"unknown --dtype {args.dtype!r}; use float32 or bfloat16")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise _usage("--label-smoothing must be in [0, 1)")
    if args.max_shift < 0 or (args.size is not None and args.size < 1):
        raise _usage("--max-shift must be >= 0 and --size >= 1")
    if args.dataset != "digits":
        if not os.path.exists(args.dataset):
            raise FileNotFoundError(f"no such dataset file: {args.dataset} (use 'digits' or a .npz path)")
    if args.init is not None and not os.path.exists(args.init):
        raise FileNotFoundError(f"no such checkpoint: {args.init}")
    if args.freeze_backbone and args.init is None:
        raise _usage("--freeze-backbone needs --init (a pretrained backbone)")
    try:
        args.step_epochs_list = tuple(int(e) for e in args.step_epochs.split(",") if e.strip())
    except ValueError:
        raise _usage(f"--step-epochs must be comma-separated integers, got {args.step_epochs!r}") from None
    if os.path.exists(args.workdir) and not os.path.isdir(args.workdir):
        raise _usage(f"--workdir {args.workdir} exists and is not a directory")


def _request_devices(k: int | None) -> None:
    """Lets the CPU backend expose ``k`` devices if JAX hasn't started a backend yet."""
    if not k or k < 2:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={k}".strip()


def plot_curves(records: list[dict], path: str, title: str | None = None) -> None:
    """Loss (train, test) and test accuracy against epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in records]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(ep, [r["train_loss"] for r in records], "o-", label="train")
    a1.plot(ep, [r["test_loss"] for r in records], "o-", label="test")
    a1.set_xlabel("epoch")
    a1.set_ylabel("cross-entropy")
    a1.set_yscale("log")
    a1.legend()
    a1.grid(alpha=0.3)
    a2.plot(ep, [100 * r["test_accuracy"] for r in records], "o-", color="C2", label="test")
    if "train_accuracy" in records[0]:
        a2.plot(ep, [100 * r["train_accuracy"] for r in records], "o-", color="C0", alpha=0.5, label="train (running)")
    a2.set_xlabel("epoch")
    a2.set_ylabel("accuracy (%)")
    a2.legend()
    a2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _read_metrics(path: str, upto: int) -> list[dict]:
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    r = json.loads(line)
                    if r.get("epoch", 0) <= upto:
                        out.append(r)
    return out


def run(args: argparse.Namespace) -> int:
    _validate(args)
    _request_devices(args.devices)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from flax_resnet import data, training

    if not args.no_cpu_workaround:
        training.cpu_small_conv_workaround()
    try:  # Orbax logs routine waits at WARNING through absl
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    if training.initialize_distributed(True if args.distributed else None):
        print(f"jax.distributed: process {jax.process_index()} of {jax.process_count()}", file=sys.stderr)
    main = jax.process_index() == 0

    dtype = {"float32": None, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[args.dtype]
    rng = jax.random.key(args.seed)
    init_rng, head_rng = jax.random.split(rng)

    # Model first (with --init the checkpoint fixes the arch and input channels).
    if args.init:
        model, variables = training.load_pretrained(args.init, dtype=dtype)
        if args.arch is not None and args.arch != model.spec.name:
            raise _usage(f"--arch {args.arch} but {args.init} holds a {model.spec.name}")
        in_ch = int(np.shape(variables["params"]["conv1"]["kernel"])[2])
    else:
        from flax_resnet.model import ResNet

        model = ResNet(arch=args.arch or "resnet50", num_classes=10, dtype=dtype, zero_init_residual=not args.no_zero_init_residual)
        variables, in_ch = None, None

    if args.dataset == "digits":
        ds = data.load_digits(size=args.size or 32, channels=in_ch or 1, seed=args.seed)
    else:
        ds = data.load_npz(args.dataset, size=args.size, seed=args.seed)
        if in_ch is not None and ds.image_shape[-1] != in_ch:
            if ds.image_shape[-1] == 1 and in_ch == 3:
                ds = data.Dataset(ds.name, np.repeat(ds.train_images, 3, -1), ds.train_labels, np.repeat(ds.test_images, 3, -1),
                                  ds.test_labels, ds.num_classes, np.repeat(ds.mean, 3), np.repeat(ds.std, 3))
            else:
                raise _usage(f"{args.dataset} has {ds.image_shape[-1]} channels, {args.init} expects {in_ch}")
    if args.batch_size > len(ds.train_labels):
        raise _usage(f"--batch-size {args.batch_size} exceeds the {len(ds.train_labels)} training images")

    if variables is None:
        model = model.clone(num_classes=ds.num_classes)
    elif model.num_classes != ds.num_classes:
        model, variables = training.replace_head(model, variables, ds.num_classes, head_rng)

    steps_per_epoch = len(ds.train_labels) // args.batch_size
    tx = training.make_optimizer(
        batch_size=args.batch_size,
        steps_per_epoch=steps_per_epoch,
        epochs=args.epochs,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        decay_bn_and_bias=not args.no_bn_bias_decay,
        warmup_epochs=args.warmup_epochs,
        schedule=args.schedule,
        step_epochs=args.step_epochs_list,
        freeze_backbone=args.freeze_backbone,
    )
    mesh = None
    if args.devices:
        try:
            mesh = training.make_mesh(args.devices)
        except ValueError as e:
            raise _usage(str(e)) from None

    os.makedirs(args.workdir, exist_ok=True)
    metrics_path = os.path.join(args.workdir, "metrics.jsonl")
    plot_path = os.path.join(args.workdir, "curves.png")
    ckpt = training.Checkpointer(os.path.join(args.workdir, "checkpoints"), max_to_keep=args.keep_checkpoints)
    resume = not args.no_resume and ckpt.latest_epoch() is not None

    def new_state():
        return training.create_train_state(
            model,
            variables if variables is not None else init_rng,
            tx,
            input_shape=(1,) + ds.image_shape,
            frozen_backbone=args.freeze_backbone,
        )

    # Resuming needs only the state's structure: skip initializing weights.
    state = jax.eval_shape(new_state) if resume else new_state()
    if mesh is not None and not resume:
        state = training.replicate(state, mesh)
    config = {
        "arch": model.spec.name,
        "dataset": ds.name,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "seed": args.seed,
        "dtype": args.dtype,
    }
    start_epoch = 0
    if resume:
        try:
            from jax.sharding import NamedSharding, PartitionSpec

            state, meta = ckpt.restore(state, sharding=NamedSharding(mesh, PartitionSpec()) if mesh is not None else None)
        except Exception as e:  # noqa: BLE001 - a mismatched workdir is a usage error
            raise _usage(f"cannot resume from {ckpt.directory} ({type(e).__name__}); use --no-resume or another --workdir") from None
        diff = {k: (meta.get("config", {}).get(k), v) for k, v in config.items() if meta.get("config", {}).get(k) not in (None, v) and k != "epochs"}
        if diff:
            raise _usage(f"{ckpt.directory} was written with other settings {diff}; use --no-resume or another --workdir")
        start_epoch = int(meta["epoch"])
    records = _read_metrics(metrics_path, start_epoch) if start_epoch else []
    if main:
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    n_dev = mesh.devices.size if mesh is not None else 1
    if main:
        print(
            f"{model.spec.name} ({sum(x.size for x in jax.tree.leaves(state.params)):,} params, {args.dtype}) on {ds!r}; "
            f"{n_dev} {jax.devices()[0].platform} device(s), batch {args.batch_size}, "
            f"lr {args.lr if args.lr is not None else training.paper_lr(args.batch_size):g}, "
            f"{steps_per_epoch} steps/epoch" + (f"; resuming after epoch {start_epoch}" if start_epoch else ""),
            file=sys.stderr,
        )

    show = main and (args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty()))
    eval_bs = args.eval_batch_size or max(args.batch_size, 128)
    t_run = time.perf_counter()
    for epoch in range(start_epoch, args.epochs):
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, file=sys.stderr)

        def progress(step, m, bar=bar):
            if bar is not None:
                bar.update(1)
                if step % 5 == 0 or step == steps_per_epoch:
                    bar.set_postfix(loss=f"{float(m['loss']):.4f}")

        state, tm = training.train_epoch(
            state,
            ds.train_images,
            ds.train_labels,
            args.batch_size,
            epoch=epoch,
            seed=args.seed,
            max_shift=args.max_shift,
            label_smoothing=args.label_smoothing,
            mesh=mesh,
            progress=progress,
        )
        if bar is not None:
            bar.close()
        ev = training.evaluate(state, ds.test_images, ds.test_labels, eval_bs, mesh)
        record = {
            "epoch": epoch + 1,
            "train_loss": tm["train_loss"],
            "train_accuracy": tm["train_accuracy"],
            "test_loss": ev["loss"],
            "test_accuracy": ev["accuracy"],
            "images_per_sec": tm["images_per_sec"],
            "lr": float(tx_lr(args, steps_per_epoch, epoch)),
            "epoch_seconds": tm["seconds"],
            "elapsed_seconds": time.perf_counter() - t_run,
        }
        records.append(record)
        # Asynchronous: Orbax writes while the next epoch trains (close() waits).
        ckpt.save(epoch + 1, state, {"config": config, "test_accuracy": ev["accuracy"]}, wait=False)
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            plot_curves(records, plot_path, f"{model.spec.name} on {ds.name} (batch {args.batch_size}, {args.dtype})")
            print(
                f"epoch {epoch + 1}/{args.epochs}: train loss {tm['train_loss']:.4f}, test loss {ev['loss']:.4f}, "
                f"test acc {100 * ev['accuracy']:.2f}%, {tm['images_per_sec']:.1f} img/s, {tm['seconds']:.1f}s",
                file=sys.stderr,
                flush=True,
            )
    ckpt.close()
    if main and records:
        last = records[-1]
        print(
            json.dumps(
                {
                    "workdir": args.workdir,
                    "epochs": last["epoch"],
                    "test_accuracy": last["test_accuracy"],
                    "best_test_accuracy": max(r["test_accuracy"] for r in records),
                    "train_seconds": round(time.perf_counter() - t_run, 1),
                }
            )
        )
    return 0


def tx_lr(args, steps_per_epoch: int, epoch: int) -> float:
    """The learning rate at the last step of ``epoch`` (for the log)."""
    from flax_resnet import training

    peak = args.lr if args.lr is not None else training.paper_lr(args.batch_size)
    sched = training.make_schedule(
        peak,
        steps_per_epoch,
        args.epochs,
        warmup_epochs=args.warmup_epochs,
        schedule=args.schedule,
        step_epochs=args.step_epochs_list,
    )
    return float(sched((epoch + 1) * steps_per_epoch - 1))
