"""Former home of checkpoint I/O, kept so ``from flax_resnet.checkpoint import load`` works: see ``flax_resnet.io``."""

from flax_resnet.io import *  # noqa: F401,F403
from flax_resnet.io import __all__  # noqa: F401
