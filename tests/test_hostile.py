"""Hostile and broken checkpoint files, faults while writing, Ctrl-C: one line, the right exit status, nothing left.

Every hostile file is built here. Readers that could crash the interpreter
(a forged pickle) run in a subprocess, so a SIGSEGV shows as a negative
return code instead of killing the test run. Models are resnet18-sized
random state_dicts (no torch model needed).
"""

from __future__ import annotations

import io
import os
import pickle
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from flax_resnet import cli
from flax_resnet import io as ckio
from flax_resnet.convert import ModelConfig, leaves

ROOT = Path(__file__).resolve().parents[1]


def random_state_dict(arch="resnet18", layout="torchvision", num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    sd = {}
    for leaf in leaves(ModelConfig(arch, layout, num_classes, 3)):
        a = rng.standard_normal(leaf.torch_shape).astype(np.float32)
        sd[leaf.torch_key] = np.abs(a) + 0.5 if leaf.torch_key.endswith("running_var") else a
    return sd


@pytest.fixture(scope="module")
def sd18():
    return random_state_dict()


@pytest.fixture
def good(sd18, tmp_path):
    path = tmp_path / "good.safetensors"
    ckio.save(path, sd18)
    return path


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def run_sub(*argv, code=None, timeout=120, **kwargs):
    """``python -m flax_resnet ARGV`` (or ``python -c CODE``) in a subprocess."""
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "flax_resnet", *map(str, argv)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env, **kwargs)


def assert_one_line(rc, out, err, status, *fragments, prefix="flax-resnet convert: "):
    lines = err.strip().splitlines()
    assert rc == status, (rc, out, err[-3000:])
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(prefix), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def assert_no_leftovers(directory: Path, *expected: str):
    assert sorted(p.name for p in directory.iterdir()) == sorted(expected)


# ---------------------------------------------------------------------------
# Pickles


def _unicode(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def forged_object_scalar() -> bytes:
    """``scalar(dtype("O") with ObjectDType.__setstate__ clearing its flags, b"AAAAAAAA")``: a forged PyObject*."""
    out = b"\x80\x02cnumpy._core.multiarray\nscalar\n"
    out += b"cnumpy\ndtype\n" + _unicode("O") + b"\x89\x88\x87R"  # numpy.dtype("O", False, True)
    # BUILD -> ObjectDType.__setstate__((3, "|", None, None, None, -1, -1, flags=1)): no NPY_LIST_PICKLE flag any more
    out += b"(K\x03" + _unicode("|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x01tb"
    out += b"c_codecs\nencode\n" + _unicode("AAAAAAAA") + _unicode("latin1") + b"\x86R\x86R."
    return out


def as_zip_pth(pickled: bytes, path: Path) -> Path:
    """``pickled`` as the data.pkl of a torch.save zip archive."""
    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save({"epoch": 1}, buf)
    template = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(path, "w") as z:
        for name in template.namelist():
            z.writestr(name, pickled if name.endswith("/data.pkl") else template.read(name))
    return path


def test_forged_numpy_object_scalar_crashes_pickle_but_no_reader(tmp_path):
    pytest.importorskip("torch")
    legacy = tmp_path / "evil.pth"
    legacy.write_bytes(forged_object_scalar())
    # The file is really hostile: plain pickle dies of it.
    crash = run_sub(code=f"import pickle; pickle.loads(open({str(legacy)!r}, 'rb').read())")
    assert crash.returncode < 0, (crash.returncode, crash.stderr[-500:])
    zipped = as_zip_pth(forged_object_scalar(), tmp_path / "evil_zip.pt")
    dst = tmp_path / "out.msgpack"
    # Every reader, in one subprocess (a crash would end it with a negative status): convert, inspect, load.
    code = f"""
import sys, flax_resnet
from flax_resnet import cli
codes = [cli.main(["convert", {str(legacy)!r}, {str(dst)!r}]), cli.main(["convert", {str(zipped)!r}, {str(dst)!r}])]
codes.append(cli.main(["inspect", {str(legacy)!r}]))
for src in ({str(legacy)!r}, {str(zipped)!r}):
    try:
        flax_resnet.load(src)
        codes.append(0)
    except flax_resnet.CheckpointError as e:
        print(e, file=sys.stderr)
        codes.append(2)
print(codes)
"""
    p = run_sub(code=code)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert p.stdout.strip() == "[2, 2, 2, 2, 2]", p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 5, p.stderr
    starts = ("flax-resnet convert: error: ", "flax-resnet convert: error: ", "flax-resnet inspect: error: ", "", "")
    for line, start, src in zip(lines, starts, (legacy, zipped, legacy, legacy, zipped)):
        assert line.startswith(f"{start}{src}: "), line
        assert "refused numpy.dtype('O')" in line and "nothing in the file was executed" in line, line
    assert_no_leftovers(tmp_path, "evil.pth", "evil_zip.pt")


def test_numpy_dtype_classes_stay_refused(capsys, tmp_path):
    """``numpy.dtypes.ObjectDType`` (and every DType class) is not allowed at all."""
    pytest.importorskip("torch")
    src = tmp_path / "evil.pth"
    src.write_bytes(b"\x80\x02cnumpy.dtypes\nObjectDType\n)R.")
    rc, out, err = run_cli(capsys, "inspect", src)
    assert_one_line(rc, out, err, 2, "numpy.dtypes.ObjectDType", "nothing in the file was executed", prefix="flax-resnet inspect: ")


def test_genuine_training_checkpoint_with_numpy_scalars_loads(capsys, sd18, tmp_path):
    """What Lightning/timm-style checkpoints carry next to the weights: numpy scalars, a Namespace."""
    torch = pytest.importorskip("torch")
    import argparse

    src = tmp_path / "last.ckpt"
    hparams = {"lr": np.float64(0.1), "epochs": np.int64(90), "ema": np.bool_(True), "scale": np.float32(0.5), "c": np.complex64(1j)}
    torch.save(
        {
            "epoch": 3,
            "state_dict": {f"model.{k}": torch.from_numpy(v) for k, v in sd18.items()},
            "hyper_parameters": hparams,
            "callbacks": {"ModelCheckpoint": {"best_model_score": np.float64(0.93)}},
            "args": argparse.Namespace(arch="resnet18", lr=np.float64(0.1)),
        },
        src,
    )
    _, variables = ckio.load(src)
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], sd18["fc.weight"].T)
    rc, out, err = run_cli(capsys, "inspect", src)
    assert rc == 0, err
    assert "epoch, hyper_parameters, callbacks, args" in out and "prefix 'model.'" in out


def test_zip_pth_with_a_flipped_byte_is_refused(capsys, sd18, tmp_path):
    torch = pytest.importorskip("torch")
    src = tmp_path / "flipped.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd18.items()}, src)
    with zipfile.ZipFile(src) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 1000)
    data = bytearray(src.read_bytes())
    data[info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 100] ^= 0x10  # inside the tensor's bytes
    src.write_bytes(bytes(data))
    dst = tmp_path / "out.npz"
    rc, out, err = run_cli(capsys, "convert", src, dst)
    assert_one_line(rc, out, err, 2, str(src), "Bad CRC-32")
    assert_no_leftovers(tmp_path, "flipped.pth")


def test_torch_file_named_safetensors_is_read_by_content(capsys, sd18, tmp_path):
    torch = pytest.importorskip("torch")
    src = tmp_path / "actually_torch.safetensors"
    torch.save({k: torch.from_numpy(v) for k, v in sd18.items()}, src)
    rc, out, err = run_cli(capsys, "convert", src, tmp_path / "out.msgpack")
    assert rc == 0, err
    assert "(pth, torch keys)" in out
    _, v = ckio.load(tmp_path / "out.msgpack")
    np.testing.assert_array_equal(v["params"]["conv1"]["kernel"], sd18["conv1.weight"].transpose(2, 3, 1, 0))


@pytest.mark.parametrize("kind", ["float8", "meta", "sparse"])
def test_unreadable_tensor_kinds_are_named(capsys, sd18, tmp_path, kind):
    torch = pytest.importorskip("torch")
    tensors = {k: torch.from_numpy(v) for k, v in sd18.items()}
    w = tensors["layer1.0.conv1.weight"]
    tensors["layer1.0.conv1.weight"] = {
        "float8": lambda: w.to(torch.float8_e4m3fn),
        "meta": lambda: w.to("meta"),
        "sparse": lambda: w.reshape(w.shape[0], -1).to_sparse(),
    }[kind]()
    src = tmp_path / f"{kind}.pth"
    torch.save(tensors, src)
    rc, out, err = run_cli(capsys, "convert", src, tmp_path / "out.msgpack")
    assert_one_line(rc, out, err, 2, str(src), "layer1.0.conv1.weight", {"float8": "float8", "meta": "meta", "sparse": "sparse"}[kind])
    assert_no_leftovers(tmp_path, src.name)


# ---------------------------------------------------------------------------
# Other formats


def test_msgpack_nested_500_deep_is_one_line(capsys, tmp_path):
    import msgpack

    tree: dict = {}
    node = tree
    for _ in range(500):
        node["a"] = {}
        node = node["a"]
    src = tmp_path / "deep.msgpack"
    src.write_bytes(msgpack.packb(tree))
    assert src.stat().st_size < 2000
    for cmd in (["convert", src, tmp_path / "out.npz"], ["inspect", src]):
        rc, out, err = run_cli(capsys, *cmd)
        assert_one_line(rc, out, err, 2, str(src), "nested more than", prefix=f"flax-resnet {cmd[0]}: ")
    assert_no_leftovers(tmp_path, "deep.msgpack")


def test_npz_deflate_bomb_refused_before_inflating(capsys, sd18, tmp_path, monkeypatch):
    """An .npz whose headers declare more bytes than its architecture holds is refused from the headers alone."""
    src = tmp_path / "bomb.npz"
    arrays = {k: np.zeros_like(v) for k, v in sd18.items()}  # only the shapes matter
    arrays["fc.weight"] = np.zeros((10, 1_500_000), np.float32)  # 60 MB more than the 10 x 512 fc: 105 MB in all (a resnet18 holds 90 MB as float64)
    np.savez_compressed(src, **arrays)
    del arrays
    assert src.stat().st_size < 1e6

    def no_inflating(*args, **kwargs):
        raise AssertionError("np.load was called")

    monkeypatch.setattr(np, "load", no_inflating)
    rc, out, err = run_cli(capsys, "convert", src, tmp_path / "out.msgpack")
    assert_one_line(rc, out, err, 2, str(src), "'fc.weight'", "refused before inflating")
    assert_no_leftovers(tmp_path, "bomb.npz")


def test_nan_num_batches_tracked_is_one_line(capsys, sd18, tmp_path):
    torch = pytest.importorskip("torch")
    tensors = {k: torch.from_numpy(v) for k, v in sd18.items()}
    tensors["bn1.num_batches_tracked"] = torch.tensor(float("nan"))
    src = tmp_path / "nbt.pth"
    torch.save(tensors, src)
    rc, out, err = run_cli(capsys, "convert", src, tmp_path / "out.msgpack")
    assert_one_line(rc, out, err, 2, str(src), "bn1.num_batches_tracked", "whole number", "nan")


def test_metadata_num_batches_tracked_not_a_number(capsys, sd18, tmp_path):
    src = tmp_path / "meta.msgpack"
    ckio.save(src, sd18, meta={"num_batches_tracked": "lots"})
    rc, out, err = run_cli(capsys, "convert", src, tmp_path / "out.pth")
    assert_one_line(rc, out, err, 2, str(src), "num_batches_tracked", "'lots'")
    assert_no_leftovers(tmp_path, "meta.msgpack")


def test_truncated_orbax_input_is_one_line(sd18, tmp_path):
    src = tmp_path / "ckpt"
    ckio.save(src, sd18)
    data = sorted((f for f in src.rglob("*") if f.is_file() and f.stat().st_size > 100_000), key=lambda f: f.stat().st_size)[-1]
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    p = run_sub("convert", src, tmp_path / "out.safetensors")
    assert_one_line(p.returncode, p.stdout, p.stderr, 2, str(src), "cannot restore the Orbax checkpoint")
    assert not (tmp_path / "out.safetensors").exists()


# ---------------------------------------------------------------------------
# Writing: unwritable, disk full, stale temporaries, missing parents


def test_orbax_output_in_unwritable_directory_fails_fast(good, tmp_path):
    """A DST directory the process may not write to: one line at once, no Orbax tracebacks, no hang.

    Root ignores permission bits, so as root the directory is made immutable (``chattr +i``) instead.
    """
    import shutil

    out_dir = tmp_path / "ro"
    out_dir.mkdir()
    if os.geteuid() == 0:
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(out_dir)], capture_output=True).returncode:
            pytest.skip("running as root on a file system without chattr +i: no directory is unwritable")
        undo = ["chattr", "-i", str(out_dir)]
    else:
        out_dir.chmod(0o555)
        undo = ["chmod", "755", str(out_dir)]
    try:
        p = run_sub("convert", good, out_dir / "ckpt", timeout=60)
        assert_one_line(p.returncode, p.stdout, p.stderr, 2, str(out_dir / "ckpt"), "cannot write")
        assert list(out_dir.iterdir()) == []
    finally:
        subprocess.run(undo, check=True)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # tensorstore threads after Orbax's failure
@pytest.mark.parametrize("suffix", [".pth", ""])
def test_disk_full_while_writing(capsys, good, tmp_path, suffix):
    """A write that the OS refuses half-way (RLIMIT_FSIZE: EFBIG, as ENOSPC would be) is one line, nothing left."""
    if suffix == ".pth":
        pytest.importorskip("torch")
    import resource

    dst = tmp_path / f"out{suffix}"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        rc, out, err = run_cli(capsys, "convert", good, dst)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert_one_line(rc, out, err, 2, str(dst), "File too large")
    assert_no_leftovers(tmp_path, "good.safetensors")


def test_stale_temporaries_of_dead_writers_are_cleaned(capsys, good, tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale_file = tmp_path / f".out.msgpack.tmp-{dead.pid}-0123abcd"
    stale_file.write_bytes(b"half")
    stale_old = tmp_path / f".out.msgpack.tmp-{dead.pid}-89abcdef.old"
    stale_old.mkdir()
    live = tmp_path / f".out.msgpack.tmp-{os.getpid()}-deadbeef"  # a live writer (this process) is left alone
    live.write_bytes(b"busy")
    other = tmp_path / f".other.msgpack.tmp-{dead.pid}-0123abcd"  # another target's: not ours to clean
    other.write_bytes(b"x")
    rc, out, err = run_cli(capsys, "convert", good, tmp_path / "out.msgpack")
    assert rc == 0, err
    assert_no_leftovers(tmp_path, "good.safetensors", "out.msgpack", live.name, other.name)


def test_missing_parent_directories_are_created(capsys, good, tmp_path):
    dst = tmp_path / "ckpt" / "runs" / "resnet18"
    rc, out, err = run_cli(capsys, "convert", good, dst)
    assert rc == 0, err
    assert ckio.detect_format(dst) == "orbax"
    # A failed write removes the directories it created.
    bad = tmp_path / "new" / "deeper" / "x.pth"
    rc, out, err = run_cli(capsys, "convert", good, bad, "--layout", "seed")
    assert rc == 2
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------
# Ctrl-C


def test_ctrl_c_during_read_is_one_line_exit_130_even_inside_a_gc_callback(good, tmp_path):
    """SIGINT arriving in a garbage-collection callback (as in JAX's) is not swallowed: exit 130, nothing written."""
    dst = tmp_path / "out.msgpack"
    code = f"""
import gc, os, signal, sys
import flax_resnet.io.formats as formats
from flax_resnet import cli

def interrupt_in_gc(phase, info):
    if phase == "start" and armed:
        del armed[:]
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # let the signal handler run here, inside the callback
            pass

armed = []
read = formats.READERS["safetensors"]

def reading(p):
    armed.append(1)
    gc.callbacks.append(interrupt_in_gc)
    gc.collect()
    return read(p)

formats.READERS["safetensors"] = reading
sys.exit(cli.main(["convert", {str(good)!r}, {str(dst)!r}]))
"""
    p = run_sub(code=code)
    assert_one_line(p.returncode, p.stdout, p.stderr, 130, "interrupted")
    assert p.stdout == ""
    assert_no_leftovers(tmp_path, "good.safetensors")


# ---------------------------------------------------------------------------
# One finite rule: parity --weights


@pytest.mark.parametrize("where", ["conv1.weight", "bn1.running_var"])
def test_parity_weights_nonfinite_is_bad_input(capsys, sd18, tmp_path, where):
    pytest.importorskip("torch")
    from parity import cli as parity_cli

    sd = dict(sd18)
    sd[where] = sd[where].copy()
    sd[where].reshape(-1)[0] = np.nan if where == "conv1.weight" else np.inf
    src = tmp_path / "w.safetensors"
    ckio.save(src, sd, allow_nonfinite=True)
    rc = parity_cli.main(["--weights", str(src), "--size", "32", "32", "--mode", "eval"])
    out, err = capsys.readouterr()
    assert_one_line(rc, out, err, 2, str(src), where, "non-finite", prefix="parity: error: ")
