"""A ``ModelConfig`` as the keyword arguments of both ``ResNet`` classes (jax dtypes and precision)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from flax_resnet.config import ModelConfig

_JAX_VALUED = ("dtype", "param_dtype", "precision")


def jax_dtype(name: str | None) -> Any:
    """A config's dtype name as a jnp dtype (``None`` stays ``None``)."""
    return None if name is None else jnp.dtype(name)


def jax_precision(name: str | None) -> jax.lax.Precision | None:
    """A config's precision name as a ``jax.lax.Precision`` (``None`` stays ``None``)."""
    return None if name is None else jax.lax.Precision[name.upper()]


def model_kwargs(config: ModelConfig) -> dict[str, Any]:
    """The keyword arguments (every config field) that the Linen and NNX ``ResNet`` take for ``config``."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"expected a flax_resnet.ModelConfig, got {type(config).__name__}")
    kw = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in _JAX_VALUED}
    kw.update(dtype=jax_dtype(config.dtype), param_dtype=jax_dtype(config.param_dtype), precision=jax_precision(config.precision))
    return kw
