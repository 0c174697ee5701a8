"""samsr.metrics: IoU and mBA as CascadePSP computes them, timing and peak memory, reports.

Metric names say how they aggregate: ``iou`` (pooled over the dataset), ``miou`` (mean of
per-image IoUs), ``mba`` (mean boundary accuracy), ``*_coarse`` (the coarse input's), ``*_delta``
(refined minus coarse). Values are fractions in [0, 1]; reports multiply by 100.

Importing this package needs only numpy and OpenCV; the timing names (``EfficiencyMeter``,
``Stopwatch``, ``measure``, ``merge_efficiency``) import torch on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from samsr.metrics.boundary import boundary_accuracy, boundary_radii
from samsr.metrics.report import (
    average_gain,
    format_efficiency,
    format_refinement_table,
    format_report,
)
from samsr.metrics.segmentation import (
    RefinementMeter,
    binarize,
    intersection_union,
    to_uint8_mask,
)

if TYPE_CHECKING:
    from samsr.metrics.efficiency import EfficiencyMeter, Stopwatch, measure, merge_efficiency

__all__ = [
    "EfficiencyMeter",
    "RefinementMeter",
    "Stopwatch",
    "average_gain",
    "binarize",
    "boundary_accuracy",
    "boundary_radii",
    "format_efficiency",
    "format_refinement_table",
    "format_report",
    "intersection_union",
    "measure",
    "merge_efficiency",
    "to_uint8_mask",
]

_LAZY = {"EfficiencyMeter", "Stopwatch", "measure", "merge_efficiency"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("samsr.metrics.efficiency"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
