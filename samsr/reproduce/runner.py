"""Running a plan: what is done, what resumes, and the command line of every run.

A run is *done* when its result is on disk: an evaluation's ``metrics.json`` (and its
``masks/`` where it saves them, see :data:`~samsr.reproduce.plan.SAVE_MASKS`), a training's
``done.json`` (written here once ``scripts/train.py`` exits 0). A training killed mid-way has a
``checkpoints/last.pt`` and resumes from it (bit-exactly, see the trainer); a killed evaluation
starts again. Nothing else is kept between calls, so a rerun redoes exactly what is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from samsr.errors import SamsrError
from samsr.reproduce.plan import SAVE_MASKS, Plan, Run

__all__ = ["RunFailed", "command", "execute", "status"]

REPO_ROOT = Path(__file__).resolve().parents[2]
DONE = "done.json"


class RunFailed(SamsrError, RuntimeError):
    """A run of the plan exited non-zero; its log names the cause."""


def status(plan: Plan, run: Run) -> str:
    """``done``, ``resume`` (a training with a checkpoint) or ``todo``."""
    folder = plan.folder(run)
    if run.script == "eval":
        masks = SAVE_MASKS not in run.overrides or (folder / "masks").is_dir()
        return "done" if masks and (folder / "metrics.json").is_file() else "todo"
    if (folder / DONE).is_file():
        return "done"
    return "resume" if (folder / "checkpoints" / "last.pt").is_file() else "todo"


def command(plan: Plan, run: Run, gpus: int = 0) -> list[str]:
    """The command line of ``run``: ``python scripts/<script>.py`` (``torchrun`` for ``gpus``
    > 1) with its overrides, its folder as Hydra's run dir, and ``resume=`` where it resumes."""
    folder = plan.folder(run)
    script = str(REPO_ROOT / "scripts" / f"{run.script}.py")
    if gpus > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        head += [f"--nproc_per_node={gpus}", script]
    else:
        head = [sys.executable, script]
    args = [*run.overrides, f"hydra.run.dir={folder}"]
    if run.script == "train" and status(plan, run) == "resume":
        args.append(f"resume={folder / 'checkpoints' / 'last.pt'}")
    return head + args


def execute(
    plan: Plan,
    gpus: int = 0,
    echo: Callable[[str], None] = print,
    launch: Callable[[list[str], Path], int] | None = None,
) -> list[str]:
    """Runs every run that is not done, in order; returns the keys it ran.

    Args:
        plan: the plan.
        gpus: GPUs per run (> 1: ``torchrun --nproc_per_node``).
        echo: where progress lines go.
        launch: ``(argv, log file) -> exit status`` (default: a subprocess whose output goes to
            the terminal and to the log).

    Raises:
        RunFailed: a run exited non-zero (the runs before it stay done).
    """
    launch = launch or _launch
    ran = []
    todo = [r for r in plan.runs if status(plan, r) != "done"]
    for i, run in enumerate(todo, 1):
        folder = plan.folder(run)
        folder.mkdir(parents=True, exist_ok=True)
        argv = command(plan, run, gpus)
        echo(f"[{i}/{len(todo)}] {run.key} ({status(plan, run)}): {' '.join(argv[1:])}")
        start = time.perf_counter()
        code = launch(argv, folder / "reproduce.log")
        if code != 0:
            raise RunFailed(
                f"{run.key} exited with status {code}; see {folder / 'reproduce.log'} "
                "(rerun the same command to go on from there)"
            )
        wall = time.perf_counter() - start
        if run.script == "train":
            record = {"argv": argv, "wall_s": wall, "checkpoint": "checkpoints/last.pt"}
            (folder / DONE).write_text(json.dumps(record, indent=2))
        elif not (folder / "metrics.json").is_file():
            raise RunFailed(f"{run.key} exited 0 but wrote no {folder / 'metrics.json'}")
        echo(f"[{i}/{len(todo)}] {run.key}: done in {wall:.0f} s")
        ran.append(run.key)
    return ran


def _launch(argv: list[str], log: Path) -> int:
    """Runs ``argv`` in this directory (relative paths mean the same in every run), its output
    on the terminal and in ``log``."""
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            out.write(line)
        return proc.wait()
