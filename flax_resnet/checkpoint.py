"""Checkpoint files in and out: PyTorch, safetensors, npz, Flax msgpack, Orbax.

Reading is safe and strict:

* ``.pth``/``.pt``/``.bin`` go through ``torch.load(..., weights_only=True)``
  only (torch is imported lazily, just for these files); a pickle that would
  call anything but tensor and container constructors is refused and nothing
  in it runs. Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``,
  ``{"model_state_dict": ...}`` next to epoch/optimizer entries) and
  ``module.``/``_orig_mod.``/shared prefixes (``model.``) are unwrapped.
* ``.safetensors`` (the ``safetensors`` package's numpy API) and ``.npz``
  (``allow_pickle=False``) never need torch. Both may hold torch keys
  (``layer1.0.conv1.weight``) or flattened Flax keys
  (``params/layer1/0/conv1/kernel``); the keys tell them apart.
* Flax ``.msgpack`` (``flax.serialization``) and Orbax checkpoint directories.

The format of a file is read from its content, not its name. Every variable
set is validated key for key and shape for shape against the architecture
(see ``flax_resnet.convert``), and non-finite weights are refused unless
``allow_nonfinite``.

Writing is atomic: data goes to a temporary name in the target directory,
is fsynced and then renamed over the target, so a failure leaves no partial
file; an existing output is replaced only with ``force=True`` (and an
existing directory only if it is itself an Orbax checkpoint).

Metadata (``arch``, ``layout``, ``num_classes``, ``in_channels`` and the
source's ``num_batches_tracked``) travels inside the file: a ``__meta__``
JSON string entry in msgpack and npz, the ``flax_resnet`` key of safetensors
metadata, Orbax's ``custom_metadata``. That makes
``.pth -> .msgpack -> .pth`` bit-exact, ``num_batches_tracked`` included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from flax_resnet.archs import get_arch
from flax_resnet.convert import (
    ConversionError,
    ModelConfig,
    _flatten,
    _to_numpy,
    flax_to_torch,
    infer_config,
    infer_flax_config,
    leaves,
    normalize_state_dict,
    torch_to_flax,
)

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "FORMATS",
    "convert",
    "detect_format",
    "format_for_path",
    "inspect",
    "load",
    "load_variables",
    "read",
    "read_state_dict",
    "save",
]

META_VERSION = 1
META_KEY = "__meta__"  # msgpack / npz entry holding the JSON metadata
SAFETENSORS_META_KEY = "flax_resnet"  # key in safetensors' string metadata
ORBAX_META_KEY = "flax_resnet"  # key in Orbax's custom_metadata

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
OUTPUT_LAYOUTS = ("torchvision", "seed", "flax")
DTYPES = {"float32": np.float32, "bfloat16": "bfloat16", "float16": np.float16, "float64": np.float64}

# Wrapper keys of training checkpoints, most specific first.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")
FLAX_COLLECTIONS = ("params", "batch_stats")


class CheckpointError(ValueError):
    """A file that cannot be read as a checkpoint (corrupt, unsafe, not one)."""


# ---------------------------------------------------------------------------
# Small helpers


def _one_line(text: Any, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _dtype(dtype: Any):
    """A numpy dtype from a name (``"bfloat16"`` via ml_dtypes) or dtype."""
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


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"


def _cast_tree(tree: Any, dtype) -> Any:
    if dtype is None:
        return tree
    if isinstance(tree, Mapping):
        return {k: _cast_tree(v, dtype) for k, v in tree.items()}
    a = np.asarray(tree)
    return a.astype(dtype) if _is_float(a) and a.dtype != dtype else a


def _unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict:
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"key {key!r} nests under a leaf")
        node[last] = value
    return out


def _tree_size(tree: Mapping) -> int:
    return int(sum(np.size(v) for v in _flatten(tree).values()))


def _tree_dtype(tree: Mapping) -> str:
    names = sorted({np.asarray(v).dtype.name for v in _flatten(tree).values()})
    return "/".join(names)


def _path_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _dtype_counts(arrays: Mapping[str, np.ndarray]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for a in arrays.values():
        name = np.asarray(a).dtype.name
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def _nonfinite(arrays: Mapping[str, np.ndarray]) -> list[tuple[str, int, int, int]]:
    """``(key, n_nan, n_inf, size)`` of every floating array with non-finite values."""
    bad = []
    for key, a in arrays.items():
        a = np.asarray(a)
        if _is_float(a) and a.size:
            finite = np.isfinite(a)
            if not finite.all():
                n_nan = int(np.isnan(a).sum())
                bad.append((key, n_nan, int(a.size - finite.sum()) - n_nan, int(a.size)))
    return bad


def _check_finite(arrays: Mapping[str, np.ndarray], where: str) -> None:
    bad = _nonfinite(arrays)
    if bad:
        key, n_nan, n_inf, size = bad[0]
        more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
        raise CheckpointError(
            f"{where}: non-finite values in {key} ({n_nan} NaN, {n_inf} Inf of {size}){more}; "
            "refusing it (use allow_nonfinite / --allow-nonfinite to accept)"
        )


# ---------------------------------------------------------------------------
# Reading


@dataclasses.dataclass
class Checkpoint:
    """The raw content of a checkpoint file, before validation.

    Attributes:
        path: the file or directory read.
        format: ``"pth"``, ``"safetensors"``, ``"npz"``, ``"msgpack"`` or ``"orbax"``.
        keys: ``"torch"`` (``tensors`` is a flat state_dict) or ``"flax"``
            (``tensors`` is a nested ``{"params", "batch_stats"}`` tree).
        tensors: numpy arrays.
        meta: flax-resnet metadata stored in the file (``{}`` if none).
        wrapper: the key path that was unwrapped (``"state_dict"``, ...).
        extras: top-level entries that are not model weights (epoch,
            optimizer, ... ; other Flax collections), ignored.
        prefix: a prefix stripped from every key (``"module."``, ``"model."``).
    """

    path: Path
    format: str
    keys: str
    tensors: dict
    meta: dict = dataclasses.field(default_factory=dict)
    wrapper: str | None = None
    extras: list[str] = dataclasses.field(default_factory=list)
    prefix: str = ""

    def flat(self) -> dict[str, np.ndarray]:
        """Tensors by their key in the file (``params/conv1/kernel`` for Flax)."""
        if self.keys == "torch":
            return dict(self.tensors)
        return {"/".join(k): v for k, v in _flatten(self.tensors).items()}


def _orbax_item_dir(path: Path) -> Path | None:
    """The directory holding an Orbax PyTree item.

    ``path`` itself; or its only item subdirectory (a ``CheckpointManager``
    step directory, ``step/<item>/``); or, for a ``CheckpointManager`` root
    (numbered step directories), the latest step's item.
    """
    if not path.is_dir():
        return None
    if (path / "_METADATA").is_file():
        return path
    subdirs = [d for d in sorted(path.iterdir()) if d.is_dir()]
    items = [d for d in subdirs if (d / "_METADATA").is_file()]
    if len(items) == 1:
        return items[0]
    if (path / "_CHECKPOINT_METADATA").is_file() and (path / "manifest.ocdbt").exists():
        return path
    steps = sorted((int(d.name), d) for d in subdirs if d.name.isdigit())
    for _, d in reversed(steps):
        if (d / "_CHECKPOINT_METADATA").is_file():
            return _orbax_item_dir(d)
    return None


def _check_input(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not os.path.lexists(p):
        raise FileNotFoundError(f"{p}: no such file or directory")
    if not p.exists():
        raise FileNotFoundError(f"{p}: broken symbolic link")
    return p


def detect_format(path: str | os.PathLike) -> str:
    """The checkpoint format of ``path``, from its content (magic bytes), not its name.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: a directory that is not an Orbax checkpoint.
        CheckpointError: a file that is not (or no longer) a checkpoint.
    """
    p = _check_input(path)
    if p.is_dir():
        if _orbax_item_dir(p) is None:
            raise IsADirectoryError(f"{p}: is a directory, not a checkpoint file or an Orbax checkpoint (no _METADATA)")
        return "orbax"
    if not p.is_file():
        raise CheckpointError(f"{p}: not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise CheckpointError(f"{p}: empty file, not a checkpoint")
    with open(p, "rb") as f:
        head = f.read(16)
    if head[:2] == b"PK":  # a zip archive: torch.save's format, or np.savez's
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            kind = "npz" if p.suffix == ".npz" else "PyTorch"
            raise CheckpointError(f"{p}: corrupt or truncated {kind} file (bad zip archive: {_one_line(e, 120)})") from None
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


def _safe_globals() -> list:
    """Harmless classes that training checkpoints pickle next to the weights."""
    import argparse

    allowed: list = [argparse.Namespace, np.dtype]
    core = getattr(np, "_core", None) or getattr(np, "core")
    allowed.append(core.multiarray.scalar)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and isinstance(getattr(dtypes, n), type)]
    return allowed


_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset", "builtins.bytearray", "_codecs.encode")


def _pickle_globals(data: bytes) -> list[str]:
    """``module.name`` of every global a pickle stream references, found without unpickling.

    Reads opcodes with ``pickletools`` (which executes nothing), through every
    pickle in ``data`` (legacy ``torch.save`` files hold several).
    """
    import io
    import pickletools

    found: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        strings: list[str] = []
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                    found.append(arg.replace(" ", ".").replace("\n", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str) and ("UNICODE" in op.name or op.name in ("STRING", "BINSTRING", "SHORT_BINSTRING")):
                    strings.append(str(arg))
        except Exception:  # truncated or not a pickle: report what was found
            break
        if stream.tell() >= len(data):
            break
    return list(dict.fromkeys(found))


def _unsafe_global(p: Path, named: str | None) -> str | None:
    """The global that makes a torch file unsafe, by a static scan of its pickle(s)."""
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                data = b"".join(z.read(n) for n in z.namelist() if n.endswith(".pkl"))
        else:
            data = p.read_bytes()
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return named
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in _safe_globals()}
    found = _pickle_globals(data)
    if named:
        for g in found:
            if g == named or g.endswith("." + named):
                return g
    for g in found:
        if g not in allowed and not g.startswith(_SAFE_GLOBAL_PREFIXES):
            return g
    return named


def _torch_load(p: Path) -> Any:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{p}: reading a PyTorch file needs torch (pip install torch); or convert it to .safetensors elsewhere") from None
    import pickle
    import warnings

    try:
        with torch.serialization.safe_globals(_safe_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error says it all
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        m = re.search(r"GLOBAL ([\w.]+)", text)
        culprit = _unsafe_global(p, m.group(1) if m else None)
        if culprit:
            raise CheckpointError(
                f"{p}: refused to load: the pickle references {culprit}, which torch.load(weights_only=True) "
                "does not allow (loading it could run code); nothing in the file was executed. "
                "If it is a whole pickled model, save model.state_dict() instead"
            ) from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        detail = next((ln for ln in reversed(lines) if not ln.startswith("Check the documentation")), text)
        raise CheckpointError(
            f"{p}: corrupt or unsupported PyTorch file, refused by torch.load(weights_only=True) "
            f"({_one_line(detail, 160)}); nothing in the file was executed"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, IndexError, TypeError, AttributeError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{p}: corrupt or truncated PyTorch file ({type(e).__name__}: {_one_line(e, 160)})") from None


def _is_array(v: Any) -> bool:
    return isinstance(v, np.ndarray) or (type(v).__module__.startswith("torch") and hasattr(v, "detach"))


def _unwrap(obj: Any, p: Path) -> tuple[dict, str | None, list[str]]:
    """The model state_dict inside whatever ``torch.load`` returned."""
    trail: list[str] = []
    extras: list[str] = []
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        arrays = {k: v for k, v in obj.items() if _is_array(v)}
        if arrays:
            extras += [".".join([*trail, str(k)]) for k in obj if k not in arrays]
            return arrays, ".".join(trail) or None, extras
        nested = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if not nested:
            nested = [k for k, v in obj.items() if isinstance(v, Mapping) and any(_is_array(x) for x in v.values())]
            if len(nested) != 1:
                break
        key = nested[0]
        extras += [".".join([*trail, str(k)]) for k in obj if k != key]
        trail.append(str(key))
        obj = obj[key]
    what = f"a {type(obj).__name__}"
    if isinstance(obj, Mapping):
        what += f" with keys {', '.join(map(str, list(obj)[:8]))}" if obj else " that is empty"
    raise CheckpointError(f"{p}: no model state_dict found (the file holds {what})")


def _strip_shared_prefix(sd: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
    """Drops a prefix every key shares (``model.``, ``backbone.``) when it hides a ResNet."""
    if "conv1.weight" in sd:
        return sd, ""
    for key in sd:
        if key.endswith(".conv1.weight") and ".layer" not in key and not key.startswith("layer"):
            prefix = key[: -len("conv1.weight")]
            if all(k.startswith(prefix) for k in sd):
                return {k[len(prefix) :]: v for k, v in sd.items()}, prefix
    return sd, ""


def _torch_keys(raw: Mapping[str, Any], p: Path) -> tuple[dict[str, np.ndarray], str]:
    bad = [k for k in raw if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{p}: state_dict key {bad[0]!r} is not a string")
    stripped = [k for k in raw if k.startswith(("module.", "_orig_mod."))]
    sd = normalize_state_dict(raw)
    if len(sd) != len(raw):
        raise CheckpointError(f"{p}: keys collide once 'module.' prefixes are stripped")
    sd, prefix = _strip_shared_prefix(sd)
    if stripped and not prefix:
        prefix = stripped[0].split(".", 1)[0] + "."
    return sd, prefix


def _split_meta(flat: dict, p: Path) -> dict:
    raw = flat.pop(META_KEY, None)
    if raw is None:
        return {}
    try:
        raw = raw.item() if isinstance(raw, np.ndarray) else raw
        meta = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        return meta if isinstance(meta, dict) else {}
    except (ValueError, TypeError, AttributeError):
        raise CheckpointError(f"{p}: unreadable {META_KEY} entry") from None


def _from_flat(flat: dict[str, np.ndarray], fmt: str, p: Path, meta: dict) -> Checkpoint:
    """A flat dict of arrays as torch keys or (``params/...``) Flax keys."""
    if not flat:
        raise CheckpointError(f"{p}: no tensors in the file")
    if any(k.split("/", 1)[0] in FLAX_COLLECTIONS and "/" in k for k in flat):
        extras = [k for k in flat if k.split("/", 1)[0] not in FLAX_COLLECTIONS]
        tree = _unflatten({k: v for k, v in flat.items() if k not in extras})
        return Checkpoint(p, fmt, "flax", tree, meta, None, extras)
    sd, prefix = _torch_keys(flat, p)
    return Checkpoint(p, fmt, "torch", sd, meta, None, [], prefix)


def _find_variables(tree: Any, p: Path) -> tuple[dict, str | None, list[str]]:
    """``{"params", "batch_stats"}`` inside a restored Flax tree (a TrainState, ...)."""
    trail: list[str] = []
    extras: list[str] = []
    for _ in range(4):
        if not isinstance(tree, Mapping):
            break
        params = tree.get("params")
        if isinstance(params, Mapping) and "conv1" in params:
            extras += [".".join([*trail, str(k)]) for k in tree if k not in FLAX_COLLECTIONS]
            return {k: tree[k] for k in FLAX_COLLECTIONS if k in tree}, ".".join(trail) or None, extras
        nested = [k for k in ("params", "model", "state", "variables", "target") if isinstance(tree.get(k), Mapping)]
        if not nested:
            break
        extras += [".".join([*trail, str(k)]) for k in tree if k != nested[0]]
        trail.append(nested[0])
        tree = tree[nested[0]]
    keys = ", ".join(map(str, list(tree)[:8])) if isinstance(tree, Mapping) else type(tree).__name__
    raise CheckpointError(f"{p}: no Flax ResNet variables found (need params/conv1; top-level keys: {keys})")


def _to_numpy_tree(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _to_numpy_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return {str(i): _to_numpy_tree(v) for i, v in enumerate(tree)}
    return np.asarray(tree)


def _restore_on_host(ocp, item: Path) -> Any:
    """Restores an Orbax PyTree as numpy arrays.

    A plain restore places arrays as they were saved, and fails on another
    topology (a checkpoint of a 4-device run read on one device); numpy
    arrays restore anywhere.
    """
    import jax

    with ocp.StandardCheckpointer() as ckptr:
        md = ckptr.metadata(item)
    md = getattr(md, "item_metadata", md)
    md = getattr(md, "tree", md)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), md)
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(item, args=ocp.args.PyTreeRestore(restore_args=args))


def _read_orbax(p: Path) -> Checkpoint:
    item = _orbax_item_dir(p)
    meta = {}
    for d in dict.fromkeys((p, item.parent, item)):
        try:
            custom = json.loads((d / "_CHECKPOINT_METADATA").read_text()).get("custom_metadata") or {}
            meta = custom.get(ORBAX_META_KEY) or meta
        except (OSError, ValueError, AttributeError):
            pass
    import orbax.checkpoint as ocp

    try:
        tree = _restore_on_host(ocp, item.absolute())
    except Exception as e:  # orbax/tensorstore raise many kinds
        raise CheckpointError(f"{p}: cannot restore the Orbax checkpoint ({type(e).__name__}: {_one_line(e, 160)})") from None
    variables, wrapper, extras = _find_variables(_to_numpy_tree(tree), p)
    if item != p:  # report which item (and step) was read
        wrapper = "/".join(x for x in (str(item.relative_to(p)), wrapper) if x)
    return Checkpoint(p, "orbax", "flax", variables, meta if isinstance(meta, dict) else {}, wrapper, extras)


def read(path: str | os.PathLike) -> Checkpoint:
    """Reads any supported checkpoint into numpy arrays, without validating it.

    Raises:
        FileNotFoundError, IsADirectoryError, CheckpointError.
    """
    fmt = detect_format(path)
    p = Path(path)
    if fmt == "orbax":
        return _read_orbax(p)
    if fmt == "pth":
        obj = _torch_load(p)
        raw, wrapper, extras = _unwrap(obj, p)
        sd, prefix = _torch_keys({k: _to_numpy(v) for k, v in raw.items()}, p)
        if any(k.startswith(FLAX_COLLECTIONS[0] + "/") for k in sd):
            ck = _from_flat(sd, fmt, p, {})
            ck.wrapper, ck.extras = wrapper, extras + ck.extras
            return ck
        return Checkpoint(p, "pth", "torch", sd, {}, wrapper, extras, prefix)
    if fmt == "safetensors":
        import safetensors
        from safetensors.numpy import load_file

        try:
            with safetensors.safe_open(str(p), framework="numpy") as f:
                header = f.metadata() or {}
            flat = load_file(str(p))
        except Exception as e:  # SafetensorError, OSError, ...
            raise CheckpointError(f"{p}: corrupt or truncated safetensors file ({_one_line(e, 160)})") from None
        meta = {}
        if SAFETENSORS_META_KEY in header:
            try:
                meta = json.loads(header[SAFETENSORS_META_KEY])
            except ValueError:
                raise CheckpointError(f"{p}: unreadable '{SAFETENSORS_META_KEY}' metadata") from None
        return _from_flat(dict(flat), fmt, p, meta if isinstance(meta, dict) else {})
    if fmt == "npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                flat = {k: z[k] for k in z.files}
        except Exception as e:  # BadZipFile, ValueError (object arrays), ...
            raise CheckpointError(f"{p}: corrupt, truncated or unsafe .npz file ({_one_line(e, 160)})") from None
        meta = _split_meta(flat, p)
        return _from_flat(flat, fmt, p, meta)
    # msgpack
    import flax.serialization

    try:
        tree = flax.serialization.msgpack_restore(p.read_bytes())
    except Exception as e:  # msgpack's errors are ValueError subclasses and friends
        raise CheckpointError(f"{p}: corrupt or truncated msgpack file ({type(e).__name__}: {_one_line(e, 160)})") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{p}: msgpack file holds a {type(tree).__name__}, not Flax variables")
    meta = _split_meta(tree, p)
    variables, wrapper, extras = _find_variables(_to_numpy_tree(tree), p)
    return Checkpoint(p, "msgpack", "flax", variables, meta, wrapper, extras)


# ---------------------------------------------------------------------------
# Validation: raw checkpoint -> model config and Flax variables


@dataclasses.dataclass
class Resolved:
    config: ModelConfig  # layout: of ``variables`` (seed = conv biases)
    variables: dict
    num_batches_tracked: Any  # int, {flax BN path: int}, or None (the source had none)
    source: Checkpoint


def _nbt_from_torch(sd: Mapping[str, np.ndarray], cfg: ModelConfig) -> Any:
    to_flax = {
        leaf.torch_key[: -len(".running_mean")]: "/".join(leaf.flax_path[:-1])
        for leaf in leaves(cfg)
        if leaf.torch_key.endswith(".running_mean")
    }
    values = {}
    for prefix, fpath in to_flax.items():
        v = sd.get(f"{prefix}.num_batches_tracked")
        if v is not None:
            values[fpath] = int(np.asarray(v).reshape(-1)[0]) if np.size(v) else 0
    if not values:
        return None
    distinct = set(values.values())
    return distinct.pop() if len(distinct) == 1 and len(values) == len(to_flax) else values


def _apply_nbt(sd: dict[str, np.ndarray], cfg: ModelConfig, nbt: Any) -> dict[str, np.ndarray]:
    """Sets (or drops) ``num_batches_tracked`` and puts each after its BN's running_var, as torch does."""
    by_flax = {}
    for leaf in leaves(cfg):
        if leaf.torch_key.endswith(".running_mean"):
            by_flax["/".join(leaf.flax_path[:-1])] = leaf.torch_key[: -len(".running_mean")]
    per_prefix = {}
    if isinstance(nbt, Mapping):
        per_prefix = {by_flax[k]: int(v) for k, v in nbt.items() if k in by_flax}
    out: dict[str, np.ndarray] = {}
    for key, value in sd.items():
        if key.endswith(".num_batches_tracked"):
            continue
        out[key] = value
        if key.endswith(".running_var") and nbt is not None:
            prefix = key[: -len(".running_var")]
            n = per_prefix.get(prefix, 0) if isinstance(nbt, Mapping) else int(nbt)
            out[f"{prefix}.num_batches_tracked"] = np.array(n, dtype=np.int64)
    return out


def _relayout(variables: dict, cfg: ModelConfig, layout: str) -> dict:
    """Flax variables in another layout: conv biases folded into BN (torchvision) or zero (seed)."""
    if layout == cfg.layout:
        return variables
    sd = flax_to_torch(variables, layout=layout)
    return torch_to_flax(sd, cfg.arch, layout)


def resolve(
    ck: Checkpoint,
    arch: str | None = None,
    layout: str | None = None,
    allow_nonfinite: bool = False,
) -> Resolved:
    """Validates a checkpoint strictly and converts it to Flax variables.

    Args:
        ck: from ``read``.
        arch: the architecture the file must hold (else inferred); a wrong one
            raises a ``ConversionError`` listing mismatching keys and shapes.
        layout: ``"torchvision"`` (bias-free convs) or ``"seed"`` (conv biases)
            for the returned variables; ``None`` keeps the file's.
        allow_nonfinite: accept NaN/Inf weights.
    """
    if arch is not None and arch != "auto":
        get_arch(arch)
    else:
        arch = None
    if layout not in (None, "torchvision", "seed"):
        raise ValueError(f"unknown layout {layout!r}; choose torchvision or seed")
    where = str(ck.path)
    if ck.keys == "torch":
        sd = ck.tensors
        try:
            cfg = infer_config(sd, arch)
        except ConversionError as e:
            raise ConversionError(f"a ResNet from {where}", e.missing, e.unexpected, e.mismatched, e.other) from None
        try:
            variables = torch_to_flax(sd, cfg.arch, cfg.layout)
        except ConversionError as e:
            target = f"{cfg.arch} ({cfg.layout} layout) from {where}"
            if arch is not None:
                with contextlib.suppress(ConversionError, ValueError):
                    held = infer_config(sd)
                    if held.arch != arch:
                        target += f", which holds a {held.arch}"
            raise ConversionError(target, e.missing, e.unexpected, e.mismatched, e.other) from None
        nbt = _nbt_from_torch(sd, cfg)
    else:
        tree = ck.tensors
        try:
            fcfg, has_bias = infer_flax_config(tree)
        except ConversionError as e:
            raise ConversionError(f"Flax ResNet variables from {where}", e.missing, e.unexpected, e.mismatched, e.other) from None
        cfg = ModelConfig(fcfg.arch, "seed" if has_bias else "torchvision", fcfg.num_classes, fcfg.in_channels)
        if arch is not None and arch != cfg.arch:
            _check_flax_tree(tree, dataclasses.replace(cfg, arch=arch), f"{arch} from {where} (which holds {cfg.arch})")
        _check_flax_tree(tree, cfg, f"{cfg.arch} ({cfg.layout} layout) from {where}")
        variables = {c: tree[c] for c in FLAX_COLLECTIONS if c in tree}
        nbt = ck.meta.get("num_batches_tracked", 0) if ck.meta else 0
    if not allow_nonfinite:
        _check_finite(ck.flat(), where)
    if layout is not None and layout != cfg.layout:
        _check_layout(cfg.arch, layout)
        variables = _relayout(variables, cfg, layout)
        cfg = dataclasses.replace(cfg, layout=layout)
    return Resolved(cfg, variables, nbt, ck)


def _check_flax_tree(tree: Mapping, cfg: ModelConfig, target: str) -> None:
    """Every leaf of ``cfg``'s Flax variables present, known, rightly shaped and floating; no copies."""
    try:
        mapping = leaves(cfg)
    except ValueError as e:
        raise ConversionError(target, other=[str(e)]) from None
    expected = {
        "/".join((leaf.collection, *leaf.flax_path)): tuple(leaf.transform.to_flax(np.empty(leaf.torch_shape, np.bool_)).shape)
        for leaf in mapping
    }
    found = {"/".join((c, *k)): v for c in FLAX_COLLECTIONS for k, v in _flatten(tree.get(c, {})).items()}
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = [(k, shape, np.shape(found[k])) for k, shape in expected.items() if k in found and tuple(np.shape(found[k])) != shape]
    nonfloat = [
        f"{k} has dtype {np.asarray(found[k]).dtype}, expected floating point"
        for k in expected
        if k in found and not _is_float(np.asarray(found[k]))
    ]
    if missing or unexpected or mismatched or nonfloat:
        raise ConversionError(target, missing, unexpected, mismatched, nonfloat)


def _check_layout(arch: str, layout: str) -> bool:
    from flax_resnet.archs import check_layout

    check_layout(get_arch(arch), layout)
    return True


def read_state_dict(path: str | os.PathLike, layout: str | None = None) -> dict[str, np.ndarray]:
    """A torch-layout state_dict (numpy arrays) from any supported file.

    Torch-key files come back as stored, unwrapped and with prefixes
    stripped (not validated against an architecture). Flax files are
    converted with ``flax_to_torch`` (``layout`` defaults to the variables'
    own: seed if the convs have biases), restoring ``num_batches_tracked``
    from the file's metadata.
    """
    ck = read(path)
    if ck.keys == "torch" and layout is None:
        return ck.tensors
    r = resolve(ck, allow_nonfinite=True)
    return _torch_state(r, layout or r.config.layout)


def _torch_state(r: Resolved, layout: str) -> dict[str, np.ndarray]:
    _check_layout(r.config.arch, layout)
    sd = flax_to_torch(r.variables, layout=layout)
    return _apply_nbt(sd, dataclasses.replace(r.config, layout=layout), r.num_batches_tracked)


def load_variables(
    path: str | os.PathLike,
    arch: str | None = None,
    layout: str | None = None,
    param_dtype: Any = None,
    allow_nonfinite: bool = False,
) -> tuple[ModelConfig, dict]:
    """``(config, variables)`` from any supported file; see ``load``."""
    r = resolve(read(path), arch, layout, allow_nonfinite)
    return r.config, _cast_tree(r.variables, _dtype(param_dtype))


def load(
    path: str | os.PathLike,
    arch: str | None = None,
    layout: str | None = None,
    dtype: Any = None,
    allow_nonfinite: bool = False,
    param_dtype: Any = None,
    **model_kwargs: Any,
):
    """Loads any checkpoint as a Flax model and its variables.

    Args:
        path: a ``.pth``/``.pt``/``.bin`` (torchvision, timm, a training
            run's checkpoint), ``.safetensors``, ``.npz``, Flax ``.msgpack``
            file, or an Orbax checkpoint directory (also a
            ``CheckpointManager`` step directory with one PyTree item).
        arch: the architecture the file must hold (else inferred from keys
            and shapes); a wrong one raises a ``ConversionError`` listing
            the mismatching keys and shapes.
        layout: ``"torchvision"`` or ``"seed"`` for the returned variables
            (conv biases folded into BN or added as zeros); ``None`` keeps
            the file's.
        dtype: the model's compute dtype (``ResNet.dtype``, e.g.
            ``jnp.bfloat16`` for mixed precision), as in ``from_torch``.
        allow_nonfinite: accept NaN/Inf weights.
        param_dtype: cast floating variables (``"float32"``, ``"bfloat16"``
            or a dtype); ``None`` keeps the file's.
        **model_kwargs: more ``ResNet`` attributes (``precision``, ...).

    Returns:
        ``(model, variables)``: a ``flax_resnet.ResNet`` and
        ``{"params", "batch_stats"}`` of numpy arrays for ``model.apply``.
    """
    from flax_resnet.model import ResNet

    cfg, variables = load_variables(path, arch, layout, param_dtype, allow_nonfinite)
    kwargs: dict[str, Any] = {}
    dtypes = {np.asarray(v).dtype for v in _flatten(variables["params"]).values()}
    if len(dtypes) == 1:
        kwargs["param_dtype"] = dtypes.pop()
    if dtype is not None:
        kwargs["dtype"] = dtype
    kwargs.update(model_kwargs)
    model = ResNet(arch=cfg.arch, num_classes=cfg.num_classes, conv_bias=cfg.conv_bias, **kwargs)
    return model, variables


# ---------------------------------------------------------------------------
# Writing


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


def _is_orbax_dir(p: Path) -> bool:
    return p.is_dir() and ((p / "_CHECKPOINT_METADATA").exists() or (p / "_METADATA").exists())


def check_output(path: str | os.PathLike, fmt: str, force: bool = False) -> Path:
    """Fails early, before any work, if ``path`` cannot or may not be written."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"{p}: output directory {parent} does not exist")
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


def _remove(p: Path) -> None:
    with contextlib.suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif os.path.lexists(p):
            p.unlink()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, fmt: str, force: bool = False) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; on success renames it into place.

    The caller writes a file (or, for ``"orbax"``, a directory) at the
    temporary path. On any exception the temporary data is removed and
    ``path`` is untouched.
    """
    p = check_output(path, fmt, force)
    parent = p.parent if str(p.parent) else Path(".")
    tmp = parent / f".{p.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if not os.path.lexists(tmp):
            raise RuntimeError(f"internal error: nothing was written to {tmp}")
        check_output(p, fmt, force)  # again: it may have appeared meanwhile
        if os.path.lexists(p) and (p.is_dir() or tmp.is_dir()):
            old = parent / f"{tmp.name}.old"
            os.rename(p, old)
            try:
                os.replace(tmp, p)
            except BaseException:
                os.rename(old, p)
                raise
            _remove(old)
        else:
            os.replace(tmp, p)
        _fsync_dir(parent)
    except BaseException as e:
        _remove(tmp)
        for stray in parent.glob(f"{tmp.name}*"):  # e.g. Orbax's own temporary directory
            _remove(stray)
        if isinstance(e, OSError) and tmp.name in str(e):  # name the user's path, not our temporary one
            raise type(e)(f"{p}: cannot write ({e.strerror or e})") from e
        raise


def _write_bytes(tmp: Path, write: Callable[[Any], None]) -> None:
    with open(tmp, "xb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _meta_for(cfg: ModelConfig, variables: Mapping, nbt: Any, extra: Mapping | None) -> dict:
    meta = {
        "format_version": META_VERSION,
        "arch": cfg.arch,
        "layout": cfg.layout,
        "num_classes": cfg.num_classes,
        "in_channels": cfg.in_channels,
        "num_batches_tracked": nbt,
        "dtype": _tree_dtype(variables.get("params", {})),
    }
    meta.update(extra or {})
    return meta


def _contiguous(a: Any) -> np.ndarray:
    """C-contiguous, keeping 0-d arrays 0-d (``np.ascontiguousarray`` makes them 1-d)."""
    a = np.asarray(a)
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _torch_tensor(a: np.ndarray):
    import warnings

    import torch

    a = _contiguous(a)
    with warnings.catch_warnings():  # read-only arrays (msgpack, mmap): torch.save only reads them
        warnings.filterwarnings("ignore", message=".*not writable.*")
        if a.dtype.name == "bfloat16":
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)


def _write_pth(tmp: Path, sd: Mapping[str, np.ndarray]) -> None:
    try:
        import torch
    except ImportError:
        raise ValueError("writing a .pth file needs torch (pip install torch); write .safetensors instead") from None
    tensors = {k: _torch_tensor(v) for k, v in sd.items()}
    _write_bytes(tmp, lambda f: torch.save(tensors, f))


def _write_safetensors(tmp: Path, flat: Mapping[str, np.ndarray], header: dict[str, str]) -> None:
    from safetensors.numpy import save

    data = save({k: _contiguous(v) for k, v in flat.items()}, metadata=header)
    _write_bytes(tmp, lambda f: f.write(data))


def _write_npz(tmp: Path, flat: Mapping[str, np.ndarray], meta: dict) -> None:
    arrays = {k: _contiguous(v) for k, v in flat.items()}
    arrays[META_KEY] = np.array(json.dumps(meta))
    _write_bytes(tmp, lambda f: np.savez(f, **arrays))


def _write_msgpack(tmp: Path, variables: Mapping, meta: dict) -> None:
    import flax.serialization

    tree = {k: variables[k] for k in FLAX_COLLECTIONS if k in variables}
    tree[META_KEY] = json.dumps(meta)
    data = flax.serialization.msgpack_serialize(tree)
    _write_bytes(tmp, lambda f: f.write(data))


def _write_orbax(tmp: Path, variables: Mapping, meta: dict) -> None:
    import orbax.checkpoint as ocp

    tree = {k: variables[k] for k in FLAX_COLLECTIONS if k in variables}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp.absolute(), tree, custom_metadata={ORBAX_META_KEY: meta})
        ckptr.wait_until_finished()


def _write(p: Path, fmt: str, r: Resolved, layout: str | None, force: bool, extra_meta: Mapping | None, dtype=None) -> dict:
    """Writes resolved variables as ``fmt`` (re-laid out, then cast to ``dtype``); returns what was written."""
    if layout is not None and layout not in OUTPUT_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(OUTPUT_LAYOUTS)}")
    if layout == "flax" and fmt == "pth":
        raise ValueError("layout 'flax' (flattened Flax keys) is for .safetensors/.npz outputs; a .pth holds a torch state_dict")
    if layout in ("torchvision", "seed"):
        _check_layout(r.config.arch, layout)
    flax_keys = fmt in FLAX_NATIVE or layout == "flax"
    if flax_keys:
        if layout in ("torchvision", "seed") and layout != r.config.layout:
            variables = _relayout(r.variables, r.config, layout)
            cfg = dataclasses.replace(r.config, layout=layout)
        else:
            variables, cfg = r.variables, r.config
        variables = _cast_tree(variables, dtype)
        flat = {f"{c}/" + "/".join(k): v for c in FLAX_COLLECTIONS for k, v in _flatten(variables.get(c, {})).items()}
    else:
        cfg = dataclasses.replace(r.config, layout=layout or r.config.layout)
        flat = _cast_tree(_torch_state(r, cfg.layout), dtype)  # fold seed biases in full precision, then cast
        variables = _cast_tree(r.variables, dtype)
    meta = _meta_for(cfg, variables, r.num_batches_tracked, extra_meta)
    with atomic_output(p, fmt, force) as tmp:
        if fmt == "msgpack":
            _write_msgpack(tmp, variables, meta)
        elif fmt == "orbax":
            _write_orbax(tmp, variables, meta)
        elif fmt == "safetensors":
            header = {"format": "flax" if flax_keys else "pt", SAFETENSORS_META_KEY: json.dumps(meta)}
            _write_safetensors(tmp, flat, header)
        elif fmt == "npz":
            _write_npz(tmp, flat, meta)
        elif fmt == "pth":
            _write_pth(tmp, flat)
        else:
            raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return {
        "path": str(p),
        "format": fmt,
        "keys": "flax" if flax_keys else "torch",
        "layout": cfg.layout,
        "arch": cfg.arch,
        "num_classes": cfg.num_classes,
        "dtype": _tree_dtype(variables["params"]),
        "bytes": _path_bytes(p),
    }


def save(
    path: str | os.PathLike,
    variables: Mapping[str, Any],
    *,
    format: str | None = None,
    layout: str | None = None,
    dtype: Any = None,
    force: bool = False,
    meta: Mapping[str, Any] | None = None,
    allow_nonfinite: bool = False,
) -> dict:
    """Writes Flax variables (or a torch state_dict) to a checkpoint, atomically.

    Args:
        path: output file, or directory for Orbax.
        variables: ``{"params", "batch_stats"}`` (numpy or jax arrays), or a
            torch-layout state_dict.
        format: one of ``FORMATS``; ``None`` follows ``path``'s suffix
            (``.msgpack``, ``.safetensors``, ``.npz``, ``.pth``/``.pt``/``.bin``;
            none: an Orbax checkpoint directory).
        layout: torch key layout of ``.pth``/``.safetensors``/``.npz``
            outputs, ``"torchvision"`` or ``"seed"``, or ``"flax"`` for
            flattened Flax keys in ``.safetensors``/``.npz``; for Flax
            outputs, ``"torchvision"``/``"seed"`` folds or adds conv biases.
            ``None`` keeps the variables' own layout (seed iff conv biases).
        dtype: cast floating leaves (``"float32"``, ``"bfloat16"``).
        force: overwrite an existing output.
        meta: extra metadata to store (e.g. ``{"num_batches_tracked": 3}``).
        allow_nonfinite: write NaN/Inf weights instead of refusing.

    Returns:
        ``{"path", "format", "keys", "layout", "arch", "num_classes", "dtype", "bytes"}``.
    """
    fmt = format or format_for_path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    check_output(path, fmt, force)
    variables = _to_numpy_tree(variables)
    if "params" in variables:
        ck = Checkpoint(Path("<variables>"), "memory", "flax", {k: variables[k] for k in FLAX_COLLECTIONS if k in variables}, dict(meta or {}))
    else:
        ck = Checkpoint(Path("<state_dict>"), "memory", "torch", normalize_state_dict(variables))
    r = resolve(ck, allow_nonfinite=allow_nonfinite)
    return _write(Path(path), fmt, r, layout, force, meta, _dtype(dtype))


# ---------------------------------------------------------------------------
# convert and inspect


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    arch: str | None = None,
    layout: str | None = None,
    dtype: Any = None,
    format: str | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
) -> dict:
    """Converts a checkpoint file to another format; see ``flax-resnet convert``.

    Returns:
        A report: ``src``, ``src_format``, ``dst``, ``format``, ``keys``,
        ``arch``, ``layout``, ``num_classes``, ``num_params``, ``dtype``,
        ``bytes``, ``seconds``, ``wrapper``, ``extras``.
    """
    t0 = time.perf_counter()
    fmt = format or format_for_path(dst)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    _check_input(src)
    check_output(dst, fmt, force)
    dt = _dtype(dtype)
    if layout is not None and layout not in OUTPUT_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(OUTPUT_LAYOUTS)}")
    ck = read(src)
    r = resolve(ck, arch, None, allow_nonfinite)
    out = _write(Path(dst), fmt, r, layout, force, {"source_format": ck.format}, dt)
    out.update(
        src=str(src),
        src_format=ck.format,
        src_keys=ck.keys,
        src_layout=r.config.layout,
        dst=out.pop("path"),
        num_params=_tree_size(r.variables["params"]),
        num_stats=_tree_size(r.variables.get("batch_stats", {})),
        wrapper=ck.wrapper,
        extras=ck.extras,
        prefix=ck.prefix,
        seconds=time.perf_counter() - t0,
    )
    return out


def inspect(path: str | os.PathLike) -> dict:
    """A report on a checkpoint, without refusing on problems.

    Returns:
        A dict: ``path``, ``format``, ``keys``, ``bytes``, ``wrapper``,
        ``extras``, ``prefix``, ``num_tensors``, ``dtypes`` (dtype: count),
        ``arch``, ``layout``, ``num_classes``, ``in_channels``,
        ``num_params``, ``num_stats``, ``num_batches_tracked``,
        ``nonfinite`` (key, NaN count, Inf count, size), ``missing``,
        ``unexpected``, ``mismatched``, ``problems`` (one line each) and
        ``meta``. ``ok`` is True when ``convert`` would accept the file.

    Raises:
        FileNotFoundError, IsADirectoryError, CheckpointError: not a readable checkpoint.
    """
    ck = read(path)
    p = Path(path)
    flat = ck.flat()
    report: dict[str, Any] = {
        "path": str(p),
        "format": ck.format,
        "keys": ck.keys,
        "bytes": _path_bytes(p),
        "wrapper": ck.wrapper,
        "extras": list(ck.extras),
        "prefix": ck.prefix,
        "num_tensors": len(flat),
        "dtypes": _dtype_counts(flat),
        "arch": None,
        "layout": None,
        "num_classes": None,
        "in_channels": None,
        "num_params": None,
        "num_stats": None,
        "num_batches_tracked": None,
        "nonfinite": [list(b) for b in _nonfinite(flat)],
        "missing": [],
        "unexpected": [],
        "mismatched": [],
        "problems": [],
        "meta": ck.meta,
    }
    try:
        r = resolve(ck, allow_nonfinite=True)
    except ConversionError as e:
        report.update(missing=e.missing, unexpected=e.unexpected, mismatched=[[k, list(a), list(b)] for k, a, b in e.mismatched])
        report["problems"].append(_one_line(e, 400))
        try:  # what the keys say, even if they do not all fit
            cfg = infer_config(ck.tensors) if ck.keys == "torch" else infer_flax_config(ck.tensors)[0]
            report.update(arch=cfg.arch, layout=cfg.layout, num_classes=cfg.num_classes, in_channels=cfg.in_channels)
        except (ConversionError, ValueError, TypeError, KeyError):
            pass
    else:
        cfg = r.config
        report.update(
            arch=cfg.arch,
            layout=cfg.layout,
            num_classes=cfg.num_classes,
            in_channels=cfg.in_channels,
            num_params=_tree_size(r.variables["params"]),
            num_stats=_tree_size(r.variables.get("batch_stats", {})),
            num_batches_tracked=r.num_batches_tracked,
        )
    if report["nonfinite"]:
        key, n_nan, n_inf, _ = report["nonfinite"][0]
        more = f" and {len(report['nonfinite']) - 1} more tensor(s)" if len(report["nonfinite"]) > 1 else ""
        report["problems"].append(f"non-finite values in {key} ({n_nan} NaN, {n_inf} Inf){more}")
    report["ok"] = not report["problems"]
    return report
