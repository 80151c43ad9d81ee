"""Inputs are checked at ``init`` as at ``apply`` (Linen) and at the call (NNX): one line naming the shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flax_resnet
import flax_resnet.nnx as frn

NCHW = r"^inputs are NHWC: expected 3 channels in the last axis, got shape \(1, 3, 32, 32\) \(an NCHW batch\? use x.transpose\(0, 2, 3, 1\)\)"
NO_BATCH = r"^inputs are NHWC batches: got one image of shape \(224, 224, 3\) with no batch axis \(use x\[None\]\)"


def test_init_refuses_nchw_and_names_a_missing_batch_axis():
    """The PyTorch habit: ``init`` on an NCHW batch used to build a 32-channel model (conv1 kernel (7, 7, 32, 64)) without a word."""
    model = flax_resnet.resnet18(num_classes=10)
    # Refused before any layer runs: one line (pytest also matches the note JAX appends).
    with pytest.raises(ValueError, match=NCHW):
        model.init(jax.random.key(0), jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match=NO_BATCH):
        model.init(jax.random.key(0), jnp.zeros((224, 224, 3)))
    with pytest.raises(ValueError, match=r"^inputs are NHWC batches \(N, H, W, 3\): got a 2-d array of shape \(32, 32\)"):
        model.init(jax.random.key(0), jnp.zeros((32, 32)))
    v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert v["params"]["conv1"]["kernel"].shape == (7, 7, 3, 64)
    # The model knows its input channels: 1-channel models say so, and refuse RGB.
    gray = flax_resnet.resnet18(num_classes=10, in_channels=1)
    assert jax.eval_shape(gray.init, jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"]["conv1"]["kernel"].shape == (7, 7, 1, 64)
    with pytest.raises(ValueError, match=r"expected 1 channels in the last axis, got shape \(1, 32, 32, 3\)"):
        gray.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_apply_follows_the_weights_channels():
    """At ``apply`` the stem kernel decides (variables converted from a 1-channel checkpoint), and says so for NCHW."""
    model = flax_resnet.resnet10t(num_classes=4, in_channels=1)
    v = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
    v = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), v)
    with pytest.raises(ValueError, match=r"expected 1 channels .* got shape \(2, 1, 32, 32\) \(an NCHW batch"):
        model.apply(v, np.zeros((2, 1, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"no batch axis"):
        model.apply(v, np.zeros((32, 32, 1), np.float32))


def test_create_train_state_takes_the_channels_of_its_input_shape():
    from flax_resnet import training

    state = training.create_train_state(flax_resnet.ResNet(arch=flax_resnet.ArchSpec("tiny", "basic", (1, 1, 1, 1)), num_classes=3), jax.random.key(0), training.torch_sgd(0.1), input_shape=(1, 16, 16, 1))
    assert state.params["conv1"]["kernel"].shape == (7, 7, 1, 64)


def test_nnx_refuses_the_same():
    model = nnx.eval_shape(lambda: frn.resnet18(num_classes=10))
    with pytest.raises(ValueError, match=NCHW):
        model(jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match=NO_BATCH):
        model(jnp.zeros((224, 224, 3)))
