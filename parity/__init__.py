"""Parity harness: PyTorch vs Flax on the same weights and inputs, under jax.jit."""
