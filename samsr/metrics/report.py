"""Markdown tables in the thesis's format (IoU/mBA x 100, per coarse-mask source, average gain).

Inputs are the dictionaries of :meth:`RefinementMeter.compute` (fractions in [0, 1]) and
:meth:`EfficiencyMeter.compute`; the x100 scaling happens only here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["average_gain", "format_efficiency", "format_refinement_table", "format_report"]

_DELTA_KEYS = ("iou_delta", "miou_delta", "mba_delta")


def average_gain(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Mean improvement over coarse-mask sources (the thesis tables' "avg. gain" row).

    Args:
        results: ``{source: metrics}`` with ``iou_delta`` and ``mba_delta`` (and optionally
            ``miou_delta``) as fractions.

    Returns:
        ``{"iou_delta": ..., "mba_delta": ...}`` (plus ``miou_delta`` if every source has it):
        unweighted means over sources, as fractions.

    Raises:
        ValueError: If ``results`` is empty or a source has no deltas (no coarse masks).
    """
    if not results:
        raise ValueError("average_gain: no results.")
    out = {}
    for key in _DELTA_KEYS:
        have = [key in metrics for metrics in results.values()]
        if key != "miou_delta" and not all(have):
            missing = [name for name, ok in zip(results, have) if not ok]
            raise ValueError(f"average_gain: sources {missing} have no {key!r} (no coarse masks?).")
        if all(have):
            out[key] = sum(float(m[key]) for m in results.values()) / len(results)
    return out


def _pct(value: Any, digits: int, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100.0 * float(value):{'+' if sign else ''}.{digits}f}"


def _pair(metrics: Mapping[str, Any], suffix: str, digits: int, sign: bool = False) -> str:
    iou = metrics.get("iou" + suffix)
    mba = metrics.get("mba" + suffix)
    return f"{_pct(iou, digits, sign)}/{_pct(mba, digits, sign)}"


def format_refinement_table(
    results: Mapping[str, Mapping[str, Any]], method: str = "refined", digits: int = 2
) -> str:
    """Formats IoU/mBA per coarse-mask source as a Markdown table.

    Args:
        results: ``{source: RefinementMeter.compute() dict}``, in row order.
        method: Name of the refiner, used in the header.
        digits: Decimals of the x100 values.

    Returns:
        ``| coarse source | coarse IoU/mBA | <method> IoU/mBA | delta IoU/mBA |`` rows, then an
        ``avg. gain`` row with the mean of the deltas over sources (when every source has them).
    """
    if results and not any("iou_coarse" in m for m in results.values()):
        # a method without a coarse input (the patch baseline): its own scores alone
        rows = [f"| {name} | {_pair(m, '', digits)} |" for name, m in results.items()]
        return "\n".join([f"| evaluation | {method} IoU/mBA |", "|---|---|", *rows])
    lines = [
        f"| coarse source | coarse IoU/mBA | {method} IoU/mBA | delta IoU/mBA |",
        "|---|---|---|---|",
    ]
    for source, metrics in results.items():
        coarse = _pair(metrics, "_coarse", digits)
        refined = _pair(metrics, "", digits)
        delta = _pair(metrics, "_delta", digits, sign=True)
        lines.append(f"| {source} | {coarse} | {refined} | {delta} |")
    if results and all("iou_delta" in m and "mba_delta" in m for m in results.values()):
        gain = average_gain(results)
        lines.append(f"| avg. gain |  |  | {_pair(gain, '_delta', digits, sign=True)} |")
    return "\n".join(lines)


def format_efficiency(efficiency: Mapping[str, Any], method: str = "refined") -> str:
    """Formats an :meth:`EfficiencyMeter.compute` dict as a one-row Markdown table.

    Args:
        efficiency: The summary dict (``time_s``, ``peak_mem_gib``, ``device_name``, ...).
        method: Row label.

    Returns:
        ``| method | time (s/image) | peak memory (GiB) | device | dtype | batch | images timed |
        mean size |`` and one row.
    """

    def num(key: str, fmt: str) -> str:
        value = efficiency.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        return format(value, fmt)

    timed = f"{efficiency.get('num_timed', 'n/a')}"
    if efficiency.get("num_warmup"):
        timed += f" (+{efficiency['num_warmup']} warm-up)"
    size = "n/a"
    if "mean_height" in efficiency and "mean_width" in efficiency:
        size = f"{efficiency['mean_height']:.0f}x{efficiency['mean_width']:.0f}"
    device = efficiency.get("device_name", efficiency.get("device", "n/a"))
    row = [
        method,
        num("time_s", ".3f"),
        num("peak_mem_gib", ".2f"),
        str(device),
        str(efficiency.get("dtype", "n/a")),
        str(efficiency.get("batch_size", "n/a")),
        timed,
        size,
    ]
    header = [
        "method",
        "time (s/image)",
        "peak memory (GiB)",
        "device",
        "dtype",
        "batch",
        "images timed",
        "mean size (HxW)",
    ]
    if "sam_ms" in efficiency:  # SAM-guided refiners: the two stages apart (thesis table 4.6)
        header[2:2] = ["SAM (ms/image)", "refiner (ms/image)"]
        row[2:2] = [num("sam_ms", ".1f"), num("refine_ms", ".1f")]
    return "\n".join(
        [
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            "| " + " | ".join(row) + " |",
        ]
    )


def format_report(
    results: Mapping[str, Mapping[str, Any]],
    method: str = "refined",
    efficiency: Mapping[str, Any] | None = None,
    title: str | None = None,
    digits: int = 2,
) -> str:
    """Formats a full Markdown report: optional title, accuracy table, optional efficiency table.

    Args:
        results: ``{source: RefinementMeter.compute() dict}``.
        method: Name of the refiner.
        efficiency: Optional :meth:`EfficiencyMeter.compute` dict.
        title: Optional heading.
        digits: Decimals of the x100 accuracy values.

    Returns:
        Markdown text ending with a newline.
    """
    parts = []
    if title:
        parts.append(f"## {title}")
    parts.append(format_refinement_table(results, method, digits))
    if efficiency is not None:
        parts.append(format_efficiency(efficiency, method))
    return "\n\n".join(parts) + "\n"
