"""Thesis figure 4.1 (input | patch-based | global | GT) from a PSPNet checkpoint:
``python scripts/figure_patches.py --ckpt CKPT --split <BIG>/test [--out DIR]``."""

import sys

from samsr.engine.patch_figure import main
from samsr.errors import exit_on_error

if __name__ == "__main__":
    sys.exit(exit_on_error(main)())
