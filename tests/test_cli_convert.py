"""``flax-resnet convert`` / ``inspect``: the round trip, and every bad input refused cleanly.

Each bad input must give a one-line ``flax-resnet convert: error: ...`` on
stderr, exit status 2, and write nothing (no output, no temporary file).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax_resnet import cli, torch_to_flax  # noqa: E402
from flax_resnet import io as checkpoint  # noqa: E402
from flax_resnet.io import formats  # noqa: E402
from flax.traverse_util import flatten_dict as _flatten  # noqa: E402


def sd_numpy(sd):
    return {k: v.detach().cpu().numpy().copy() for k, v in sd.items()}


@pytest.fixture(scope="module")
def r18():
    """A seeded resnet18 (10 classes) with calibrated BatchNorm: small and quick."""
    from parity.fixtures import reference_model

    return reference_model("resnet18", seed=7, num_classes=10, calibrate_size=32).state_dict()


@pytest.fixture
def good(r18, tmp_path):
    path = tmp_path / "good.pth"
    torch.save(r18, path)
    return path


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_refused(capsys, argv, *fragments, dst=None):
    """Exit 2, one error line naming the problem, and nothing written."""
    rc, out, err = run(capsys, *argv)
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"flax-resnet {argv[0]}: error: "), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    if dst is not None:
        dst = Path(dst)
        if not dst.is_dir():  # (an existing directory given as DST is left alone)
            assert not os.path.lexists(dst), f"{dst} was written"
        leftovers = [p.name for p in dst.parent.iterdir() if p.name.startswith(".")]
        assert not leftovers, f"temporary files left: {leftovers}"
    return lines[0]


# ---------------------------------------------------------------------------
# The round trip


def test_cli_round_trip_pth_msgpack_pth_is_bit_exact(capsys, tmp_path):
    """A training checkpoint (DataParallel prefixes, epoch/optimizer) -> msgpack -> .pth."""
    from parity.fixtures import reference_model

    model = reference_model("resnet50", seed=8, calibrate_size=32)
    sd = model.state_dict()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    src = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 90, "state_dict": {f"module.{k}": v for k, v in sd.items()}, "optimizer": opt.state_dict()}, src)

    rc, out, err = run(capsys, "convert", src, tmp_path / "r50.msgpack")
    assert rc == 0, err
    assert "resnet50" in out and "torchvision layout" in out and "1000 classes" in out and "25,557,032" in out
    assert " bytes " in out and " s" in out and "epoch, optimizer" in out

    rc, out, err = run(capsys, "convert", tmp_path / "r50.msgpack", tmp_path / "back.pth")
    assert rc == 0, err
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(back) == list(sd)  # same keys, same order, num_batches_tracked included
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    assert int(back["bn1.num_batches_tracked"]) == 3
    # and it loads strictly into the torch model again
    import torch_ref

    torch_ref.ResNet("resnet50").load_state_dict(back, strict=True)

    rc, out, err = run(capsys, "inspect", tmp_path / "r50.msgpack")
    assert rc == 0, err
    assert "resnet50" in out and "25,557,032" in out and "float32 x267" in out and "status        ok" in out


def test_cli_outputs_by_suffix(capsys, good, tmp_path, r18):
    want = torch_to_flax(sd_numpy(r18))
    for name, fmt in [("a.msgpack", "msgpack"), ("a.safetensors", "safetensors"), ("a.pt", "pth"), ("orbax_dir", "orbax"), ("a.npz", "npz")]:
        rc, out, err = run(capsys, "convert", good, tmp_path / name, "--json")
        assert rc == 0, err
        report = json.loads(out)
        assert report["format"] == fmt and report["arch"] == "resnet18" and report["num_classes"] == 10
        assert checkpoint.detect_format(tmp_path / name) == fmt
        _, variables = checkpoint.load(tmp_path / name)
        got = _flatten(variables)
        for k, v in _flatten(want).items():
            assert got[k].dtype == v.dtype and got[k].tobytes() == v.tobytes(), k
    # An existing empty directory is an Orbax target too.
    (tmp_path / "empty").mkdir()
    rc, out, err = run(capsys, "convert", good, tmp_path / "empty")
    assert rc == 0, err
    assert checkpoint.detect_format(tmp_path / "empty") == "orbax"
    # Flax-key safetensors on request; told apart from torch keys on read.
    rc, _, err = run(capsys, "convert", good, tmp_path / "flax.safetensors", "--layout", "flax")
    assert rc == 0, err
    assert checkpoint.read(tmp_path / "flax.safetensors").keys == "flax"
    assert checkpoint.read(tmp_path / "a.safetensors").keys == "torch"


def test_cli_force_overwrites(capsys, good, tmp_path, r18):
    dst = tmp_path / "out.msgpack"
    dst.write_bytes(b"old")
    assert_refused(capsys, ["convert", good, dst], "already exists", "--force")
    assert dst.read_bytes() == b"old"
    rc, _, err = run(capsys, "convert", good, dst, "--force")
    assert rc == 0, err
    assert checkpoint.read(dst).format == "msgpack"
    # Orbax directories too; replaced as a whole.
    orb = tmp_path / "orb"
    assert run(capsys, "convert", good, orb)[0] == 0
    assert_refused(capsys, ["convert", good, orb], "already exists", dst=orb)
    assert run(capsys, "convert", good, orb, "--force", "--dtype", "bfloat16")[0] == 0
    assert checkpoint.inspect(orb)["dtypes"] == {"bfloat16": 102}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_inspect_reports(capsys, good, tmp_path, r18):
    rc, out, err = run(capsys, "inspect", good)
    assert rc == 0, err
    for s in ("resnet18", "torchvision", "num_classes   10", "11,181,642", "float32 x102, int64 x20", "status        ok"):
        assert s in out, (s, out)
    rc, out, _ = run(capsys, "inspect", good, "--json")
    r = json.loads(out)
    assert r["arch"] == "resnet18" and r["num_params"] == 11_181_642 and r["num_batches_tracked"] == 3 and r["ok"]

    # Unusual content is reported, with exit status 1.
    sd = dict(r18)
    sd["layer1.0.conv1.weight"] = sd["layer1.0.conv1.weight"].clone()
    sd["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    sd["fc.weight"] = sd["fc.weight"].clone()
    sd["fc.weight"][1, 2] = float("inf")
    sd["head.extra.weight"] = torch.zeros(3)
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": sd, "epoch": 1}, bad)
    rc, out, _ = run(capsys, "inspect", bad)
    assert rc == 1
    assert "head.extra.weight" in out and "layer1.0.conv1.weight (1 NaN, 0 Inf" in out and "fc.weight (0 NaN, 1 Inf" in out
    assert "PROBLEMS" in out and "epoch" in out
    assert_refused(capsys, ["inspect", tmp_path / "missing.pth"], "no such file")


# ---------------------------------------------------------------------------
# Bad input: each refused with one line, exit 2, nothing written


class Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


@pytest.mark.parametrize("kind", ["in_state_dict", "raw_pickle", "legacy_torch_save"])
def test_malicious_pickle_is_refused_and_never_runs(capsys, tmp_path, r18, kind):
    marker = tmp_path / "PWNED"
    src = tmp_path / "evil.pth"
    if kind == "in_state_dict":
        torch.save({**r18, "fc.weight": Payload(str(marker))}, src)
    elif kind == "raw_pickle":
        src.write_bytes(pickle.dumps(Payload(str(marker))))
    else:
        torch.save({"state_dict": r18, "hook": Payload(str(marker))}, src, _use_new_zipfile_serialization=False)
    if kind == "raw_pickle":  # the payload is real: plain pickle runs it
        pickle.loads(src.read_bytes())
        assert marker.exists()
        marker.unlink()
    dst = tmp_path / "out.msgpack"
    assert_refused(capsys, ["convert", src, dst], "refused", "exec, which", "nothing in the file was executed", dst=dst)
    assert not marker.exists()
    assert_refused(capsys, ["inspect", src], "refused")
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(src)
    assert not marker.exists()


def test_malicious_pickle_subprocess_exit_code(tmp_path):
    marker = tmp_path / "PWNED"
    src = tmp_path / "evil.pt"
    src.write_bytes(pickle.dumps(Payload(str(marker))))
    dst = tmp_path / "out.msgpack"
    p = subprocess.run([sys.executable, "-m", "flax_resnet", "convert", str(src), str(dst)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p
    assert p.stdout == "" and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith("flax-resnet convert: error: ") and "refused" in p.stderr
    assert not marker.exists() and not dst.exists()


def _truncate(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".msgpack", ".npz"])
def test_truncated_file(capsys, good, tmp_path, suffix):
    src = tmp_path / f"full{suffix}"
    if suffix == ".pth":
        shutil.copy(good, src)
    else:
        assert run(capsys, "convert", good, src)[0] == 0
    _truncate(src, 0.6)
    dst = tmp_path / "out.safetensors"
    assert_refused(capsys, ["convert", src, dst], "corrupt or truncated", str(src), dst=dst)


def test_corrupt_files(capsys, good, tmp_path):
    dst = tmp_path / "out.msgpack"
    # safetensors whose JSON header is garbage
    st = tmp_path / "corrupt.safetensors"
    assert run(capsys, "convert", good, st)[0] == 0
    data = bytearray(st.read_bytes())
    data[9:40] = b"#" * 31
    st.write_bytes(bytes(data))
    assert_refused(capsys, ["convert", st, dst], "corrupt", dst=dst)
    # a torch zip whose pickle was overwritten
    pth = tmp_path / "corrupt.pth"
    import zipfile

    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(pth, "w") as zout:
        for item in zin.infolist():
            payload = zin.read(item)
            zout.writestr(item, b"\x80\x02garbage" if item.filename.endswith("data.pkl") else payload)
    assert_refused(capsys, ["convert", pth, dst], "corrupt", dst=dst)
    # an empty file
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert_refused(capsys, ["convert", empty, dst], "empty file", dst=dst)


@pytest.mark.parametrize("what", ["text", "random", "zip", "tensors", "list", "npz_object"])
def test_not_a_checkpoint(capsys, tmp_path, what):
    src = tmp_path / "thing.pth"
    expect = "not a checkpoint"
    if what == "text":
        src.write_text("just some notes\n")
    elif what == "random":
        src = tmp_path / "thing.bin"
        src.write_bytes(b"\x17" + np.random.default_rng(0).integers(0, 256, 4095, dtype=np.uint8).tobytes())
    elif what == "zip":
        import zipfile

        with zipfile.ZipFile(src, "w") as z:
            z.writestr("readme.txt", "hello")
        expect = "neither a PyTorch checkpoint nor an .npz"
    elif what == "tensors":  # a checkpoint, but of something else
        src = tmp_path / "bert.safetensors"
        from safetensors.numpy import save_file

        save_file({"encoder.layer.0.weight": np.zeros((4, 4), np.float32)}, str(src))
        expect = "not a ResNet state_dict"
    elif what == "list":
        torch.save([1, 2, 3], src)
        expect = "no model state_dict found"
    else:
        src = tmp_path / "obj.npz"
        np.savez(src, a=np.array([object()], dtype=object))
        expect = "unsafe"
    dst = tmp_path / "out.msgpack"
    assert_refused(capsys, ["convert", src, dst], expect, dst=dst)


def test_unknown_or_missing_architecture(capsys, good, tmp_path, r18):
    dst = tmp_path / "out.msgpack"
    assert_refused(capsys, ["convert", good, dst, "--arch", "resnet9"], "unknown architecture 'resnet9'", "resnet50", dst=dst)
    # No architecture in the table has these stage sizes.
    sd = {k: v for k, v in r18.items() if not k.startswith("layer4.1.")}
    src = tmp_path / "odd.pth"
    torch.save(sd, src)
    assert_refused(capsys, ["convert", src, dst], "no known architecture", "(2, 2, 2, 1)", dst=dst)
    # A keyed ResNet without the keys that say which one.
    sd = {k: v for k, v in r18.items() if not k.startswith("conv1.")}
    torch.save(sd, src)
    assert_refused(capsys, ["convert", src, dst], "no conv1.weight", dst=dst)
    # argparse errors are one line too (no usage block).
    for argv, needle in (([good, dst, "--arch"], "--arch: expected one argument"), ([good, dst, "--dtype", "float16"], "invalid choice: 'float16'"), ([good], "required: DST")):
        with pytest.raises(SystemExit) as e:
            cli.main(["convert"] + [str(a) for a in argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and not dst.exists()
        assert err.count("\n") == 1 and err.startswith("flax-resnet convert: error: ") and needle in err, err


def test_wrong_arch_lists_keys_and_shapes(capsys, good, tmp_path):
    dst = tmp_path / "out.msgpack"
    line = assert_refused(capsys, ["convert", good, dst, "--arch", "resnet34"], "cannot convert to resnet34", "which holds a resnet18", dst=dst)
    assert "80 missing key(s): layer1.2.conv1.weight, layer1.2.bn1.weight" in line and "... and 68 more" in line
    line = assert_refused(capsys, ["convert", good, dst, "--arch", "resnet50"], "165 missing key(s)", "24 shape mismatch(es)", dst=dst)
    assert "layer1.0.conv1.weight expected (64, 64, 1, 1) found (64, 64, 3, 3)" in line
    # The same from a Flax source (keys named by their Flax paths).
    mp = tmp_path / "r18.msgpack"
    assert run(capsys, "convert", good, mp)[0] == 0
    assert_refused(capsys, ["convert", mp, dst, "--arch", "resnet34"], "resnet34", "missing key(s)", "params/layer1/2/conv1/kernel", dst=dst)


def test_shape_mismatch(capsys, tmp_path, r18):
    sd = dict(r18)
    sd["fc.bias"] = torch.zeros(11)
    sd["layer2.0.bn2.running_var"] = torch.ones(64)
    src = tmp_path / "mis.pth"
    torch.save(sd, src)
    dst = tmp_path / "out"
    line = assert_refused(capsys, ["convert", src, dst], "2 shape mismatch(es)", "fc.bias expected (10,) found (11,)", dst=dst)
    assert "layer2.0.bn2.running_var expected (128,) found (64,)" in line
    # unexpected and missing keys too, all in the one line
    sd = dict(r18)
    sd["layer1.0.conv3.weight_typo"] = sd.pop("layer1.0.conv2.weight")
    torch.save(sd, src)
    assert_refused(capsys, ["convert", src, dst], "1 missing key(s): layer1.0.conv2.weight", "1 unexpected key(s): layer1.0.conv3.weight_typo", dst=dst)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_refused_unless_allowed(capsys, tmp_path, r18, value):
    sd = dict(r18)
    w = sd["layer3.1.bn2.running_var"].clone()
    w[5] = value
    sd["layer3.1.bn2.running_var"] = w
    src = tmp_path / "nan.safetensors"
    from safetensors.torch import save_file

    save_file(sd, str(src))
    dst = tmp_path / "out.msgpack"
    assert_refused(capsys, ["convert", src, dst], "non-finite values in layer3.1.bn2.running_var", "--allow-nonfinite", dst=dst)
    with pytest.raises(checkpoint.CheckpointError, match="non-finite"):
        checkpoint.load(src)
    rc, out, err = run(capsys, "convert", src, dst, "--allow-nonfinite")
    assert rc == 0, err
    _, v = checkpoint.load(dst, allow_nonfinite=True)
    got = v["batch_stats"]["layer3"]["1"]["bn2"]["var"][5]
    assert (np.isnan(got) and np.isnan(value)) or got == value
    # A Flax file with a non-finite value is refused as well.
    assert_refused(capsys, ["convert", dst, tmp_path / "again.pth"], "non-finite values in batch_stats/layer3/1/bn2/var", dst=tmp_path / "again.pth")


def test_missing_input(capsys, tmp_path):
    dst = tmp_path / "out.msgpack"
    assert_refused(capsys, ["convert", tmp_path / "nope.pth", dst], "nope.pth: no such file or directory", dst=dst)
    os.symlink(tmp_path / "gone.pth", tmp_path / "link.pth")
    assert_refused(capsys, ["convert", tmp_path / "link.pth", dst], "broken symbolic link", dst=dst)


def test_directory_where_a_file_is_expected(capsys, good, tmp_path):
    d = tmp_path / "somedir"
    d.mkdir()
    (d / "notes.txt").write_text("x")
    dst = tmp_path / "out.msgpack"
    assert_refused(capsys, ["convert", d, dst], "is a directory", "not a checkpoint file", dst=dst)
    # DST with a file suffix that is an existing directory (even with --force)
    out_dir = tmp_path / "weights.msgpack"
    out_dir.mkdir()
    assert_refused(capsys, ["convert", good, out_dir, "--force"], "is a directory", dst=out_dir)
    assert out_dir.is_dir() and not any(out_dir.iterdir())
    # A non-empty directory that is not an Orbax checkpoint is never replaced, even with --force.
    assert_refused(capsys, ["convert", good, d, "--force"], "not an Orbax checkpoint", dst=d)
    assert (d / "notes.txt").read_text() == "x"


def test_output_exists(capsys, good, tmp_path):
    for name in ("out.msgpack", "out.pth", "out.safetensors"):
        dst = tmp_path / name
        dst.write_text("precious")
        assert_refused(capsys, ["convert", good, dst], "already exists", dst=None)
        assert dst.read_text() == "precious"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_other_bad_arguments(capsys, good, tmp_path):
    assert_refused(capsys, ["convert", good, tmp_path / "out.txt"], "unknown output format '.txt'", dst=tmp_path / "out.txt")
    (tmp_path / "file").write_text("x")
    assert_refused(capsys, ["convert", good, tmp_path / "file" / "ckpt" / "out"], "file is not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "good.pth"]
    assert_refused(capsys, ["convert", good, tmp_path / "o.pth", "--layout", "seed"], "seed", "resnet50/101/152", dst=tmp_path / "o.pth")
    assert_refused(capsys, ["convert", good, tmp_path / "o.pth", "--layout", "flax"], "layout 'flax'", dst=tmp_path / "o.pth")


def test_failed_write_leaves_nothing(good, tmp_path, monkeypatch):
    """A failure half-way through writing leaves neither the output nor a temporary file."""

    def broken(tmp, variables, meta):
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(formats, "write_msgpack", broken)
    dst = tmp_path / "out.msgpack"
    with pytest.raises(OSError, match="disk full"):
        checkpoint.convert(good, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.pth"]
    # and an existing output survives a failed --force
    dst.write_text("old")
    with pytest.raises(OSError):
        checkpoint.convert(good, dst, force=True)
    assert dst.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.pth", "out.msgpack"]


def test_unwritable_output_is_one_line_naming_it(capsys, good, tmp_path, monkeypatch):
    """An OS error while writing (permissions, disk full) names DST, not the temporary file, in one line."""

    def denied(tmp, variables, meta):
        raise PermissionError(13, "Permission denied", str(tmp))

    monkeypatch.setattr(formats, "write_msgpack", denied)
    dst = tmp_path / "out.msgpack"
    line = assert_refused(capsys, ["convert", good, dst], f"{dst}: cannot write (Permission denied)", dst=dst)
    assert ".tmp-" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.pth"]


def test_training_run_orbax_checkpoint(capsys, r18, tmp_path):
    """A CheckpointManager step directory holding a whole train state converts to .pth."""
    import orbax.checkpoint as ocp

    variables = torch_to_flax(sd_numpy(r18))
    state = {"step": np.array(100), "params": variables["params"], "batch_stats": variables["batch_stats"], "opt_state": {"mu": variables["params"]}}
    with ocp.CheckpointManager(str(tmp_path / "ckpts"), item_names=("state", "meta")) as mgr:
        mgr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"epoch": 3})))
        mgr.wait_until_finished()
        state["params"] = {**state["params"], "fc": {"kernel": state["params"]["fc"]["kernel"] * 2, "bias": state["params"]["fc"]["bias"]}}
        mgr.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"epoch": 7})))
        mgr.wait_until_finished()
    step = tmp_path / "ckpts" / "3"
    rc, out, err = run(capsys, "convert", step, tmp_path / "trained.pth")
    assert rc == 0, err
    assert "from ['state']" in out and "step" in out and "opt_state" in out  # reported as ignored
    back = torch.load(tmp_path / "trained.pth", weights_only=True)
    for k, v in r18.items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(back[k], v), k
    # The manager's root directory: the latest step.
    report = checkpoint.inspect(tmp_path / "ckpts")
    assert report["ok"] and report["wrapper"] == "7/state" and report["arch"] == "resnet18"
    _, v = checkpoint.load(tmp_path / "ckpts")
    np.testing.assert_array_equal(v["params"]["fc"]["kernel"], variables["params"]["fc"]["kernel"] * 2)
