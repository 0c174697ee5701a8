"""The reproduce command: ``python scripts/reproduce.py table=4.4 [profile=cpu_smoke] [gpus=N]
[ckpt.crm=...] [--dry-run]``."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from samsr.engine.configs import compose
from samsr.errors import ConfigError
from samsr.reproduce.plan import Plan, build_plan, table_names
from samsr.reproduce.runner import command, execute, status
from samsr.reproduce.tables import assemble, to_markdown, write_table

__all__ = ["main", "plan_from_config"]

USAGE = (
    "usage: python scripts/reproduce.py table=<4.1|4.2|4.3|4.4|4.5|4.6|patch|all> "
    "[profile=full|cpu_smoke] [gpus=N] [ckpt.<model>=<file>] [out_dir=...] [--dry-run]"
)


def _tables(value: object) -> list[str]:
    names = list(value) if isinstance(value, ListConfig | list | tuple) else [value]
    names = [str(n) for n in names]
    return table_names() if names == ["all"] else names


def plan_from_config(cfg: DictConfig) -> Plan:
    """The plan of ``cfg`` (the composed ``reproduce`` config)."""
    if OmegaConf.is_missing(cfg, "table"):
        raise ConfigError(f"which table? {USAGE}")
    prof = OmegaConf.to_container(cfg.profile, resolve=True)
    assert isinstance(prof, dict)
    return build_plan(
        _tables(cfg.table),
        cfg.out_dir,
        data=prof.get("data") or (),
        train_data=prof.get("train_data") or (),
        eval_data=prof.get("eval_data") or (),
        train=prof.get("train") or (),
        evaluate=prof.get("evaluate") or (),
        models=prof.get("models") or {},
        eval_models=prof.get("eval_models") or {},
        checkpoints=OmegaConf.to_container(cfg.ckpt, resolve=True),  # type: ignore[arg-type]
        speed_source=str(prof["speed_source"]),
        optimised_preset=str(prof["optimised_preset"]),
    )


def describe(plan: Plan, gpus: int) -> str:
    """The plan, one line per run: its status and command line."""
    lines = [f"plan: {len(plan.runs)} runs in {plan.out_dir}"]
    for run in plan.runs:
        state = status(plan, run)
        lines.append(f"  [{state:6s}] {run.key}")
        if state != "done":
            lines.append("           " + " ".join(command(plan, run, gpus)[1:]))
    lines.append("tables: " + ", ".join(plan.tables))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Plans, runs what is missing and writes the tables; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(f"{USAGE}\n\n{__doc__}")
        return 0
    dry = "--dry-run" in args
    overrides = [a for a in args if a != "--dry-run"]
    flags = [a for a in overrides if a.startswith("-")]
    if flags:
        raise ConfigError(f"unknown option(s) {flags}; {USAGE}")
    cfg = compose("reproduce", overrides)
    plan = plan_from_config(cfg)
    gpus = int(cfg.gpus)
    if gpus < 0:
        raise ConfigError(f"gpus={gpus}: use 0 (one process) or the number of GPUs")
    print(describe(plan, gpus))
    if dry:
        return 0
    execute(plan, gpus)
    out = Path(plan.out_dir) / "tables"
    for name in plan.tables:
        table = assemble(plan, name, str(cfg.profile.speed_source))
        md, csv = write_table(table, out)
        print(f"\n{to_markdown(table)}\n{md}\n{csv}")
    return 0
