"""The ``samsr`` command (``pyproject.toml`` ``[project.scripts]``): ``samsr refine ...``.

Training, evaluation and the benchmark stay Hydra/argparse scripts of a checkout
(``scripts/train.py``, ``scripts/eval.py``, ``scripts/benchmark.py``); ``samsr refine`` is what an
installed package offers a user with a photo, a mask and a checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import samsr

__all__ = ["main"]

_COMMANDS = {"refine": "refine images' coarse masks with a checkpoint (samsr refine -h)"}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="samsr",
        description="High-resolution segmentation refinement.",
        epilog="commands:\n" + "\n".join(f"  {k:<8} {v}" for k, v in _COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"samsr {samsr.__version__}")
    p.add_argument("command", choices=sorted(_COMMANDS), help="what to do")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``samsr <command> [options]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in _COMMANDS:
        _top_parser().parse_args(argv)  # --help, --version, or a usage error (exit 2)
        return 2
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.WARNING)
    logging.getLogger("samsr").setLevel(logging.INFO)
    from samsr.engine.refine_cli import main as refine
    from samsr.errors import exit_on_error

    return exit_on_error(refine)(argv[1:], prog="samsr refine")


if __name__ == "__main__":
    sys.exit(main())
