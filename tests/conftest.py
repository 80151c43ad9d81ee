import os
import sys

# The parity tests compare against float64 torch runs; JAX's x64 mode is
# switched on per computation (jax.enable_x64), never globally.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
