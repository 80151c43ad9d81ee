"""Orbax checkpoint directories: read as host (numpy) arrays, written with ``StandardCheckpointer``."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from flax_resnet.io.common import FLAX_COLLECTIONS, CheckpointError, one_line

META_KEY = "flax_resnet"  # key in Orbax's custom_metadata


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Orbax/absl log failures (with tracebacks) on stderr before raising; the raised error is reported instead."""
    loggers = [logging.getLogger(n) for n in ("absl", "orbax", "jax", "tensorstore", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _fd2_captured(drain_on_error: float = 0.5) -> Iterator[None]:
    """Redirects file descriptor 2 while Orbax restores.

    When one read fails, tensorstore's threads still finish the others and
    print "Event loop is closed" tracebacks straight to fd 2 (not through
    Python's logging). They are dropped; after a failure the threads get
    ``drain_on_error`` seconds to finish. Output of a successful restore
    is passed on.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            time.sleep(drain_on_error)
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if not failed:
                sink.seek(0)
                text = sink.read().decode(errors="replace")
                if text:
                    sys.stderr.write(text)


def custom_metadata(item: Path, root: Path) -> dict:
    """flax-resnet's entry of Orbax's ``custom_metadata`` (public ``metadata()`` API), searched from the item up to ``root``."""
    import orbax.checkpoint as ocp

    dirs = [item]
    while dirs[-1] != root and root in dirs[-1].parents:
        dirs.append(dirs[-1].parent)
    for d in dirs:
        try:
            with _quiet(), ocp.StandardCheckpointer() as ckptr:
                md = ckptr.metadata(d.absolute())
        except Exception:  # no step metadata at this level
            continue
        meta = (getattr(md, "custom_metadata", None) or {}).get(META_KEY)
        if isinstance(meta, dict):
            return meta
    return {}


def restore_on_host(item: Path) -> Any:
    """Restores an Orbax PyTree as numpy arrays.

    A plain restore places arrays as they were saved and fails on another
    topology (a checkpoint of a 4-device run read on one device); numpy
    arrays restore anywhere.
    """
    import jax
    import orbax.checkpoint as ocp

    try:
        with _quiet(), _fd2_captured():
            with ocp.StandardCheckpointer() as ckptr:
                md = ckptr.metadata(item.absolute())
            md = getattr(md, "item_metadata", md)
            md = getattr(md, "tree", md)
            args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), md)
            with ocp.PyTreeCheckpointer() as ckptr:
                return ckptr.restore(item.absolute(), args=ocp.args.PyTreeRestore(restore_args=args))
    except Exception as e:  # orbax/tensorstore raise many kinds
        raise CheckpointError(f"{item}: cannot restore the Orbax checkpoint ({type(e).__name__}: {one_line(e, 160)})") from None


def write(tmp: Path, variables: Mapping, meta: dict) -> None:
    """Saves ``params``/``batch_stats`` to the (new) directory ``tmp``."""
    import orbax.checkpoint as ocp

    tree = {k: variables[k] for k in FLAX_COLLECTIONS if k in variables}
    tmp.mkdir()  # an unwritable parent fails here, at once, not in Orbax's background threads
    tmp.rmdir()
    try:
        with _quiet(), _fd2_captured(), ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp.absolute(), tree, custom_metadata={META_KEY: meta})
            ckptr.wait_until_finished()
    except Exception as e:  # tensorstore reports OS errors as ValueError text with the errno
        code = re.search(r"os_error_code='(\d+)'", str(e))
        if code:
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1)))) from None
        raise OSError(f"Orbax could not write the checkpoint ({type(e).__name__})") from None
