"""A training run's identity and what a rerun says (#23): --init weights, a finished run, dropped images, Orbax's waits."""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
import pytest

from flax_resnet import training
from flax_resnet.cli import main as cli_main
from flax_resnet.train_cli import _dropped_note
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


def test_a_finished_run_says_so_and_prints_its_summary(tmp_path, capsys):
    npz = _write_npz(tmp_path / "tiny.npz")
    work = tmp_path / "run"
    args = ("--dataset", npz, "--arch", "resnet18", "--size", "16", "--workdir", work)
    rc, out, err = _train(capsys, *args)
    assert rc == 0, err
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


def test_images_left_out_of_each_epoch_are_counted(tmp_path, capsys):
    # The fine-tune block: 102 images at batch 64 used 64 a step and never said so.
    assert _dropped_note(102, 64, 38).startswith("38 of the 102 training images are left out of each epoch: every step takes a full batch of 64")
    assert _dropped_note(102, 64, 38).endswith("; --batch-size 51 uses every image")
    assert "--batch-size" not in _dropped_note(1437, 64, 29)  # digits: no batch in 33..64 divides 1437
    npz = _write_npz(tmp_path / "tiny.npz")  # 48 images, 80/20: 38 train, batch 12: 3 steps, 2 left out
    rc, out, err = _train(capsys, "--dataset", npz, "--arch", "resnet18", "--size", "16", "--workdir", tmp_path / "w")
    assert rc == 0 and "2 of the 38 training images are left out of each epoch" in err, err
    rc, out, err = _train(capsys, "--dataset", npz, "--arch", "resnet18", "--size", "16", "--workdir", tmp_path / "w2", "--batch-size", "19")
    assert rc == 0 and "left out" not in err, err


def test_orbax_waits_for_the_previous_save_are_not_printed(tmp_path, caplog, monkeypatch):
    from absl import logging as absl_logging
    from orbax.checkpoint import checkpoint_manager

    import flax_resnet

    monkeypatch.setattr(checkpoint_manager, "_WAIT_FOR_PREV_SAVE_WARNING_THRESHOLD_SECS", -1.0)  # every save would warn
    model = flax_resnet.resnet18(num_classes=2)
    state = training.create_train_state(model, jax.random.key(0), training.make_optimizer(), input_shape=(1, 16, 16, 3))
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
