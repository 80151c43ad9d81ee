"""A stage of blocks (``layerN``), unrolled or compiled once per stage (``nn.scan``), with optional remat.

Kept apart from the blocks (``flax_resnet.blocks``) so that they read as the
paper's blocks; this module only decides how they are run.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn

from flax_resnet import kernels
from flax_resnet.archs import BlockSpec
from flax_resnet.blocks import BLOCKS
from flax_resnet.layers import RELU_SIGNS

ModuleDef = Any


@functools.lru_cache(maxsize=None)
def _scan_body(block: type) -> type:
    """``block`` as the body of ``nn.scan``: ``x -> (x, per-block output or None)``.

    The body is the block itself (a subclass), so its variables sit directly
    under ``layerN/rest``. ``train`` is an attribute so that the scan
    broadcasts no Python values; ``emit`` stacks each block's output.
    """

    class Body(block):
        train: bool = False
        emit: bool = False

        @nn.compact
        def __call__(self, x):  # type: ignore[override]
            y = self.forward(x, self.train)
            return y, (y if self.emit else None)

    Body.__name__ = Body.__qualname__ = f"Scanned{block.__name__}"
    return Body


class Stage(nn.Module):
    """``layerN``: its blocks, named ``0``, ``1``, ... as in torch.

    With ``scan_blocks``, blocks ``1..n-1`` (identical in shape: stride 1,
    no projection) run as one ``nn.scan`` named ``rest`` whose variables
    carry a leading axis of length ``n - 1``: XLA compiles one block body
    per stage. ``remat`` recomputes each block in the backward pass.
    """

    specs: tuple[BlockSpec, ...]
    conv: ModuleDef
    norm: ModuleDef
    zero_init_residual: bool = False
    scan_blocks: bool = False
    remat: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False, emit: bool = True):
        cls = BLOCKS[self.specs[0].kind]
        block = nn.remat(cls, static_argnums=(2,)) if self.remat else cls
        specs = self.specs if not self.scan_blocks else self.specs[:1]
        outs = []
        for b in specs:
            x = block(b, self.conv, self.norm, self.zero_init_residual, name=str(b.index))(x, train)
            outs.append(x)
        rest = self.specs[len(specs) :]
        if rest:
            body = nn.remat(_scan_body(cls), prevent_cse=False) if self.remat else _scan_body(cls)
            axes = {"params": 0, "batch_stats": 0, "intermediates": 0, RELU_SIGNS: 0}
            scan = nn.scan(body, variable_axes=axes, split_rngs={"params": True}, length=len(rest))
            loop_conv = functools.partial(self.conv, conv_general_dilated=kernels.loop_conv_general_dilated)
            body_kw = dict(conv=loop_conv, norm=self.norm, zero_init_residual=self.zero_init_residual, train=train, emit=emit)
            x, ys = scan(rest[0], name="rest", **body_kw)(x)
            outs += [ys[i] for i in range(len(rest))] if emit else []
        return x, outs
