"""Compare CRM inference variants: ``python scripts/benchmark.py [--ckpt ...] [--variants ...]``.

Each variant (``samsr/configs/inference/<name>.yaml``) runs in a fresh process on the same images
with the same weights; ``python scripts/benchmark.py --help`` lists the options.
"""

import sys

from samsr.engine.benchmark_cli import main
from samsr.errors import exit_on_error

if __name__ == "__main__":
    sys.exit(exit_on_error(main)())
