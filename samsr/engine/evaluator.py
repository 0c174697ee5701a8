"""Evaluation loop: refine every image of every coarse source, score it, time it, report it; in
one process or split over the ranks of a ``torchrun`` job (every accuracy field equal)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from samsr.data.io import write_mask
from samsr.distributed import DistContext, all_gather_objects
from samsr.metrics import (
    EfficiencyMeter,
    RefinementMeter,
    format_efficiency,
    format_refinement_table,
    merge_efficiency,
)

RefineFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def evaluate(
    refine: RefineFn,
    datasets: Mapping[str, Any],
    device: Any,
    out_dir: str | Path | None = None,
    method: str = "refined",
    warmup: int = 1,
    save_masks: bool = False,
    dtype: str | None = None,
    progress: bool = True,
    small_coarse_rule: str = "cascadepsp",
    facts: Mapping[str, Any] | None = None,
    dist: DistContext | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate ``refine`` on each coarse source.

    Args:
        refine: ``(image HxWx3 uint8, coarse HxW uint8) -> refined HxW uint8``, e.g. a Refiner.
            Optional protocol: ``takes_name = True`` (called with ``name=``), ``reset()``
            before each source and ``report() -> dict`` merged into its metrics (SAM-SR's
            ``sam_ms`` / ``refine_ms`` and gate counts).
        datasets: coarse source name -> evaluation dataset (items: image, gt, coarse, name).
        device: the device the model runs on (timing synchronises it, peak memory is read there).
        out_dir: where ``metrics.json``, ``results.md`` and saved masks go (None: nothing written).
        method: the method's name in the report.
        warmup: images per source whose time is left out of the mean.
        save_masks: write ``<out_dir>/masks/<source>/<name>_mask.png``.
        dtype: the inference dtype, recorded beside the timings.
        progress: show a progress bar.
        small_coarse_rule: CascadePSP's small-object rule (see :class:`RefinementMeter`).
        facts: settings recorded in every source's metrics beside device and dtype (e.g. the
            ``cudnn_benchmark`` / ``tf32`` flags in force).
        dist: with several ranks (every rank calls this), rank ``r`` refines images ``r, r + W,
            ...`` of each source; rank 0 gathers the per-image scores in dataset order (so every
            accuracy field equals a one-process run's), merges the timings (``per_rank`` keeps
            each rank's) and writes the reports.

    Returns:
        source -> metrics (``iou``, ``miou``, ``mba``, ``*_coarse``, ``*_delta``, ``time_s``,
        ``peak_mem_gib``, ...); ``{}`` on ranks other than 0.
    """
    ctx = dist or DistContext()
    if not datasets:
        raise ValueError("no evaluation datasets configured (data.test / data.val is empty)")
    results: dict[str, dict[str, Any]] = {}
    for source, dataset in datasets.items():
        if len(dataset) == 0:
            raise ValueError(f"evaluation source '{source}' has no images")
        meter = RefinementMeter(small_coarse_rule=small_coarse_rule)
        eff = EfficiencyMeter(device, warmup=warmup, dtype=dtype)
        takes_name = bool(getattr(refine, "takes_name", False))
        if hasattr(refine, "reset"):
            refine.reset()  # per-source stage times / counts (SAM-guided refiners)
        indices = range(ctx.rank, len(dataset), ctx.world_size)
        show = progress and ctx.is_main
        bar = tqdm(indices, desc=f"eval {source}", disable=not show, leave=False)
        for i in bar:
            sample = dataset[i]
            with eff.measure(size=sample["gt"].shape[:2]):
                if takes_name:
                    pred = refine(sample["image"], sample["coarse"], name=sample["name"])
                else:
                    pred = refine(sample["image"], sample["coarse"])
            meter.update(sample["name"], sample["gt"], pred, sample["coarse"])
            if save_masks and out_dir is not None:
                write_mask(Path(out_dir) / "masks" / source / f"{sample['name']}_mask.png", pred)
        report = refine.report() if hasattr(refine, "report") else {}
        part = (list(indices), meter.per_image(), eff.compute() if len(eff) else None, report)
        parts = all_gather_objects(part) if ctx.enabled else [part]
        if not ctx.is_main:
            continue
        if ctx.enabled:  # every rank's rows, in dataset order
            order = sorted((i, row) for idx, rows, _, _ in parts for i, row in zip(idx, rows))
            meter = RefinementMeter(small_coarse_rule=small_coarse_rule)
            meter.add_rows([row for _, row in order])
        res: dict[str, Any] = {
            **meter.compute(),
            **merge_efficiency([p[2] for p in parts if p[2] is not None]),
            **(facts or {}),
        }
        rows = meter.per_image()
        res["image_sizes"] = sorted({f"{row['width']}x{row['height']}" for row in rows})
        res.update(_merge_reports([p[3] for p in parts], [len(p[0]) for p in parts]))
        res["per_image"] = rows
        results[source] = res

    if out_dir is not None and ctx.is_main:
        write_results(results, out_dir, method)
    return results


def _merge_reports(reports: list[dict[str, Any]], counts: list[int]) -> dict[str, Any]:
    """The ranks' ``refine.report()`` as one: ``*_ms`` means weighted by images, integer
    counts summed, anything else as rank 0 has it."""
    if len(reports) == 1:
        return dict(reports[0])
    out = dict(reports[0])
    for key, value in reports[0].items():
        if key.endswith("_ms"):
            total = sum(n for r, n in zip(reports, counts) if key in r)
            out[key] = sum(r[key] * n for r, n in zip(reports, counts) if key in r) / total
        elif isinstance(value, int) and not isinstance(value, bool):
            out[key] = sum(int(r.get(key, 0)) for r in reports)
    return out


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def format_results(results: dict[str, dict[str, Any]], method: str) -> str:
    """Markdown: the thesis-style IoU/mBA table, then time and peak memory per coarse source."""
    eff_rows = [
        format_efficiency(res, f"{method} ({source})").splitlines()
        for source, res in results.items()
    ]
    eff_table = "\n".join(eff_rows[0][:2] + [rows[2] for rows in eff_rows])
    return f"{format_refinement_table(results, method)}\n\n{eff_table}"


def write_results(results: dict[str, dict[str, Any]], out_dir: str | Path, method: str) -> None:
    """Write ``metrics.json`` (everything) and ``results.md`` (the thesis-style table)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(_json_safe(results), indent=2))
    (out / "results.md").write_text(format_results(results, method=method) + "\n")
