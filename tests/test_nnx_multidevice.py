"""NNX data parallelism: two steps over a 4-device mesh equal two steps on one device (float64, 1e-10).

A subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
(set before JAX starts). The model and optimizer are replicated in place
(``flax_resnet.nnx.training.replicate``), the batch sharded
(``flax_resnet.training.shard_batch``); BatchNorm must see the global batch
(the four shards' means differ), gradients must be all-reduced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from flax import nnx
    import flax_resnet.nnx as frn
    from flax_resnet import training
    from flax_resnet.archs import ArchSpec
    from flax_resnet.nnx import training as nt

    assert len(jax.devices()) == 4, jax.devices()
    # One basic block per stage: the resnet18 graph at half the compile time.
    arch = ArchSpec("resnet10", "basic", (1, 1, 1, 1))

    def make():
        # Seeded fan-in-scaled weights and realistic BN state (not 0/1, so a wrong
        # running-stat update would show), without the cost of initializing.
        model = nnx.eval_shape(lambda: frn.ResNet(arch, 10, param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
        rng = np.random.default_rng(1)
        for path, v in nnx.to_flat_state(nnx.state(model)):
            if path[-1] == "var":
                value = rng.uniform(0.5, 1.5, v.shape)
            elif path[-1] == "kernel":
                value = rng.normal(size=v.shape) / np.sqrt(np.prod(v.shape[:-1]))
            else:
                value = rng.normal(size=v.shape) * 0.2 + (path[-1] == "scale")
            v.set_value(jnp.asarray(value))
        return model

    tx = training.make_optimizer(batch_size=8, steps_per_epoch=2, epochs=1, lr=0.1, warmup_epochs=0)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 32, 32, 3)) + np.arange(8)[:, None, None, None] * 0.1
    labels = rng.integers(0, 10, size=8).astype(np.int32)

    one = make()
    opt1 = nt.create_optimizer(one, tx)
    m1 = [nt.train_step(one, opt1, jnp.asarray(images), jnp.asarray(labels)) for _ in range(2)]

    mesh = training.make_mesh(4)
    four = nt.replicate(make(), mesh)
    opt4 = nt.replicate(nt.create_optimizer(four, tx), mesh)
    x, y = training.shard_batch(mesh, images, labels)
    assert x.addressable_shards[0].data.shape[0] == 2
    m4 = [nt.train_step(four, opt4, x, y) for _ in range(2)]
    leaves4 = jax.tree.leaves(nnx.state(four)) + jax.tree.leaves(nnx.state(opt4))
    shard_means = [float(np.mean(images[2 * i:2 * i + 2])) for i in range(4)]

    def rel(a, b):
        return max(float(np.max(np.abs(np.asarray(p) - np.asarray(q))) / max(np.max(np.abs(np.asarray(q))), 1e-300))
                   for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    s1, s4 = frn.to_linen(one), frn.to_linen(four)
    print(json.dumps({
        "params": rel(s4["params"], s1["params"]),
        "batch_stats": rel(s4["batch_stats"], s1["batch_stats"]),
        "opt_state": rel(nnx.state(opt4.opt_state), nnx.state(opt1.opt_state)),
        "loss": max(abs(float(a["loss"]) - float(b["loss"])) for a, b in zip(m1, m4)),
        "moved": rel(s1["batch_stats"], frn.to_linen(make())["batch_stats"]),
        "replicated": all(l.sharding.is_fully_replicated and len(l.sharding.device_set) == 4 for l in leaves4),
        "shard_spread": max(shard_means) - min(shard_means),
        "dtype": str(s4["params"]["fc"]["kernel"].dtype),
        "step": int(opt4.step[...]),
    }))
    """
)


def test_four_devices_equal_one_in_float64():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=root, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["dtype"] == "float64" and out["step"] == 2 and out["replicated"]
    assert out["shard_spread"] > 0.1  # per-device BatchNorm statistics would differ
    assert out["moved"] > 1e-3  # the running stats did change
    assert out["params"] <= 1e-10 and out["batch_stats"] <= 1e-10 and out["opt_state"] <= 1e-10, out
    assert out["loss"] <= 1e-10, out
