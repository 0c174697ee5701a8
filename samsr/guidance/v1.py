"""SAM-SR v1, IoU-based (SPEC section 6): pick SAM masks by coverage, gate, replace the coarse mask.

SAM's automatic mask generator (AMG) returns a list of annotation dicts in segment_anything's
format: ``"segmentation"`` (an H x W bool array, or an uncompressed RLE dict
``{"size": [h, w], "counts": [...]}`` in column-major order, runs alternating and starting with
zeros), ``"area"`` (int, pixels), ``"bbox"`` ([x, y, w, h], XYWH, inclusive extents as
segment_anything writes them), ``"predicted_iou"`` and ``"stability_score"``.

v1 keeps every SAM mask whose pixels lie mostly inside the coarse mask (coverage >= threshold)
and feeds the union of the kept masks to an unchanged CRM in place of the coarse mask, unless a
gate says not to: the coarse mask is sparse (thin or scattered objects: bicycles, chairs), no
mask was kept, or SAM's union deforms the coarse mask too much.

The selection and the measures (coverage, sparsity, deformation; masks decoded one at a time
within their boxes, so 6000 x 4000 images with ~900 masks stay cheap) are in
:mod:`samsr.guidance.selection`. Everything here is numpy/OpenCV on the CPU and never imports
``segment_anything`` (``samsr.guidance.build`` and ``samsr.guidance.runner`` do).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from samsr.guidance.maps import resize_nearest
from samsr.guidance.selection import (
    SegmentationDecoder,
    deformation,
    is_real,
    sparsity,
    union_of_selected,
)
from samsr.guidance.strategy import Guided, working_size

if TYPE_CHECKING:
    from samsr.guidance.runner import AmgConfig, SamRunner

__all__ = [
    "REASONS",
    "V1Config",
    "V1Decision",
    "V1Guidance",
    "V1Stats",
    "guided_coarse",
]

#: Every value of :attr:`V1Decision.reason`.
REASONS = ("used", "sparse", "deformed", "no_masks")


@dataclass
class V1Config:
    """Settings of SAM-SR v1.

    Attributes:
        coverage_threshold: keep a SAM mask when the fraction of its pixels inside the coarse mask
            is >= this, in (0, 1].
        sparsity_gate: skip SAM when the coarse mask is sparse (see :func:`sparsity`).
        sparsity_threshold: the coarse mask is sparse when its sparsity is > this, in [0, 1]. A
            tunable the thesis sets per experiment; 0.5 (the object covers less than half of its
            filled convex hull) is only a starting point.
        deformation_gate: skip SAM when the union of kept masks differs too much from the coarse
            mask (see :func:`deformation`).
        deformation_threshold: the union deforms the coarse mask when 1 - IoU is > this, in [0, 1].
        min_kept: fewer kept masks than this means "no_masks" and SAM is skipped (>= 1).
    """

    coverage_threshold: float = 0.8
    sparsity_gate: bool = True
    sparsity_threshold: float = 0.5
    deformation_gate: bool = True
    deformation_threshold: float = 0.2
    min_kept: int = 1

    def __post_init__(self) -> None:
        for name in ("sparsity_gate", "deformation_gate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"V1Config.{name} must be a bool, got {getattr(self, name)!r}")
        t = self.coverage_threshold
        if not is_real(t) or not 0.0 < t <= 1.0:
            raise ValueError(f"V1Config.coverage_threshold must be in (0, 1], got {t!r}")
        for name in ("sparsity_threshold", "deformation_threshold"):
            t = getattr(self, name)
            if not is_real(t) or not 0.0 <= t <= 1.0:
                raise ValueError(f"V1Config.{name} must be in [0, 1], got {t!r}")
        k = self.min_kept
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"V1Config.min_kept must be an int >= 1, got {k!r}")


@dataclass(frozen=True)
class V1Decision:
    """What :func:`guided_coarse` did with one image.

    Attributes:
        used: True when the SAM union replaced the coarse mask (``reason == "used"``).
        reason: one of :data:`REASONS`; "no_masks" means fewer than ``min_kept`` masks were kept
            (there may have been SAM masks, none covered enough by the coarse mask).
        num_masks: SAM masks seen; None when ``anns`` has no ``len`` and was not iterated (the
            sparsity gate fired).
        num_kept: masks kept by the coverage test (0 when the sparsity gate fired).
        sparsity: of the coarse mask (always computed).
        deformation: 1 - IoU(union, coarse); None when no union was formed ("sparse",
            "no_masks").
    """

    used: bool
    reason: str
    num_masks: int | None
    num_kept: int
    sparsity: float | None
    deformation: float | None

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"V1Decision.reason must be one of {REASONS}, got {self.reason!r}")
        if self.used != (self.reason == "used"):
            raise ValueError(f"V1Decision.used={self.used} contradicts reason={self.reason!r}")


class V1Stats:
    """Counts how often SAM was used or skipped, and why, over an evaluation.

    Example::

        stats = V1Stats()
        for ...:
            coarse, decision = guided_coarse(anns, coarse, cfg)
            stats.update(decision)
        metrics.update(stats.summary())
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = dict.fromkeys(REASONS, 0)
        self._kept_selected = 0  # sum of num_kept over images where selection ran
        self._kept_used = 0  # sum of num_kept over images where SAM was used

    def update(self, decision: V1Decision) -> None:
        """Adds one image's decision."""
        self.counts[decision.reason] += 1
        if decision.reason != "sparse":
            self._kept_selected += decision.num_kept
        if decision.used:
            self._kept_used += decision.num_kept

    def summary(self) -> dict[str, float]:
        """Counts and rates, flat, ready for ``metrics.json``.

        Returns:
            ``images``, ``used``, ``skipped``, ``skipped_sparse``, ``skipped_deformed``,
            ``skipped_no_masks`` (counts); ``used_fraction`` (used / images); ``mean_kept``
            (kept masks per image over images where masks were selected, i.e. not "sparse");
            ``mean_kept_used`` (over images where SAM was used). Rates and means are 0.0 when
            their denominator is 0 (NaN would not be valid JSON).
        """
        c = self.counts
        images = sum(c.values())
        selected = images - c["sparse"]
        return {
            "images": images,
            "used": c["used"],
            "skipped": images - c["used"],
            "skipped_sparse": c["sparse"],
            "skipped_deformed": c["deformed"],
            "skipped_no_masks": c["no_masks"],
            "used_fraction": c["used"] / images if images else 0.0,
            "mean_kept": self._kept_selected / selected if selected else 0.0,
            "mean_kept_used": self._kept_used / c["used"] if c["used"] else 0.0,
        }


def guided_coarse(
    anns: Iterable[Mapping[str, Any]],
    coarse: np.ndarray,
    cfg: V1Config,
    decode: SegmentationDecoder | None = None,
) -> tuple[np.ndarray, V1Decision]:
    """SAM-SR v1 for one image: the mask CRM should refine, and why.

    Order: binarise the coarse mask (``coarse > 127``); the sparsity gate (before any mask is
    decoded, so a sparse coarse mask costs no decoding); selection and union
    (:func:`select_and_union`); fewer than ``cfg.min_kept`` kept -> "no_masks"; the deformation
    gate. Gates only skip when enabled, but sparsity and deformation are reported whenever they
    could be computed, which helps tune the thresholds.

    Args:
        anns: AMG annotations of the image (see the module docstring).
        coarse: H x W uint8 coarse mask, 0..255.
        cfg: settings.
        decode: see :func:`select_and_union`.

    Returns:
        (mask, decision): when used, the union of kept masks as H x W uint8 0/255 (a new array);
        otherwise ``coarse`` itself (the same object, values unchanged).
    """
    if not isinstance(coarse, np.ndarray) or coarse.dtype != np.uint8:
        got = coarse.dtype if isinstance(coarse, np.ndarray) else type(coarse).__name__
        raise TypeError(f"coarse must be a uint8 array (0..255), got {got}")
    if coarse.ndim != 2:
        raise ValueError(f"coarse must be H x W, got shape {coarse.shape}")
    binary = coarse > 127
    num_masks = len(anns) if isinstance(anns, Sized) else None

    sparse = sparsity(binary)
    if cfg.sparsity_gate and sparse > cfg.sparsity_threshold:
        return coarse, V1Decision(False, "sparse", num_masks, 0, sparse, None)

    union, kept, num_masks = union_of_selected(anns, binary, cfg.coverage_threshold, decode)
    if kept < cfg.min_kept:
        return coarse, V1Decision(False, "no_masks", num_masks, kept, sparse, None)

    deform = deformation(union, binary)
    if cfg.deformation_gate and deform > cfg.deformation_threshold:
        return coarse, V1Decision(False, "deformed", num_masks, kept, sparse, deform)
    return union.view(np.uint8) * np.uint8(255), V1Decision(
        True, "used", num_masks, kept, sparse, deform
    )


class V1Guidance:
    """SAM-SR v1: the union of the SAM masks the coarse mask covers replaces it, unless gated.

    Args:
        amg: SAM's automatic mask generation (its ``max_side`` is the working size).
        gates: the selection threshold and the gates.
    """

    def __init__(self, amg: AmgConfig, gates: V1Config) -> None:
        self.amg = amg
        self.gates = gates
        self.max_side = amg.max_side
        self.stats = V1Stats()

    def guide(self, runner: SamRunner, image: np.ndarray, coarse: np.ndarray, name: str) -> Guided:
        """The coarse mask SAM's masks vote for (or the coarse mask itself), no extra channels."""
        hw = coarse.shape[:2]
        anns = runner.generate(self.amg)
        small = resize_nearest(coarse, working_size(anns, hw))
        guided, decision = guided_coarse(anns, small, self.gates)
        self.stats.update(decision)
        return Guided(resize_nearest(guided, hw) if decision.used else coarse, None)

    def report(self) -> dict[str, Any]:
        """``sam_v1``: how often SAM was used or skipped, and why."""
        return {"sam_v1": self.stats.summary()}

    def reset(self) -> None:
        """Forgets the gate counts."""
        self.stats = V1Stats()
