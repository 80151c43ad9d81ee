"""Hugging Face model directories as checkpoint sources (local files only).

A directory holding ``config.json`` and ``model.safetensors`` (or
``pytorch_model.bin``, read with ``weights_only``) is what
``save_pretrained`` / ``push_to_hub`` write and what the hub cache holds:

* transformers (``"model_type": "resnet"``): the architecture comes from the
  weights and must agree with ``layer_type``, ``depths``, ``hidden_sizes``,
  ``embedding_size`` and ``num_channels``; ``downsample_in_bottleneck``
  (ResNet v1: stride in the first 1x1 conv) is kept as ``stride_in_1x1``;
  ``id2label`` as the class names.
* timm (``"architecture": "resnet50d"``): the architecture must be a row of
  ``flax_resnet.ARCHS`` and the weights must hold it; ``label_names`` are
  the class names.

``read_config`` is the one reader of these files (``hub.resolve`` uses it too):
every field it uses is checked once, with one line naming the file and field.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from flax_resnet import preprocess as pp
from flax_resnet.archs import ARCHS, get_arch
from flax_resnet.catalog import imagenet_labels, says_imagenet_1k
from flax_resnet.convert import ConversionError, infer_config
from flax_resnet.io.common import CheckpointError, one_line, read_json

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_model_dir(p: Path) -> bool:
    """A directory with ``config.json`` next to ``model.safetensors`` or ``pytorch_model.bin``."""
    return p.is_dir() and (p / "config.json").is_file()


MAX_CLASSES = 1_000_000
_INDEX = re.compile(r"0|[1-9][0-9]{0,6}")  # id2label keys as transformers writes them: "0", "1", ...


@dataclasses.dataclass(frozen=True)
class DirConfig:
    """A model directory's ``config.json`` (and ``preprocessor_config.json``), every field read checked once.

    Attributes:
        path: the ``config.json``.
        source: ``"timm"`` or ``"transformers"``.
        arch: timm's ``architecture`` as a row of ``ARCHS`` (``None`` for transformers).
        labels: class names by index (``id2label`` / ``label_names``; ImageNet's
            for a 1000-class timm config tagged ``in1k``), where complete.
        num_classes: timm's ``num_classes``, if given.
        expected: transformers' architecture fields (``layer_type``,
            ``depths``, ``hidden_sizes``, ``embedding_size``, ``num_channels``) present in the file.
        stride_in_1x1: transformers' ``downsample_in_bottleneck`` (ResNet v1).
        downsample_in_first_stage: transformers' stride-2 first stage flag.
        preprocess: the evaluation transform (``None`` unless asked for).
        tags: timm's pretrained ``tag`` and ``hf_hub_id``, where they are strings.
    """

    path: Path
    source: str
    arch: str | None = None
    labels: tuple[str, ...] | None = None
    num_classes: int | None = None
    expected: dict = dataclasses.field(default_factory=dict)
    stride_in_1x1: bool = False
    downsample_in_first_stage: bool = False
    preprocess: Any = None
    tags: tuple[str, ...] = ()


def _int(cfg: dict, key: str, where: str, lo: int = 1, hi: int = MAX_CLASSES) -> int:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise CheckpointError(f"{where}: {key} must be an integer from {lo} to {hi:,}, found {one_line(repr(v), 80)}")
    return v


def _bool(cfg: dict, key: str, where: str) -> bool:
    v = cfg.get(key, False)
    if not isinstance(v, bool):
        raise CheckpointError(f"{where}: {key} must be true or false, found {one_line(repr(v), 80)}")
    return v


def _ints(cfg: dict, key: str, where: str, n: int) -> list[int]:
    v = cfg[key]
    if not isinstance(v, list) or len(v) != n:
        raise CheckpointError(f"{where}: {key} must be a list of {n} integers, found {one_line(repr(v), 80)}")
    return [_int({key: x}, key, where, 1, 1 << 20) for x in v]


def _id2label(mapping: Any, where: str) -> tuple[str, ...] | None:
    """``id2label`` as names by index: keys "0".."N-1" exactly as transformers writes them, string values."""
    if mapping is None:
        return None
    if not isinstance(mapping, dict):
        raise CheckpointError(f"{where}: id2label must be an object of index -> name, found {type(mapping).__name__}")
    if len(mapping) > MAX_CLASSES:
        raise CheckpointError(f"{where}: id2label has {len(mapping):,} entries, more than {MAX_CLASSES:,}")
    by_index = {}
    for k, v in mapping.items():
        if not _INDEX.fullmatch(k):
            raise CheckpointError(f"{where}: id2label key {one_line(repr(k), 40)} is not a class index (\"0\", \"1\", ...)")
        if not isinstance(v, str):
            raise CheckpointError(f"{where}: id2label[{k!r}] must be a string, found {one_line(repr(v), 40)}")
        by_index[int(k)] = v
    if not by_index or sorted(by_index) != list(range(len(by_index))):
        return None
    return tuple(by_index[i] for i in range(len(by_index)))


def _label_names(v: Any, where: str) -> tuple[str, ...] | None:
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise CheckpointError(f"{where}: label_names must be a list of strings, found {one_line(repr(v), 80)}")
    if len(v) > MAX_CLASSES:
        raise CheckpointError(f"{where}: label_names has {len(v):,} entries, more than {MAX_CLASSES:,}")
    return tuple(v) or None


def _timm_arch(cfg: dict, where: str) -> str:
    name = cfg.get("architecture")
    if not isinstance(name, str):
        raise CheckpointError(f"{where}: 'architecture' must be a string, found {one_line(repr(name), 80)}")
    arch = name.split(".", 1)[0]  # "resnet50d.ra2_in1k" -> "resnet50d"
    if arch not in ARCHS:
        timm_rows = ", ".join(a for a, s in ARCHS.items() if s.source == "timm")
        raise CheckpointError(f"{where}: unknown timm architecture {one_line(repr(name), 80)}; this library builds the torchvision rows and {timm_rows}")
    return arch


def _preset(make, cfg: Any, where: str, source: str):
    try:
        return dataclasses.replace(make(cfg, where), source=source)
    except ValueError as e:
        raise CheckpointError(one_line(e)) from None


def read_config(p: Path, preprocessing: bool = False, name: str | None = None) -> DirConfig:
    """The one reader of a model directory's ``config.json``: every field it uses checked, one line each.

    Args:
        p: the directory.
        preprocessing: also read the evaluation transform (timm's
            ``pretrained_cfg``; transformers' ``preprocessor_config.json``, else
            the default).
        name: how the user named the directory (for ``Preprocess.source``).

    Raises:
        CheckpointError: a file that is not a JSON object (too large, nested
            too deep, a duplicate key) or a field of the wrong type or range,
            naming the file and the field.
    """
    path = p / "config.json"
    where = str(path)
    cfg = read_json(path)
    label = name or str(p)
    if "architecture" in cfg or "pretrained_cfg" in cfg:  # timm's push_to_hub config
        arch = _timm_arch(cfg, where)
        pcfg = cfg.get("pretrained_cfg")
        pcfg = pcfg if isinstance(pcfg, dict) else {}  # checked below when the preprocessing is read
        num_classes = _int(cfg, "num_classes", where, 0) if "num_classes" in cfg else None
        if num_classes is None and "num_classes" in pcfg:
            num_classes = _int(pcfg, "num_classes", f"{where} pretrained_cfg", 0)
        tags = tuple(t for t in (pcfg.get("tag"), pcfg.get("hf_hub_id")) if isinstance(t, str))
        labels = _label_names(cfg.get("label_names"), where)
        if labels is not None and num_classes is not None and len(labels) != num_classes:
            labels = None
        if labels is None and says_imagenet_1k(num_classes, tags + ((name,) if name else ())):  # timm's in1k configs carry no names
            labels = imagenet_labels()
        prep = None
        if preprocessing:
            prep = _preset(pp.timm_preset, cfg.get("pretrained_cfg", {}), f"{where} pretrained_cfg", f"timm pretrained_cfg of {label}")
        return DirConfig(path, "timm", arch, labels, num_classes, preprocess=prep, tags=tags)
    if cfg.get("model_type") != "resnet":
        raise CheckpointError(
            f"{where}: neither a transformers ResNet (model_type {one_line(repr(cfg.get('model_type')), 60)}) nor a timm config (no 'architecture')"
        )
    expected: dict[str, Any] = {}
    if "layer_type" in cfg:
        if cfg["layer_type"] not in ("basic", "bottleneck"):
            raise CheckpointError(f"{where}: layer_type must be 'basic' or 'bottleneck', found {one_line(repr(cfg['layer_type']), 60)}")
        expected["layer_type"] = cfg["layer_type"]
    for key in ("depths", "hidden_sizes"):
        if key in cfg:
            expected[key] = _ints(cfg, key, where, 4)
    for key in ("embedding_size", "num_channels"):
        if key in cfg:
            expected[key] = _int(cfg, key, where, 1, 1 << 20)
    prep = None
    if preprocessing:
        proc = p / "preprocessor_config.json"
        prep = pp.Preprocess()
        if proc.exists():
            prep = _preset(pp.transformers_preset, read_json(proc), str(proc), f"preprocessor_config.json of {label}")
    return DirConfig(
        path, "transformers", None, _id2label(cfg.get("id2label"), where), None, expected,
        _bool(cfg, "downsample_in_bottleneck", where), _bool(cfg, "downsample_in_first_stage", where), prep,
    )


def _check_transformers(cfg: DirConfig, found, where: str) -> dict:
    """Compares a transformers ``ResNetConfig`` with the architecture the weights hold."""
    spec = get_arch(found.arch)
    problems = []
    if cfg.downsample_in_first_stage:
        problems.append("downsample_in_first_stage=true (a stride-2 first stage) has no torchvision counterpart")
    held = {
        "layer_type": spec.block,
        "depths": list(spec.stage_sizes),
        "hidden_sizes": [p * spec.expansion for p in (64, 128, 256, 512)],
        "embedding_size": spec.stem_channels,
        "num_channels": found.in_channels,
    }
    for key, value in cfg.expected.items():
        if value != held[key]:
            problems.append(f"{key} is {value!r} but the weights hold {held[key]!r} ({spec.name})")
    if problems:
        raise CheckpointError(f"{where}: config.json disagrees with the weights: " + "; ".join(problems))
    meta: dict[str, Any] = {"source": "transformers"}
    if cfg.stride_in_1x1 and spec.block == "bottleneck":
        meta["stride_in_1x1"] = True
    if cfg.labels and len(cfg.labels) == found.num_classes:
        meta["labels"] = list(cfg.labels)
    return meta


def weights_file(p: Path) -> Path:
    """The weights file of model directory ``p`` (``CheckpointError`` if it has none)."""
    weights = next((p / f for f in WEIGHT_FILES if (p / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{p}: a model directory without weights (no {' or '.join(WEIGHT_FILES)} next to config.json)")
    return weights


def read_model_dir(p: Path, ck: Any, cfg: DirConfig | None = None) -> dict:
    """Checks a model directory's weights against its ``config.json``.

    Args:
        p: the directory.
        ck: the ``Checkpoint`` that ``formats.read`` made of ``weights_file(p)``.
        cfg: ``read_config(p)``, if already read.

    Returns:
        The metadata the directory adds (``arch`` for timm, ``stride_in_1x1``,
        ``labels``, ``source``).

    Raises:
        CheckpointError: an unreadable or contradicting ``config.json``, an
            unknown timm architecture (one line each).
    """
    where = str(p / "config.json")
    cfg = cfg or read_config(p)
    weights = ck.path
    if cfg.source == "timm":
        meta: dict[str, Any] = {"source": "timm", "arch": cfg.arch}
        if cfg.labels:
            meta["labels"] = list(cfg.labels)
        return meta
    if ck.keys != "torch":
        raise CheckpointError(f"{weights}: expected a torch state_dict in a transformers model directory")
    try:
        found = infer_config(ck.tensors, layout="transformers")
    except ConversionError as e:
        raise ConversionError(f"a transformers ResNet from {weights}", e.missing, e.unexpected, e.mismatched, e.other) from None
    return _check_transformers(cfg, found, where)
