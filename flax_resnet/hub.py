"""Pretrained weights by the names torchvision, timm and transformers users know.

``from_pretrained(name)`` resolves ``name`` to a local file through the
standard caches, downloading only when it is not there yet, and loads it with
``flax_resnet.load`` (the strict converter: every key and shape checked):

* torchvision weight enums as strings (``"ResNet50_Weights.IMAGENET1K_V2"``,
  ``"ResNet50_Weights.DEFAULT"``), timm's names for the same files
  (``"resnet50.tv_in1k"``, ``"resnet50.tv2_in1k"``), the files' own names
  (``"resnet50-11ad3fa6.pth"``) and bare architectures (``"resnet50"``: the
  DEFAULT weights). Looked up in torch hub's checkpoint directory,
  ``$TORCH_HOME/hub/checkpoints`` (``TORCH_HOME`` defaults to
  ``$XDG_CACHE_HOME/torch``, else ``~/.cache/torch``), where
  ``torchvision.models.resnet50(weights=...)`` caches them; downloaded from
  download.pytorch.org into it otherwise (SHA-256 prefix checked, as torch hub
  does).
* Hugging Face hub ids: timm (``"timm/resnet50.a1_in1k"``, ``"hf-hub:timm/..."``
  or the bare ``"resnet50.a1_in1k"``) and transformers (``"microsoft/resnet-50"``),
  through ``huggingface_hub``'s cache (``HF_HUB_CACHE``, else
  ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``; ``HF_HUB_OFFLINE=1``
  honoured).
* a local path: any file ``flax_resnet.load`` reads, or a Hugging Face model
  directory (``config.json`` next to ``model.safetensors``).

``resolve(name)`` returns where the weights are and what goes with them: the
class labels where the source has them (``id2label`` / ``label_names`` of a
``config.json``, ImageNet's for torchvision's weights) and the evaluation
preprocessing (``flax_resnet.preprocess``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import urllib.request
from pathlib import Path
from typing import Any

from flax_resnet import preprocess as pp
from flax_resnet.archs import ARCHS

TORCHVISION_URL = "https://download.pytorch.org/models/"
_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".npz", ".msgpack")

# torchvision/models/resnet.py: (enum class, arch) -> {tag: (file name, resize_size)}; crop_size is 224 for all.
_TV = {
    ("ResNet18_Weights", "resnet18"): {"IMAGENET1K_V1": ("resnet18-f37072fd.pth", 256)},
    ("ResNet34_Weights", "resnet34"): {"IMAGENET1K_V1": ("resnet34-b627a593.pth", 256)},
    ("ResNet50_Weights", "resnet50"): {"IMAGENET1K_V1": ("resnet50-0676ba61.pth", 256), "IMAGENET1K_V2": ("resnet50-11ad3fa6.pth", 232)},
    ("ResNet101_Weights", "resnet101"): {"IMAGENET1K_V1": ("resnet101-63fe2227.pth", 256), "IMAGENET1K_V2": ("resnet101-cd907fc2.pth", 232)},
    ("ResNet152_Weights", "resnet152"): {"IMAGENET1K_V1": ("resnet152-394f9c45.pth", 256), "IMAGENET1K_V2": ("resnet152-f82ba261.pth", 232)},
    ("ResNeXt50_32X4D_Weights", "resnext50_32x4d"): {
        "IMAGENET1K_V1": ("resnext50_32x4d-7cdf4587.pth", 256),
        "IMAGENET1K_V2": ("resnext50_32x4d-1a0047aa.pth", 232),
    },
    ("ResNeXt101_32X8D_Weights", "resnext101_32x8d"): {
        "IMAGENET1K_V1": ("resnext101_32x8d-8ba56ff5.pth", 256),
        "IMAGENET1K_V2": ("resnext101_32x8d-110c445d.pth", 232),
    },
    ("ResNeXt101_64X4D_Weights", "resnext101_64x4d"): {"IMAGENET1K_V1": ("resnext101_64x4d-173b62eb.pth", 232)},
    ("Wide_ResNet50_2_Weights", "wide_resnet50_2"): {
        "IMAGENET1K_V1": ("wide_resnet50_2-95faca4d.pth", 256),
        "IMAGENET1K_V2": ("wide_resnet50_2-9ba9bcbe.pth", 232),
    },
    ("Wide_ResNet101_2_Weights", "wide_resnet101_2"): {
        "IMAGENET1K_V1": ("wide_resnet101_2-32ee1156.pth", 256),
        "IMAGENET1K_V2": ("wide_resnet101_2-d733dc28.pth", 232),
    },
}


@dataclasses.dataclass(frozen=True)
class TorchvisionWeights:
    """One torchvision weights entry."""

    enum: str  # "ResNet50_Weights.IMAGENET1K_V2"
    arch: str
    file: str  # "resnet50-11ad3fa6.pth"
    resize: int  # resize_size of its eval transform (crop 224)

    @property
    def url(self) -> str:
        return TORCHVISION_URL + self.file


def _torchvision_names() -> dict[str, TorchvisionWeights]:
    names: dict[str, TorchvisionWeights] = {}
    for (cls, arch), tags in _TV.items():
        for tag, (file, resize) in tags.items():
            w = TorchvisionWeights(f"{cls}.{tag}", arch, file, resize)
            timm_tag = "tv_in1k" if tag == "IMAGENET1K_V1" else "tv2_in1k"
            for key in (w.enum, f"{arch}.{timm_tag}", file):
                names[key.lower()] = w
        default = names[f"{cls}.{'IMAGENET1K_V2' if 'IMAGENET1K_V2' in tags else 'IMAGENET1K_V1'}".lower()]
        names[f"{cls}.DEFAULT".lower()] = names[arch] = default
    return names


TORCHVISION_WEIGHTS = _torchvision_names()


@dataclasses.dataclass
class Pretrained:
    """Where a pretrained model's weights are and what goes with them.

    Attributes:
        name: as asked for.
        source: ``"torchvision"``, ``"timm"``, ``"transformers"`` or ``"file"``.
        path: what ``flax_resnet.load`` reads: the weights file, Orbax
            directory or Hugging Face model directory (whose ``config.json`` is
            checked against the weights).
        directory: the Hugging Face snapshot (or model) directory, if any.
        labels: class names by index, where the source has them.
        preprocess: the source's evaluation transform (a default for plain files).
    """

    name: str
    source: str
    path: Path
    directory: Path | None = None
    labels: tuple[str, ...] | None = None
    preprocess: pp.Preprocess = dataclasses.field(default_factory=pp.Preprocess)


def torch_hub_dir() -> Path:
    """torch hub's checkpoint directory, computed as ``torch.hub.get_dir()`` does but without importing torch."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (``HF_HUB_CACHE``, ``HF_HOME``)."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
        cache = os.path.join(home, "hub")
    return Path(os.path.expanduser(cache))


def _tilde(p: Path) -> str:
    home = os.path.expanduser("~")
    s = str(p)
    return "~" + s[len(home) :] if home not in ("", "/") and s.startswith(home + os.sep) else s


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:limit] + ("..." if len(text) > limit else "")


def imagenet_labels() -> tuple[str, ...] | None:
    """ImageNet-1k class names in torchvision's order (``weights.meta["categories"]``), if shipped."""
    path = Path(__file__).with_name("imagenet_classes.txt")
    if not path.is_file():
        return None
    labels = tuple(line for line in path.read_text(encoding="utf-8").splitlines() if line)
    return labels if len(labels) == 1000 else None


def _download(url: str, dest: Path) -> None:
    """Downloads ``url`` to ``dest`` atomically; checks torch hub's SHA-256 prefix (``name-<hex>.pth``)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        m = re.search(r"-([a-f0-9]+)\.", dest.name)
        if m and not digest.hexdigest().startswith(m.group(1)):
            raise ValueError(f"SHA-256 {digest.hexdigest()[:16]}... does not start with {m.group(1)}")
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def _torchvision(name: str, w: TorchvisionWeights, download: bool) -> Pretrained:
    path = torch_hub_dir() / w.file
    if not path.is_file():
        where = f"{w.file} ({w.enum}) is not in {_tilde(path.parent)}"
        if not download:
            raise FileNotFoundError(f"{where} and download=False; fetch {w.url} into it")
        try:
            _download(w.url, path)
        except Exception as e:  # URLError, timeouts, HTTP errors, a bad hash
            raise FileNotFoundError(f"{where} and the download failed: {_one_line(e)}; fetch {w.url} into it") from None
    labels = imagenet_labels()
    return Pretrained(name, "torchvision", path, None, labels, pp.torchvision_preset(w.resize, w.enum))


def _hf_file(repo: str, filename: str, download: bool, revision: str | None) -> Path | None:
    """A file of a hub repo: from the cache, else downloaded if allowed; None where there is no such file.

    Raises:
        FileNotFoundError: the download failed (network, unknown or gated repo).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    try:
        return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=hf_cache_dir(), local_files_only=not download))
    except RemoteEntryNotFoundError:  # the repo has no such file
        return None
    except (OSError, ValueError) as e:  # not cached; offline, unknown or gated repo, bad id
        if not download and isinstance(e, LocalEntryNotFoundError):
            return None
        cause = e.__cause__ or e.__context__ or e
        raise FileNotFoundError(f"{repo} is not in the Hugging Face cache {_tilde(hf_cache_dir())} and the download failed: {_one_line(cause)}") from None


def hf_snapshot(repo: str, download: bool = True, revision: str | None = None) -> Path:
    """The local snapshot directory of a hub repo holding ``config.json`` and the weights.

    The cache is read first; only when ``config.json`` or the weights are
    missing (and ``download``) are ``config.json``, ``preprocessor_config.json``
    and one weights file (``model.safetensors``, else ``pytorch_model.bin``)
    fetched.

    Raises:
        ModuleNotFoundError: without ``huggingface_hub``.
        FileNotFoundError: not in the cache and not downloadable (one line).
    """
    try:
        import huggingface_hub  # noqa: F401
    except ModuleNotFoundError:
        raise ModuleNotFoundError("Hugging Face hub ids need huggingface_hub: pip install 'flax-resnet[hub]'", name="huggingface_hub") from None

    def fetch(online: bool) -> tuple[Path | None, Path | None]:
        config = _hf_file(repo, "config.json", online, revision)
        if config is None:
            return None, None
        weights = _hf_file(repo, "model.safetensors", online, revision) or _hf_file(repo, "pytorch_model.bin", online, revision)
        if weights is not None and online:
            _hf_file(repo, "preprocessor_config.json", online, revision)
        return config, weights

    config, weights = fetch(False)
    if (config is None or weights is None) and download:
        config, weights = fetch(True)
    if config is None or weights is None:
        missing = "config.json" if config is None else "model.safetensors or pytorch_model.bin"
        how = "download=False (or HF_HUB_OFFLINE=1)" if not download else f"the hub has no {missing} for it"
        raise FileNotFoundError(f"{repo} is not in the Hugging Face cache {_tilde(hf_cache_dir())} ({missing} missing) and {how}")
    return config.parent


def _from_hf_dir(name: str, d: Path) -> Pretrained:
    """A Hugging Face model directory: timm's (``pretrained_cfg``) or transformers' (``model_type``).

    ``config.json`` and ``preprocessor_config.json`` are read by ``io.hf_dir.read_config``,
    the one reader of model directories (``flax_resnet.load`` uses it too).
    """
    from flax_resnet.io.hf_dir import WEIGHT_FILES, read_config

    cfg = read_config(d, preprocessing=True, name=name)
    if not any((d / f).is_file() for f in WEIGHT_FILES):
        raise FileNotFoundError(f"{d}: no {' or '.join(WEIGHT_FILES)} next to config.json")
    return Pretrained(name, cfg.source, d, d, cfg.labels, cfg.preprocess)


def resolve(name: str | os.PathLike, download: bool = True, revision: str | None = None) -> Pretrained:
    """Finds pretrained weights by name (see the module docstring), downloading only if needed.

    Args:
        name: a torchvision weights name or file name, a Hugging Face hub id,
            a bare timm name, or a local file or model directory.
        download: fetch what is not cached; ``False`` only reads the caches.
        revision: a Hugging Face hub revision (branch, tag or commit).

    Returns:
        A ``Pretrained``.

    Raises:
        FileNotFoundError: not cached and not downloadable (one line saying
            where it was looked for).
        ValueError: a name nothing here knows.
    """
    raw = os.fspath(name)
    key = raw.strip()
    if os.path.exists(key):
        p = Path(key)
        if p.is_dir() and (p / "config.json").is_file():
            return _from_hf_dir(raw, p)
        w = TORCHVISION_WEIGHTS.get(p.name.lower())
        if w is not None:
            return Pretrained(raw, "torchvision", p, None, imagenet_labels(), pp.torchvision_preset(w.resize, w.enum))
        return Pretrained(raw, "file", p)
    w = TORCHVISION_WEIGHTS.get(key.lower())
    if w is not None:
        return _torchvision(raw, w, download)
    if key.startswith(("/", "./", "../", "~")) or key.lower().endswith(_FILE_SUFFIXES):
        raise FileNotFoundError(f"{raw}: no such file or directory")
    repo = key.removeprefix("hf-hub:").removeprefix("hf_hub:")
    if "/" not in repo and "." in repo and repo.split(".")[0] in ARCHS:
        repo = f"timm/{repo}"  # timm's bare names live under timm/ on the hub
    if re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        return _from_hf_dir(raw, hf_snapshot(repo, download and not offline, revision))
    raise ValueError(
        f"unknown pretrained name {raw!r}: not a file, a torchvision weights name (ResNet50_Weights.IMAGENET1K_V2, "
        f"resnet50-11ad3fa6.pth, resnet50), or a Hugging Face hub id (timm/resnet50.a1_in1k, microsoft/resnet-50)"
    )


def from_pretrained(name: str | os.PathLike, api: str = "linen", download: bool = True, revision: str | None = None, **load_kwargs: Any):
    """Loads pretrained weights by the name users know, as ``flax_resnet.load`` does a file.

    Args:
        name: ``"ResNet50_Weights.IMAGENET1K_V2"``, ``"resnet50"`` (torchvision's
            DEFAULT), ``"resnet50-11ad3fa6.pth"``, ``"timm/resnet50.a1_in1k"``,
            ``"microsoft/resnet-50"``, or a local path; see ``resolve``.
        api: ``"linen"`` (``flax_resnet.ResNet`` and its variables) or ``"nnx"``.
        download: fetch what is not cached (``False``: caches only).
        revision: a Hugging Face hub revision.
        **load_kwargs: passed to ``flax_resnet.load`` (``dtype``,
            ``param_dtype``, ``layout``, ``arch``, ...).

    Returns:
        ``(model, variables)`` exactly as ``flax_resnet.load(resolve(name).path)``
        for ``api="linen"``; for ``api="nnx"`` a ``flax_resnet.nnx.ResNet``
        holding the same arrays (in train mode, like any new NNX or torch
        model: call ``.eval()`` for inference). Labels and the preprocessing
        are in ``resolve(name)``.

    Raises:
        FileNotFoundError: not cached and not downloadable.
        NotImplementedError: ``api="nnx"`` where ``flax_resnet.nnx`` is missing.
        ValueError: an unknown name or api; ``ConversionError`` (a
            ``ValueError``) for weights that are not a ResNet this package builds.
    """
    if api not in ("linen", "nnx"):
        raise ValueError(f"unknown api {api!r}; choose 'linen' or 'nnx'")
    if api == "nnx":
        try:
            from flax_resnet import nnx as fnnx
        except ModuleNotFoundError as e:
            if e.name != "flax_resnet.nnx":
                raise
            raise NotImplementedError("api='nnx' needs flax_resnet.nnx, which this version does not have yet") from None
    from flax_resnet.checkpoint import load

    info = resolve(name, download=download, revision=revision)
    # A model directory is read whole: its config.json names v1 strides (transformers) or the architecture (timm).
    model, variables = load(info.directory if info.directory is not None else info.path, **load_kwargs)
    if api == "nnx":
        kwargs = {name: getattr(model, name) for name in ("dtype", "precision") if getattr(model, name, None) is not None}
        return fnnx.from_linen(model.arch, variables, allow_nonfinite=True, **kwargs)  # load() applied the finite rule
    return model, variables
