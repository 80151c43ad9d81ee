import sys

from flax_resnet.cli import main

sys.exit(main())
