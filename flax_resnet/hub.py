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

Cached torchvision files are checked against the SHA-256 prefix in their
names (``check_hash=False`` skips it); without a network a hub id fails at
once, in one line; ``flax_resnet.catalog`` lists the names
(``list_models``, ``list_pretrained``) and suggests the nearest for a typo.

``resolve(name)`` returns where the weights are and what goes with them: the
class labels where the source has them (``id2label`` / ``label_names`` of a
``config.json``, ImageNet's for torchvision's weights) and the evaluation
preprocessing (``flax_resnet.preprocess``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import urllib.request
from pathlib import Path
from typing import Any

from flax_resnet import preprocess as pp
from flax_resnet.archs import ARCHS
from flax_resnet.builder import check_api
from flax_resnet.catalog import (  # noqa: F401 - the names' table, also read as hub.TORCHVISION_WEIGHTS, hub.list_pretrained
    HUB_IDS,
    TORCHVISION_URL,
    TORCHVISION_WEIGHTS,
    TorchvisionWeights,
    did_you_mean,
    imagenet_labels,
    known_names,
    list_models,
    list_pretrained,
)
from flax_resnet.io.common import one_line
from flax_resnet.io.formats import read_meta
from flax_resnet.io.hf_dir import WEIGHT_FILES, read_config
from flax_resnet.io.resolve import load

_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".npz", ".msgpack")


# CLI options for the Python keywords named in this module's messages (``cli_terms``).
_CLI_TERMS = {"download=False": "--no-download", "check_hash=False": "--no-check-hash"}


def cli_terms(message: str) -> str:
    """A message of this module in the command line's terms (``--no-download`` for ``download=False``, ...)."""
    for py, cli in _CLI_TERMS.items():
        message = message.replace(py, cli)
    return message


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


def hash_prefix(file_name: str) -> str | None:
    """The SHA-256 prefix torch hub's file names carry (``resnet50-11ad3fa6.pth`` -> ``11ad3fa6``), if any."""
    m = re.search(r"-([a-f0-9]{6,})\.", file_name)
    return m.group(1) if m else None


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
        prefix = hash_prefix(dest.name)
        if prefix and not digest.hexdigest().startswith(prefix):
            raise ValueError(f"SHA-256 {digest.hexdigest()[:16]}... does not start with {prefix}")
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


_HASHED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> SHA-256: each file is read once per process


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        _HASHED[key] = digest.hexdigest()
    return _HASHED[key]


def check_file_hash(path: Path, w: TorchvisionWeights) -> None:
    """Checks a cached torchvision file against the SHA-256 prefix in its name, as torch hub's ``check_hash=True``.

    Raises:
        ValueError: the file is not torchvision's (a truncated download, or another file under its name).
    """
    prefix = hash_prefix(w.file)
    if prefix is None:
        return
    got = _sha256(path)
    if not got.startswith(prefix):
        raise ValueError(
            f"{_tilde(path)}: SHA-256 {got[:12]}... does not start with {prefix}, so it is not torchvision's {w.enum} "
            f"(a partial download or another file under its name); delete it to download it again, "
            f"or pass check_hash=False to use it as it is"
        )


def _torchvision(name: str, w: TorchvisionWeights, download: bool, check_hash: bool = True) -> Pretrained:
    path, url = torch_hub_dir() / w.file, TORCHVISION_URL + w.file
    if not path.is_file():
        where = f"{w.file} ({w.enum}) is not in {_tilde(path.parent)}"
        if not download:
            raise FileNotFoundError(f"{where} and download=False; fetch {url} into it")
        try:
            _download(url, path)
        except Exception as e:  # URLError, timeouts, HTTP errors, a bad hash
            raise FileNotFoundError(f"{where} and the download failed: {one_line(e)}; fetch {url} into it") from None
    elif check_hash:  # a download is checked as it arrives; a cached file here
        check_file_hash(path, w)
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
        raise FileNotFoundError(f"{repo} is not in the Hugging Face cache {_tilde(hf_cache_dir())} and the download failed: {one_line(cause)}") from None


@contextlib.contextmanager
def _quiet_hub():
    """huggingface_hub's own warnings ("Retrying in 1s [Retry 1/5]") held back: a failure is one line, ours."""
    log = logging.getLogger("huggingface_hub")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _check_reachable(repo: str, revision: str | None) -> None:
    """One HEAD request for the repo's ``config.json``, without huggingface_hub's retries.

    Without a network, ``hf_hub_download`` retries five times over about 25 s;
    this fails in well under a second instead. HTTP answers (404, 401, ...)
    pass: the download that follows reports them.

    Raises:
        FileNotFoundError: the hub cannot be reached (one line).
    """
    import inspect

    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    no_retry = {"retry_on_errors": False} if "retry_on_errors" in inspect.signature(get_hf_file_metadata).parameters else {}
    try:
        get_hf_file_metadata(hf_hub_url(repo, "config.json", revision=revision), timeout=10, **no_retry)
    except HfHubHTTPError:
        return
    except Exception as e:  # noqa: BLE001 - connection refused, DNS, timeout, offline mode: no answer from the hub
        raise FileNotFoundError(
            f"{repo} is not in the Hugging Face cache {_tilde(hf_cache_dir())} and the hub cannot be reached ({one_line(e, 120)}); "
            f"put the snapshot there (huggingface-cli download {repo}) or pass a local model directory"
        ) from None


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

    with _quiet_hub():
        config, weights = fetch(False)
        if (config is None or weights is None) and download:
            _check_reachable(repo, revision)
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
    cfg = read_config(d, preprocessing=True, name=name)
    if not any((d / f).is_file() for f in WEIGHT_FILES):
        raise FileNotFoundError(f"{d}: no {' or '.join(WEIGHT_FILES)} next to config.json")
    return Pretrained(name, cfg.source, d, d, cfg.labels, cfg.preprocess)


def resolve(name: str | os.PathLike, download: bool = True, revision: str | None = None, check_hash: bool = True) -> Pretrained:
    """Finds pretrained weights by name (see the module docstring), downloading only if needed.

    Args:
        name: a torchvision weights name or file name, a Hugging Face hub id,
            a bare timm name, or a local file or model directory.
        download: fetch what is not cached; ``False`` only reads the caches.
        revision: a Hugging Face hub revision (branch, tag or commit).
        check_hash: check a cached torchvision file named by a torchvision
            name against the SHA-256 prefix in its file name (as torch hub's
            ``check_hash=True``; read once per process). A path is taken as it is.

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
        labels = read_meta(p).get("labels")  # a converted model directory's class names travel in the file
        return Pretrained(raw, "file", p, labels=tuple(labels) if labels else None)
    w = TORCHVISION_WEIGHTS.get(key.lower())
    if w is not None:
        return _torchvision(raw, w, download, check_hash)
    if key.startswith(("/", "./", "../", "~")) or key.lower().endswith(_FILE_SUFFIXES):
        raise FileNotFoundError(f"{raw}: no such file or directory")
    repo = key.removeprefix("hf-hub:").removeprefix("hf_hub:")
    if "/" not in repo and "." in repo and repo.split(".")[0] in ARCHS:
        repo = f"timm/{repo}"  # timm's bare names live under timm/ on the hub
    if re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        try:
            return _from_hf_dir(raw, hf_snapshot(repo, download and not offline, revision))
        except FileNotFoundError as e:
            hint = "" if repo in HUB_IDS else did_you_mean(repo, HUB_IDS)
            if not hint:
                raise
            raise FileNotFoundError(f"{e}{hint}") from None
    raise ValueError(
        f"unknown pretrained name {raw!r}: not a file, a torchvision weights name (ResNet50_Weights.IMAGENET1K_V2, "
        f"resnet50-11ad3fa6.pth, resnet50), or a Hugging Face hub id (timm/resnet50.a1_in1k, microsoft/resnet-50)"
        f"{did_you_mean(key, known_names())}"
    )


def from_pretrained(
    name: str | os.PathLike, api: str = "linen", download: bool = True, revision: str | None = None, check_hash: bool = True, **load_kwargs: Any
):
    """Loads pretrained weights by the name users know, as ``flax_resnet.load`` does a file.

    Args:
        name: ``"ResNet50_Weights.IMAGENET1K_V2"``, ``"resnet50"`` (torchvision's
            DEFAULT), ``"resnet50-11ad3fa6.pth"``, ``"timm/resnet50.a1_in1k"``,
            ``"microsoft/resnet-50"``, or a local path; see ``resolve``.
        api: ``"linen"`` (``flax_resnet.ResNet`` and its variables) or ``"nnx"``.
        download: fetch what is not cached (``False``: caches only).
        revision: a Hugging Face hub revision.
        check_hash: check cached torchvision files against the hash in their name (see ``resolve``).
        **load_kwargs: passed to ``flax_resnet.load`` (``dtype``,
            ``param_dtype``, ``layout``, ``arch``, ...).

    Returns:
        Exactly ``flax_resnet.load(path, api=api, **load_kwargs)`` of the path
        (or model directory) ``resolve(name)`` finds: ``(model, variables)``
        for ``api="linen"``, a ``flax_resnet.nnx.ResNet`` (in train mode:
        call ``.eval()`` for inference) for ``api="nnx"``; the same config
        either way. Labels and the preprocessing are in ``resolve(name)``.

    Raises:
        FileNotFoundError: not cached and not downloadable.
        ValueError: an unknown name or api; ``ConversionError`` (a
            ``ValueError``) for weights that are not a ResNet this package builds.
    """
    check_api(api)
    info = resolve(name, download=download, revision=revision, check_hash=check_hash)
    # A model directory is read whole: its config.json names v1 strides (transformers) or the architecture (timm).
    return load(info.directory if info.directory is not None else info.path, api=api, **load_kwargs)
