"""The one reader of ``.npz`` headers: what every member declares, checked before anything is inflated.

Checkpoints (``formats``), datasets (``data.load_npz``) and ``predict``'s
image archives all read their ``.npz`` files through ``members``, so one
policy refuses the same hostile archives everywhere:

* a member that is not an ``.npy`` array of format 1.0/2.0, or holds Python
  objects;
* a header whose declared shape and dtype do not add up to the member's
  inflated size (the zip directory says how many bytes it inflates to);
* deflate bombs: more than ``BOMB_MIN_BYTES`` inflating over ``BOMB_RATIO``
  times what is stored, per member and for the archive as a whole.

Real arrays deflate by ~1-20x (images, weights); a field of zeros by ~1000x.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Callable, Iterator

import numpy as np

BOMB_RATIO = 100  # real arrays deflate by ~1-20x; zeros by ~1000x
BOMB_MIN_BYTES = 64 * 2**20  # small members may compress as much as they like


@dataclasses.dataclass(frozen=True)
class Member:
    """One ``.npy`` member of an ``.npz``, from its header alone.

    Attributes:
        name: the array's key (the member name without ``.npy``).
        shape, dtype, fortran_order: as the header declares them.
        offset: where the array data starts inside the inflated member.
        nbytes: the data's size (``offset + nbytes`` is the inflated size).
        stored: the member's compressed size in the archive.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int
    nbytes: int
    stored: int


def _header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f".npy format version {version} is not supported")


def members(path: str | os.PathLike, error: Callable[[str], Exception] = ValueError) -> dict[str, Member]:
    """Every member's declared shape and dtype, checked (see the module docstring); nothing is inflated.

    Args:
        path: the ``.npz`` file.
        error: the exception type to raise (``CheckpointError``, ``DatasetError``).

    Raises:
        ``error``: one line naming the file (and the member) for a corrupt,
        unsafe or bomb archive.
    """
    out: dict[str, Member] = {}
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            for info in infos:
                if not info.filename.endswith(".npy"):
                    raise error(f"{path}: member {info.filename!r} is not an .npy array")
                if info.file_size > BOMB_MIN_BYTES and info.file_size > BOMB_RATIO * max(info.compress_size, 1):
                    raise error(
                        f"{path}: {info.filename[:-4]} declares {info.file_size:,} bytes stored in {info.compress_size:,} "
                        f"(x{info.file_size // max(info.compress_size, 1):,}): a likely deflate bomb, refused before inflating"
                    )
            total = sum(i.file_size for i in infos)
            stored = sum(i.compress_size for i in infos)
            if total > BOMB_MIN_BYTES and total > BOMB_RATIO * max(stored, 1):
                big = max(infos, key=lambda i: i.file_size).filename[:-4]
                raise error(
                    f"{path}: declares {total:,} bytes ({big!r} the largest) stored in {stored:,} "
                    f"(x{total // max(stored, 1):,}): a likely deflate bomb, refused before inflating"
                )
            for info in infos:
                name = info.filename[: -len(".npy")]
                with z.open(info) as f:
                    shape, fortran, dtype = _header(f)
                    offset = f.tell()
                if dtype.hasobject:
                    raise error(f"{path}: {name} holds Python objects (dtype {dtype}): unsafe, only numeric arrays are read")
                nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if offset + nbytes != info.file_size:
                    raise error(f"{path}: {name} declares shape {tuple(shape)} ({nbytes:,} bytes of {dtype}) but holds {info.file_size - offset:,}")
                out[name] = Member(name, tuple(int(s) for s in shape), dtype, bool(fortran), offset, nbytes, info.compress_size)
    except FileNotFoundError:
        raise
    except Exception as e:  # BadZipFile, EOFError, header syntax (ValueError, SyntaxError), a bad CRC, ...
        if isinstance(e, error) and str(e).startswith(f"{path}:"):
            raise
        raise error(f"{path} is not a readable .npz file ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    return out


def read(path: str | os.PathLike, name: str, error: Callable[[str], Exception] = ValueError) -> np.ndarray:
    """One member as an array (after ``members`` checked it), its CRC verified."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return z[name]
    except Exception as e:  # a damaged member (bad CRC, truncation)
        raise error(f"{path}: cannot read {name} ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None


def iter_rows(path: str | os.PathLike, member: Member, rows: int, error: Callable[[str], Exception] = ValueError) -> Iterator[np.ndarray]:
    """A C-order member in chunks of ``rows`` along its first axis, inflated as they are read (bounded memory).

    Raises:
        ``error``: a Fortran-order member, a truncated or damaged one.
    """
    if member.fortran_order and len(member.shape) > 1:
        raise error(f"{path}: {member.name} is stored in Fortran order; save it with np.savez(..., {member.name}=np.ascontiguousarray(x))")
    row_shape = member.shape[1:]
    row_bytes = int(np.prod(row_shape, dtype=object)) * member.dtype.itemsize
    try:
        with zipfile.ZipFile(path) as z, z.open(member.name + ".npy") as f:
            f.read(member.offset)
            for start in range(0, member.shape[0] if member.shape else 0, rows):
                n = min(rows, member.shape[0] - start)
                buf = f.read(n * row_bytes)
                if len(buf) != n * row_bytes:
                    raise EOFError(f"{member.name} ends after {start} rows")
                yield np.frombuffer(buf, member.dtype).reshape((n, *row_shape))
    except zipfile.BadZipFile as e:
        raise error(f"{path}: cannot read {member.name} ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
    except EOFError as e:
        raise error(f"{path}: cannot read {member.name} (truncated: {e})") from None
