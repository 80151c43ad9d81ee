"""Helpers of the hostile-input tests (test_hostile_*.py): tiny weights, CLI runs in and out of process, peak RSS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from flax_resnet import cli
from flax_resnet import io as ckio
from flax_resnet.convert import ModelConfig, leaves

ROOT = Path(__file__).resolve().parents[1]
RSS_LIMIT_KB = 1024 * 1024  # 1 GiB: the bound on predict/convert of small hostile files

# VmHWM (this process's own peak RSS): getrusage's ru_maxrss would carry over the forked test runner's across exec.
_MEASURED = """\
import os, sys
from flax_resnet import cli
try:
    rc = cli.main(sys.argv[1:])
finally:
    with open("/proc/self/status") as f:
        kb = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    with open(os.environ["RSS_OUT"], "w") as f:
        f.write(kb)
sys.exit(rc)
"""


def random_state_dict(arch="resnet18", num_classes=10, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    sd = {}
    for leaf in leaves(ModelConfig(arch, "torchvision", num_classes, 3)):
        a = rng.standard_normal(leaf.torch_shape).astype(dtype)
        sd[leaf.torch_key] = np.abs(a) + 0.5 if leaf.torch_key.endswith("running_var") else a
    return sd


def save_weights(path, **kwargs):
    ckio.save(path, random_state_dict(**kwargs))
    return path


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line(rc, out, err, status, *fragments, command="predict", out_empty=True):
    lines = err.strip().splitlines()
    assert rc == status, (rc, out[-2000:], err[-3000:])
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"flax-resnet {command}: error: "), lines[0]
    for f in fragments:
        assert str(f) in lines[0], (f, lines[0])
    if out_empty:
        assert out == "", out[-2000:]
    return lines[0]


def run_measured(tmp_path, *argv, timeout=600, env=None):
    """``flax-resnet ARGV`` in a subprocess: ``(returncode, stdout, stderr, peak RSS in KiB)``."""
    rss = tmp_path / f"rss-{os.getpid()}-{len(list(tmp_path.glob('rss-*')))}.txt"
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "RSS_OUT": str(rss), "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    p = subprocess.run([sys.executable, "-c", _MEASURED, *map(str, argv)], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=full_env)
    kb = int(rss.read_text()) if rss.exists() else -1
    rss.unlink(missing_ok=True)
    return p.returncode, p.stdout, p.stderr, kb
