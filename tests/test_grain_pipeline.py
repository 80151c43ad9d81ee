"""The grain pipeline and ``flax-resnet train --data``: seeded augmentation, exact mid-epoch resume, converted weights.

Every command runs in this process (``cli.main``), so each train step compiles once.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

import flax_resnet
from flax_resnet import preprocess as pp
from flax_resnet.cli import main as cli_main
from flax_resnet.imagedata import pipeline, sources

pytest.importorskip("grain")
Image = pytest.importorskip("PIL.Image")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train/{circle,square} and val/{circle,square}: 24 + 6 JPEGs per class, 20x26 px, shapes in random colors."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 6)):
        for k, c in enumerate(("circle", "square")):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                yy, xx = np.mgrid[:20, :26]
                cy, cx = rng.integers(8, 12), rng.integers(9, 17)
                mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < 36) if k == 0 else ((abs(yy - cy) < 5) & (abs(xx - cx) < 5))
                a = np.where(mask[..., None], rng.integers(128, 256, 3), rng.integers(0, 80, 3)).astype(np.uint8)
                Image.fromarray(a).save(root / split / c / f"{i}.jpg", quality=95)
    return root


def _recipe(augment="standard", size=16, on_bad="error"):
    return pipeline.Recipe(size, augment, pp.IMAGENET_MEAN, pp.IMAGENET_STD, pipeline.eval_preprocess(pp.Preprocess(), size), on_bad)


def _epochs(records, recipe, n_epochs, seed=0, workers=0, batch=8):
    s = pipeline.TrainStream(records, recipe, batch, seed=seed, workers=workers)
    return [list(s.batches()) for _ in range(n_epochs)]


def test_augmentation_is_seeded_and_independent_of_workers(folder):
    train = sources.open_splits(str(folder)).train.records
    a = _epochs(train, _recipe(), 2)
    b = _epochs(train, _recipe(), 2)
    c = _epochs(train, _recipe(), 1, seed=1)
    assert [len(e) for e in a] == [6, 6]  # 48 images // 8
    x0, y0 = a[0][0]
    assert x0.shape == (8, 16, 16, 3) and x0.dtype == np.float32 and y0.dtype == np.int32
    for ea, eb in zip(a, b):
        for (xa, ya), (xb, yb) in zip(ea, eb):
            assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert not np.array_equal(a[0][0][0], c[0][0][0])
    assert not np.array_equal(a[0][0][0], a[1][0][0])  # each epoch its own order and crops
    labels = np.concatenate([y for _, y in a[0]])
    assert sorted(np.bincount(labels)) == [24, 24]  # one epoch sees every image once (none dropped: 48 % 8 == 0)
    # Worker processes produce the same batches (grain's per-record generators).
    w = _epochs(train, _recipe(), 1, workers=1)
    assert all(np.array_equal(xa, xw) for (xa, _), (xw, _) in zip(a[0], w[0]))


def test_stream_state_resumes_mid_epoch(folder):
    train = sources.open_splits(str(folder)).train.records
    full = _epochs(train, _recipe("light"), 2, batch=10)  # 4 batches an epoch, 8 images dropped
    s = pipeline.TrainStream(train, _recipe("light"), 10)
    it = s.batches()
    head = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(s.state()))  # as the checkpoint's JSON meta stores it
    assert (state["epoch"], state["step"], state["pos"]) == (0, 3, 30)
    r = pipeline.TrainStream(train, _recipe("light"), 10)
    r.restore(state)
    rest = list(r.batches()) + list(r.batches())
    for (xa, ya), (xb, yb) in zip(full[0] + full[1], head + rest):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    assert len(head + rest) == 8


def test_rrc_box_follows_torchvision():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = pipeline.rrc_box(30, 40, (0.08, 1.0), pipeline.RATIO, rng)
        assert 0 <= top <= 30 - h and 0 <= left <= 40 - w and 0.08 * 1200 * 0.8 <= h * w <= 1200
        assert 3 / 4 - 0.2 <= w / h <= 4 / 3 + 0.2
    # An image no allowed crop fits: torchvision's fallback, the central crop at the nearest ratio.
    assert pipeline.rrc_box(1, 40, (0.08, 1.0), pipeline.RATIO, rng) == (0, 19, 1, 1)
    assert pipeline.rrc_box(40, 1, (0.9, 1.0), pipeline.RATIO, rng) == (19, 0, 1, 1)


def test_eval_and_none_use_the_weights_preprocessing(folder):
    splits = sources.open_splits(str(folder))
    timm = pp.timm_preset({"input_size": (3, 224, 224), "crop_pct": 0.95, "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.25,) * 3}, "timm")
    ep = pipeline.eval_preprocess(timm, 16)
    assert (ep.resize, ep.crop, ep.interpolation, ep.mean) == (17, 16, "bicubic", (0.5,) * 3)  # 235/224 of 16
    assert (pipeline.eval_preprocess(pp.Preprocess(), 32).resize, pipeline.eval_preprocess(pp.Preprocess(), 32).crop) == (37, 32)
    recipe = pipeline.Recipe(16, "none", ep.mean, ep.std, ep)
    (x, y), = list(pipeline.eval_batches(splits.val.records, recipe, 12))
    path, label = splits.val.records[5]
    with Image.open(path) as im:
        want = pp.apply(np.asarray(im.convert("RGB")), ep)
    assert np.array_equal(x[5], want) and y[5] == label and x.shape == (12, 16, 16, 3)
    s = pipeline.TrainStream(splits.val.records, recipe, 12, seed=0)
    xs, ys = next(s.batches())
    i = int(np.flatnonzero([np.array_equal(a, want) for a in xs])[0])  # "none": the eval transform, shuffled
    assert ys[i] == label


def test_bad_image_mid_stream_error_and_skip(tmp_path, folder):
    root = tmp_path / "f"
    shutil.copytree(folder / "train", root)
    bad = root / "circle" / "3.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    records = sources.open_splits(str(root)).train.records
    with pytest.raises(pipeline.BadImage, match=rf"{bad}: not a readable image \(OSError: image file is truncated"):
        _epochs(records, _recipe(), 1)
    s = pipeline.TrainStream(records, _recipe(on_bad="skip"), 8)
    epoch = list(s.batches())
    assert len(epoch) == 5 and s.skipped and str(bad) in s.skipped[0]  # 44 images: the epoch's last batch lacks one
    assert len(list(s.batches())) == 5 and len(s.skipped) == 2  # every epoch meets it again


# ------------------------------------------------------------------ the train command


def _train(capsys, folder, work, *extra):
    argv = ["train", "--data", str(folder), "--size", "16", "--epochs", "2", "--batch-size", "8", "--eval-batch-size", "8",
            "--lr", "0.05", "--workers", "0", "--progress", "off", "--workdir", str(work), *extra]
    rc = cli_main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _params(work):
    return jax.tree.leaves(jax.device_get(flax_resnet.load(str(work / "checkpoints"))[1]))


@pytest.mark.slow  # ~1-2 min on 2 idle cores (3 short runs); the stream's own resume is test_stream_state_resumes_mid_epoch
def test_cli_folder_resume_mid_epoch_is_bit_identical(folder, tmp_path, capsys):
    rc, out, err = _train(capsys, folder, tmp_path / "whole", "--checkpoint-every", "2", "--arch", "resnet10t")
    assert rc == 0, err
    rc, out, err = _train(capsys, folder, tmp_path / "killed", "--checkpoint-every", "2", "--stop-after-steps", "9", "--arch", "resnet10t")
    assert rc == 0 and "stopped after 9 steps (--stop-after-steps)" in err, err
    # Epoch 1 has 6 steps: checkpoints after it (step 6) and mid-epoch 2 at step 8; step 9 is lost as in a kill.
    assert sorted(int(d) for d in os.listdir(tmp_path / "killed" / "checkpoints")) == [6, 8]
    rc, out, err = _train(capsys, folder, tmp_path / "killed", "--checkpoint-every", "2", "--arch", "resnet10t")
    assert rc == 0 and "resuming at step 3 of epoch 2" in err, err
    whole, resumed = _params(tmp_path / "whole"), _params(tmp_path / "killed")
    assert len(whole) == len(resumed) > 40
    assert all(np.array_equal(a, b) for a, b in zip(whole, resumed))
    meta = json.loads((tmp_path / "whole" / "checkpoints" / "12" / "meta" / "metadata").read_text())
    assert meta["config"]["classes"] == ["circle", "square"] and meta["epoch"] == 2
    # Another augmentation is another run: refused in one line, as another data source would be.
    rc, out, err = _train(capsys, folder, tmp_path / "whole", "--augment", "none", "--epochs", "3", "--arch", "resnet10t")
    assert rc == 2 and err.count("\n") == 1 and "--augment standard -> none" in err


@pytest.mark.slow
def test_cli_refuses_to_resume_on_other_data(folder, tmp_path, capsys):
    """A changed class list or another set of images is another run: refused in one line naming --data, nothing written."""
    data = tmp_path / "data"
    shutil.copytree(folder, data)
    rc, out, err = _train(capsys, data, tmp_path / "run", "--stop-after-steps", "1", "--checkpoint-every", "1", "--arch", "resnet10t")
    assert rc == 0, err
    saved = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
    for split in ("train", "val"):  # the class list: square -> box
        (data / split / "square").rename(data / split / "box")
    rc, out, err = _train(capsys, data, tmp_path / "run", "--arch", "resnet10t")
    assert rc == 2 and err.count("\n") == 1 and "holds another run (--data " in err and "use --no-resume" in err, err
    for split in ("train", "val"):  # the classes back, one image fewer
        (data / split / "box").rename(data / split / "square")
    (data / "train" / "square" / "0.jpg").unlink()
    rc, out, err = _train(capsys, data, tmp_path / "run", "--arch", "resnet10t")
    assert rc == 2 and "holds another run (--data " in err, err
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == saved


def test_cli_datasets_dir_from_converted_weights(tmp_path, capsys):
    """A ``datasets`` save_to_disk directory, fine-tuned from torch weights converted on load (--init a .pth)."""
    datasets = pytest.importorskip("datasets")
    torch = pytest.importorskip("torch")
    model = flax_resnet.resnet10t(num_classes=5)
    variables = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
    rng = np.random.default_rng(0)

    def fill(path, s):  # random weights; BN variances positive
        x = (rng.normal(size=s.shape) * 0.05).astype(np.float32)
        return np.abs(x) + 1 if jax.tree_util.keystr(path).endswith("['var']") else x

    variables = jax.tree_util.tree_map_with_path(fill, variables)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in flax_resnet.flax_to_torch(variables).items()}
    torch.save(sd, tmp_path / "r10t.pth")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["dark", "light"])})
    labels = [i % 2 for i in range(40)]
    imgs = [Image.fromarray(np.full((18, 22, 3), 30 + 180 * l, np.uint8)) for l in labels]
    datasets.Dataset.from_dict({"image": imgs, "label": labels}, features=feats).save_to_disk(str(tmp_path / "ds"))
    rc, out, err = _train(capsys, tmp_path / "ds", tmp_path / "run", "--init", str(tmp_path / "r10t.pth"), "--epochs", "1", "--freeze-backbone")
    assert rc == 0, err
    assert "ImageData('ds', train=36, val=4, size=16, classes=2" in err  # a seeded 10% split: no validation split saved
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["epoch"] == 1 and np.isfinite(rec["train_loss"])


def test_cli_data_errors_are_one_line(tmp_path, capsys, folder):
    rc, _, err = _train(capsys, tmp_path / "nope", tmp_path / "w")
    assert rc == 2 and "no such data directory or file" in err and err.count("\n") == 1
    rc, _, err = _train(capsys, folder, tmp_path / "w", "--dataset", "digits2")
    assert rc == 2 and "--data and --dataset name the same thing" in err
    (tmp_path / "e" / "a").mkdir(parents=True)
    (tmp_path / "e" / "b").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "e" / "a" / "x.png")
    rc, _, err = _train(capsys, tmp_path / "e", tmp_path / "w")
    assert rc == 2 and err.endswith("empty class folder (no .jpg/.jpeg/.png/.ppm/.bmp/.pgm/.tif/.tiff/.webp files); remove it or add images\n")


@pytest.mark.slow
def test_two_class_digits_folder_reaches_95_percent(tmp_path, capsys):
    """The docs' acceptance run: digits 0 and 1 as 32 px PNGs, from a converted (random) torch resnet18: >= 95% validation accuracy."""
    torch = pytest.importorskip("torch")
    import torch_ref
    from flax_resnet.imagedata import synthetic

    torch.manual_seed(0)
    torch.save(torch_ref.resnet18().state_dict(), tmp_path / "resnet18-random.pth")
    synthetic.digits_folder(str(tmp_path / "d"), (0, 1), size=32)
    rc, out, err = _train(capsys, tmp_path / "d", tmp_path / "run", "--init", str(tmp_path / "resnet18-random.pth"), "--size", "32",
                          "--batch-size", "16", "--eval-batch-size", "72", "--augment", "light", "--epochs", "6", "--lr", "0.01")
    assert rc == 0, err
    assert "ImageData('d', train=288, val=72, size=32, classes=2" in err
    assert json.loads(out.strip().splitlines()[-1])["best_test_accuracy"] >= 0.95


def _two_hosts(argv):
    """Runs ``argv`` as processes 0 and 1 of a ``jax.distributed`` run on localhost (coordinator from the environment)."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(2):
        env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid), FLAX_RESNET_DISTRIBUTED="1", XLA_FLAGS="--xla_force_host_platform_device_count=2")
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        results = [p.communicate(timeout=900) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for pid, (p, (out, err)) in enumerate(zip(procs, results)):
        assert p.returncode == 0, f"process {pid}: {err[-3000:]}"
    return [out for out, _ in results], [err for _, err in results]


TWO_HOST_STREAM = """
import json
import numpy as np
from flax_resnet import training
assert training.initialize_distributed()
import jax
from flax_resnet import preprocess as pp
from flax_resnet.imagedata import pipeline, sources

n = 24
images = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None, None], 8, 1).repeat(8, 2).repeat(3, 3)
records = sources.ArrayRecords(images, np.arange(n))  # label = record index
recipe = pipeline.Recipe(8, "none", (0.0,) * 3, (1.0,) * 3, pipeline.eval_preprocess(pp.Preprocess(mean=(0.0,) * 3, std=(1.0,) * 3), 8))
stream = pipeline.TrainStream(records, recipe, 4, seed=0)
epochs = [[b[1].tolist() for b in stream.batches()] for _ in range(2)]
x, y = next(pipeline.TrainStream(records, recipe, 4, seed=0).batches())
mesh = training.make_mesh()
gx, gy = training.place_local_batch(mesh, x, y)
from jax.experimental import multihost_utils
rows = multihost_utils.process_allgather(gy, tiled=True).tolist()
assert np.rint(np.asarray(multihost_utils.process_allgather(gx, tiled=True))[:, 0, 0, 0] * 255).astype(int).tolist() == rows  # pixels travel with labels
evals = [int(r[1]) for r in pipeline.eval_shard(records)]
print("RESULT " + json.dumps({"epochs": epochs, "global": rows, "eval": evals, "devices": [len(jax.devices()), len(jax.local_devices())]}))
"""


@pytest.mark.slow
def test_two_hosts_read_disjoint_shards_into_one_global_batch(tmp_path):
    """Under jax.distributed each process reads only its shard (ShardByJaxProcess) and passes its rows of the global batch."""
    script = tmp_path / "stream.py"
    script.write_text(TWO_HOST_STREAM)
    outs, _ = _two_hosts([sys.executable, str(script)])
    r = [json.loads([line for line in out.splitlines() if line.startswith("RESULT ")][-1][7:]) for out in outs]
    assert r[0]["devices"] == r[1]["devices"] == [4, 2]
    for epoch in range(2):
        seen = [sum(host["epochs"][epoch], []) for host in r]
        assert [len(s) for s in seen] == [12, 12] and sorted(seen[0] + seen[1]) == list(range(24)), seen  # disjoint, all read
    assert r[0]["epochs"][0] != r[0]["epochs"][1]  # reshuffled each epoch
    assert r[0]["global"] == r[1]["global"] == r[0]["epochs"][0][0] + r[1]["epochs"][0][0]  # host 0's rows, then host 1's
    assert sorted(r[0]["eval"] + r[1]["eval"]) == list(range(24)) and not set(r[0]["eval"]) & set(r[1]["eval"])


@pytest.mark.slow
def test_cli_folder_on_two_hosts(folder, tmp_path):
    """flax-resnet train --data on two processes (jax.distributed on localhost), each batch split over two CPU devices per host."""
    cmd = [sys.executable, "-m", "flax_resnet", "train", "--data", str(folder), "--arch", "resnet10t", "--size", "16", "--epochs", "1",
           "--batch-size", "8", "--eval-batch-size", "8", "--workers", "1", "--progress", "off", "--distributed", "--workdir", str(tmp_path / "w")]
    outs, errs = _two_hosts(cmd)
    for pid, err in enumerate(errs):
        assert f"jax.distributed: process {pid} of 2" in err, err[-3000:]
    assert "4 cpu device(s), batch 8" in errs[0] and "6 steps/epoch" in errs[0], errs[0]  # 48 images: 24 per host, 4 rows each per step
    summary = json.loads(outs[0].strip().splitlines()[-1])
    assert summary["epochs"] == 1 and 0.0 <= summary["best_test_accuracy"] <= 1.0
    model, variables = flax_resnet.load(str(tmp_path / "w" / "checkpoints"))  # one checkpoint, written by both processes together
    assert model.num_classes == 2 and all(np.isfinite(a).all() for a in jax.tree.leaves(variables))
