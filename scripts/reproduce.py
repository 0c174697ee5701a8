"""Each thesis table from one command:
``python scripts/reproduce.py table=4.4 [profile=cpu_smoke] [gpus=N] [ckpt.crm=...] [--dry-run]``.

Plans the table's training and evaluation runs, runs what is not done yet and writes the table
beside the thesis's numbers (README "Reproducing the thesis")."""

import sys

from samsr.errors import exit_on_error
from samsr.reproduce.cli import main

if __name__ == "__main__":
    sys.exit(exit_on_error(main)())
