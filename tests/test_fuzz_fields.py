"""One rule, tested by mutation: every reader validates what it reads, so only the library's documented errors come out.

Hypothesis changes one field at a time (or drops it) in ``config.json``,
``preprocessor_config.json``, checkpoint metadata and ``.npz`` array headers,
to any JSON value (NaN, Infinity, huge integers, strings, nested lists and
objects) or any header text, and the readers must either accept the file or
raise one of their documented exception types with one line naming the file.
A ``TypeError``, ``KeyError``, ``RecursionError``, ``ZeroDivisionError`` ...
escaping is a reader that did not check a field.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import flax_resnet  # noqa: E402
from flax_resnet import data, hub, predict  # noqa: E402
from flax_resnet import io as ckio  # noqa: E402
from flax_resnet.convert import ConversionError  # noqa: E402
from flax_resnet.io.common import CheckpointError  # noqa: E402
from flax_resnet.io.formats import META_KEY  # noqa: E402
from hostile_util import random_state_dict  # noqa: E402
from test_hostile_modeldir import PROC, TIMM, TRANSFORMERS  # noqa: E402

LOAD_ERRORS = (CheckpointError, ConversionError, FileNotFoundError)  # flax_resnet.load, hub.resolve, io.read
# FUZZ_EXAMPLES=300 for a longer, randomized search; the default run is 30 derandomized examples per reader.
SETTINGS = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 30)), deadline=None, suppress_health_check=list(HealthCheck),
                    derandomize="FUZZ_EXAMPLES" not in os.environ)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["resnet18", "bottleneck", "basic", "center", "bicubic", "0", "01", " 2", "timm"]),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=12)
deep = st.integers(10, 3000).map(lambda n: "[" * n + "]" * n)


def _mutations(base: dict, nested: tuple[str, ...] = ()) -> st.SearchStrategy:
    """``(key path, new value or DROP)``: one field of ``base`` (or of a nested object) replaced or dropped."""
    paths = [(k,) for k in base] + [(k, sub) for k in nested if isinstance(base.get(k), dict) for sub in base[k]] + [("extra_field",)]
    return st.tuples(st.sampled_from(paths), st.one_of(json_values, st.just("__DROP__"), deep.map(lambda s: ("__RAW__", s))))


def _apply(base: dict, mutation) -> str:
    path, value = mutation
    cfg = json.loads(json.dumps(base))
    node = cfg
    for k in path[:-1]:
        node = node[k]
    raw = None
    if value == "__DROP__":
        node.pop(path[-1], None)
    elif isinstance(value, tuple) and value[:1] == ("__RAW__",):
        node[path[-1]] = "__RAW__"
        raw = value[1]
    else:
        node[path[-1]] = value
    text = json.dumps(cfg)  # NaN and Infinity as Python's json writes them (as many real files do)
    return text.replace('"__RAW__"', raw) if raw else text


def _documented(e: BaseException, types, where) -> None:
    assert type(e) in types, f"{type(e).__name__} escaped: {e}"
    msg = str(e)
    assert "\n" not in msg and str(where) in msg, msg


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzzw")
    sd = random_state_dict()
    ckio.save(d / "timm.safetensors", sd)
    ckio.save(d / "hf.safetensors", sd, layout="transformers")
    ckio.save(d / "meta.npz", sd, meta={"labels": [f"c{i}" for i in range(10)], "source": "timm", "arch": "resnet18", "stride_in_1x1": False})
    return d


def _model_dir(root: Path, weights: Path, kind: str, config: str, proc: str | None = None) -> Path:
    d = Path(tempfile.mkdtemp(dir=root))
    (d / "model.safetensors").symlink_to(weights / ("timm.safetensors" if kind == "timm" else "hf.safetensors"))
    (d / "config.json").write_text(config)
    if proc is not None:
        (d / "preprocessor_config.json").write_text(proc)
    return d


def _check_dir(d: Path, load: bool) -> None:
    for call in (hub.resolve, flax_resnet.load) if load else (hub.resolve,):
        try:
            call(d)
        except Exception as e:  # noqa: BLE001 - the point: which types come out
            _documented(e, LOAD_ERRORS, d)


@SETTINGS
@given(mutation=_mutations(TIMM, nested=("pretrained_cfg",)))
def test_timm_config_fields(weights, tmp_path_factory, mutation):
    _check_dir(_model_dir(tmp_path_factory.getbasetemp(), weights, "timm", _apply(TIMM, mutation)), load=True)


@SETTINGS
@given(mutation=_mutations(TRANSFORMERS, nested=("id2label",)))
def test_transformers_config_fields(weights, tmp_path_factory, mutation):
    d = _model_dir(tmp_path_factory.getbasetemp(), weights, "transformers", _apply(TRANSFORMERS, mutation), json.dumps(PROC))
    _check_dir(d, load=True)


@SETTINGS
@given(mutation=_mutations(PROC, nested=("size",)))
def test_preprocessor_config_fields(weights, tmp_path_factory, mutation):
    d = _model_dir(tmp_path_factory.getbasetemp(), weights, "transformers", json.dumps(TRANSFORMERS), _apply(PROC, mutation))
    _check_dir(d, load=False)


@SETTINGS
@given(mutation=_mutations({"format_version": 1, "arch": "resnet18", "layout": "torchvision", "num_classes": 10, "in_channels": 3,
                            "num_batches_tracked": 0, "dtype": "float32", "labels": ["a"] * 10, "stride_in_1x1": False, "source": "timm"}))
def test_checkpoint_metadata_fields(weights, tmp_path_factory, mutation):
    base = {"format_version": 1, "arch": "resnet18", "layout": "torchvision", "num_classes": 10, "in_channels": 3,
            "num_batches_tracked": 0, "dtype": "float32", "labels": ["a"] * 10, "stride_in_1x1": False, "source": "timm"}
    path = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())) / "m.npz"
    with zipfile.ZipFile(weights / "meta.npz") as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            if info.filename != META_KEY + ".npy":
                zout.writestr(info, zin.read(info))
        with zout.open(META_KEY + ".npy", "w") as m:
            np.lib.format.write_array(m, np.array(_apply(base, mutation)))
    try:
        flax_resnet.load(path)
    except Exception as e:  # noqa: BLE001
        _documented(e, LOAD_ERRORS, path)


# ----------------------------------------------------------------- .npz headers


def _npy(header: str, payload: bytes) -> bytes:
    h = header.encode("latin-1", "replace")
    h += b" " * (-(len(h) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h + payload


header_fields = st.fixed_dictionaries({}, optional={
    "descr": st.one_of(st.sampled_from(["|u1", "<f4", ">f8", "|O", "<U3", "V8", "|b1", "<c8", "<i8", "<f2", "bogus", ""]), json_values.map(str)),
    "fortran_order": st.one_of(st.booleans(), scalars),
    "shape": st.one_of(st.lists(st.integers(-2, 2**40), max_size=5).map(tuple), st.lists(st.integers(0, 9), max_size=5).map(tuple), scalars),
})
headers = st.one_of(header_fields.map(repr), st.text(max_size=60), st.just("{'descr': '|u1', 'fortran_order': False, 'shape': (" + "(" * 500 + ")" * 500 + ")}"))


@SETTINGS
@given(member=st.sampled_from(["images", "labels"]), header=headers)
def test_npz_headers(tmp_path_factory, member, header):
    rng = np.random.default_rng(0)
    arrays = {"images": rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8), "labels": np.arange(8) % 2}
    path = Path(tempfile.mkdtemp(dir=tmp_path_factory.getbasetemp())) / "x.npz"
    with zipfile.ZipFile(path, "w") as z:
        for k, a in arrays.items():
            if k == member:
                z.writestr(f"{k}.npy", _npy(header, a.tobytes()))
            else:
                with z.open(f"{k}.npy", "w") as m:
                    np.lib.format.write_array(m, a)
    for call, types in ((lambda: ckio.read(path), LOAD_ERRORS), (lambda: data.load_npz(path), (data.DatasetError,)),
                        (lambda: list(predict.iter_images(predict.check_inputs([path]), 3)), (ValueError,))):
        try:
            call()
        except Exception as e:  # noqa: BLE001
            _documented(e, types, path)
