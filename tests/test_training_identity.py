"""A training run's identity and what a rerun says (#23): --init weights, a finished run, dropped images, Orbax's waits."""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
import optax
import pytest

from flax_resnet import training
from flax_resnet.cli import main as cli_main
from flax_resnet.train_cli import _dropped_note
from flax_resnet.train_loop import check_run
from test_training_cli import _save_torch, _write_npz


@pytest.fixture(scope="module")
def r18_pair():
    """Two different resnet18 weight sets (random, BN variances positive)."""
    import flax_resnet

    model = flax_resnet.resnet18(num_classes=4)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))

    def fill(seed):
        rng = np.random.default_rng(seed)
        return jax.tree_util.tree_map_with_path(
            lambda p, s: (lambda x: np.abs(x) + 1 if jax.tree_util.keystr(p).endswith("['var']") else x)(rng.normal(size=s.shape).astype(np.float32) * 0.05),
            shapes,
        )

    return fill(0), fill(1)


def _train(capsys, *argv):
    rc = cli_main(["train", "--epochs", "1", "--batch-size", "12", "--progress", "off", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_init_identity_is_the_content_and_a_change_is_refused(tmp_path):
    f = tmp_path / "w.pth"
    f.write_bytes(b"weights one")
    ident = training.weights_identity(f)
    assert ident.startswith("sha256:") and len(ident) == len("sha256:") + 16
    os.utime(f, (1, 1))
    (tmp_path / "copy.pth").write_bytes(f.read_bytes())
    assert training.weights_identity(f) == training.weights_identity(tmp_path / "copy.pth") == ident  # touched or copied: the same
    f.write_bytes(b"weights two")
    assert training.weights_identity(f) != ident
    d = tmp_path / "orbax"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "x").write_bytes(b"1")
    before = training.weights_identity(d)
    (d / "sub" / "x").write_bytes(b"2")
    assert training.weights_identity(d) != before  # an Orbax directory: every file counts

    base = {"arch": "resnet18", "dataset": "tiny", "num_classes": 3, "batch_size": 12, "seed": 0, "dtype": "float32",
            "normalize": "dataset", "channels_first": False, "size": None}
    saved = {**base, "init": ident, "init_file": "w.pth"}
    check_run("runs/ft", saved, {**saved})  # the same weights: resumes
    check_run("runs/ft", base, {**base, "init": ident, "init_file": "w.pth"})  # a run saved before the identity existed
    with pytest.raises(Exception, match=r"^runs/ft holds another run \(--init w.pth \(sha256:\w+\) -> w.pth \(sha256:\w+\)\): resuming it"):
        check_run("runs/ft", saved, {**saved, "init": training.weights_identity(f)})
    with pytest.raises(Exception, match=r"\(--init w.pth \(sha256:\w+\) -> random weights\)"):
        check_run("runs/ft", saved, {**saved, "init": None, "init_file": None})


@pytest.mark.slow
def test_changed_init_weights_are_another_run(r18_pair, tmp_path, capsys):
    a, b = r18_pair
    init = _save_torch(a, tmp_path / "r18.pth")
    npz = _write_npz(tmp_path / "tiny.npz", size=16)
    work = tmp_path / "ft"
    rc, out, err = _train(capsys, "--dataset", npz, "--init", init, "--workdir", work)
    assert rc == 0, err
    ident = training.weights_identity(init)
    with training.Checkpointer(work / "checkpoints") as ck:
        assert ck.read_meta()["config"]["init"] == ident and ident.startswith("sha256:")

    # Touched, or copied elsewhere: the same content, the same run (nothing left to do).
    os.utime(init, (1, 1))
    rc, out, err = _train(capsys, "--dataset", npz, "--init", init, "--workdir", work)
    assert rc == 0 and "nothing to train" in err, err

    # The same file name with other weights (the README's fine-tune block after resnet50.pth changed): refused in one line.
    _save_torch(b, init)
    rc, out, err = _train(capsys, "--dataset", npz, "--init", init, "--workdir", work, "--epochs", "2")
    assert rc == 2 and err.count("\n") == 1, err
    assert f"{work} holds another run (--init {init} ({ident}) -> {init} ({training.weights_identity(init)}))" in err
    assert "use --no-resume to start over there, or another --workdir" in err
    assert sorted(os.listdir(work / "checkpoints")) == ["1"], "nothing trained"

    # Random weights where the run started from --init, and the other way round: other runs too.
    rc, out, err = _train(capsys, "--dataset", npz, "--arch", "resnet18", "--workdir", work)
    assert rc == 2 and "-> random weights)" in err, err
    scratch = tmp_path / "scratch"
    assert _train(capsys, "--dataset", npz, "--arch", "resnet18", "--workdir", scratch)[0] == 0
    rc, out, err = _train(capsys, "--dataset", npz, "--init", init, "--workdir", scratch)
    assert rc == 2 and "(--init random weights -> " in err, err


@pytest.mark.slow
def test_a_finished_run_says_so_and_prints_its_summary(tmp_path, capsys):
    npz = _write_npz(tmp_path / "tiny.npz")
    work = tmp_path / "run"
    args = ("--dataset", npz, "--arch", "resnet18", "--size", "16", "--workdir", work)
    rc, out, err = _train(capsys, *args)
    assert rc == 0, err
    assert "2 of the 38 training images are left out of each epoch" in err  # 48 images, 80/20: 38 train, batch 12
    first = json.loads(out.strip().splitlines()[-1])
    assert first["epochs"] == 1

    rc, out, err = _train(capsys, *args)  # the issue: "resuming after epoch 12", nothing trained, no summary
    assert rc == 0, err
    assert f"{work}: all 1 epochs are done, nothing to train; pass a larger --epochs to continue the run" in err
    assert "compiling the train step" not in err
    again = json.loads(out.strip().splitlines()[-1])
    assert (again["epochs"], again["test_accuracy"], again["best_test_accuracy"]) == (1, first["test_accuracy"], first["best_test_accuracy"])

    # The checkpoints of a run whose metrics.jsonl is gone (e.g. written by your own loop): the summary from the checkpoint.
    os.remove(work / "metrics.jsonl")
    rc, out, err = _train(capsys, *args)
    assert rc == 0 and "nothing to train" in err, err
    assert json.loads(out.strip().splitlines()[-1])["test_accuracy"] == pytest.approx(first["test_accuracy"])


def test_images_left_out_of_each_epoch_are_counted():
    # The fine-tune block: 102 images at batch 64 used 64 a step and never said so.
    assert _dropped_note(102, 64, 38).startswith("38 of the 102 training images are left out of each epoch: every step takes a full batch of 64")
    assert _dropped_note(102, 64, 38).endswith("; --batch-size 51 uses every image")
    assert "--batch-size" not in _dropped_note(1437, 64, 29)  # digits: no batch in 33..64 divides 1437


def test_orbax_waits_for_the_previous_save_are_not_printed(tmp_path, caplog, monkeypatch):
    from absl import logging as absl_logging
    from orbax.checkpoint import checkpoint_manager

    monkeypatch.setattr(checkpoint_manager, "_WAIT_FOR_PREV_SAVE_WARNING_THRESHOLD_SECS", -1.0)  # every save would warn
    state = training.TrainState.create(apply_fn=None, params={"w": np.zeros(3, np.float32)}, tx=optax.sgd(0.1), batch_stats={"m": np.zeros(2, np.float32)})
    caplog.set_level(logging.WARNING)
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.WARNING)  # `flax-resnet train` run in this process sets ERROR
    try:
        with training.Checkpointer(tmp_path / "ck") as ck:
            for epoch in (1, 2, 3):
                ck.save(epoch, state, wait=False)
        absl_logging.warning("another Orbax warning")  # the filter drops the routine waits only
    finally:
        absl_logging.set_verbosity(verbosity)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "Waiting for previous save" in m], messages
    assert "another Orbax warning" in messages
