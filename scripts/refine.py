"""Refine one photo's coarse mask with a checkpoint (see samsr.engine.refine_cli)."""

import sys

from samsr.engine.refine_cli import main
from samsr.errors import exit_on_error

if __name__ == "__main__":
    sys.exit(exit_on_error(main)())
