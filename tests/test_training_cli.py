"""The ``train`` command on tiny configs, and starting from pretrained weights (``training.load_pretrained``, ``--init``)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_resnet
from flax_resnet import training
from flax_resnet.cli import main as cli_main
from test_training import N_CLASSES, SHAPE, _assert_trees_equal, _tree_max_diff

# ------------------------------------------------------------- pretrained


@pytest.fixture(scope="module")
def r18():
    """resnet18 (a named arch, as checkpoint files need) with 4 classes and its variables."""
    model = flax_resnet.resnet18(num_classes=N_CLASSES)
    # Shapes without compiling an init; random values do for file round trips.
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + SHAPE))
    rng = np.random.default_rng(0)

    def fill(path, s):
        x = rng.normal(size=s.shape).astype(np.float32) * 0.05
        return np.abs(x) + 1 if jax.tree_util.keystr(path).endswith("['var']") else x

    return model, jax.tree_util.tree_map_with_path(fill, shapes)


def _save_torch(variables, path):
    """The variables as a PyTorch checkpoint file, wrapped as a training run saves it."""
    torch = pytest.importorskip("torch")
    sd = {k: torch.from_numpy(np.array(v)) for k, v in flax_resnet.flax_to_torch(jax.device_get(variables)).items()}
    torch.save({"epoch": 90, "model_state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    return path


@pytest.mark.parametrize("suffix", [".pth", ".msgpack"])
def test_load_pretrained_replaces_head(r18, tmp_path, suffix):
    model, variables = r18
    path = tmp_path / f"r18{suffix}"
    _save_torch(variables, path) if suffix == ".pth" else flax_resnet.save(path, jax.device_get(variables))
    m2, v2 = training.load_pretrained(path, num_classes=3, dtype=jnp.bfloat16)
    assert m2.num_classes == 3 and m2.dtype == jnp.bfloat16 and m2.spec.name == "resnet18"
    assert v2["params"]["fc"]["kernel"].shape == (512, 3)
    # Every backbone weight and statistic is the checkpoint's, bit for bit.
    _assert_trees_equal({k: v for k, v in v2["params"].items() if k != "fc"}, {k: v for k, v in variables["params"].items() if k != "fc"})
    _assert_trees_equal(v2["batch_stats"], variables["batch_stats"])


# ------------------------------------------------------------------------ CLI


def _write_npz(path, n=48, size=12, classes=3, **extra):
    rng = np.random.default_rng(0)
    labels = np.arange(n) % classes
    images = (rng.random((n, size, size)) * 60 + labels[:, None, None] * 60).astype(np.uint8)
    np.savez(path, images=images, labels=labels, **extra)
    return path


def _records(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _damage(checkpoint_dir):
    """Truncates every array file of an Orbax checkpoint (a crash mid-write, a full disk)."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(checkpoint_dir / "state") for f in fs if "ocdbt" in d]
    assert files
    for f in files:
        os.truncate(f, min(10, os.path.getsize(f)))


def test_cli_run_resume_fallback_and_changed_settings(tmp_path, capsys, monkeypatch):
    """One run through the command: outputs, default workdir, resume after a damaged checkpoint, changed settings.

    Every invocation runs in this process, so the train step compiles once.
    """
    npz = _write_npz(tmp_path / "tiny.npz")
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "runs" / "resnet18-tiny"  # the default --workdir: runs/ARCH-DATASET

    def train(epochs, *extra):
        argv = ["train", "--arch", "resnet18", "--dataset", str(npz), "--size", "16", "--epochs", str(epochs),
                "--batch-size", "12", "--lr", "0.05", "--progress", "off", *extra]
        rc = cli_main(argv)
        out = capsys.readouterr()
        return rc, out.out, out.err

    rc, out, err = train(2)
    assert rc == 0, err
    assert "compiling the train step" in err and "of it the first step, compiling)" in err
    recs = _records(work / "metrics.jsonl")
    assert [r["epoch"] for r in recs] == [1, 2]
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "images_per_sec", "lr"):
        assert all(np.isfinite(r[key]) for r in recs), key
    assert (work / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(work / "checkpoints")) == ["1", "2"]
    assert json.loads(out.strip().splitlines()[-1])["epochs"] == 2

    # A damaged newest checkpoint and a half-written last metrics line (a crash): resume from
    # epoch 1, say so in one line, retrain epoch 2 to exactly the same numbers.
    _damage(work / "checkpoints" / "2")
    with open(work / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')
    rc, out, err = train(2)
    assert rc == 0, err
    lines = [l for l in err.splitlines() if "does not restore" in l]
    assert len(lines) == 1 and lines[0].startswith(f"checkpoint 2 in {work / 'checkpoints'} does not restore (")
    assert lines[0].endswith("resuming after epoch 1; it will be rewritten") and "Traceback" not in err
    again = _records(work / "metrics.jsonl")
    assert [r["epoch"] for r in again] == [1, 2] and again[0] == recs[0]
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr"):
        assert again[1][key] == recs[1][key], key

    # More epochs: the run continues, and the command says the schedule is rebuilt and where it restarts.
    from flax_resnet import training

    lr_next = float(training.make_schedule(0.05, 3, 3, warmup_epochs=1)(2 * 3))
    rc, out, err = train(3)
    assert rc == 0, err
    assert (f"resuming {os.path.join('runs', 'resnet18-tiny')} after epoch 2 with --epochs 2 -> 3: the run continues under the new "
            f"settings; the cosine learning-rate schedule is rebuilt for 3 epochs, so epoch 3 starts at lr {lr_next:.3g}") in err
    assert [r["epoch"] for r in _records(work / "metrics.jsonl")] == [1, 2, 3]

    # --no-resume starts over: the old checkpoints go, epoch 1 is written again.
    rc, out, err = train(1, "--no-resume")
    assert rc == 0, err
    assert "--no-resume: starting over in" in err and "checkpoints of epochs 2, 3 are removed" in err
    assert sorted(os.listdir(work / "checkpoints")) == ["1"] and [r["epoch"] for r in _records(work / "metrics.jsonl")] == [1]

    # Another architecture or batch size in the same workdir is another run: refused, naming what differs.
    for extra, needle in ((["--arch", "resnet34"], "(--arch resnet18 -> resnet34)"), (["--batch-size", "6"], "(--batch-size 12 -> 6)")):
        rc, out, err = train(3, "--workdir", str(work), *extra)
        assert rc == 2 and err.count("\n") == 1, err
        assert f"{work} holds another run {needle}: resuming it would not continue that run; use --no-resume" in err, err

    # No checkpoint restores: one line, nothing trained.
    _damage(work / "checkpoints" / "1")
    rc, out, err = train(3)
    assert rc == 2 and err.count("\n") == 1, err
    assert f"cannot resume: cannot restore {work / 'checkpoints' / '1'}: " in err and err.rstrip().endswith("use --no-resume or another --workdir")


def test_plot_has_integer_epochs_and_one_colour_per_split():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from flax_resnet.training import logs

    recs = [{"epoch": e, "train_loss": 1 / e, "test_loss": 1.2 / e, "train_accuracy": 0.5 + e / 10, "test_accuracy": 0.4 + e / 10}
            for e in (1, 2, 3)]
    fig = logs.curves_figure(recs)
    fig.canvas.draw()
    colours = {}
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        for line in ax.get_lines():
            colours.setdefault(line.get_label().split()[0], set()).add(line.get_color())
    assert set(colours) == {"train", "test"}
    assert all(len(c) == 1 for c in colours.values()) and colours["train"] != colours["test"], colours
    plt.close(fig)


def test_cli_help_lists_choices_and_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "`" not in text
    for needle in ("--dtype {float32,bfloat16,float16}", "--normalize {dataset,imagenet,none}", "resnet18, resnet34, resnet50",
                   "(default: runs/ARCH-DATASET)", "(default: 64)", "(default: 12)", "(default: dataset)", "(default: 0.9)", "(default: 0)"):
        assert needle in " ".join(text.split()).replace("{ ", "{"), needle


def test_cli_init_and_freeze(r18, tmp_path):
    model, variables = r18
    init = _save_torch(variables, tmp_path / "r18.pth")  # converted torch weights
    npz = _write_npz(tmp_path / "tiny.npz", size=16)  # grey images: repeated to the checkpoint's 3 channels
    work = tmp_path / "ft"
    argv = ["train", "--dataset", str(npz), "--epochs", "1", "--batch-size", "12", "--workdir", str(work),
            "--init", str(init), "--freeze-backbone", "--progress", "off"]
    assert cli_main(argv) == 0
    rec = json.loads((work / "metrics.jsonl").read_text())
    assert rec["epoch"] == 1
    # Only fc changed in the saved state.
    head_rng = jax.random.split(jax.random.key(0))[1]  # the command's: --seed 0, split into (init, head)
    state = training.create_train_state(
        *training.replace_head(model, variables, 3, head_rng),
        training.make_optimizer(freeze_backbone=True), frozen_backbone=True)
    with training.Checkpointer(work / "checkpoints") as ck:
        restored, _ = ck.restore(state)
    _assert_trees_equal({k: v for k, v in restored.params.items() if k != "fc"}, {k: v for k, v in variables["params"].items() if k != "fc"})
    _assert_trees_equal(restored.batch_stats, variables["batch_stats"])
    # The new head trained: it moved from its initial values (~1e-3 in 3 steps; another init differs by ~0.1).
    assert 1e-4 < _tree_max_diff(restored.params["fc"], state.params["fc"]) < 1e-2
    assert int(restored.step) == 3  # 48 images, 80/20 split: 38 train // 12


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--arch", "resnet51"], "argument --arch: unknown architecture 'resnet51'; did you mean 'resnet"),
        (["--dataset", "/nonexistent/x.npz"], "no such dataset file"),
        (["--dataset", "BADNPZ"], "lacks array(s) images, labels"),
        (["--dataset", "digits", "--num-classes", "5"], "digits has 10 classes, not --num-classes 5"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--init", "/nonexistent.pth"], "no such checkpoint"),
        (["--freeze-backbone"], "needs --init"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(extra, needle, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((3, 4, 4)), y=np.zeros(3))
    extra = [str(bad) if e == "BADNPZ" else e for e in extra]
    try:
        rc = cli_main(["train", "--workdir", str(tmp_path / "w"), "--epochs", "1"] + extra)
    except SystemExit as e:  # argparse's own checks (choices) exit from the parser
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("flax-resnet train: error:")
    assert needle in err
    assert not (tmp_path / "w").exists()


def test_cli_without_the_train_extra_says_what_to_install(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("sklearn", "tqdm") else real(name, *a))
    assert cli_main(["train", "--workdir", str(tmp_path / "w"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs scikit-learn, tqdm: pip install 'flax-resnet[train]'" in err, err
    assert not (tmp_path / "w").exists()
