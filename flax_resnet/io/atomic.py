"""Atomic output: write to a hidden temporary name next to the target, fsync, rename.

A failure (an exception, Ctrl-C, a full disk) removes the temporary data and
any parent directories this write created, so the target is either the old
one or the complete new one. Temporaries of processes that were killed
(SIGKILL leaves them) are removed by the next write to the same target: their
names carry the writer's pid.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from flax_resnet.io.common import check_interrupt, one_line


def _is_orbax_dir(p: Path) -> bool:
    if not p.is_dir():
        return False
    from orbax.checkpoint.path import format_utils

    return format_utils.is_orbax_checkpoint(p) or format_utils.is_pytree_checkpoint(p)


def _missing_parents(p: Path) -> list[Path]:
    """The ancestors of ``p`` that do not exist yet, outermost first; an ancestor that is a file fails here."""
    missing = []
    for parent in p.absolute().parents:
        if parent.is_dir():
            break
        if os.path.lexists(parent):
            raise NotADirectoryError(f"{p}: cannot write: {parent} is not a directory")
        missing.append(parent)
    return missing[::-1]


def check_output(path: str | os.PathLike, fmt: str, force: bool = False) -> Path:
    """Fails early, before any work, if ``path`` cannot or may not be written (missing parents are fine)."""
    p = Path(path)
    _missing_parents(p)
    if os.path.lexists(p):
        if p.is_dir() and not p.is_symlink():
            if fmt != "orbax":
                raise IsADirectoryError(f"{p}: is a directory; a .{fmt} output must be a file path")
            if any(p.iterdir()):
                if not _is_orbax_dir(p):
                    raise FileExistsError(f"{p}: is a non-empty directory that is not an Orbax checkpoint; refusing to replace it")
                if not force:
                    raise FileExistsError(f"{p}: already exists (use --force / force=True to overwrite)")
        elif not force:
            raise FileExistsError(f"{p}: already exists (use --force / force=True to overwrite)")
    return p


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove(p: Path) -> None:
    """Removes a file, link or directory tree; missing is fine."""
    with contextlib.suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif os.path.lexists(p):
            p.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temporaries(p: Path) -> list[Path]:
    """Removes ``.NAME.tmp-PID-*`` leftovers (and their ``.old``/Orbax siblings) of dead processes."""
    parent = p.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(re.escape(f".{p.name}.tmp-") + r"(\d+)-[0-9a-f]{8}")
    removed = []
    for entry in parent.iterdir():
        m = pattern.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            remove(entry)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, fmt: str, force: bool = False) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; on success renames it into place.

    The caller writes a file (or, for ``"orbax"``, a directory) at the
    temporary path. Missing parent directories are created first. On any
    exception the temporary data, and the directories created, are removed
    and ``path`` is untouched.
    """
    p = check_output(path, fmt, force)
    created = _missing_parents(p)
    for d in created:
        try:
            d.mkdir()
        except FileExistsError:
            pass
        except OSError as e:
            for made in reversed(created[: created.index(d)]):
                with contextlib.suppress(OSError):
                    made.rmdir()
            raise type(e)(f"{p}: cannot create directory {d} ({e.strerror or e})") from None
    parent = p.parent
    clean_stale_temporaries(p)
    tmp = parent / f".{p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if not os.path.lexists(tmp):
            raise RuntimeError(f"internal error: nothing was written to {tmp}")
        check_interrupt()
        check_output(p, fmt, force)  # again: it may have appeared meanwhile
        if os.path.lexists(p) and (p.is_dir() or tmp.is_dir()):
            old = parent / f"{tmp.name}.old"
            os.rename(p, old)
            try:
                os.replace(tmp, p)
            except BaseException:
                os.rename(old, p)
                raise
            remove(old)
        else:
            os.replace(tmp, p)
        _fsync_dir(parent)
    except BaseException as e:
        remove(tmp)
        for stray in parent.glob(f"{tmp.name}*"):  # e.g. Orbax's own temporary directory
            remove(stray)
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        if isinstance(e, OSError) and not str(e).startswith(str(p)):  # name the user's path, not our temporary one
            raise type(e)(f"{p}: cannot write ({e.strerror or one_line(e)})") from None
        raise


def write_bytes(tmp: Path, write: Callable[[Any], None]) -> None:
    """Opens ``tmp`` (new), lets ``write(f)`` fill it, and fsyncs it."""
    with open(tmp, "xb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
