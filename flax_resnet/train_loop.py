"""Pieces of ``flax-resnet train``'s epoch loop: the Linen step over any batches, mid-epoch checkpoints, the stop hook,
and the run identity (which settings make a checkpoint another run).

``run`` is ``train_cli._Run``: args, state, data (``imagedata.stream``),
checkpointer, config, steps per epoch.
"""

from __future__ import annotations

import sys

from flax_resnet.cli import UsageError

# Settings that make a checkpoint another run: resuming under other values is refused.
RUN_KEYS = ("arch", "dataset", "num_classes", "batch_size", "seed", "dtype", "normalize", "channels_first", "size", "data", "augment")
# Settings of the recipe: resuming under other values continues the run with them.
RECIPE_KEYS = ("epochs", "lr", "schedule", "warmup_epochs", "momentum", "weight_decay", "label_smoothing", "max_shift")


class Stopped(Exception):
    """``--stop-after-steps`` reached."""


def eval_batch(batch_size: int, mesh) -> int:
    """The evaluation batch rounded up to a multiple of the mesh's devices."""
    n = mesh.devices.size if mesh is not None else 1
    return -(-batch_size // n) * n


def checkpoint_key(run, epoch: int) -> int:
    """A checkpoint's number: the epoch for in-memory data; for streamed data (mid-epoch checkpoints) the global step."""
    if not run.ds.streaming:
        return epoch
    import jax

    key = int(jax.device_get(run.state.step))
    if key in run.ckpt.all_epochs():  # an epoch shortened by skipped images ended on a mid-epoch checkpoint's step
        run.ckpt.manager.wait_until_finished()
        run.ckpt.delete(key)
    return key


def linen_epoch(run, kw: dict) -> dict:
    """``train_step`` over one epoch's batches; ``run.state`` follows every step (for mid-epoch checkpoints)."""
    from flax_resnet import training

    smoothing = float(kw.pop("label_smoothing"))

    def step(x, y):
        run.state, m = training.train_step(run.state, x, y, label_smoothing=smoothing)
        return m

    return training.run_epoch(step, None, None, run.args.batch_size, **kw)


def checkpointing(run, epoch: int, progress, nnx_run):
    """``progress`` plus ``--checkpoint-every`` (state and data position) and ``--stop-after-steps``."""
    args = run.args

    def hook(step, m):
        progress(step, m)
        run.steps_done += 1
        at = run.ds.stream.step if run.ds.streaming else step  # the step within the epoch, also after a mid-epoch resume
        if args.checkpoint_every and run.ds.streaming and at % args.checkpoint_every == 0 and at < run.steps_per_epoch:
            if nnx_run is not None:
                run.state = nnx_run.to_state(run.state)
            meta = {"config": run.config, "epoch": epoch, "data": run.ds.state()}
            run.ckpt.save(checkpoint_key(run, epoch), run.state, meta, wait=False)
        if args.stop_after_steps is not None and run.steps_done >= args.stop_after_steps:
            raise Stopped

    return hook


def resume_note(ds, start_epoch: int) -> str:
    """The start line's ``; resuming ...`` (mid-epoch for a streamed run restored inside an epoch)."""
    if getattr(ds, "stream", None) is not None and ds.stream.step:
        return f"; resuming at step {ds.stream.step + 1} of epoch {start_epoch + 1}"
    return f"; resuming after epoch {start_epoch}" if start_epoch else ""


def stopped(args, ckpt, ds) -> int:
    """``--stop-after-steps`` reached: pending checkpoints finish, the workers stop, one line; exit status 0."""
    ckpt.close()
    ds.close()
    print(f"stopped after {args.stop_after_steps} steps (--stop-after-steps); rerun to resume from the newest checkpoint", file=sys.stderr, flush=True)
    return 0


def close_data(ds, main: bool) -> None:
    """Stops the data workers; counts the images ``--on-bad-image skip`` left out while decoding."""
    ds.close()
    skipped = getattr(getattr(ds, "stream", None), "skipped", None)
    if main and skipped:
        print(f"--on-bad-image skip: {len(set(skipped))} images failed to decode and were left out each time met (named above)", file=sys.stderr, flush=True)


def newest_meta(ckpt) -> tuple[int, dict] | None:
    """``(epoch, meta)`` of the newest checkpoint whose meta reads; None if none does."""
    for e in sorted(ckpt.all_epochs(), reverse=True):
        try:
            return e, ckpt.read_meta(e)
        except Exception:  # noqa: BLE001 - a damaged checkpoint; restore() reports it
            continue
    return None


def check_run(workdir: str, saved: dict, config: dict) -> None:
    """Refuses to resume another run (other architecture, data, batch, init weights, ...), naming what differs."""
    other = [f"{_opt(k)} {saved[k]} -> {config[k]}" for k in RUN_KEYS if saved.get(k) is not None and saved[k] != config[k]]
    if "init" in saved and saved["init"] != config["init"]:  # runs saved before the init identity existed pass
        was = f"{saved.get('init_file')} ({saved['init']})" if saved["init"] else "random weights"
        now = f"{config['init_file']} ({config['init']})" if config["init"] else "random weights"
        other.append(f"--init {was} -> {now}")
    if other:
        raise UsageError(
            f"{workdir} holds another run ({', '.join(other)}): resuming it would not continue that run; "
            "use --no-resume to start over there, or another --workdir"
        )


def announce_recipe(workdir: str, saved: dict, config: dict, sched, steps_per_epoch: int, done: int) -> None:
    """Says in one line what a changed recipe (e.g. more --epochs) does from here on."""
    changed = [f"{_opt(k)} {saved[k]} -> {config[k]}" for k in RECIPE_KEYS if k in saved and saved[k] != config[k]]
    if changed and done < config["epochs"]:
        print(
            f"resuming {workdir} after epoch {done} with {', '.join(changed)}: the run continues under the new settings; "
            f"the {config['schedule']} learning-rate schedule is rebuilt for {config['epochs']} epochs, "
            f"so epoch {done + 1} starts at lr {float(sched(done * steps_per_epoch)):.3g}",
            file=sys.stderr,
            flush=True,
        )


def _opt(key: str) -> str:
    return "--" + key.replace("_", "-")
