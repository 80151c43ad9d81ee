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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flax_resnet.archs import ARCHS, get_arch
from flax_resnet.convert import ConversionError, infer_config
from flax_resnet.io.common import CheckpointError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def is_model_dir(p: Path) -> bool:
    """A directory with ``config.json`` next to ``model.safetensors`` or ``pytorch_model.bin``."""
    return p.is_dir() and (p / "config.json").is_file()


def _config(p: Path) -> dict:
    path = p / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    return cfg


def _labels(mapping: Any, where: str) -> list[str] | None:
    if not isinstance(mapping, dict) or not mapping:
        return None
    try:
        by_index = {int(k): str(v) for k, v in mapping.items()}
    except (TypeError, ValueError):
        raise CheckpointError(f"{where}: id2label keys must be integers") from None
    if sorted(by_index) != list(range(len(by_index))):
        return None
    return [by_index[i] for i in range(len(by_index))]


def _check_transformers(cfg: dict, found, where: str) -> dict:
    """Compares a transformers ``ResNetConfig`` with the architecture the weights hold."""
    spec = get_arch(found.arch)
    problems = []
    if cfg.get("downsample_in_first_stage"):
        problems.append("downsample_in_first_stage=true (a stride-2 first stage) has no torchvision counterpart")
    expected = {
        "layer_type": spec.block,
        "depths": list(spec.stage_sizes),
        "hidden_sizes": [p * spec.expansion for p in (64, 128, 256, 512)],
        "embedding_size": spec.stem_channels,
        "num_channels": found.in_channels,
    }
    for key, want in expected.items():
        if key in cfg and cfg[key] != want:
            problems.append(f"{key} is {cfg[key]!r} but the weights hold {want!r} ({spec.name})")
    if problems:
        raise CheckpointError(f"{where}: config.json disagrees with the weights: " + "; ".join(problems))
    meta: dict[str, Any] = {"source": "transformers"}
    if cfg.get("downsample_in_bottleneck") and spec.block == "bottleneck":
        meta["stride_in_1x1"] = True
    labels = _labels(cfg.get("id2label"), where)
    if labels and len(labels) == found.num_classes:
        meta["labels"] = labels
    return meta


def _timm_arch(cfg: dict, where: str) -> str:
    name = cfg.get("architecture")
    if not isinstance(name, str):
        raise CheckpointError(f"{where}: 'architecture' must be a string, found {name!r}")
    arch = name.split(".", 1)[0]  # "resnet50d.ra2_in1k" -> "resnet50d"
    if arch not in ARCHS:
        timm_rows = ", ".join(a for a, s in ARCHS.items() if s.source == "timm")
        raise CheckpointError(f"{where}: unknown timm architecture {name!r}; this library builds the torchvision rows and {timm_rows}")
    return arch


def weights_file(p: Path) -> Path:
    """The weights file of model directory ``p`` (``CheckpointError`` if it has none)."""
    weights = next((p / f for f in WEIGHT_FILES if (p / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{p}: a model directory without weights (no {' or '.join(WEIGHT_FILES)} next to config.json)")
    return weights


def read_model_dir(p: Path, ck: Any) -> dict:
    """Checks a model directory's weights against its ``config.json``.

    Args:
        p: the directory.
        ck: the ``Checkpoint`` that ``formats.read`` made of ``weights_file(p)``.

    Returns:
        The metadata the directory adds (``arch`` for timm, ``stride_in_1x1``,
        ``labels``, ``source``).

    Raises:
        CheckpointError: an unreadable or contradicting ``config.json``, an
            unknown timm architecture (one line each).
    """
    where = str(p / "config.json")
    cfg = _config(p)
    weights = ck.path
    if "architecture" in cfg or "pretrained_cfg" in cfg:  # timm's push_to_hub config
        arch = _timm_arch(cfg, where)
        meta: dict[str, Any] = {"source": "timm", "arch": arch}
        labels = cfg.get("label_names")
        if isinstance(labels, list) and labels and len(labels) == cfg.get("num_classes", len(labels)):
            meta["labels"] = [str(x) for x in labels]
        return meta
    if cfg.get("model_type") != "resnet":
        raise CheckpointError(f"{where}: neither a transformers ResNet (model_type {cfg.get('model_type')!r}) nor a timm config (no 'architecture')")
    if ck.keys != "torch":
        raise CheckpointError(f"{weights}: expected a torch state_dict in a transformers model directory")
    try:
        found = infer_config(ck.tensors, layout="transformers")
    except ConversionError as e:
        raise ConversionError(f"a transformers ResNet from {weights}", e.missing, e.unexpected, e.mismatched, e.other) from None
    return _check_transformers(cfg, found, where)
