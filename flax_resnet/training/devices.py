"""Devices: data-parallel meshes, placing the state and batches, several hosts, a CPU speed-up."""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
DATA_AXIS = "data"


CPU_WORKAROUND_FLAG = "--xla_disable_hlo_passes=algsimp"


def _accelerator_expected() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if platforms:
        return any(p.strip() not in ("", "cpu") for p in platforms.split(","))
    import importlib.util
    import pkgutil

    try:
        import jax_plugins  # namespace package of the CUDA / ROCm / TPU plugins

        if any(True for _ in pkgutil.iter_modules(jax_plugins.__path__)):
            return True
    except ImportError:
        pass
    return importlib.util.find_spec("libtpu") is not None


def cpu_small_conv_workaround(force: bool = False) -> bool:
    """Turns off XLA's algebraic simplifier (``--xla_disable_hlo_passes=algsimp``); no longer needed.

    Once a 3x3 conv's input is smaller than its kernel (ResNet's layer3/4 at
    2x2 and 1x1 for 32x32 images), XLA's algebraic simplifier swaps the conv's
    operands and the CPU backend runs the swapped conv as a naive loop. This
    flag was the way around it; ``flax_resnet.kernels`` now runs such convs as
    one matrix product of their taps on CPU, which is faster than the flag
    (a resnet18 train step at 32x32, batch 64: 172 ms, 187 ms with the flag,
    444 ms before either), so nothing calls this any more. Kept for code that
    does. The flag changes an optimization pass only: results are the same up
    to float rounding. It must run before JAX starts its backend (the first
    ``jax.devices()`` or computation) and does nothing when an accelerator
    plugin is installed (unless ``force``) or the backend already started.
    Returns whether the flag is in effect for this process.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if CPU_WORKAROUND_FLAG in flags:
        return True
    try:
        from jax._src import xla_bridge

        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # private API; assume the worst
        started = True
    if started:
        return False
    if not force and _accelerator_expected():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {CPU_WORKAROUND_FLAG}".strip()
    return True


def initialize_distributed(enable: bool | None = None, **kwargs) -> bool:
    """Joins a multi-host run via ``jax.distributed.initialize(**kwargs)``.

    Runs when ``enable`` is true, or, with ``enable=None``, when the
    environment variable ``FLAX_RESNET_DISTRIBUTED=1`` is set. Call it on
    every host before any other JAX call; on Cloud TPU, SLURM and other
    auto-detected clusters no arguments are needed, otherwise pass
    ``coordinator_address``, ``num_processes`` and ``process_id`` (or set
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``).
    Afterwards ``jax.devices()`` lists every host's devices, ``make_mesh``
    spans them, and each host feeds its slice of the global batch
    (``shard_batch`` takes the host's part). Returns whether it initialized.
    """
    if enable is None:
        enable = os.environ.get("FLAX_RESNET_DISTRIBUTED", "") not in ("", "0", "false", "False")
    if not enable:
        return False
    for key, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        value = os.environ.get(var, "")
        if key not in kwargs and value:  # jax reads JAX_COORDINATOR_ADDRESS itself, these two only on known clusters
            if not value.isdigit():
                raise ValueError(f"{var}={value!r}: expected a non-negative integer")
            kwargs[key] = int(value)
    jax.distributed.initialize(**kwargs)
    return True


def make_mesh(devices: int | Sequence[Any] | None = None, axis_name: str = DATA_AXIS) -> Mesh:
    """A 1-D data-parallel mesh: the first ``devices`` devices (all by default)."""
    if devices is None:
        devs = jax.devices()
    elif isinstance(devices, int):
        avail = jax.devices()
        if devices < 1 or devices > len(avail):
            raise ValueError(
                f"asked for {devices} devices but {len(avail)} are available ({avail[0].platform}); "
                "on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts"
            )
        devs = avail[:devices]
    else:
        devs = list(devices)
    return Mesh(np.asarray(devs), (axis_name,))


def _from_host(a: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from the same host copy on every process: each places only its own devices' parts."""
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places every array of ``tree`` (e.g. the train state) on all devices of ``mesh``.

    In a multi-host run every host holds the same values (same seed, same
    checkpoint) and places its own copy on its own devices: arrays that
    already sit on one device are not sent across hosts, which the CPU and
    GPU backends do not support.
    """
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def place(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:  # already global
            return jax.device_put(a, sharding)
        return _from_host(np.asarray(a), sharding)

    return jax.tree.map(place, tree)


def shard_batch(mesh: Mesh | None, *arrays: np.ndarray):
    """Splits arrays along the batch axis over ``mesh`` (``P("data")``).

    Arrays are the *global* batch. In a multi-host run every host passes the
    same global batch (``data.batches`` gives every host the same order) and
    places only the rows of its own devices, wherever they sit in the mesh.
    The batch must divide by the number of devices. ``mesh=None`` just moves
    the arrays to the default device.
    """
    if mesh is None:
        out = tuple(jnp.asarray(a) for a in arrays)
        return out if len(out) > 1 else out[0]
    sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
    n_dev = mesh.devices.size
    out = []
    for a in arrays:
        a = np.asarray(a)
        if a.shape[0] % n_dev:
            raise ValueError(f"batch of {a.shape[0]} does not divide over {n_dev} devices")
        out.append(_from_host(a, sharding))
    return tuple(out) if len(out) > 1 else out[0]


def place_local_batch(mesh: Mesh | None, *arrays: np.ndarray):
    """Places this process's rows of a global batch (``jax.make_array_from_process_local_data``).

    For a pipeline that reads only this host's shard (grain's
    ``ShardByJaxProcess``): each process passes ``global_batch /
    process_count`` rows, split over its local devices. With one process it
    places the same array as ``shard_batch``.
    """
    if mesh is None:
        return shard_batch(None, *arrays)
    sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
    n_local = len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])
    out = []
    for a in arrays:
        a = np.asarray(a)
        if a.shape[0] % n_local:
            raise ValueError(f"a host batch of {a.shape[0]} does not divide over {n_local} local devices")
        out.append(jax.make_array_from_process_local_data(sharding, a))
    return tuple(out) if len(out) > 1 else out[0]
