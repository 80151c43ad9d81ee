"""Fine-tuning converted weights: a new classifier head, pretrained checkpoints and their identity."""

from __future__ import annotations

import hashlib
import os

import jax
import jax.numpy as jnp
from flax import linen as nn

from flax_resnet.io.resolve import load
from flax_resnet.model import ResNet


def replace_head(model, variables: dict, num_classes: int, rng: jax.Array):
    """A new classifier for ``num_classes``; the backbone keeps its weights.

    Returns ``(model, variables)`` with ``model.num_classes`` changed and
    ``fc`` freshly initialized as the model initializes it (kernel
    ``variance_scaling(1/3, fan_in, uniform)``, zero bias).

    Raises:
        TypeError: ``model`` is not a ``flax_resnet.ResNet``.
    """
    if not isinstance(model, ResNet):
        raise TypeError(f"replace_head expects a flax_resnet.ResNet, got {type(model).__name__}")
    fc = variables["params"]["fc"]
    in_features = fc["kernel"].shape[0]
    dtype = fc["kernel"].dtype
    head = nn.Dense(
        num_classes,
        use_bias="bias" in fc,
        param_dtype=dtype,
        kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
    )
    new_fc = head.init(rng, jnp.zeros((1, in_features), dtype))["params"]
    params = dict(variables["params"])
    params["fc"] = new_fc
    new_variables = dict(variables)
    new_variables["params"] = params
    return model.clone(num_classes=num_classes), new_variables


def load_pretrained(path: str | os.PathLike, num_classes: int | None = None, rng: jax.Array | None = None, **model_kwargs):
    """Loads converted weights (``.pth``, ``.safetensors``, ``.msgpack``, Orbax) for fine-tuning.

    Args:
        path: a checkpoint ``flax_resnet.load`` reads.
        num_classes: if given and different, ``replace_head`` for it.
        rng: key for the new head (default ``jax.random.key(0)``).
        **model_kwargs: ``ResNet`` attributes to override, e.g.
            ``dtype=jnp.bfloat16`` for mixed precision.

    Returns:
        ``(model, variables)``.
    """
    model, variables = load(path, **model_kwargs)
    if num_classes is not None and num_classes != model.num_classes:
        model, variables = replace_head(model, variables, num_classes, jax.random.key(0) if rng is None else rng)
    return model, variables


def weights_identity(path: str | os.PathLike) -> str:
    """``sha256:<16 hex>`` of a weights checkpoint's content (a file, or every file of an Orbax directory).

    A training run started from it records this (``flax-resnet train --init``):
    the content, not the name or modification time, so a file rewritten
    with other weights is another run and a copied or touched one is not.
    """
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for f in files:
        digest.update(os.path.relpath(f, path).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]
