"""Refine coarse masks with a checkpoint: the ``samsr refine`` command from a checkout,
``python scripts/refine.py IMAGE|DIR --mask MASK|DIR --ckpt CKPT`` (samsr.engine.refine_cli)."""

import sys

from samsr.cli import main

if __name__ == "__main__":
    sys.exit(main(["refine", *sys.argv[1:]]))
