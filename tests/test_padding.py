"""Padding and kernel orientation of every strided op, against ``torch.nn.functional`` in float64.

Odd input sizes cannot test padding: at an odd size, ``'SAME'`` pads a
stride-2 conv or pool by the same amount on both sides, exactly as torch
does. At even sizes it pads one pixel less at the top/left, which moves every
window. These tests run the Flax model on images with one lit pixel away from
the centre (in one input channel), with random, asymmetric kernels, so a
shifted window, a flipped or transposed kernel, or a swapped channel changes
several output positions; and each shows that ``'SAME'`` padding would fail
it. The ops' inputs are the Flax model's own (captured with
``capture_intermediates``), so each op is checked alone.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from parity import reference_weights as rw

# Image size -> the input sizes of the stem conv, the max-pool and layer2's first convs:
# 8 -> 8, 4, 2;  10 -> 10, 5, 3;  32 -> 32, 16, 8;  40 -> 40, 20, 10.
SIZES = (8, 10, 32, 40)


@functools.lru_cache(maxsize=2)
def weights(arch: str) -> dict[str, np.ndarray]:
    import torch_ref

    model = torch_ref.ResNet(arch, num_classes=7)
    return rw.reference_weights({k: tuple(v.shape) for k, v in model.state_dict().items()})


def lit_image(size: int) -> np.ndarray:
    """NCHW float64, one pixel of channel 1 lit, off the centre in both axes."""
    x = np.zeros((1, 3, size, size))
    x[0, 1, 1, size - 3] = 1.0
    return x


def flax_captures(arch: str, x: np.ndarray) -> tuple[dict, dict]:
    """The Flax model's intermediates and every module's output, keyed by torch module path (NCHW)."""
    import jax
    from flax import traverse_util

    import flax_resnet

    with jax.enable_x64(True):
        model, v = flax_resnet.from_torch(weights(arch), arch=arch, layout="torchvision")
        out, state = jax.jit(lambda v, x: model.apply(v, x, method="intermediates", capture_intermediates=True, mutable=["intermediates"]))(
            v, x.transpose(0, 2, 3, 1)
        )
    nchw = lambda a: np.array(a, np.float64).transpose(0, 3, 1, 2) if np.ndim(a) == 4 else np.array(a)  # noqa: E731
    flat = traverse_util.flatten_dict(state["intermediates"])
    mods = {".".join(k[:-1]): nchw(a[0]) for k, a in flat.items() if hasattr(a[0], "shape")}  # stages return tuples
    return {k: nchw(a) for k, a in out.items()}, mods


def same_conv(x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
    """The conv with ``'SAME'`` padding (the bug): NCHW/OIHW in and out."""
    import jax

    with jax.enable_x64(True):
        y = jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return np.asarray(y)


def same_max_pool(x: np.ndarray) -> np.ndarray:
    import jax

    with jax.enable_x64(True):
        y = jax.lax.reduce_window(x, -np.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 2, 2), "SAME")
    return np.asarray(y)


def assert_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape} != torch's {want.shape}"
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max(), err_msg=what)


def assert_differs(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """The 'SAME' version fails the comparison above (a different shape fails it too)."""
    assert got.shape != want.shape or np.abs(got - want).max() > 1e-3 * np.abs(want).max(), f"'SAME' would pass {what}"


@pytest.mark.parametrize("size", SIZES)
def test_stem_conv_max_pool_and_strided_convs_match_torch(size):
    import torch
    import torch.nn.functional as F

    w = {k: torch.from_numpy(v) for k, v in weights("resnet18").items()}
    x = lit_image(size)
    out, mods = flax_captures("resnet18", x)

    # Stem: 7x7/2, padding 3. The lit pixel reaches a block of output positions, several of them at the border.
    want = F.conv2d(torch.from_numpy(x), w["conv1.weight"], stride=2, padding=3).numpy()
    assert np.count_nonzero(np.abs(want).sum(1)) >= 6
    assert_close(mods["conv1"], want, f"stem conv at {size}x{size}")
    assert_differs(same_conv(x, w["conv1.weight"].numpy(), 2), want, f"the stem conv at {size}x{size}")

    # Max-pool 3x3/2, padding 1 (-inf), on the Flax stem's own ReLU output.
    pre = np.maximum(mods["bn1"], 0.0)
    want = F.max_pool2d(torch.from_numpy(pre), 3, stride=2, padding=1).numpy()
    assert_close(out["stem"], want, f"max-pool on {pre.shape[2]}x{pre.shape[3]}")
    if pre.shape[2] % 2 == 0:
        assert_differs(same_max_pool(pre), want, f"the max-pool on {pre.shape[2]}x{pre.shape[3]}")

    # layer2.0 (basic block): its 3x3/2 conv (padding 1) and the shortcut's 1x1/2 conv, on layer1's output.
    y = out["layer1"]
    want = F.conv2d(torch.from_numpy(y), w["layer2.0.conv1.weight"], stride=2, padding=1).numpy()
    assert_close(mods["layer2.0.conv1"], want, f"3x3/2 conv on {y.shape[2]}x{y.shape[3]}")
    if y.shape[2] % 2 == 0:
        assert_differs(same_conv(y, w["layer2.0.conv1.weight"].numpy(), 2), want, f"the 3x3/2 conv on {y.shape[2]}x{y.shape[3]}")
    # A 1x1/2 conv has no padding ('SAME' agrees); it samples even positions, which this pins down.
    want = F.conv2d(torch.from_numpy(y), w["layer2.0.downsample.0.weight"], stride=2).numpy()
    assert_close(mods["layer2.0.downsample.0"], want, f"1x1/2 conv on {y.shape[2]}x{y.shape[3]}")
    assert_differs(F.conv2d(torch.from_numpy(y[:, :, 1:, 1:]), w["layer2.0.downsample.0.weight"], stride=2).numpy(), want, "an odd-phase 1x1/2 conv")


@pytest.mark.parametrize("size", (32, 36))
def test_avg_pool_shortcut_matches_torch(size):
    """timm's ``avg_down`` shortcut: AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False), then a 1x1 conv.

    At 36x36 layer2's input is 9x9, so the last window is partial (ceil mode).
    """
    import torch
    import torch.nn.functional as F

    w = {k: torch.from_numpy(v) for k, v in weights("resnet10t").items()}
    out, mods = flax_captures("resnet10t", lit_image(size))
    y = out["layer1"]
    pooled = F.avg_pool2d(torch.from_numpy(y), 2, stride=2, ceil_mode=True, count_include_pad=False)
    want = F.conv2d(pooled, w["layer2.0.downsample.1.weight"]).numpy()
    assert_close(mods["layer2.0.downsample.1"], want, f"avg-pool shortcut on {y.shape[2]}x{y.shape[3]}")
    # The deep stem's first conv: 3x3/2, padding 1, on the lit image.
    x = lit_image(size)
    want = F.conv2d(torch.from_numpy(x), w["conv1.0.weight"], stride=2, padding=1).numpy()
    assert_close(mods["conv1.0"], want, f"deep stem conv at {size}x{size}")
    assert_differs(same_conv(x, w["conv1.0.weight"].numpy(), 2), want, f"the deep stem conv at {size}x{size}")
