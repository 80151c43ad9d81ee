"""Which format a file is (from its content) and which format an output path asks for (from its suffix)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from flax_resnet.io.common import CheckpointError, one_line

FORMATS = ("pth", "safetensors", "npz", "msgpack", "orbax")
FLAX_NATIVE = ("msgpack", "orbax")
SUFFIX_FORMATS = {
    ".pth": "pth",
    ".pt": "pth",
    ".bin": "pth",
    ".ckpt": "pth",
    ".safetensors": "safetensors",
    ".npz": "npz",
    ".msgpack": "msgpack",
}


def check_input(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` if it exists (a broken symbolic link does not)."""
    p = Path(path)
    if not os.path.lexists(p):
        raise FileNotFoundError(f"{p}: no such file or directory")
    if not p.exists():
        raise FileNotFoundError(f"{p}: broken symbolic link")
    return p


def orbax_item_dir(path: Path) -> Path | None:
    """The directory holding an Orbax PyTree item, found with Orbax's public path API.

    ``path`` itself (an item, or a step with one item saved by
    ``StandardCheckpointer``); a ``CheckpointManager`` step's only item
    subdirectory; or, for a ``CheckpointManager`` root, the latest finalized
    step's item.
    """
    if not path.is_dir():
        return None
    from orbax.checkpoint.path import format_utils, step

    if format_utils.is_pytree_checkpoint(path):
        return path
    items = [d for d in sorted(path.iterdir()) if d.is_dir() and format_utils.is_pytree_checkpoint(d)]
    if len(items) == 1:
        return items[0]
    try:
        steps = step.checkpoint_steps(path)
    except (OSError, ValueError):
        steps = []
    for n in sorted(steps, reverse=True):
        found = orbax_item_dir(path / str(n))
        if found is not None:
            return found
    return None


def detect_format(path: str | os.PathLike) -> str:
    """The checkpoint format of ``path``, from its content (magic bytes), not its name.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: a directory that is not an Orbax checkpoint.
        CheckpointError: a file that is not (or no longer) a checkpoint.
    """
    p = check_input(path)
    if p.is_dir():
        if orbax_item_dir(p) is None:
            raise IsADirectoryError(f"{p}: is a directory, not a checkpoint file or an Orbax checkpoint (no _METADATA)")
        return "orbax"
    if not p.is_file():
        raise CheckpointError(f"{p}: not a regular file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: empty file, not a checkpoint")
    with open(p, "rb") as f:
        head = f.read(16)
    if head[:2] == b"PK":  # a zip archive: torch.save's format, or np.savez's
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            kind = "npz" if p.suffix == ".npz" else "PyTorch"
            raise CheckpointError(f"{p}: corrupt or truncated {kind} file (bad zip archive: {one_line(e, 120)})") from None
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "pth"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        raise CheckpointError(f"{p}: a zip archive that is neither a PyTorch checkpoint nor an .npz file")
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:  # pickle PROTO: legacy torch.save
        return "pth"
    if len(head) >= 9 and head[8:9] == b"{":  # u64 header length, then a JSON header
        return "safetensors"
    if 0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF):  # a msgpack map
        return "msgpack"
    raise CheckpointError(
        f"{p}: not a checkpoint (unrecognized content; expected a PyTorch .pth/.pt/.bin, .safetensors, .npz "
        "or Flax .msgpack file, or an Orbax checkpoint directory)"
    )


def format_for_path(path: str | os.PathLike) -> str:
    """The output format a path asks for: by suffix; no suffix (or an existing directory) is Orbax."""
    p = Path(path)
    if p.suffix.lower() in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[p.suffix.lower()]
    if not p.suffix or p.is_dir():
        return "orbax"
    raise ValueError(
        f"{p}: unknown output format {p.suffix!r}; use .msgpack, .safetensors, .npz, .pth/.pt/.bin, "
        "or a path without suffix for an Orbax checkpoint directory"
    )
