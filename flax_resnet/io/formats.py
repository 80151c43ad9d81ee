"""Reading any supported file into numpy arrays (``read``), and the per-format writers.

``.pth`` goes through ``torch_pickle`` only; ``.safetensors`` (numpy API) and
``.npz`` (``allow_pickle=False``) never need torch; ``.msgpack`` through
``flax.serialization``; Orbax through ``orbax_io``. Files hold torch keys
(``layer1.0.conv1.weight``) or flattened Flax keys (``params/layer1/0/conv1/kernel``).
Metadata (arch, layout, classes, ``num_batches_tracked``) travels as a
``__meta__`` JSON entry (msgpack, npz), the ``flax_resnet`` key of safetensors
metadata, or Orbax's ``custom_metadata``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from flax_resnet.archs import ARCHS
from flax_resnet.convert import ConversionError, infer_config, infer_flax_config, leaves, normalize_state_dict
from flax_resnet.io import hf_dir, npz, orbax_io, torch_pickle
from flax_resnet.io.atomic import write_bytes
from flax_resnet.io.common import (
    FLAX_COLLECTIONS,
    MAX_TREE_DEPTH,
    CheckpointError,
    check_interrupt,
    flat,
    one_line,
    parse_json,
    to_numpy_tree,
    tree_depth,
    unflat,
)
from flax_resnet.io.sniff import detect_format, orbax_item_dir

META_VERSION = 1
META_KEY = "__meta__"  # msgpack / npz entry holding the JSON metadata
SAFETENSORS_META_KEY = "flax_resnet"  # key in safetensors' string metadata
SMALL_EXTRA_BYTES = 1 << 20  # an npz member the architecture has no place for may hold this much


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
        return dict(self.tensors) if self.keys == "torch" else flat(self.tensors)


# ---------------------------------------------------------------------------
# keys


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


def torch_keys(raw: Mapping[str, Any], p: Path) -> tuple[dict[str, np.ndarray], str]:
    """A state_dict without ``module.``/``_orig_mod.``/shared prefixes, and the prefix stripped."""
    try:  # dense numeric tensors only: meta, sparse and float8 tensors are named
        sd = normalize_state_dict(raw)
    except ConversionError as e:
        raise CheckpointError(f"{p}: " + "; ".join(e.other)) from None
    stripped = [k for k in raw if k.startswith(("module.", "_orig_mod."))]
    if len(sd) != len(raw):
        raise CheckpointError(f"{p}: keys collide once 'module.' prefixes are stripped")
    sd, prefix = _strip_shared_prefix(sd)
    if stripped and not prefix:
        prefix = stripped[0].split(".", 1)[0] + "."
    return sd, prefix


def check_meta(meta: Any, where: str) -> dict:
    """flax-resnet metadata of any format, the fields the readers use checked (``num_batches_tracked``: ``resolve``).

    Raises:
        CheckpointError: a field of the wrong type, naming the file and field.
    """
    if not isinstance(meta, dict):
        return {}
    for key in ("source", "arch", "layout", "dtype", "source_format"):
        if key in meta and not isinstance(meta[key], str):
            raise CheckpointError(f"{where}: metadata {key} must be a string, found {one_line(repr(meta[key]), 60)}")
    if meta.get("source") == "timm" and "arch" in meta:
        if meta["arch"] not in ARCHS:
            raise CheckpointError(f"{where}: metadata arch {one_line(repr(meta['arch']), 60)} is not an architecture this library builds")
    if "stride_in_1x1" in meta and not isinstance(meta["stride_in_1x1"], bool):
        raise CheckpointError(f"{where}: metadata stride_in_1x1 must be true or false, found {one_line(repr(meta['stride_in_1x1']), 60)}")
    labels = meta.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
        raise CheckpointError(f"{where}: metadata labels must be a list of strings, found {one_line(repr(labels), 60)}")
    return meta


def _split_meta(tree: dict, p: Path) -> dict:
    raw = tree.pop(META_KEY, None)
    if raw is None:
        return {}
    if isinstance(raw, np.ndarray):
        if raw.size != 1 or raw.dtype.kind not in "SU":
            raise CheckpointError(f"{p}: unreadable {META_KEY} entry (a {raw.dtype} array of shape {raw.shape}, not a JSON string)")
        raw = raw.reshape(()).item()
    if not isinstance(raw, (str, bytes)):
        raise CheckpointError(f"{p}: unreadable {META_KEY} entry ({type(raw).__name__}, not a JSON string)")
    return check_meta(parse_json(raw, f"{p}: {META_KEY}"), str(p))


def from_flat(tensors: dict[str, np.ndarray], fmt: str, p: Path, meta: dict) -> Checkpoint:
    """A flat dict of arrays as torch keys or (``params/...``) Flax keys."""
    if not tensors:
        raise CheckpointError(f"{p}: no tensors in the file")
    if any(k.split("/", 1)[0] in FLAX_COLLECTIONS and "/" in k for k in tensors):
        extras = [k for k in tensors if k.split("/", 1)[0] not in FLAX_COLLECTIONS]
        try:
            tree = unflat({k: v for k, v in tensors.items() if k not in extras})
        except ValueError as e:  # a key nested under a leaf
            raise CheckpointError(f"{p}: inconsistent Flax keys ({one_line(e, 120)})") from None
        return Checkpoint(p, fmt, "flax", tree, meta, None, extras)
    sd, prefix = torch_keys(tensors, p)
    return Checkpoint(p, fmt, "torch", sd, meta, None, [], prefix)


def find_variables(tree: Any, p: Path) -> tuple[dict, str | None, list[str]]:
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


def _check_depth(tree: Any, p: Path) -> None:
    if tree_depth(tree) > MAX_TREE_DEPTH:
        raise CheckpointError(f"{p}: nested more than {MAX_TREE_DEPTH} levels deep; not Flax ResNet variables")


# ---------------------------------------------------------------------------
# readers


def _check_npz_sizes(p: Path) -> None:
    """Refuses an .npz whose declared arrays exceed what its architecture holds, before inflating any (zip bombs).

    ``npz.members`` refuses bombs and lying headers whatever the keys; this adds
    the architecture's own bound where the keys name one.
    """
    declared = {k: (m.shape, m.dtype) for k, m in npz.members(p, CheckpointError).items()}
    stubs = {k: np.lib.stride_tricks.as_strided(np.zeros(1, d if d.kind in "biufcV" else np.uint8), shape, (0,) * len(shape)) for k, (shape, d) in declared.items()}
    nbytes = {k: int(np.prod(shape, dtype=np.float64)) * d.itemsize for k, (shape, d) in declared.items()}
    try:
        if any(k.split("/", 1)[0] in FLAX_COLLECTIONS and "/" in k for k in stubs):
            cfg = infer_flax_config(unflat({k: v for k, v in stubs.items() if "/" in k}))[0]
        else:
            cfg = infer_config({k: v for k, v in torch_keys(stubs, p)[0].items()})
    except (ConversionError, ValueError, KeyError, TypeError, IndexError):
        return  # not a ResNet: the full read says why, and small files are harmless
    n_weights = sum(int(np.prod(leaf.torch_shape)) for leaf in leaves(cfg))
    limit = n_weights * 8 + SMALL_EXTRA_BYTES  # every weight as float64, plus metadata
    total = sum(nbytes.values())
    if total > limit:
        big = max(nbytes, key=nbytes.get)
        raise CheckpointError(
            f"{p}: declares {total:,} bytes of arrays ({big!r}: {declared[big][0]} {declared[big][1]}), more than a "
            f"{cfg.arch} can hold ({limit:,}); refused before inflating"
        )


def _npz_members(p: Path, only_meta: bool = False) -> dict[str, np.ndarray]:
    """The members of a checked ``.npz`` (just its metadata member with ``only_meta``)."""
    _check_npz_sizes(p)
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files if not only_meta or k == META_KEY}
    except Exception as e:  # BadZipFile (CRC), ValueError (object arrays), ...
        raise CheckpointError(f"{p}: corrupt, truncated or unsafe .npz file ({one_line(e, 160)})") from None


def _read_npz(p: Path) -> Checkpoint:
    tensors = _npz_members(p)
    meta = _split_meta(tensors, p)
    return from_flat(tensors, "npz", p, meta)


def _safetensors_meta(p: Path) -> dict:
    """flax-resnet's entry of a safetensors header (the tensors are not read)."""
    import safetensors

    try:
        with safetensors.safe_open(str(p), framework="numpy") as f:
            header = f.metadata() or {}
    except Exception as e:  # SafetensorError, OSError
        raise CheckpointError(f"{p}: corrupt or truncated safetensors file ({one_line(e, 160)})") from None
    raw = header.get(SAFETENSORS_META_KEY)
    return {} if raw is None else check_meta(parse_json(raw, f"{p}: '{SAFETENSORS_META_KEY}' metadata"), str(p))


def _read_safetensors(p: Path) -> Checkpoint:
    from safetensors.numpy import load_file

    meta = _safetensors_meta(p)
    try:
        tensors = load_file(str(p))
    except Exception as e:  # SafetensorError, OSError, unsupported dtypes (float8), ...
        raise CheckpointError(f"{p}: corrupt or truncated safetensors file ({one_line(e, 160)})") from None
    return from_flat(dict(tensors), "safetensors", p, meta)


def _read_msgpack(p: Path) -> Checkpoint:
    import flax.serialization

    try:
        tree = flax.serialization.msgpack_restore(p.read_bytes())
    except Exception as e:  # msgpack's errors are ValueError subclasses and friends; RecursionError
        raise CheckpointError(f"{p}: corrupt or truncated msgpack file ({type(e).__name__}: {one_line(e, 160)})") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{p}: msgpack file holds a {type(tree).__name__}, not Flax variables")
    _check_depth(tree, p)
    meta = _split_meta(tree, p)
    variables, wrapper, extras = find_variables(to_numpy_tree(tree), p)
    return Checkpoint(p, "msgpack", "flax", variables, meta, wrapper, extras)


def _read_pth(p: Path) -> Checkpoint:
    obj = torch_pickle.torch_load(p)
    check_interrupt()
    raw, wrapper, extras = torch_pickle.unwrap(obj, p)
    sd, prefix = torch_keys(raw, p)
    if any(k.startswith(FLAX_COLLECTIONS[0] + "/") for k in sd):
        ck = from_flat(sd, "pth", p, {})
        ck.wrapper, ck.extras = wrapper, extras + ck.extras
        return ck
    return Checkpoint(p, "pth", "torch", sd, {}, wrapper, extras, prefix)


def _read_orbax(p: Path) -> Checkpoint:
    item = orbax_item_dir(p)
    meta = check_meta(orbax_io.custom_metadata(item, p), str(p))
    tree = orbax_io.restore_on_host(item)
    _check_depth(tree, p)
    variables, wrapper, extras = find_variables(to_numpy_tree(tree), p)
    if item != p:  # report which item (and step) was read
        wrapper = "/".join(x for x in (str(item.relative_to(p)), wrapper) if x)
    return Checkpoint(p, "orbax", "flax", variables, meta, wrapper, extras)


READERS = {"pth": _read_pth, "safetensors": _read_safetensors, "npz": _read_npz, "msgpack": _read_msgpack, "orbax": _read_orbax}


def read(path: str | os.PathLike) -> Checkpoint:
    """Reads any supported checkpoint into numpy arrays, without validating it.

    Raises:
        FileNotFoundError, IsADirectoryError, CheckpointError.
    """
    if hf_dir.is_model_dir(Path(path)):  # a Hugging Face model directory: config.json + weights
        cfg = hf_dir.read_config(Path(path))  # the config first: it is small, the weights are not
        ck = read(hf_dir.weights_file(Path(path)))
        return dataclasses.replace(ck, path=Path(path), meta={**ck.meta, **hf_dir.read_model_dir(Path(path), ck, cfg)})
    fmt = detect_format(path)
    ck = READERS[fmt](Path(path))
    check_interrupt()
    return ck


def read_meta(path: str | os.PathLike) -> dict:
    """The metadata ``save`` and ``convert`` stored with a file (``{}`` for torch files), checked.

    Reads only the header of a ``.safetensors`` file, the metadata member
    of an ``.npz`` and Orbax's metadata of a checkpoint directory; a
    ``.msgpack`` file is read whole.

    Raises:
        FileNotFoundError, IsADirectoryError, CheckpointError.
    """
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "pth":
        return {}
    if fmt == "orbax":
        return check_meta(orbax_io.custom_metadata(orbax_item_dir(p), p), str(p))
    if fmt == "safetensors":
        return _safetensors_meta(p)
    if fmt == "npz":
        return _split_meta(_npz_members(p, only_meta=True), p)
    return READERS[fmt](p).meta


# ---------------------------------------------------------------------------
# writers (each fills a new temporary path; see atomic.atomic_output)


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


def write_pth(tmp: Path, sd: Mapping[str, np.ndarray]) -> None:
    try:
        import torch
    except ImportError:
        raise ValueError("writing a .pth file needs torch (pip install torch==2.13.0); write .safetensors instead") from None
    import io

    tensors = {k: _torch_tensor(v) for k, v in sd.items()}
    buf = io.BytesIO()  # torch's zip writer turns a failed write (disk full) into "unexpected pos": write it ourselves
    torch.save(tensors, buf)
    write_bytes(tmp, lambda f: f.write(buf.getbuffer()))


def write_safetensors(tmp: Path, tensors: Mapping[str, np.ndarray], header: dict[str, str]) -> None:
    from safetensors.numpy import save

    data = save({k: _contiguous(v) for k, v in tensors.items()}, metadata=header)
    write_bytes(tmp, lambda f: f.write(data))


def write_npz(tmp: Path, tensors: Mapping[str, np.ndarray], meta: dict) -> None:
    arrays = {k: _contiguous(v) for k, v in tensors.items()}
    arrays[META_KEY] = np.array(json.dumps(meta))
    write_bytes(tmp, lambda f: np.savez(f, **arrays))


def write_msgpack(tmp: Path, variables: Mapping, meta: dict) -> None:
    import flax.serialization

    tree = {k: variables[k] for k in FLAX_COLLECTIONS if k in variables}
    tree[META_KEY] = json.dumps(meta)
    data = flax.serialization.msgpack_serialize(tree)
    write_bytes(tmp, lambda f: f.write(data))


write_orbax = orbax_io.write
