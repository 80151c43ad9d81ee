"""``flax-resnet parity`` as users run it: a subprocess over every architecture kind and every source ``load`` reads.

The torch side is built from the same model description as the Flax side
(``torch_ref.build(config)``), so timm's deep stems, avg-pool shortcuts and
transformers model directories run through the command itself. Fast runs
are small (32-64 px, batch 2, eval); the issue's full-size runs are slow.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import flax_resnet
from parity import fixtures

ROOT = Path(__file__).resolve().parents[1]


def parity(*args: str, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "flax_resnet", "parity", *args], capture_output=True, text=True, env=env, cwd=cwd or ROOT, timeout=timeout)


def passes(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    if out.stdout.startswith("{"):  # --json
        assert json.loads(out.stdout)["passed"]
    else:
        assert "PASS: all" in out.stdout
    log_margin(out)
    return out.stdout


def log_margin(out: subprocess.CompletedProcess) -> None:
    """PARITY_MARGINS=FILE (tests/conftest.py): the command's worst point, as the in-process runs log theirs."""
    if not os.environ.get("PARITY_MARGINS"):
        return
    if out.stdout.startswith("{"):
        d = json.loads(out.stdout)
        dtype, points = d["dtype"], [(f"{p['mode']} {p['name']}", p["rel"], p["tol"]) for p in d["points"]]
    else:
        lines = out.stdout.splitlines()
        dtype = next(t for t in lines[0].split(", ") if t in ("float32", "float64", "bfloat16"))
        i = next(i for i, line in enumerate(lines) if line.startswith("mode "))
        cols = re.split(r"\s{2,}", lines[i].strip())
        rows = [dict(zip(cols, re.split(r"\s{2,}", line.strip()))) for line in lines[i + 1 :] if line.strip() and not line.startswith(" ")]
        rows = rows[: next((j for j, r in enumerate(rows) if len(r) < len(cols)), len(rows))]  # the footnotes follow the table
        points = [(f"{r['mode']} {r['point']}", float(r["rel err"]), float(r["tolerance"])) for r in rows]
    label, rel, tol = max(points, key=lambda p: p[1] / p[2])
    row = {"test": os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0], "command": " ".join(out.args[3:]), "dtype": dtype}
    row |= {"passed": True, "worst": label, "rel": rel, "tol": tol, "ratio": rel / tol}
    with open(os.environ["PARITY_MARGINS"], "a") as f:
        f.write(json.dumps(row) + "\n")


SMALL = ("--size", "32", "32", "--batch", "2")

# One row of every kind: 7x7 stem (torchvision), seed layout, timm's deep and deep_tiered stems,
# avg_down shortcuts, grouped convs, basic blocks.
# Each subprocess costs ~15 s of CPU: the fast tier runs two rows, the slow tier the rest.
SLOW = pytest.mark.slow
ROWS = [
    ("resnet18", "torchvision", "basic blocks, 7x7 stem"),
    ("resnet10t", "torchvision", "timm deep_tiered stem, avg_down"),
    pytest.param("resnet50", "seed", "seed layout: conv biases, identity_downsample", marks=SLOW),
    pytest.param("resnet18d", "torchvision", "timm deep stem, avg_down", marks=SLOW),
    pytest.param("resnext50_32x4d", "torchvision", "grouped 3x3 convs", marks=SLOW),
]


@pytest.mark.parametrize("arch,layout,kind", ROWS)
def test_every_row_kind_by_arch(arch, layout, kind):
    out = passes(parity("--arch", arch, "--layout", layout, *SMALL))
    assert f"{arch} ({layout} layout)" in out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet50c", "resnet50s"])
def test_deep_stem_50_layer_rows_by_arch(arch):
    """timm's deep stem at widths 32 (c) and 64 (s): the rows that used to end in a traceback."""
    passes(parity("--arch", arch, *SMALL))


def _save(tmp: Path, name: str, variables_or_sd, **kw) -> Path:
    path = tmp / name
    flax_resnet.io.save(path, variables_or_sd, **kw)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One file of every source ``flax_resnet.load`` reads, each a small seeded model."""
    tmp = tmp_path_factory.mktemp("sources")
    r18 = fixtures.reference_model("resnet18", seed=3)
    sd = {k: v.numpy() for k, v in r18.state_dict().items()}
    _, variables = flax_resnet.from_torch(r18.state_dict())
    out = {
        "torchvision.pth": tmp / "torchvision.pth",
        "seed.pth": tmp / "seed.pth",
        "timm.pth": tmp / "timm_resnet10t.pth",
        "msgpack": _save(tmp, "r18.msgpack", variables),
        "safetensors": _save(tmp, "r18.safetensors", sd),
        "npz": _save(tmp, "r18.npz", sd),
        "orbax": _save(tmp, "r18_orbax", variables),
    }
    torch.save(r18.state_dict(), out["torchvision.pth"])
    torch.save(fixtures.reference_model("resnet50", "seed", seed=4, num_classes=10).state_dict(), out["seed.pth"])
    torch.save(fixtures.reference_model("resnet10t", seed=5, num_classes=10).state_dict(), out["timm.pth"])
    pytest.importorskip("transformers")
    from parity import hf

    hf.reference_model("resnet18", num_labels=5, seed=6).save_pretrained(tmp / "hf")
    out["transformers"] = tmp / "hf"
    return out


SOURCES = ["seed.pth", "timm.pth", "orbax", "transformers"] + [pytest.param(s, marks=SLOW) for s in ("torchvision.pth", "msgpack", "safetensors", "npz")]


@pytest.mark.parametrize("source", SOURCES)
def test_every_source_by_weights(sources, source):
    out = passes(parity("--weights", str(sources[source]), *SMALL, "--json"))
    report = json.loads(out)
    want = {"seed.pth": ("resnet50", "seed"), "timm.pth": ("resnet10t", "torchvision"), "transformers": ("resnet18", "transformers")}
    assert (report["arch"], report["layout"]) == want.get(source, ("resnet18", "torchvision"))
    assert report["passed"] and report["explanation"] is None


@pytest.mark.slow
def test_api_nnx_for_a_timm_row_and_a_transformers_directory(sources):
    passes(parity("--arch", "resnet10t", "--api", "nnx", *SMALL))
    out = passes(parity("--weights", str(sources["transformers"]), "--api", "nnx", *SMALL))
    assert "Flax NNX" in out and "(transformers layout)" in out


def test_a_transformers_directory_without_transformers_says_how_to_get_it(sources, tmp_path):
    """transformers hidden from the subprocess: one line naming the install, exit 2."""
    (tmp_path / "transformers.py").write_text("raise ImportError('hidden by the test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "flax_resnet", "parity", "--weights", str(sources["transformers"]), *SMALL], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "pip install" in out.stderr and "--layout torchvision" in out.stderr


# --- the runs, at the sizes users run them ----------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet10t", "resnet50c", "resnet18d", "resnet50s"])
def test_timm_stem_rows_at_default_settings(arch):
    passes(parity("--arch", arch))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet26t", "resnet50d"])
def test_timm_checkpoints_by_weights(arch, tmp_path):
    path = tmp_path / f"{arch}.pth"
    torch.save(fixtures.reference_model(arch, seed=7).state_dict(), path)
    passes(parity("--weights", str(path)))


@pytest.mark.slow
def test_transformers_resnet50_directory(tmp_path):
    pytest.importorskip("transformers")
    from parity import hf

    hf.reference_model("resnet50", seed=8).save_pretrained(tmp_path / "hf")
    passes(parity("--weights", str(tmp_path / "hf")))


@pytest.mark.slow
def test_resnet18_every_mode_at_batch_2():
    """The run that cried wolf: resnet18 --mode all --size 64 64 --batch 2 with the default seed."""
    out = passes(parity("--arch", "resnet18", "--mode", "all", "--size", "64", "64", "--batch", "2"))
    assert "grad   layer1" in out and "grad grad" not in out


def test_an_fp32_fail_reruns_in_float64_and_says_which_it_is(monkeypatch):
    """A planted structural bug: the FAIL names the float64 difference; an fp32-only excess says float64 agrees."""
    from parity import harness

    real = flax_resnet.from_torch

    def broken(sd, **kw):
        model, v = real(sd, **kw)
        v["batch_stats"]["layer2"]["0"]["bn1"]["var"] = v["batch_stats"]["layer2"]["0"]["bn1"]["var"] * 1.5
        return model, v

    monkeypatch.setattr(flax_resnet, "from_torch", broken)
    r = harness.run_parity(fixtures.reference_model("resnet18"), fixtures.images(2, 3, 32, 32).numpy(), modes=("eval",), explain=True)
    assert not r.passed and r.float64_check["structural"]
    assert r.explanation.startswith("float64 differs by") and r.explanation.endswith("at eval layer2.0: a real difference"), r.explanation
    assert r.explanation in r.format() and r.to_dict()["explanation"] == r.explanation
    monkeypatch.setattr(flax_resnet, "from_torch", real)

    # An fp32-only excess: the Flax fp32 results nudged by 1e-4 of their magnitude (float64 untouched).
    side = harness._flax_side

    def nudged(model, variables, x, *a, **kw):
        out = side(model, variables, x, *a, **kw)
        if x.dtype == np.float32:
            out["eval"]["logits"] = out["eval"]["logits"] + 1e-4 * np.abs(out["eval"]["logits"]).max()
        return out

    monkeypatch.setattr(harness, "_flax_side", nudged)
    r = harness.run_parity(fixtures.reference_model("resnet18"), fixtures.images(2, 3, 32, 32).numpy(), modes=("eval",), explain=True)
    assert not r.passed and not r.float64_check["structural"]
    assert r.explanation.startswith("float64 agrees to") and "an fp32 sensitivity, not a structural difference" in r.explanation


def test_gpu_check_covers_every_row_kind():
    """parity/gpu_check.sh (run by hand on a GPU) names rows of every kind, and is valid bash."""
    import re

    from flax_resnet.archs import ARCHS

    script = (ROOT / "parity" / "gpu_check.sh").read_text()
    rows = re.search(r'^KINDS="([^"]+)"', script, re.M).group(1).split()
    specs = [ARCHS[a] for a in rows]  # every name is a row
    kinds = lambda s: {s.block, s.stem, s.shortcut, "grouped" if s.groups > 1 else "wide" if s.width_per_group > 64 else "plain", f"attn {s.attn}", f"pool {s.stem_pool}"}  # noqa: E731
    assert set().union(*map(kinds, specs)) == set().union(*map(kinds, ARCHS.values()))
    assert any(s.has_seed_layout for s in specs) and any(sum(s.stage_sizes) > 40 for s in specs)
    assert "--api \"$api\"" in script and "--mode all" in script and "|| true" not in script
    assert subprocess.run(["bash", "-n", str(ROOT / "parity" / "gpu_check.sh")]).returncode == 0
