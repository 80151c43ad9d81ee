"""Every script in examples/ runs, at a tiny size, as a user runs it: a subprocess in a fresh directory, twice.

A script says how the test runs it in one comment line::

    # example-test: [slow] [rerun] ARGS...

``ARGS`` are its command-line arguments at a tiny size (image size, images,
epochs); ``slow`` marks it for the slow tier; ``rerun`` runs it a second time
in the same directory, over the first run's files (checkpoints, stand-in
weights), as a user who runs it again would. A script without the line runs
once, with no arguments.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "examples").glob("*.py"))
DIRECTIVE = re.compile(r"^# example-test:(?P<args>.*)$", re.M)
# What the first (and second) run of a script must print (scripts not listed: anything, but something).
EXPECT = {
    "finetune_loop": ("epoch 1: train loss", "all 1 epochs are done"),
    "extract_features": ("pre_logits (128, 512)\npooled features: train (128, 512), test (360, 512)\nlogistic regression",),
    "parity_checkpoint": ("verdict: PASS",),
}


def _how(script: Path) -> tuple[list[str], bool, bool]:
    """(arguments, slow, rerun) from the script's ``# example-test:`` line."""
    m = DIRECTIVE.search(script.read_text(encoding="utf-8"))
    args = shlex.split(m.group("args")) if m else []
    flags = set()
    while args and args[0] in ("slow", "rerun"):
        flags.add(args.pop(0))
    return args, "slow" in flags, "rerun" in flags


def _param(script: Path):
    args, slow, rerun = _how(script)
    return pytest.param(script, args, rerun, id=script.stem, marks=[pytest.mark.slow] if slow else [])


def test_there_are_examples():
    names = {s.stem for s in SCRIPTS}
    assert {"finetune_loop", "extract_features", "parity_checkpoint"} <= names, names


@pytest.mark.parametrize("script,args,rerun", [_param(s) for s in SCRIPTS])
def test_example_runs_as_written(script, args, rerun, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1",
           "TORCH_HOME": str(tmp_path / "torch"), "HF_HUB_CACHE": str(tmp_path / "hf")}
    outputs = []
    for run in (1, 2) if rerun else (1,):
        r = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{script.name} {' '.join(args)} (run {run}) exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        assert "Traceback" not in r.stderr and "Waiting for previous save" not in r.stderr, r.stderr[-3000:]
        outputs.append(r.stdout)
    assert all(out.strip() for out in outputs), f"{script.name} printed nothing: {outputs}"
    for out, expected in zip(outputs, EXPECT.get(script.stem, ())):
        assert expected in out, out[-3000:]


def _workdirs(code: str) -> set[str]:
    """Training directories a block writes: ``--workdir DIR``, ``Checkpointer("DIR/checkpoints")``, ``--workdir`` defaults."""
    found = {m.group(1) for m in re.finditer(r"--workdir[ =]([^\s;|&]+)", code)}
    found |= {m.group(1) for m in re.finditer(r"""Checkpointer\(\s*["']([^"']+?)(?:/checkpoints)?["']""", code)}
    for m in re.finditer(r"flax-resnet train\b[^\n]*", code):
        if "--workdir" not in m.group(0):
            found.add("runs/ARCH-DATASET (the default)")
    return found


def test_no_two_documented_blocks_share_a_workdir():
    # The issue: the Python loop and the CLI block both wrote runs/digits; run in order, the CLI "resumed" and trained nothing.
    from test_readme import RUNNABLE, _prepare

    owner: dict[str, str] = {}
    for b in RUNNABLE:
        where = f"{b['file']}:{b['line']}"
        for d in _workdirs(_prepare(b)[0]):
            assert d not in owner, f"{where} and {owner[d]} both write {d}"
            owner[d] = where
    assert len(owner) >= 3, owner  # the Python loop, the CLI run and the fine-tune at least
    assert _workdirs('ckpt = training.Checkpointer("runs/digits/checkpoints")\nflax-resnet train --workdir runs/digits') == {"runs/digits"}
