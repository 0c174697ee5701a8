"""The thesis's figures from one command:
``python scripts/figures.py figure=4.2 [profile=cpu_smoke] [source=pspnet] [num=4] [--dry-run]``.

2.6: CRM's failure cases; 4.2 / 4.3: image | coarse | CRM | SAM-SR v2.1 | GT with a zoomed
boundary crop. Runs the evaluations they draw where missing (README "Reproducing the thesis")."""

import sys

from samsr.errors import exit_on_error
from samsr.reproduce.cli import figures_main

if __name__ == "__main__":
    sys.exit(exit_on_error(figures_main)())
