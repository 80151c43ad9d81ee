"""The benchmarks' driver side: the machine, one subprocess per measurement, load sampling, the ``Runner``."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

from benchmarks.common import LOADED, OTHER_BUSY, ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "run.py")  # each worker runs as ``run.py --worker TASK``


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
        info["cpu_features"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile") if f in flags]
    except OSError:
        info["cpu"] = platform.processor() or "unknown"
    versions = {}
    for mod in ("jax", "jaxlib", "flax", "optax", "torch", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    info["versions"] = versions
    try:
        import jax

        info["jax_device"] = f"{jax.default_backend()} ({jax.devices()[0].device_kind})"
    except Exception:
        pass
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    return info


def _other_runnable() -> int | None:
    """Threads of other process groups that are running or runnable right now (Linux)."""
    try:
        me = os.getpgid(0)
        n = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[2]) == me:  # fields: state ppid pgrp ...
                    continue
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] == "R":
                            n += 1
            except (OSError, IndexError, ValueError):
                continue
        return n
    except OSError:
        return None


class _Sampler:
    """Samples other processes' runnable threads every ``period`` seconds in the background."""

    def __init__(self, period: float = 0.5):
        import threading

        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _run(self, period):
        while not self._stop.wait(period):
            n = _other_runnable()
            if n is not None:
                self.samples.append(n)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def run_task(task: dict, timeout: float) -> dict:
    load = os.getloadavg()[0]
    sampler = _Sampler()
    sampler.__enter__()
    t0 = time.perf_counter()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        p = subprocess.run([sys.executable, SCRIPT, "--worker", json.dumps(task)], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        line = next((l for l in reversed(p.stdout.splitlines()) if l.startswith("BENCH_RESULT ")), None)
        if line is None:
            tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
            out = {"ok": False, "error": f"exit {p.returncode}: {tail[0][:200]}"}
        else:
            out = json.loads(line[len("BENCH_RESULT ") :])
    except subprocess.TimeoutExpired:
        out = {"ok": False, "error": f"timed out after {timeout:.0f}s"}
    out["wall_s"] = time.perf_counter() - t0
    sampler.__exit__()
    out["load_before"] = load
    out["load_after"] = os.getloadavg()[0]
    out["other_runnable"] = sampler.mean  # mean runnable threads of other processes during the measurement
    return out


def _fmt(v, digits=1, suffix=""):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.{digits}f}{suffix}"


def _img_s(res):
    return res.get("img_s") if res and res.get("ok") else None


def _loaded(results):
    """Whether other processes competed for the CPU during any of these measurements."""
    for r in results:
        if not r:
            continue
        other = r.get("other_runnable")
        if other is not None:
            if other > OTHER_BUSY:
                return True
        elif max(r.get("load_before", 0), r.get("load_after", 0)) > LOADED:
            return True
    return False


class Runner:
    def __init__(self, args):
        self.args = args
        self.results: list[dict] = []
        self.t0 = time.perf_counter()

    def run(self, section: str, row: dict, name: str, task: dict, timeout: float = 900) -> dict:
        if self.args.verbose:
            print(f"  [{time.perf_counter() - self.t0:6.0f}s] {section} {row} {name} ...", file=sys.stderr, flush=True)
        res = run_task(task, timeout)
        if self.args.json:  # progress survives an interrupted run
            with open(self.args.json + ".partial.jsonl", "a") as f:
                f.write(json.dumps({"section": section, "row": row, "name": name, "result": res}) + "\n")
        if self.args.verbose:
            extra = f"{res.get('img_s', 0):.2f} img/s" if res.get("img_s") else (res.get("error") or "")
            print(f"           -> {extra} ({res['wall_s']:.0f}s, load {res['load_before']:.1f})", file=sys.stderr, flush=True)
        self.results.append({"section": section, "row": row, "name": name, "task": task, "result": res})
        return res


def _variant(res: dict, name: str) -> dict | None:
    if not res or not res.get("ok"):
        return None
    return res.get("variants", {}).get(name)
