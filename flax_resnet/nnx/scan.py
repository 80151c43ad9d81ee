"""An NNX stage (``layerN``) run unrolled or as one ``nnx.scan`` (``ScannedStage``), with optional remat."""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from flax_resnet.archs import BlockSpec
from flax_resnet.nnx.blocks import BLOCKS, _Settings


def _call_block(block: nnx.Module, x: jax.Array) -> jax.Array:
    return block(x)


class ScannedStage(nnx.Module):
    """``layerN`` with blocks ``1..n-1`` stacked and run by one ``nnx.scan``.

    Block ``0`` (which may stride and project) is the attribute ``"0"``;
    the stacked blocks are ``rest`` (every leaf with a leading axis of
    ``n - 1``): the paths of Linen's ``ResNet(scan_blocks=True)``.
    ``stage[0]`` is block 0, ``stage[i]`` for ``i >= 1`` the stacked module.
    """

    def __init__(self, specs: tuple[BlockSpec, ...], settings: _Settings, *, zero_init_residual: bool, remat: bool, rngs: nnx.Rngs):
        block = BLOCKS[specs[0].kind]
        setattr(self, "0", block(specs[0], settings, zero_init_residual=zero_init_residual, rngs=rngs))
        inner = dataclasses.replace(settings, in_loop=True)
        spec = specs[1]

        @nnx.split_rngs(splits=len(specs) - 1)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs: nnx.Rngs) -> nnx.Module:
            return block(spec, inner, zero_init_residual=zero_init_residual, rngs=rngs)

        self.rest = make(rngs)
        self.size = len(specs)
        self.remat = remat

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> nnx.Module:
        if not -self.size <= i < self.size:
            raise IndexError(f"block {i} of a stage of {self.size}")
        return getattr(self, "0") if i in (0, -self.size) else self.rest

    def run(self, x: jax.Array, emit: bool) -> tuple[jax.Array, list[jax.Array]]:
        first = getattr(self, "0")
        y0 = nnx.remat(_call_block)(first, x) if self.remat else first(x)

        def body(block: nnx.Module, carry: jax.Array):
            y = block(carry)
            return y, (y if emit else None)

        if self.remat:
            body = nnx.remat(body, prevent_cse=False)
        x, ys = nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))(self.rest, y0)
        return x, [y0] + ([ys[i] for i in range(self.size - 1)] if emit else [])


def run_stage(stage: nnx.List | ScannedStage, x: jax.Array, emit: bool, remat: bool) -> tuple[jax.Array, list[jax.Array]]:
    if isinstance(stage, ScannedStage):
        return stage.run(x, emit)
    outs = []
    call = nnx.remat(_call_block) if remat else _call_block
    for block in stage:
        x = call(block, x)
        outs.append(x)
    return x, outs
