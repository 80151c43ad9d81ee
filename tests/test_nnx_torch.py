"""NNX ResNets against the PyTorch reference in float64: eval, train mode (outputs and running stats), gradients.

Every point (each block's output, each stage's running statistics and
gradients) must agree with torch to 1e-10 (eval) / 1e-9 (train, grad) of the
reference's largest magnitude at that point, the harness's float64 rule.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import flax_resnet.nnx as frn
from flax_resnet.convert import flax_to_torch
from parity.fixtures import images, reference_model

TOL = {"eval": 1e-10, "train": 1e-9, "grad": 1e-9}

# (arch, layout, scan_blocks): ResNet-50 in both layouts, a basic-block model, a grouped
# model, and a 100+-layer model scanned.
CASES = [  # the seed layout (conv biases) at 50 layers; torchvision's keys are the others'
    ("resnet50", "seed", False),
    ("resnet18", "torchvision", False),
    ("resnext50_32x4d", "torchvision", False),
    ("resnet101", "torchvision", True),
]


@pytest.fixture(autouse=True)
def _release_compiled():
    yield
    jax.clear_caches()


@nnx.jit
def _eval_train_grad(model, x, y):
    """Eval-mode outputs (an eval view of the model), then the train-mode forward (running
    stats updated in place), loss and gradients: one compile per model."""
    ev = nnx.view(model, use_running_average=True).intermediates(x, blocks=True)

    def loss_fn(m):
        out = m.intermediates(x, blocks=True)
        return optax.softmax_cross_entropy_with_integer_labels(out["logits"], y).mean(), out

    (loss, out), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return ev, loss, out, grads


def _torch_side(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1) if t.ndim == 4 else t.detach().numpy()  # noqa: E731
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        ev = {k: nhwc(v) for k, v in m.forward_intermediates(xt, blocks=True).items()}
    m = copy.deepcopy(model).train()
    out = m.forward_intermediates(xt, blocks=True)
    loss = F.cross_entropy(out["logits"], yt)
    loss.backward()
    train = {k: nhwc(v) for k, v in out.items()}
    train.update({f"stat:{k}": v.numpy() for k, v in m.state_dict().items() if k.endswith(("running_mean", "running_var"))})
    grad = {"loss": loss.detach().numpy()}
    grad.update({f"grad:{k}": p.grad.numpy() for k, p in m.named_parameters()})
    return {"eval": ev, "train": train, "grad": grad}


def _nnx_side(model: frn.ResNet, x: np.ndarray, y: np.ndarray, layout: str) -> dict[str, dict[str, np.ndarray]]:
    x = jnp.asarray(x.transpose(0, 2, 3, 1))
    ev, loss, out, grads = _eval_train_grad(model, x, jnp.asarray(y))
    ev = {k: np.asarray(v) for k, v in ev.items()}
    train = {k: np.asarray(v) for k, v in out.items()}
    sd = frn.to_torch(model, layout=layout)
    train.update({f"stat:{k}": v for k, v in sd.items() if k.endswith(("running_mean", "running_var"))})
    g = {"params": frn.to_linen(grads)["params"], "batch_stats": frn.to_linen(model)["batch_stats"]}
    gsd = flax_to_torch(jax.device_get(g), layout=layout)
    grad = {"loss": np.asarray(loss)}
    grad.update({f"grad:{k}": v for k, v in gsd.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))})
    return {"eval": ev, "train": train, "grad": grad}


def _point(key: str) -> str:
    """A keyed tensor's point: its kind and stage (``grad:layer2.3.conv1.weight`` -> ``grad layer2``)."""
    if ":" not in key:
        return key
    kind, name = key.split(":", 1)
    top = name.split(".")[0]
    return f"{kind} {'stem' if top in ('conv1', 'bn1') else top}"


def _errors(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    """``max|got - ref| / max|ref|`` per point."""
    assert set(got) == set(ref), set(got) ^ set(ref)
    groups: dict[str, list[str]] = {}
    for k in ref:
        groups.setdefault(_point(k), []).append(k)
    out = {}
    for name, keys in groups.items():
        scale = max(float(np.max(np.abs(ref[k]))) for k in keys) or 1.0
        out[name] = max(float(np.max(np.abs(got[k].astype(np.float64) - ref[k]))) for k in keys) / scale
    return out


@pytest.mark.parametrize("arch,layout,scan", CASES)
def test_nnx_matches_torch_float64(arch, layout, scan):
    ref_model = reference_model(arch, layout, num_classes=10, calibrate_size=32).double()
    x = images(2, 3, 64, 64).double().numpy()
    y = np.array([3, 7])
    want = _torch_side(ref_model, x, y)
    with jax.enable_x64(True):
        model = frn.from_torch(ref_model.state_dict(), scan_blocks=scan)
        assert model.fc.kernel.dtype == jnp.float64 and isinstance(model.layer3, frn.ScannedStage) == scan
        got = _nnx_side(model, x, y, layout)
    failures = []
    for mode in ("eval", "train", "grad"):
        errs = _errors(want[mode], got[mode])
        failures += [f"{mode} {p}: {e:.2e}" for p, e in errs.items() if not e <= TOL[mode]]
    assert not failures, failures
    # Every block's output, the running stats of every stage and every gradient were compared.
    assert {"layer1.0", "layer4.1", "logits"} <= set(got["eval"]) and "stat:layer4.0.bn1.running_var" in got["train"]
    assert len([k for k in got["grad"] if k.startswith("grad:")]) == len(list(ref_model.parameters()))


def test_parity_command_api_nnx_float32(capsys):
    """``flax-resnet parity --api nnx``: the NNX model through the harness's points and fp32 rule (2x the measured fp32 noise), kinks matched."""
    import json

    from flax_resnet.cli import main as cli_main

    rc = cli_main(["parity", "--api", "nnx", "--arch", "resnet18", "--size", "64", "64", "--batch", "2", "--mode", "all", "--num-classes", "10", "--json"])
    out = capsys.readouterr().out
    report = json.loads(out)
    assert rc == 0 and report["passed"] and report["api"] == "nnx", out[-3000:]
    assert {p["mode"] for p in report["points"]} == {"eval", "train", "grad", "steps"} and report["dtype"] == "float32"
    assert report["kinks"] is not None  # NNX gradients get Linen's kink matching
