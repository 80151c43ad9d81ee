"""Checkpoint files in and out: PyTorch, safetensors, npz, Flax msgpack, Orbax.

Reading is safe and strict: ``.pth`` only through
``torch.load(weights_only=True)`` (``torch_pickle``), formats read from the
content (``sniff``), every key and shape validated against the architecture
and NaN/Inf refused (``resolve``). Writing is atomic (``atomic``). One module
per job:

* ``common``: ``CheckpointError``, dtypes, trees, Ctrl-C (the finite rule is ``convert.check_finite``).
* ``sniff``: which format a file is, which format an output path asks for.
* ``torch_pickle``: safe PyTorch pickles (what is allowed and why).
* ``npz``: the one ``.npz`` header reader (sizes bounded before any read).
* ``orbax_io``: Orbax directories, read as host arrays.
* ``hf_dir``: Hugging Face model directories (``config.json``, the one reader).
* ``formats``: ``read``, ``read_meta`` and the per-format writers.
* ``atomic``: temporary file, fsync, rename; stale temporaries cleaned.
* ``resolve``: validation, ``load``, ``save``, ``read_state_dict``.
* ``report``: ``convert`` and ``inspect``.
"""

from flax_resnet.io.common import CheckpointError
from flax_resnet.io.formats import Checkpoint, read
from flax_resnet.io.report import convert, inspect
from flax_resnet.io.resolve import Resolved, load, load_variables, read_state_dict, resolve, save
from flax_resnet.io.sniff import FORMATS, detect_format, format_for_path

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "FORMATS",
    "Resolved",
    "convert",
    "detect_format",
    "format_for_path",
    "inspect",
    "load",
    "load_variables",
    "read",
    "read_state_dict",
    "resolve",
    "save",
]
