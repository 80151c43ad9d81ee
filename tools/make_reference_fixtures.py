"""Writes tests/reference/*.npz: what the real torchvision and timm ResNets compute.

The parity tests compare Flax with ``torch_ref``, and both are built from the
same table (``flax_resnet.archs``); these fixtures anchor both to the real
libraries. For every architecture: the full state_dict key list with shapes,
the parameter count (1000 classes), and float64 outputs of the library's own
model on weights that ``parity.reference_weights`` regenerates from the key
names alone (so no weights are stored):

* eval: logits, the first 8 channels of the pooled stem/layer1..4/pre_logits,
  a digest of each of those tensors, and channel 0 of the stem output;
* one train-mode pass (torch's default momentum 0.1): logits, feature
  digests, a digest of every BatchNorm's updated running mean and var;
* the gradients of mean cross-entropy from that pass: a digest of every
  parameter's, ``fc.bias`` in full, the first 16 channels of layer4's last
  BN bias, and output channel 0 of the stem conv kernel;

at ``parity.reference_weights.SIZES`` (an odd and an even input size),
batch 2, 7 classes. A digest is ``sum(w * tensor)`` with fixed random
weights, so every entry moves it (see ``parity.reference_weights.digest``).

Run once, in a side environment with the real libraries (the project's venv
pins torch 2.13.0 and has neither torchvision nor timm)::

    python3 -m venv /work/sidevenv
    /work/sidevenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm
    PYTHONPATH=. /work/sidevenv/bin/python tools/make_reference_fixtures.py [ARCH ...]
    PYTHONPATH=. /work/sidevenv/bin/python tools/make_reference_fixtures.py --features [ARCH ...]

(``--features``: ``tests/reference/features/<arch>.npz``, timm's
``features_only=True`` feature maps; see ``features_fixture``.)

(torch and torchvision install from this machine's local wheel index, timm
from PyPI.) It imports only numpy, torch, torchvision, timm and
``parity.reference_weights`` from this repository.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from parity import reference_weights as rw

TORCHVISION = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
)
TIMM = (
    "resnet10t",
    "resnet14t",
    "resnet18d",
    "resnet26",
    "resnet26d",
    "resnet26t",
    "resnet34d",
    "resnet50c",
    "resnet50d",
    "resnet50s",
    "resnet50t",
    "resnet101c",
    "resnet101d",
    "resnet101s",
    "resnet152c",
    "resnet152d",
    "resnet152s",
    "resnet200",
    "resnet200d",
    "seresnet50",
    "seresnext26d_32x4d",
    "seresnext50_32x4d",
    "seresnext101_32x8d",
    "resnetrs50",
    "resnetrs101",
)
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "reference")


def build(arch: str) -> tuple[torch.nn.Module, str]:
    if arch in TORCHVISION:
        import torchvision

        return getattr(torchvision.models, arch)(weights=None, num_classes=rw.NUM_CLASSES), f"torchvision {torchvision.__version__}"
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=rw.NUM_CLASSES), f"timm {timm.__version__}"


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float64)


def run_model(model: torch.nn.Module, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every fixture point of the current mode; features are captured by hooks (the same attributes in both libraries)."""
    feats: dict[str, torch.Tensor] = {}
    hooks = [model.maxpool.register_forward_hook(lambda m, i, o: feats.__setitem__("stem", o))]
    for s in (1, 2, 3, 4):
        hooks.append(getattr(model, f"layer{s}").register_forward_hook(lambda m, i, o, s=s: feats.__setitem__(f"layer{s}", o)))
    hooks.append(model.fc.register_forward_hook(lambda m, i, o: feats.__setitem__("pre_logits", i[0])))
    try:
        logits = model(torch.from_numpy(x))
    finally:
        for h in hooks:
            h.remove()
    return {**feats, "logits": logits}


def fixture(arch: str) -> dict[str, np.ndarray]:
    model, library = build(arch)
    sd = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    weights = rw.reference_weights(shapes)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    model = model.double()
    params = [k for k, _ in model.named_parameters()]
    bns = [k[: -len(".running_var")] for k in sd if k.endswith(".running_var")]
    n_feat = shapes["fc.weight"][1]
    count = sum(p.numel() for p in model.parameters()) + (1000 - rw.NUM_CLASSES) * (n_feat + 1)
    stem_key, bn_bias_key = rw.stem_conv_key(sd), rw.last_bn_bias_key(sd)
    meta = {
        "arch": arch,
        "library": library,
        "torch": torch.__version__,
        "keys": [[k, list(s)] for k, s in shapes.items()],
        "param_count": int(count),
        "num_classes": rw.NUM_CLASSES,
        "sizes": rw.SIZES,
        "stem_conv": stem_key,
        "bn_bias": bn_bias_key,
    }
    out = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    for size in rw.SIZES:
        x, y = rw.images(size), rw.labels(size)
        m = model.eval()
        with torch.no_grad():
            ev = {k: _np(v) for k, v in run_model(m, x).items()}
        out[f"{size}/eval/logits"] = ev["logits"]
        out[f"{size}/eval/pooled"] = np.stack([rw.pooled(ev[f]) for f in rw.FEATURES])
        out[f"{size}/eval/digest"] = np.array([rw.digest(f, ev[f]) for f in rw.FEATURES])
        out[f"{size}/eval/stem_map"] = ev["stem"][:, 0]

        m = copy.deepcopy(model).train()
        tr = run_model(m, x)
        loss = F.cross_entropy(tr["logits"], torch.from_numpy(y))
        loss.backward()
        tr = {k: _np(v) for k, v in tr.items()}
        out[f"{size}/train/logits"] = tr["logits"]
        out[f"{size}/train/digest"] = np.array([rw.digest(f, tr[f]) for f in rw.FEATURES])
        msd = m.state_dict()
        out[f"{size}/train/stats"] = np.array([rw.digest(f"{b}.{s}", _np(msd[f"{b}.{s}"])) for b in bns for s in rw.STATS])
        out[f"{size}/train/loss"] = np.array(loss.item())
        grads = dict(m.named_parameters())
        out[f"{size}/grad/digest"] = np.array([rw.digest(k, _np(grads[k].grad)) for k in params])
        out[f"{size}/grad/fc.bias"] = _np(grads["fc.bias"].grad)
        out[f"{size}/grad/bn_bias"] = _np(grads[bn_bias_key].grad)[:16]
        out[f"{size}/grad/stem_conv"] = _np(grads[stem_key].grad)[0]
        del m
    return out


FEATURE_ARCHS = ("resnet18", "resnet50d", "seresnext26d_32x4d", "resnetrs50")


def features_fixture(arch: str) -> dict[str, np.ndarray]:
    """timm's ``features_only=True`` model (``FeatureListNet``, all five ``out_indices``) in float64 eval mode.

    Per size and feature map (``act1``, ``layer1``..``layer4``): its shape,
    the pooled first 8 channels, a digest and channel 0 in full.
    """
    import timm

    model = timm.create_model(arch, pretrained=False, features_only=True, out_indices=(0, 1, 2, 3, 4))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict({k: torch.from_numpy(v) for k, v in rw.reference_weights(shapes).items()}, strict=True)
    model = model.double().eval()
    info = model.feature_info.get_dicts()
    meta = {"arch": arch, "library": f"timm {timm.__version__}", "torch": torch.__version__, "keys": [[k, list(s)] for k, s in shapes.items()], "feature_info": info, "sizes": rw.SIZES}
    out = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    for size in rw.SIZES:
        with torch.no_grad():
            feats = [_np(f) for f in model(torch.from_numpy(rw.images(size)))]
        for d, f in zip(info, feats):
            out[f"{size}/{d['module']}/shape"] = np.array(f.shape)
            out[f"{size}/{d['module']}/pooled"] = rw.pooled(f)
            out[f"{size}/{d['module']}/digest"] = np.array(rw.digest(d["module"], f))
            out[f"{size}/{d['module']}/channel0"] = f[:, 0]
    return out


def main(argv: list[str]) -> int:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(OUT, exist_ok=True)
    if argv[:1] == ["--features"]:  # tests/reference/features/<arch>.npz
        os.makedirs(os.path.join(OUT, "features"), exist_ok=True)
        for arch in argv[1:] or FEATURE_ARCHS:
            path = os.path.join(OUT, "features", f"{arch}.npz")
            np.savez_compressed(path, **features_fixture(arch))
            print(f"{arch} features: {os.path.getsize(path) / 1024:.1f} KiB", flush=True)
        return 0
    for arch in argv or (TORCHVISION + TIMM):
        t = time.perf_counter()
        arrays = fixture(arch)
        path = os.path.join(OUT, f"{arch}.npz")
        np.savez_compressed(path, **arrays)
        print(f"{arch}: {os.path.getsize(path) / 1024:.1f} KiB, {time.perf_counter() - t:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
