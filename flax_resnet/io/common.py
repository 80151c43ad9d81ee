"""What every part of checkpoint I/O shares: the error, dtypes, trees, Ctrl-C, the one JSON reader."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
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


# ---------------------------------------------------------------------------
# JSON


MAX_JSON_BYTES = 64 * 2**20  # a config with a million class names is ~30 MB


def _no_duplicates(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for i, k in enumerate(keys) if k in keys[:i])
        raise ValueError(f"key {dup!r} appears twice")
    return dict(pairs)


def parse_json(text: str | bytes, where: str, error: type[Exception] = CheckpointError) -> Any:
    """The one JSON parser of files and metadata: one line for bad syntax, duplicate keys or deep nesting.

    Nesting deeper than ``MAX_TREE_DEPTH`` is refused (every config and
    metadata here is a few levels deep) before Python's recursion limit is
    reached.

    Raises:
        ``error``: naming ``where``.
    """
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise error(f"{where}: JSON nested more than {MAX_TREE_DEPTH} levels deep; refused") from None
    except (ValueError, TypeError) as e:  # JSONDecodeError, UnicodeDecodeError, duplicate keys
        raise error(f"{where}: unreadable JSON ({type(e).__name__}: {one_line(e, 120)})") from None
    if tree_depth(data) > MAX_TREE_DEPTH:
        raise error(f"{where}: JSON nested more than {MAX_TREE_DEPTH} levels deep; refused")
    return data


def read_json(path: str | os.PathLike, error: type[Exception] = CheckpointError, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """A JSON object from a regular file of at most ``max_bytes`` (see ``parse_json``).

    Raises:
        FileNotFoundError; ``error``: not a regular file, too large, not JSON,
        not an object (one line naming the file).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except OSError as e:
        raise error(f"{path}: unreadable ({one_line(e, 120)})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: not a regular file")
    if st.st_size > max_bytes:
        raise error(f"{path}: {st.st_size:,} bytes; a JSON config here is at most {max_bytes:,}")
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{path}: unreadable ({one_line(e, 120)})") from None
    data = parse_json(raw, str(path), error)
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
