"""flax_resnet.io: every source format of every depth to every output format, and back.

For resnet50/101/152 (torchvision layout), a seeded reference model with
calibrated BatchNorm is saved as a ``.pth`` and a ``.safetensors`` file;
each is converted to each output format and loaded back. The loaded
variables must equal the directly converted ones bit for bit, and one jitted
forward per depth checks the logits against a float64 torch run: the Flax
float32 error must be at most twice torch float32's own error, with the same
argmax. Torch outputs must read back bit-exactly, num_batches_tracked
included.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import flax_resnet  # noqa: E402
from flax_resnet import TORCHVISION_PARAM_COUNTS, torch_to_flax  # noqa: E402
from flax_resnet import io as checkpoint  # noqa: E402
from flax_resnet.io.resolve import nbt_from_torch  # noqa: E402
from flax.traverse_util import flatten_dict as _flatten  # noqa: E402

DEPTHS = ("resnet50", "resnet101", "resnet152")
# name -> (DST suffix, --layout)
OUTPUTS = {
    "msgpack": (".msgpack", None),
    "orbax": ("", None),
    "safetensors": (".safetensors", None),
    "safetensors-flax": (".safetensors", "flax"),
    "pth": (".pth", None),
    "npz": (".npz", None),
}
BATCH, SIZE = 2, 64


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A RAM-backed directory where available: the format matrix writes several GB."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="flax-resnet-test-", dir=shm))
    else:
        d = tmp_path_factory.mktemp("ckpt")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def state_dict_numpy(sd) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in sd.items()}


def assert_trees_equal(got, want, what=""):
    """Same leaves, same dtypes, same shapes, same bits."""
    g, w = _flatten(got), _flatten(want)
    assert set(g) == set(w), f"{what}: leaves differ: {sorted(set(g) ^ set(w))[:5]}"
    for k in w:
        a, b = np.asarray(g[k]), np.asarray(w[k])
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {'/'.join(k)} {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert a.tobytes() == b.tobytes(), f"{what}: {'/'.join(k)} differs"


def assert_state_dicts_equal(got, want, what="", ordered=True):
    """Same keys (in the same order), same dtypes and shapes, same bits (num_batches_tracked included)."""
    got = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)) for k, v in got.items()}
    assert set(got) == set(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))[:5]}"
    if ordered:
        assert list(got) == list(want), f"{what}: key order differs"
    for k, b in want.items():
        a = got[k]
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {k} {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert a.tobytes() == b.tobytes(), f"{what}: {k} differs"


class Case:
    """One depth: the reference model's weights, source files, torch logits and a jitted Flax forward."""

    def __init__(self, arch: str, workdir: Path):
        import jax
        from safetensors.torch import save_file

        from parity.fixtures import images, reference_model

        seed = DEPTHS.index(arch) + 10
        model = reference_model(arch, "torchvision", seed=seed, calibrate_size=32)
        self.arch = arch
        self.sd = state_dict_numpy(model.state_dict())
        self.expected = torch_to_flax(self.sd)
        self.files = {"pth": workdir / f"{arch}-src.pth", "safetensors": workdir / f"{arch}-src.safetensors"}
        torch.save(model.state_dict(), self.files["pth"])
        save_file(model.state_dict(), str(self.files["safetensors"]))

        x = images(BATCH, 3, SIZE, SIZE, seed=seed)
        with torch.no_grad():
            self.logits32 = model(x).numpy()
            self.logits64 = model.double()(x.double()).numpy()
        self.torch_err = float(np.abs(self.logits32 - self.logits64).max())
        self.x = np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))
        self.model = None
        self.fwd = None
        self.jax = jax

    def check_forward(self, model, variables) -> float:
        """Flax logits vs the float64 torch run; returns the Flax error."""
        if self.fwd is None:
            self.model = model
            self.fwd = self.jax.jit(lambda v, x: model.apply(v, x))
        assert model == self.model
        logits = np.asarray(self.fwd(variables, self.x))
        err = float(np.abs(logits - self.logits64).max())
        assert err <= 2 * self.torch_err, f"{self.arch}: Flax fp32 error {err:.3g} > 2 x torch fp32 error {self.torch_err:.3g}"
        np.testing.assert_array_equal(logits.argmax(-1), self.logits64.argmax(-1))
        print(f"{self.arch}: max |logit - torch float64|: Flax fp32 {err:.3g}, torch fp32 {self.torch_err:.3g}")
        return err


_CASES: dict[str, Case] = {}


@pytest.fixture
def case(request, workdir):
    arch = request.param
    if arch not in _CASES:
        _CASES.clear()  # one depth in memory at a time
        _CASES[arch] = Case(arch, workdir)
    return _CASES[arch]


# The formats at every depth; the extra ones (npz, Flax-key safetensors) at resnet50 only.
MATRIX = [
    pytest.param(arch, src, out, id=f"{arch}-{src}-{out}", marks=[pytest.mark.slow] if arch != "resnet50" else [])
    for arch, src, out in itertools.product(DEPTHS, ("pth", "safetensors"), OUTPUTS)
    if arch == "resnet50" or out not in ("npz", "safetensors-flax")
]


@pytest.mark.parametrize(("case", "src", "out"), MATRIX, indirect=["case"])
def test_convert_and_load_back(case, src, out, workdir):
    suffix, layout = OUTPUTS[out]
    dst = workdir / f"{case.arch}-{src}-{out}{suffix}"
    report = checkpoint.convert(case.files[src], dst, layout=layout)
    assert (report["arch"], report["num_classes"], report["src_format"]) == (case.arch, 1000, src)
    assert report["num_params"] == TORCHVISION_PARAM_COUNTS[case.arch]
    assert report["bytes"] > 3 * report["num_params"]  # Orbax compresses a little
    assert report["format"] == ("pth" if out == "pth" else out.split("-")[0])
    assert not [p for p in workdir.iterdir() if p.name.startswith(".")], "temporary files left behind"

    model, variables = checkpoint.load(dst)
    assert (model.arch, model.num_classes, model.conv_bias) == (case.arch, 1000, False)
    assert_trees_equal(variables, case.expected, f"{src} -> {out}")
    case.check_forward(model, variables)

    if out in ("safetensors", "pth", "npz"):  # torch layout: reads back as the source state_dict
        assert_state_dicts_equal(checkpoint.read_state_dict(dst), case.sd, f"{src} -> {out}", ordered=out != "safetensors")
    if out == "msgpack" and src == "pth":  # and on to .pth again: bit-exact
        back = workdir / f"{case.arch}-back.pth"
        checkpoint.convert(dst, back)
        assert_state_dicts_equal(torch.load(back, weights_only=True), case.sd, "pth -> msgpack -> pth")
        back.unlink()
    shutil.rmtree(dst) if dst.is_dir() else dst.unlink()


# ---------------------------------------------------------------------------
# Smaller models: layouts, dtypes, wrappers, metadata


@pytest.fixture(scope="module")
def seed50(workdir):
    """A seed-layout (conv biases, identity_downsample) resnet50 and its .pth."""
    from parity.fixtures import reference_model

    model = reference_model("resnet50", "seed", seed=3, num_classes=10, calibrate_size=32)
    path = workdir / "seed50.pth"
    torch.save(model.state_dict(), path)
    return model, state_dict_numpy(model.state_dict()), path


def test_seed_layout_round_trip(seed50, workdir):
    model, sd, path = seed50
    mp = workdir / "seed50.msgpack"
    r = checkpoint.convert(path, mp)
    assert (r["arch"], r["layout"], r["num_classes"]) == ("resnet50", "seed", 10)
    flax_model, variables = checkpoint.load(mp)
    assert flax_model.conv_bias
    assert_trees_equal(variables, torch_to_flax(sd), "seed -> msgpack")
    back = workdir / "seed50-back.pth"
    checkpoint.convert(mp, back)  # the variables' own layout: seed
    assert_state_dicts_equal(torch.load(back, weights_only=True), sd, "seed pth -> msgpack -> pth")

    # Exported to torchvision layout: biases folded into running_mean; loads strictly into torch.
    import torch_ref

    tv = workdir / "seed50-tv.safetensors"
    checkpoint.convert(mp, tv, layout="torchvision")
    tv_sd = checkpoint.read_state_dict(tv)
    assert not any(k.endswith(".bias") and ("conv" in k or "downsample.0" in k) for k in tv_sd)
    tv_model = torch_ref.ResNet("resnet50", num_classes=10, layout="torchvision").eval()
    tv_model.load_state_dict({k: torch.from_numpy(v) for k, v in tv_sd.items()}, strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # the fold is exact math; only float32 rounding of the folded mean differs
        seed32, tv32 = model(x), tv_model(x)
        seed64 = model.double()(x.double())
        model.float()
    seed_err, tv_err = (seed32 - seed64).abs().max().item(), (tv32 - seed64).abs().max().item()
    assert tv_err <= 2 * seed_err, (tv_err, seed_err)
    assert torch.equal(tv32.argmax(-1), seed64.argmax(-1))
    assert tv_sd["layer1.0.bn1.num_batches_tracked"] == sd["layer1.0.bn1.num_batches_tracked"] == 3

    # load(layout=...) re-lays out on the way in.
    m2, v2 = checkpoint.load(path, layout="torchvision")
    assert not m2.conv_bias and "bias" not in v2["params"]["conv1"]
    assert_trees_equal(v2, torch_to_flax(tv_sd), "load(layout='torchvision')")
    for p in (mp, back, tv):
        p.unlink()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_torchvision_to_seed_layout(suffix, workdir, capsys):
    """torchvision weights (read from a ``.bin``) exported in the seed layout load strictly into the seed model, same outputs."""
    import torch_ref
    from flax_resnet import cli
    from parity.fixtures import images, reference_model

    tv_model = reference_model("resnet50", "torchvision", seed=4, num_classes=10, calibrate_size=32)
    src = workdir / "tv50.bin"  # Hugging Face's name for a torch state_dict file; read by content, not suffix
    torch.save(tv_model.state_dict(), src)
    dst = workdir / f"tv50-seed{suffix}"
    assert cli.main(["convert", str(src), str(dst), "--layout", "seed"]) == 0
    assert "resnet50, seed layout, 10 classes" in capsys.readouterr().out
    sd = checkpoint.read_state_dict(dst)
    assert "layer1.0.identity_downsample.0.bias" in sd and not np.any(sd["conv1.bias"])  # zero biases, nothing to fold
    seed_model = torch_ref.ResNet("resnet50", num_classes=10, layout="seed").eval()
    seed_model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, strict=True)
    x = images(2, 3, 64, 64, seed=4).double()
    with torch.no_grad():
        want, got = tv_model.double()(x), seed_model.double()(x)
    tv_model.float()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12 * want.abs().max().item())
    model, variables = checkpoint.load(dst)
    assert model.conv_bias and (model.arch, model.num_classes) == ("resnet50", 10)
    for p in (src, dst):
        p.unlink()


def test_bfloat16_outputs(seed50, workdir):
    import ml_dtypes

    _, sd, path = seed50
    want = torch_to_flax(sd)
    for name in ("bf16.msgpack", "bf16", "bf16.safetensors"):
        dst = workdir / name
        r = checkpoint.convert(path, dst, dtype="bfloat16", layout="flax" if name.endswith(".safetensors") else None)
        assert r["dtype"] == "bfloat16"
        model, variables = checkpoint.load(dst)
        assert model.param_dtype == ml_dtypes.bfloat16
        cast = {c: {k: v.astype(ml_dtypes.bfloat16) for k, v in _flatten(t).items()} for c, t in want.items()}
        got = {c: _flatten(t) for c, t in variables.items()}
        for c in cast:
            for k, v in cast[c].items():
                assert got[c][k].dtype == ml_dtypes.bfloat16
                assert got[c][k].tobytes() == v.tobytes(), (name, c, k)
        assert r["bytes"] < 0.6 * 4 * r["num_params"]  # half the float32 size
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    # bfloat16 into a torch file: torch.bfloat16 tensors, num_batches_tracked stays int64.
    dst = workdir / "bf16.pth"
    checkpoint.convert(path, dst, dtype="bfloat16")
    back = torch.load(dst, weights_only=True)
    assert back["conv1.weight"].dtype == torch.bfloat16 and back["bn1.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(back["fc.weight"], torch.from_numpy(sd["fc.weight"]).bfloat16())
    dst.unlink()
    m32, v32 = checkpoint.load(path, param_dtype="float32")
    assert_trees_equal(v32, want)
    # dtype is the model's compute dtype (mixed precision), as in from_torch; params stay float32.
    import jax.numpy as jnp

    mixed, v = checkpoint.load(path, dtype=jnp.bfloat16)
    assert mixed.dtype == jnp.bfloat16 and v["params"]["fc"]["kernel"].dtype == np.float32


def test_training_checkpoint_wrappers_and_prefixes(workdir):
    from parity.fixtures import reference_model

    model = reference_model("resnet18", seed=4, num_classes=7, calibrate_size=32)
    sd = model.state_dict()
    want = torch_to_flax(state_dict_numpy(sd))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wrapped = {
        "bare": sd,
        "state_dict": {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3, "optimizer": opt.state_dict()},
        "model": {"model": sd, "epoch": 90, "best_acc1": 0.76},
        "model_state_dict": {"model_state_dict": sd, "optimizer_state_dict": opt.state_dict(), "loss": 0.5},
        "lightning": {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "global_step": 10},
    }
    for name, obj in wrapped.items():
        path = workdir / f"wrap-{name}.pth"
        torch.save(obj, path)
        ck = checkpoint.read(path)
        assert ck.keys == "torch"
        model_, variables = checkpoint.load(path)
        assert (model_.arch, model_.num_classes) == ("resnet18", 7)
        assert_trees_equal(variables, want, name)
        report = checkpoint.inspect(path)
        assert report["ok"] and report["arch"] == "resnet18" and report["num_params"] == sum(p.numel() for p in model.parameters())
        path.unlink()
    # The wrapper and dropped entries are reported.
    path = workdir / "wrap.pth"
    torch.save(wrapped["state_dict"], path)
    r = checkpoint.inspect(path)
    assert r["wrapper"] == "state_dict" and r["prefix"] == "module." and set(r["extras"]) == {"epoch", "optimizer"}
    path.unlink()


def test_metadata_travels(seed50, workdir):
    _, sd, path = seed50
    for name in ("meta.msgpack", "meta.safetensors", "meta"):
        dst = workdir / name
        checkpoint.convert(path, dst)
        meta = checkpoint.read(dst).meta
        assert meta["arch"] == "resnet50" and meta["layout"] == "seed" and meta["num_classes"] == 10
        assert meta["num_batches_tracked"] == 3 and meta["source_format"] == "pth"
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    # The msgpack stays a plain Flax file: from_bytes with a target ignores __meta__.
    import flax.serialization

    dst = workdir / "plain.msgpack"
    checkpoint.convert(path, dst)
    target = torch_to_flax(sd)
    restored = flax.serialization.from_bytes(target, dst.read_bytes())
    assert_trees_equal(restored, target)
    assert json.loads(flax.serialization.msgpack_restore(dst.read_bytes())["__meta__"])["arch"] == "resnet50"
    dst.unlink()


def test_save_api_and_varying_num_batches_tracked(workdir):
    from parity.fixtures import reference_model

    model = reference_model("resnet18", seed=6, num_classes=5, calibrate_size=32)
    sd = state_dict_numpy(model.state_dict())
    sd["layer2.0.bn1.num_batches_tracked"] = np.array(17, np.int64)  # per-layer values survive too
    variables = torch_to_flax(sd)
    dst = workdir / "api.msgpack"
    info = checkpoint.save(dst, variables, meta={"num_batches_tracked": nbt_from_torch(sd, flax_resnet.infer_config(sd))})
    assert info["format"] == "msgpack" and info["arch"] == "resnet18"
    with pytest.raises(FileExistsError):
        checkpoint.save(dst, variables)
    back = workdir / "api.pth"
    checkpoint.convert(dst, back)
    assert_state_dicts_equal(torch.load(back, weights_only=True), sd, "per-layer num_batches_tracked")
    # save() also takes a torch state_dict.
    st = workdir / "api.safetensors"
    checkpoint.save(st, {k: torch.from_numpy(v) for k, v in sd.items()})
    assert_state_dicts_equal(checkpoint.read_state_dict(st), sd, "save(state_dict)", ordered=False)
    # A torch source without num_batches_tracked keys gives none back.
    bare = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    src = workdir / "nonbt.safetensors"
    checkpoint.save(src, bare)
    assert not any(k.endswith("num_batches_tracked") for k in checkpoint.read_state_dict(src))
    for p in (dst, back, st, src):
        p.unlink()


def test_top_level_load_export():
    assert flax_resnet.load is checkpoint.load and flax_resnet.save is checkpoint.save


def test_import_without_torch(seed50, workdir, tmp_path):
    """safetensors/msgpack/Orbax work in a process where torch cannot be imported."""
    import subprocess
    import sys

    src = workdir / "notorch.safetensors"
    checkpoint.convert(seed50[2], src)
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import flax_resnet, flax_resnet.io as c\n"
        f"r = c.convert({str(src)!r}, {str(tmp_path / 'o.msgpack')!r})\n"
        f"m, v = c.load({str(tmp_path / 'o.msgpack')!r})\n"
        "assert m.arch == 'resnet50' and m.conv_bias\n"
        f"try:\n    c.load({str(seed50[2])!r})\nexcept ValueError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "needs torch" in out.stdout
    src.unlink()
