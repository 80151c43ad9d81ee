"""Reading PyTorch pickles safely: ``torch.load(weights_only=True)`` and nothing wider.

Which non-torch globals do genuine checkpoints carry? torchvision's and
timm's published weights and Hugging Face ``pytorch_model.bin`` files are
plain ``OrderedDict``s of tensors: none. Training checkpoints add Python
scalars, strings and containers (torch's allowlist covers them), an
``argparse.Namespace`` (timm's ``train.py`` stores ``args``) and, often,
numpy scalars: a metric or learning rate logged as ``np.float64`` in Lightning
callbacks/hyper-parameters, nerfstudio, deepmd. A numpy scalar pickles as
``numpy._core.multiarray.scalar(numpy.dtype("f8", False, True), bytes)`` (or
``numpy.core...`` from numpy 1.x) plus a ``BUILD`` of the dtype's state.

Allowing the real ``numpy.dtype``/``scalar``/``numpy.dtypes.*DType`` is
unsafe: a pickle can build an object dtype (``dtype("O")``, or
``ObjectDType.__setstate__``) and then a "scalar" whose bytes are a forged
``PyObject*``, crashing the reader (SIGSEGV). So those names are bound to
stand-ins here (``_SafeDType``, ``_safe_scalar``) that accept only bool,
integer, float and complex dtypes of their exact size and build the value
with ``np.frombuffer``. numpy arrays (``_reconstruct``) and the DType classes
stay refused.
"""

from __future__ import annotations

import argparse
import io
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from flax_resnet.io.common import CheckpointError, one_line

NUMERIC_KINDS = "biufc"  # bool, int, uint, float, complex: never Python objects
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")


class _SafeDType:
    """What a pickle's ``numpy.dtype(...)`` builds here: a numeric dtype, nothing else."""

    def __init__(self, spec: Any = None, align: Any = False, copy: Any = True):
        if not isinstance(spec, str) or not re.fullmatch(r"[<>=|]?[biufc]\d{1,2}", spec):
            raise pickle.UnpicklingError(f"refused numpy.dtype({spec!r}): only bool/int/float/complex dtypes are read")
        d = np.dtype(spec)
        if d.kind not in NUMERIC_KINDS or d.hasobject:
            raise pickle.UnpicklingError(f"refused numpy.dtype({spec!r})")
        self.dtype = d

    def __setstate__(self, state: Any) -> None:
        # numpy's state: (version, byteorder, subarray, names, fields, elsize, alignment, flags).
        # Only the byte order is taken; flags and sizes (which could mark the dtype as holding objects) are not.
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
        if order not in ("<", ">", "=", "|"):
            raise pickle.UnpicklingError(f"refused numpy dtype state {state!r}")
        if order in "<>":
            self.dtype = self.dtype.newbyteorder(order)


def _safe_scalar(dtype: Any, data: Any = None) -> np.generic:
    """``numpy.core.multiarray.scalar(dtype, bytes)``, for numeric dtypes only."""
    d = getattr(dtype, "dtype", None) if isinstance(dtype, _SafeDType) else None
    if d is None or not isinstance(data, bytes) or len(data) != d.itemsize:
        raise pickle.UnpicklingError("refused a numpy scalar that is not a numeric dtype with its exact bytes")
    return np.frombuffer(data, dtype=d)[0]


def safe_globals() -> list:
    """What ``torch.load(weights_only=True)`` may build besides torch's own allowlist."""
    return [
        argparse.Namespace,  # timm train.py's "args"
        (_SafeDType, "numpy.dtype"),  # listed, so BUILD may call _SafeDType.__setstate__
        (_safe_scalar, "numpy.core.multiarray.scalar"),
        (_safe_scalar, "numpy._core.multiarray.scalar"),
    ]


_SAFE_PREFIXES = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset", "builtins.bytearray", "_codecs.encode")


def _safe_names() -> set[str]:
    names = set()
    for g in safe_globals():
        names.add(g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}")
    return names


def pickle_globals(data: bytes) -> list[str]:
    """``module.name`` of every global a pickle stream references, found without unpickling.

    Reads opcodes with ``pickletools`` (which executes nothing), through every
    pickle in ``data`` (legacy ``torch.save`` files hold several).
    """
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
    return list(dict.fromkeys(found))


def _pickle_bytes(p: Path) -> bytes:
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            return b"".join(z.read(n) for n in z.namelist() if n.endswith(".pkl"))
    return p.read_bytes()


def _unsafe_global(p: Path, named: str | None) -> str | None:
    """The global that makes a torch file unsafe, by a static scan of its pickle(s)."""
    try:
        found = pickle_globals(_pickle_bytes(p))
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return named
    if named:
        for g in found:
            if g == named or g.endswith("." + named):
                return g
    allowed = _safe_names()
    for g in found:
        if g not in allowed and not g.startswith(_SAFE_PREFIXES):
            return g
    return named


def _check_zip_crc(p: Path) -> None:
    """Every member of a zip ``.pth`` read once, so a flipped byte fails its CRC-32 (torch does not check)."""
    try:
        with zipfile.ZipFile(p) as z:
            for info in z.infolist():
                with z.open(info) as f:
                    while f.read(1 << 24):
                        pass
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{p}: corrupt PyTorch file ({one_line(e, 160)})") from None


def torch_load(p: Path) -> Any:
    """``torch.load(weights_only=True)`` of a file, read by content (an open file, whatever its suffix)."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{p}: reading a PyTorch file needs torch (pip install torch==2.13.0 --index-url "
            "https://download.pytorch.org/whl/cpu); or convert it to .safetensors elsewhere"
        ) from None
    if zipfile.is_zipfile(p):
        _check_zip_crc(p)
    try:
        with open(p, "rb") as f, torch.serialization.safe_globals(safe_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error says it all
            return torch.load(f, map_location="cpu", weights_only=True)
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
        refused = re.search(r"refused .*", detail)
        if refused:  # one of the numpy stand-ins said no
            raise CheckpointError(f"{p}: {one_line(refused.group(0), 160)}; nothing in the file was executed") from None
        raise CheckpointError(
            f"{p}: corrupt or unsupported PyTorch file, refused by torch.load(weights_only=True) "
            f"({one_line(detail, 160)}); nothing in the file was executed"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, IndexError, TypeError, AttributeError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{p}: corrupt or truncated PyTorch file ({type(e).__name__}: {one_line(e, 160)})") from None


def is_array(v: Any) -> bool:
    return isinstance(v, np.ndarray) or (type(v).__module__.startswith("torch") and hasattr(v, "detach"))


def unwrap(obj: Any, p: Path) -> tuple[dict, str | None, list[str]]:
    """The model state_dict inside whatever ``torch.load`` returned: ``(tensors, wrapper path, ignored entries)``."""
    trail: list[str] = []
    extras: list[str] = []
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        arrays = {k: v for k, v in obj.items() if is_array(v)}
        if arrays:
            extras += [".".join([*trail, str(k)]) for k in obj if k not in arrays]
            return arrays, ".".join(trail) or None, extras
        nested = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if not nested:
            nested = [k for k, v in obj.items() if isinstance(v, Mapping) and any(is_array(x) for x in v.values())]
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
