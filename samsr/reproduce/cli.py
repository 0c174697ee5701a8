"""The reproduce commands: ``python scripts/reproduce.py table=4.4 [profile=cpu_smoke] [gpus=N]
[ckpt.crm=...] [--dry-run]`` and ``python scripts/figures.py figure=4.2 [...]``."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from samsr.engine.configs import compose
from samsr.errors import ConfigError
from samsr.reproduce.plan import Eval, Plan, build_plan, figure_names, table_names
from samsr.reproduce.runner import command, execute, status
from samsr.reproduce.tables import assemble, to_markdown, write_table

__all__ = ["figures_main", "main", "plan_from_config"]

USAGE = (
    "usage: python scripts/reproduce.py table=<4.1|4.2|4.3|4.4|4.5|4.6|patch|all> "
    "[profile=full|cpu_smoke] [gpus=N] [ckpt.<model>=<file>] [out_dir=...] [--dry-run]"
)
FIGURES_USAGE = (
    "usage: python scripts/figures.py figure=<2.6|4.2|4.3|all> [profile=full|cpu_smoke] "
    "[source=<coarse source>] [num=4] [names=[a,b]] [gpus=N] [ckpt.<model>=<file>] [--dry-run]"
)


def _names(value: object, every: list[str]) -> list[str]:
    names = list(value) if isinstance(value, ListConfig | list | tuple) else [value]
    names = [str(n) for n in names]
    return every if names == ["all"] else names


def plan_from_config(cfg: DictConfig, figures: list[str] | None = None) -> Plan:
    """The plan of ``cfg`` (the composed ``reproduce`` config): of its ``table``, or with
    ``figures``, of those figures."""
    if figures is None:
        if OmegaConf.is_missing(cfg, "table"):
            raise ConfigError(f"which table? {USAGE}")
        tables = _names(cfg.table, table_names())
    prof = OmegaConf.to_container(cfg.profile, resolve=True)
    assert isinstance(prof, dict)
    return build_plan(
        tables if figures is None else [],
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
        figures=figures or (),
    )


def describe(plan: Plan, gpus: int) -> str:
    """The plan, one line per run: its status and command line."""
    lines = [f"plan: {len(plan.runs)} runs in {plan.out_dir}"]
    for run in plan.runs:
        state = status(plan, run)
        lines.append(f"  [{state:6s}] {run.key}")
        if state != "done":
            lines.append("           " + " ".join(command(plan, run, gpus)[1:]))
    if plan.tables:
        lines.append("tables: " + ", ".join(plan.tables))
    return "\n".join(lines)


def _command_line(
    argv: Sequence[str] | None, config: str, usage: str
) -> tuple[DictConfig, bool] | None:
    """(the composed ``config``, --dry-run) of a command line; None after printing --help."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(f"{usage}\n\n{__doc__}")
        return None
    overrides = [a for a in args if a != "--dry-run"]
    flags = [a for a in overrides if a.startswith("-")]
    if flags:
        raise ConfigError(f"unknown option(s) {flags}; {usage}")
    cfg = compose(config, overrides)
    if int(cfg.gpus) < 0:
        raise ConfigError(f"gpus={cfg.gpus}: use 0 (one process) or the number of GPUs")
    return cfg, "--dry-run" in args


def main(argv: Sequence[str] | None = None) -> int:
    """Plans, runs what is missing and writes the tables; returns the exit status."""
    parsed = _command_line(argv, "reproduce", USAGE)
    if parsed is None:
        return 0
    cfg, dry = parsed
    plan = plan_from_config(cfg)
    gpus = int(cfg.gpus)
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


def figures_main(argv: Sequence[str] | None = None) -> int:
    """Plans and runs the evaluations the figures draw (those missing), then draws them;
    returns the exit status."""
    from samsr.data.io import write_image
    from samsr.engine.builders import build_eval_datasets
    from samsr.reproduce import figures

    parsed = _command_line(argv, "figures", FIGURES_USAGE)
    if parsed is None:
        return 0
    cfg, dry = parsed
    if OmegaConf.is_missing(cfg, "figure"):
        raise ConfigError(f"which figure? {FIGURES_USAGE}")
    names = _names(cfg.figure, figure_names())
    plan = plan_from_config(cfg, names)
    gpus = int(cfg.gpus)
    print(describe(plan, gpus))
    if dry:
        return 0
    execute(plan, gpus)
    source = str(cfg.source or cfg.profile.speed_source)
    # the test data exactly as CRM's evaluation composed it
    crm_eval = next(r for r in plan.runs if r.key == Eval("crm").key)
    data_cfg = compose("eval", [o for o in crm_eval.overrides if not o.startswith("ckpt_path=")])
    dataset = build_eval_datasets(data_cfg.data, "test", sources=[source])[source]
    index = {item.name: i for i, item in enumerate(dataset.items)}
    out = Path(str(cfg.out))
    for name in names:
        spec = figures.SPECS[name]
        folders = {m: plan.out_dir / Eval(m).key for m in spec.models}
        rows = {m: figures.load_rows(f / "metrics.json", source) for m, f in folders.items()}
        chosen = (
            [str(n) for n in cfg.names]
            if cfg.names
            else figures.select_images(spec, rows, int(cfg.num))
        )
        unknown = [n for n in chosen if n not in index or any(n not in r for r in rows.values())]
        if unknown:
            raise ConfigError(f"names={unknown}: not among the test images of source {source}")
        print(f"figure {name} ({spec.rule}), source {source}: {', '.join(chosen)}")
        drawn = []
        for image_name in chosen:
            sample = dataset[index[image_name]]
            masks = {m: figures.read_saved_mask(f, source, image_name) for m, f in folders.items()}
            per_image = {m: rows[m][image_name] for m in spec.models}
            drawn.append(figures.draw_figure(name, sample, masks, per_image, int(cfg.panel_px)))
            path = out / name / source / f"{image_name}.png"
            write_image(path, drawn[-1])
            print(f"  {path}")
        if drawn:
            sheet = out / f"figure_{name}_{source}.png"
            write_image(sheet, figures.contact_sheet(drawn))
            print(f"  contact sheet: {sheet}")
    return 0
