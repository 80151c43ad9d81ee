"""``ModelConfig``: the one description of a model, from every reader to both front ends.

A config names the architecture row (``flax_resnet.ARCHS``) and every
setting that changes the numbers a model computes or the torch keys it
reads and writes. Readers (``infer_config``, ``from_torch``, ``load``,
``from_pretrained``, model directories, checkpoint metadata) return one;
``flax_resnet.build(config, api=...)`` is the one place that turns it into a
Linen or NNX model, and ``flax_resnet.model_config(model)`` goes back.

Dtypes and precision are stored as strings (``"bfloat16"``, ``"highest"``)
so that ``to_dict()`` is JSON and checkpoints can store it. Things that do
not change the numbers (``axis_name``, NNX ``rngs``) are not part of it:
they are passed to ``build``.

This module imports neither jax nor torch: ``torch_ref`` reads it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from flax_resnet.archs import ARCHS, ArchSpec, check_layout, get_arch

DTYPES = ("float16", "bfloat16", "float32", "float64")
PRECISIONS = ("default", "high", "highest")
# jax's other spellings of the three precisions (jax.lax.Precision accepts them too).
_PRECISION_ALIASES = {"fastest": "default", "bfloat16": "default", "tensorfloat32": "high", "float32": "highest"}


def _dtype_name(field: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        name = value
    else:  # numpy/jax dtype or scalar type (jnp.bfloat16, np.float32, np.dtype("float64"))
        name = getattr(getattr(value, "dtype", value), "name", None) or getattr(value, "__name__", None)
    if name is not None and name not in DTYPES:
        raise ValueError(f"ModelConfig.{field}: {value!r} is not one of {', '.join(DTYPES)}")
    return name


def _precision_name(value: Any) -> str | None:
    if value is None:
        return None
    name = value.lower() if isinstance(value, str) else str(getattr(value, "name", "")).lower()  # jax.lax.Precision.HIGHEST
    name = _PRECISION_ALIASES.get(name, name)
    if name not in PRECISIONS:
        raise ValueError(f"ModelConfig.precision: {value!r} is not one of {', '.join(PRECISIONS)} (or None)")
    return name


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes a ResNet's numbers and its torch key layout.

    Attributes:
        arch: a row of ``flax_resnet.ARCHS`` (``"resnet50"``, ``"resnet50d"``),
            stored by name, or a custom ``ArchSpec`` (e.g. a tiny test net).
        layout: torch state_dict key layout: ``"torchvision"``, ``"seed"``
            (convs with bias, ``identity_downsample``) or ``"transformers"``.
        num_classes: outputs of ``fc``; 0 is a headless backbone.
        in_channels: input channels (1 for grayscale).
        conv_bias: convs carry a bias. ``None`` (the default) means "as the
            layout has it": ``True`` for ``"seed"``, else ``False``.
        stride_in_1x1: ResNet v1 (a bottleneck strides in its first 1x1
            conv; transformers' ``downsample_in_bottleneck``) instead of v1.5.
        zero_init_residual: each block's last BatchNorm scale starts at zero.
        bn_momentum: Flax convention; 0.9 is torch's momentum 0.1.
        bn_eps: BatchNorm epsilon, torch's 1e-5.
        dtype: compute dtype name (``"bfloat16"``), or ``None`` to follow the
            inputs and params. A jax/numpy dtype is accepted and stored by name.
        param_dtype: dtype name of freshly initialized params and BN stats.
        precision: ``"default"``, ``"high"``, ``"highest"`` or ``None`` (a
            ``jax.lax.Precision`` is accepted and stored by name).
        scan_blocks: each stage's blocks ``1..n-1`` run as one scan (their
            variables stacked under ``layerN/rest``).
        remat: recompute each block's activations in the backward pass.

    Raises:
        ValueError: one line naming the field, for any invalid value.
    """

    arch: str | ArchSpec
    layout: str = "torchvision"
    num_classes: int = 1000
    in_channels: int = 3
    conv_bias: bool | None = None
    stride_in_1x1: bool = False
    zero_init_residual: bool = False
    bn_momentum: float = 0.9
    bn_eps: float = 1e-5
    dtype: str | None = None
    param_dtype: str = "float32"
    precision: str | None = None
    scan_blocks: bool = False
    remat: bool = False

    def __post_init__(self):
        arch = self.arch
        if isinstance(arch, ArchSpec) and ARCHS.get(arch.name) == arch:
            arch = arch.name  # a row is stored by name
        if not isinstance(arch, ArchSpec) and (not isinstance(arch, str) or arch not in ARCHS):
            raise ValueError(f"ModelConfig.arch: unknown architecture {arch!r}; choose one of {', '.join(ARCHS)} (or pass an ArchSpec)")
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen: normalize in place)
        set_("arch", arch)
        try:
            check_layout(get_arch(arch), self.layout)
        except (ValueError, TypeError) as e:
            raise ValueError(f"ModelConfig.layout: {e}") from None
        for name in ("num_classes", "in_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "num_classes" else 1):
                raise ValueError(f"ModelConfig.{name}: expected an int >= {0 if name == 'num_classes' else 1}, got {value!r}")
        if self.conv_bias is None:
            set_("conv_bias", self.layout == "seed")
        for name in ("conv_bias", "stride_in_1x1", "zero_init_residual", "scan_blocks", "remat"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name}: expected True or False, got {getattr(self, name)!r}")
        if self.layout == "seed" and not self.conv_bias:
            raise ValueError("ModelConfig.conv_bias: the seed layout's convs carry biases; conv_bias=False needs another layout")
        for name, lo, hi in (("bn_momentum", 0.0, 1.0), ("bn_eps", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo <= value < hi) or (name == "bn_eps" and value == 0):
                raise ValueError(f"ModelConfig.{name}: expected a float in {'(' if name == 'bn_eps' else '['}{lo}, {hi}), got {value!r}")
            set_(name, float(value))
        set_("dtype", _dtype_name("dtype", self.dtype))
        set_("param_dtype", _dtype_name("param_dtype", self.param_dtype))
        if self.param_dtype is None:
            raise ValueError("ModelConfig.param_dtype: expected a dtype name, got None")
        set_("precision", _precision_name(self.precision))

    @property
    def spec(self) -> ArchSpec:
        """The architecture: its row of ``ARCHS`` or the custom ``ArchSpec``."""
        return get_arch(self.arch)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with ``changes`` (validated); a new ``layout`` re-derives ``conv_bias`` unless it is given."""
        if "layout" in changes and "conv_bias" not in changes:
            changes["conv_bias"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-safe dict (str, int, float, bool, None values)."""
        out = dataclasses.asdict(self)  # a custom ArchSpec becomes a dict of its fields
        if isinstance(out["arch"], dict):
            out["arch"] = {k: list(v) if isinstance(v, tuple) else v for k, v in out["arch"].items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """The config ``to_dict`` wrote; refuses unknown fields and wrong types (one-line ValueError).

        Fields left out take their defaults (``arch`` is required).
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"ModelConfig: expected a dict of fields, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "arch" not in data:
            raise ValueError("ModelConfig.arch: missing (the architecture row is required)")
        data = dict(data)
        if isinstance(data["arch"], Mapping):  # a custom ArchSpec, as to_dict writes it
            try:
                data["arch"] = ArchSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["arch"].items()})
            except (TypeError, ValueError) as e:
                raise ValueError(f"ModelConfig.arch: not an ArchSpec: {e}") from None
        for key in ("dtype", "param_dtype", "precision", "layout"):
            if key in data and data[key] is not None and not isinstance(data[key], str):
                raise ValueError(f"ModelConfig.{key}: expected a string, got {type(data[key]).__name__}")
        return cls(**data)


FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))


def split_settings(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(settings, runtime)``: the ``ModelConfig`` fields among ``kwargs`` and the rest (``axis_name``, ``rngs``)."""
    return {k: v for k, v in kwargs.items() if k in FIELDS}, {k: v for k, v in kwargs.items() if k not in FIELDS}


def dtype_of(variables: Mapping[str, Any]) -> str | None:
    """The one floating dtype name of a variables tree's ``params`` (``None`` if mixed or not floating)."""
    names = set()
    stack = [variables.get("params", {})]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            stack.extend(node.values())
        else:
            names.add(str(getattr(node, "dtype", "")))
    return names.pop() if len(names) == 1 and next(iter(names)) in DTYPES else None
