"""Data parallelism: one step sharded over 4 devices equals one step on 1 device; the command on 4 devices.

Runs in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
(the flag must be set before JAX starts) and float64, so the comparison is
tight: any per-device BatchNorm statistics or a missing gradient all-reduce
would show up as O(1e-2) differences, float reassociation as O(1e-15).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    import flax_resnet
    from flax_resnet import training

    assert len(jax.devices()) == 4, jax.devices()
    # ResNet-10 (one basic block per stage): the resnet18 graph at half the compile time.
    arch = flax_resnet.ArchSpec("resnet10", "basic", (1, 1, 1, 1))
    model = flax_resnet.ResNet(arch=arch, num_classes=10, param_dtype=jnp.float64)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float64))
    # Realistic BN state (not 0/1) so a wrong running-stat update would show.
    variables = {"params": variables["params"],
                 "batch_stats": jax.tree.map(lambda x: x + 0.3, variables["batch_stats"])}
    tx = training.make_optimizer(batch_size=8, steps_per_epoch=1, epochs=1, lr=0.1, warmup_epochs=0)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 32, 32, 3))
    labels = rng.integers(0, 10, size=8).astype(np.int32)

    single = training.create_train_state(model, variables, tx)
    s1, m1 = training.train_step(single, jnp.asarray(images), jnp.asarray(labels), label_smoothing=0.1)

    mesh = training.make_mesh(4)
    state = training.replicate(training.create_train_state(model, variables, tx), mesh)
    x, y = training.shard_batch(mesh, images, labels)
    assert len(x.sharding.device_set) == 4 and x.addressable_shards[0].data.shape[0] == 2
    s4, m4 = training.train_step(state, x, y, label_smoothing=0.1)
    jax.block_until_ready(s4)

    # The per-device batch statistics would differ from the global ones:
    def shard_mean(i):
        return float(jnp.mean(jnp.asarray(images[2 * i:2 * i + 2])))
    assert max(shard_mean(i) for i in range(4)) - min(shard_mean(i) for i in range(4)) > 1e-3

    def diff(a, b):
        return max(float(np.max(np.abs(np.asarray(p) - np.asarray(q)))) for p, q in
                   zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    def moved(a, b):
        return max(float(np.max(np.abs(np.asarray(p) - np.asarray(q)))) for p, q in
                   zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    # Orbax round trip of the replicated state: restored replicated and bit-identical (so training
    # continues exactly: test_training.py::test_checkpoint_resume_equals_uninterrupted).
    import tempfile
    from jax.sharding import NamedSharding, PartitionSpec
    ckdir = tempfile.mkdtemp()
    with training.Checkpointer(ckdir) as ck:
        ck.save(1, s4, {"seed": 0})
    template = jax.eval_shape(lambda: training.create_train_state(model, variables, tx))
    with training.Checkpointer(ckdir) as ck:
        r4, meta = ck.restore(template, sharding=NamedSharding(mesh, PartitionSpec()))

    out = {
        "resume_replicated": all(l.sharding.is_fully_replicated and len(l.sharding.device_set) == 4
                                 for l in jax.tree.leaves(r4.params) + jax.tree.leaves(r4.opt_state)),
        "resume_meta": meta,
        "resume_diff": max(diff(s4.params, r4.params), diff(s4.batch_stats, r4.batch_stats), diff(s4.opt_state, r4.opt_state),
                           abs(int(s4.step) - int(r4.step))),
        "accuracy": abs(float(m1["accuracy"]) - float(m4["accuracy"])),
        "params": diff(s1.params, s4.params),
        "batch_stats": diff(s1.batch_stats, s4.batch_stats),
        "opt_state": diff(s1.opt_state, s4.opt_state),
        "loss": abs(float(m1["loss"]) - float(m4["loss"])),
        "params_moved": moved(s1.params, single.params),
        "stats_moved": moved(s1.batch_stats, single.batch_stats),
        "replicated": all(len(l.sharding.device_set) == 4 and l.sharding.is_fully_replicated
                          for l in jax.tree.leaves(s4.params) + jax.tree.leaves(s4.batch_stats)),
        "dtype": str(jax.tree.leaves(s4.params)[0].dtype),
        "step": int(s4.step),
    }
    print("RESULT " + json.dumps(out))
    """
)


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([_root()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def test_sharded_step_over_4_devices_equals_single_device(tmp_path):
    env = _env()
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    script = tmp_path / "mesh_step.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], cwd=_root(), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    assert r["dtype"] == "float64" and r["step"] == 1 and r["replicated"]
    # The step did something, on a scale far above the tolerance...
    assert r["params_moved"] > 1e-3 and r["stats_moved"] > 1e-3
    # ... and the sharded step reproduces it to float64 rounding.
    assert r["params"] < 1e-10, r
    assert r["batch_stats"] < 1e-10, r
    assert r["opt_state"] < 1e-10, r
    assert r["loss"] < 1e-12 and r["accuracy"] == 0, r
    # Resuming a replicated state from Orbax continues exactly.
    assert r["resume_replicated"] and r["resume_meta"] == {"epoch": 1, "seed": 0}, r
    assert r["resume_diff"] == 0.0, r


def test_cli_trains_digits_on_4_devices_in_bfloat16(tmp_path):
    """``flax-resnet train --devices 4 --dtype bfloat16`` on digits: progress bar, metrics, plot, float32 checkpoints."""
    env = _env()
    env.pop("XLA_FLAGS", None)  # the command asks for the devices itself
    work = tmp_path / "run"
    argv = [sys.executable, "-m", "flax_resnet", "train", "--arch", "resnet18", "--dataset", "digits", "--size", "16",
            "--epochs", "1", "--batch-size", "128", "--devices", "4", "--dtype", "bfloat16", "--workdir", str(work),
            "--progress", "on"]
    proc = subprocess.run(argv, cwd=_root(), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 cpu device(s), batch 128" in proc.stderr and "bfloat16" in proc.stderr
    assert "epoch 1/1: 100%" in proc.stderr or "11/11" in proc.stderr, proc.stderr[-2000:]  # tqdm's bar
    rec = json.loads((work / "metrics.jsonl").read_text())
    assert {"epoch", "train_loss", "test_loss", "test_accuracy", "images_per_sec"} <= set(rec)
    assert rec["epoch"] == 1 and np.isfinite(rec["test_loss"]) and rec["images_per_sec"] > 0
    assert (work / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # Mixed precision: the checkpoint holds float32 params and statistics.
    from flax_resnet import io

    report = io.inspect(work / "checkpoints")
    assert report["arch"] == "resnet18" and report["num_classes"] == 10 and set(report["dtypes"]) == {"float32"}, report


MULTIHOST = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    from flax_resnet import training
    pid = int(sys.argv[1])
    assert training.initialize_distributed(True, coordinator_address=sys.argv[2], num_processes=2, process_id=pid)
    import jax.numpy as jnp, numpy as np
    import flax_resnet

    arch = flax_resnet.ArchSpec("resnet10", "basic", (1, 1, 1, 1))
    model = flax_resnet.ResNet(arch=arch, num_classes=10, param_dtype=jnp.float64)
    local = jax.local_devices()[0]
    # Committed to a local device (as loaded weights are): replicate() must not send them across hosts.
    variables = jax.device_put(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3), jnp.float64)), local)
    tx = training.make_optimizer(batch_size=8, steps_per_epoch=1, epochs=1, lr=0.1, warmup_epochs=0)
    rng = np.random.default_rng(0)  # every host holds the same global batch
    images = rng.normal(size=(8, 16, 16, 3))
    labels = rng.integers(0, 10, size=8).astype(np.int32)

    mesh = training.make_mesh()  # all 4 devices of both processes
    state = training.replicate(training.create_train_state(model, variables, tx), mesh)
    x, y = training.shard_batch(mesh, images, labels)
    rows = sorted(int(s.index[0].start) for s in x.addressable_shards)  # this host's rows of the global batch
    s4, m4 = training.train_step(state, x, y)

    result = {"processes": jax.process_count(), "devices": len(jax.devices()), "local": len(jax.local_devices()), "rows": rows}
    if pid == 0:  # the same global batch on one device (every host holds the same replicated result)
        with jax.default_device(local):
            s1, m1 = training.train_step(training.create_train_state(model, variables, tx), jnp.asarray(images), jnp.asarray(labels))

        def diff(a, b):
            return max(float(np.max(np.abs(np.asarray(p.addressable_data(0)) - np.asarray(q))))
                       for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

        result.update(params=diff(s4.params, s1.params), batch_stats=diff(s4.batch_stats, s1.batch_stats),
                      loss=abs(float(m4["loss"]) - float(m1["loss"])))
    print("RESULT " + json.dumps(result), flush=True)
    """
)


def test_two_processes_with_jax_distributed_equal_one_device(tmp_path):
    """Multi-host data parallelism: 2 processes x 2 CPU devices (jax.distributed, gloo) == 1 device, in float64."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env()
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    script = tmp_path / "multihost.py"
    script.write_text(MULTIHOST)
    procs = [
        subprocess.Popen([sys.executable, str(script), str(i), f"127.0.0.1:{port}"], cwd=_root(), env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][len("RESULT "):]))
    finally:
        for p in procs:
            p.kill()
    assert [r["rows"] for r in results] == [[0, 2], [4, 6]]  # each host placed only its own devices' rows
    for r in results:
        assert (r["processes"], r["devices"], r["local"]) == (2, 4, 2)
    r = results[0]
    assert r["params"] < 1e-10 and r["batch_stats"] < 1e-10 and r["loss"] < 1e-12, r
