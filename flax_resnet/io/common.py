"""What every part of checkpoint I/O shares: the error, the finite rule, dtypes, trees, Ctrl-C."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator, Mapping

import numpy as np
from flax import traverse_util

from flax_resnet.validate import is_float

FLAX_COLLECTIONS = ("params", "batch_stats")
DTYPES = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16, "float64": np.float64}
MAX_TREE_DEPTH = 16  # a Flax ResNet tree is 7 levels deep (params/layer1/rest/0/downsample/0/kernel)


class CheckpointError(ValueError):
    """A file that cannot be read as a checkpoint (corrupt, unsafe, not one)."""


def one_line(text: Any, limit: int = 300) -> str:
    """``text`` (or an exception's message, else its type name) on one line, cut to ``limit`` characters.

    The project's one error-message helper (the hub, file writes and the CLI use it).
    """
    s = " ".join(str(text).split()) or (type(text).__name__ if isinstance(text, BaseException) else "")
    return s if len(s) <= limit else s[: limit - 3] + "..."


# ---------------------------------------------------------------------------
# dtypes


def as_dtype(dtype: Any):
    """A floating numpy dtype from a name (``"bfloat16"`` via ml_dtypes) or dtype; ``None`` stays ``None``."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if isinstance(dtype, str) or str(dtype) == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    d = np.dtype(dtype)
    if not np.issubdtype(d, np.floating):
        raise ValueError(f"dtype must be floating point, got {d}")
    return d


def cast_tree(tree: Any, dtype) -> Any:
    """Floating leaves cast to ``dtype`` (``None``: unchanged); other leaves kept."""
    if dtype is None:
        return tree
    import jax

    def cast(a):
        a = np.asarray(a)
        return a.astype(dtype) if is_float(a) and a.dtype != dtype else a

    return jax.tree.map(cast, tree)


# ---------------------------------------------------------------------------
# trees


def flat(tree: Mapping) -> dict[str, Any]:
    """``{"params/conv1/kernel": leaf}``."""
    return traverse_util.flatten_dict(tree, sep="/")


def unflat(flat_tree: Mapping[str, Any]) -> dict:
    return traverse_util.unflatten_dict(dict(flat_tree), sep="/")


def tree_depth(tree: Any) -> int:
    """Nesting depth of dicts/lists, without recursion (a hostile file may nest thousands deep)."""
    depth, stack = 0, [(tree, 0)]
    while stack:
        node, d = stack.pop()
        depth = max(depth, d)
        if depth > MAX_TREE_DEPTH:
            return depth
        if isinstance(node, Mapping):
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend((v, d + 1) for v in node)
    return depth


def to_numpy_tree(tree: Any) -> Any:
    """Nested dicts (lists and tuples become ``"0", "1", ...`` keys) of numpy arrays."""
    if isinstance(tree, Mapping):
        return {str(k): to_numpy_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return {str(i): to_numpy_tree(v) for i, v in enumerate(tree)}
    return np.asarray(tree)


def tree_size(tree: Mapping) -> int:
    return int(sum(np.size(v) for v in flat(tree).values()))


def path_bytes(path: Path) -> int:
    """Size of a file, or of every file under a directory."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def tree_dtype(tree: Mapping) -> str:
    return "/".join(sorted({np.asarray(v).dtype.name for v in flat(tree).values()}))


# ---------------------------------------------------------------------------
# Ctrl-C


_interrupted = threading.Event()
_guard_depth = 0


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Ctrl-C during reading/writing is noted and raised at the next ``check_interrupt``.

    A ``KeyboardInterrupt`` raised inside a garbage-collection callback (JAX
    installs one) is printed and dropped by Python, and the work would go on
    to exit 0. Here the first SIGINT only sets a flag that the I/O steps
    check between stages; a second one raises at once. Outside the main
    thread this does nothing (signal handlers are main-thread only).
    """
    global _guard_depth
    if _guard_depth or threading.current_thread() is not threading.main_thread():
        yield  # nested (convert -> read), or not the main thread
        return

    def handler(signum, frame):
        if _interrupted.is_set():
            raise KeyboardInterrupt
        _interrupted.set()

    previous = signal.signal(signal.SIGINT, handler)
    _guard_depth += 1
    try:
        yield
        check_interrupt()
    finally:
        _guard_depth -= 1
        signal.signal(signal.SIGINT, previous)
        _interrupted.clear()


def check_interrupt() -> None:
    """Raises ``KeyboardInterrupt`` if Ctrl-C was pressed inside ``deferred_interrupts``."""
    if _interrupted.is_set():
        _interrupted.clear()
        raise KeyboardInterrupt
