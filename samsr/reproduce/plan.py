"""What each thesis table needs: its training and evaluation runs, with their folders and
command lines, and which evaluation fills which part of the table.

A plan is pure data: building one runs nothing, so ``--dry-run`` prints exactly what a run
would launch. Every run has a fixed folder ``<out_dir>/<key>`` (``train/crm``,
``eval/crm/faithful``, ``eval/crm/bbox@pspnet``), which is how a rerun finds finished work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

from samsr.errors import ConfigError

__all__ = ["FIGURES", "TABLES", "Eval", "Plan", "Run", "build_plan", "figure_names", "table_names"]

CRM = "crm"
V3 = ("samsr_v3_1", "samsr_v3_2", "samsr_v3_3", "samsr_v3_4")
# models trained from the CRM checkpoint (their extra input channels start at zero)
FROM_CRM = ("samsr_v2_1", "samsr_v2_2")
# models that evaluate CRM's own checkpoint with SAM in front of it
ON_CRM = ("samsr_v1",)
TRAINED = (CRM, *FROM_CRM, *V3, "pspnet")


@dataclasses.dataclass(frozen=True)
class Run:
    """One command of a plan.

    Attributes:
        key: its folder under the plan's ``out_dir`` and its name in the plan.
        script: ``train`` or ``eval`` (``scripts/<script>.py``).
        overrides: the Hydra overrides of its command line.
        needs: keys of the runs whose checkpoints it reads (they run first).
    """

    key: str
    script: str
    overrides: tuple[str, ...]
    needs: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Eval:
    """An evaluation a table reads: ``model`` (its checkpoint) with an inference ``preset``.

    ``sources`` None: every coarse source of the profile's test data; else only those.
    """

    model: str
    preset: str = "faithful"
    sources: tuple[str, ...] | None = None

    @property
    def key(self) -> str:
        subset = f"@{'+'.join(self.sources)}" if self.sources else ""
        return f"eval/{self.model}/{self.preset}{subset}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """The runs of one or more tables in launch order, and what each table reads."""

    runs: tuple[Run, ...]
    tables: Mapping[str, tuple[Eval, ...]]
    out_dir: Path

    def folder(self, run: Run) -> Path:
        return self.out_dir / run.key


# table -> (title, the evaluations it reads); "speed" and "optimised" are the profile's
# speed_source and optimised_preset, filled in by build_plan
TABLES: dict[str, tuple[str, tuple[tuple[str, str, str | None], ...]]] = {
    "4.1": (
        "Peak memory, time and accuracy of CRM: original vs patched fusion",
        ((CRM, "faithful", None), (CRM, "patched", "speed")),
    ),
    "4.2": (
        "Time and accuracy of CRM's decoding variants",
        tuple(
            (CRM, p, None if p == "faithful" else "speed")
            for p in ("faithful", "bbox", "contour", "strided2", "strided4", "strided8")
        ),
    ),
    "4.3": (
        "SAM-SR v1 vs CRM per coarse source",
        ((CRM, "faithful", None), ("samsr_v1", "faithful", None)),
    ),
    "4.4": (
        "SAM-SR v2.1 and v2.2 vs CRM per coarse source",
        tuple((m, "faithful", None) for m in (CRM, *FROM_CRM)),
    ),
    "4.5": (
        "SAM-SR v3.1-v3.4 vs CRM per coarse source",
        tuple((m, "faithful", None) for m in (CRM, *V3)),
    ),
    "4.6": (
        "Summary: time, memory and average improvement",
        ((CRM, "faithful", None), ("samsr_v2_1", "optimised", None)),
    ),
    "patch": ("Patch-based PSPNet baseline (thesis section 4.1)", (("pspnet", "faithful", None),)),
}


# figure -> (title, the evaluations whose saved masks it draws); see samsr/reproduce/figures.py
FIGURES: dict[str, tuple[str, tuple[tuple[str, str, str | None], ...]]] = {
    "2.6": ("CRM's failure cases", ((CRM, "faithful", None),)),
    "4.2": (
        "CRM vs SAM-SR v2.1: where SAM's guidance changes the object",
        ((CRM, "faithful", None), ("samsr_v2_1", "faithful", None)),
    ),
    "4.3": (
        "CRM vs SAM-SR v2.1: where SAM's guidance changes the boundary",
        ((CRM, "faithful", None), ("samsr_v2_1", "faithful", None)),
    ),
}

SAVE_MASKS = "eval.save_masks=true"
"""Every faithful refiner evaluation keeps its masks: the figures draw them."""


def table_names() -> list[str]:
    """Every table ``build_plan`` knows, in the thesis's order."""
    return list(TABLES)


def figure_names() -> list[str]:
    """Every figure ``build_plan`` knows."""
    return list(FIGURES)


def _evals(
    reads: tuple[tuple[str, str, str | None], ...], speed_source: str, optimised: str
) -> tuple[Eval, ...]:
    out = []
    for model, preset, sources in reads:
        preset = optimised if preset == "optimised" else preset
        out.append(Eval(model, preset, (speed_source,) if sources == "speed" else None))
    return tuple(out)


def _data(model: str, data: Sequence[str]) -> Sequence[str]:
    """The shared data overrides, but for the patch baseline: it trains on segmentation data of
    its own (``models.pspnet``) and reads its test data from ``eval_models.pspnet``."""
    return () if model == "pspnet" else data


def build_plan(
    tables: Sequence[str],
    out_dir: str | Path,
    *,
    figures: Sequence[str] = (),
    data: Sequence[str] = (),
    train_data: Sequence[str] = (),
    eval_data: Sequence[str] = (),
    train: Sequence[str] = (),
    evaluate: Sequence[str] = (),
    models: Mapping[str, Sequence[str]],
    eval_models: Mapping[str, Sequence[str]] | None = None,
    checkpoints: Mapping[str, str | None] | None = None,
    speed_source: str = "pspnet",
    optimised_preset: str = "fast",
) -> Plan:
    """The runs that ``tables`` need, each once, trainings before the evaluations that read them.

    Args:
        tables: table names (``4.1`` ... ``4.6``, ``patch``; see :data:`TABLES`).
        out_dir: the folder holding every run's folder.
        figures: figure names (:data:`FIGURES`): their evaluations join the plan.
        data: overrides of every refiner's runs, training and evaluation (one data config:
            e.g. the synthetic set, whose training and test images are made together); the patch
            baseline trains and tests on data of its own (``models``/``eval_models``).
        train_data: the refiners' training data (e.g. ``data=train_merged``).
        eval_data: the refiners' test data (e.g. ``data=big``).
        train: overrides of every training run.
        evaluate: overrides of every evaluation run.
        models: per model, the overrides that select and size it (``model=...`` first).
        eval_models: per model, the overrides of its evaluations where they differ from
            ``models`` (e.g. the patch baseline: trained on VOC, tested on BIG).
        checkpoints: per model, an existing checkpoint to use instead of training it (the
            official CRM file too); ``samsr_v1`` uses CRM's.
        speed_source: the coarse source of tables 4.1-4.2's variant rows (the thesis: PSPNet).
        optimised_preset: table 4.6's "with the inference optimisations" preset.

    Raises:
        ConfigError: an unknown table, or a model with neither overrides nor a checkpoint.
    """
    if any(t not in TABLES for t in tables) or not (tables or figures):
        raise ConfigError(f"table={list(tables)}: pick from {table_names()} or all")
    if any(f not in FIGURES for f in figures):
        raise ConfigError(f"figure={list(figures)}: pick from {figure_names()} or all")
    out = Path(out_dir)
    ckpts = {k: str(v) for k, v in (checkpoints or {}).items() if v}
    for model, path in ckpts.items():
        if model not in TRAINED:
            raise ConfigError(f"ckpt.{model}: no such trained model (one of {list(TRAINED)})")
        if not Path(path).exists():
            raise ConfigError(f"ckpt.{model}={path}: no such file; pass an existing checkpoint")
    eval_models = eval_models or {}
    runs: dict[str, Run] = {}

    def model_args(model: str) -> list[str]:
        if model not in models:
            raise ConfigError(
                f"the profile has no settings for model {model} (profile.models.{model}); "
                f"add them or pass ckpt.{model}=<checkpoint>"
            )
        return list(models[model])

    def checkpoint(model: str) -> tuple[str, tuple[str, ...]]:
        """(checkpoint path, keys of the runs that make it) of a trained model."""
        if model in ckpts:
            return str(ckpts[model]), ()
        key = f"train/{model}"
        if key not in runs:
            args = [*model_args(model), *_data(model, [*data, *train_data]), *train]
            needs: tuple[str, ...] = ()
            if model in FROM_CRM:
                crm, needs = checkpoint(CRM)
                args.append(f"model.init_weights={crm}")
            runs[key] = Run(key, "train", tuple(args), needs)
        return str(out / key / "checkpoints" / "last.pt"), (key,)

    per_table = {t: _evals(TABLES[t][1], speed_source, optimised_preset) for t in tables}
    drawn = [_evals(FIGURES[f][1], speed_source, optimised_preset) for f in figures]
    for evals in [*per_table.values(), *drawn]:
        for ev in evals:
            if ev.key in runs:
                continue
            source = CRM if ev.model in ON_CRM else ev.model
            path, needs = checkpoint(source)
            own = eval_models[ev.model] if ev.model in eval_models else model_args(ev.model)
            args = [*own, *_data(ev.model, [*data, *eval_data]), *evaluate]
            if ev.model != "pspnet":
                args.append(f"inference={ev.preset}")
                if ev.preset == "faithful":
                    args.append(SAVE_MASKS)
            if ev.sources:
                args.append(f"eval.sources=[{','.join(ev.sources)}]")
            args.append(f"ckpt_path={path}")
            runs[ev.key] = Run(ev.key, "eval", tuple(args), needs)
    ordered = [r for r in runs.values() if r.script == "train"]
    ordered += [r for r in runs.values() if r.script == "eval"]
    return Plan(tuple(ordered), per_table, out)
