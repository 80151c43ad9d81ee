import functools
import os
import sys

import numpy as np

# The parity tests compare against float64 torch runs; JAX's x64 mode is
# switched on per computation (jax.enable_x64), never globally.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# No comparison treats NaN as equal: assert_allclose defaults to equal_nan=True, which lets a
# NaN in Flax's output match a NaN in the reference (or in Flax's own second run).
np.testing.assert_allclose = functools.partial(np.testing.assert_allclose, equal_nan=False)
