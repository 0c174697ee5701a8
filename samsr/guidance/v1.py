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

Memory: images can be 6000 x 4000 with ~900 masks, so masks are decoded one at a time and the
work is limited to each mask's bounding box (see :func:`select_and_union`); apart from the
caller's annotations, at most one decoded mask, the union and the coarse mask are alive at once.
Everything here is numpy/OpenCV on the CPU and never imports ``segment_anything``
(``samsr.guidance.build`` and ``samsr.guidance.runner`` do).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from samsr.guidance.maps import resize_nearest
from samsr.guidance.rle import decode_rle, decode_rle_window, rle_box, rle_counts, rle_size
from samsr.guidance.strategy import Guided, working_size

if TYPE_CHECKING:
    from samsr.guidance.runner import AmgConfig, SamRunner

__all__ = [
    "V1Guidance",
    "REASONS",
    "SegmentationDecoder",
    "V1Config",
    "V1Decision",
    "V1Stats",
    "coverage",
    "decode_rle",
    "decode_segmentation",
    "deformation",
    "guided_coarse",
    "select_and_union",
    "sparsity",
]

#: Receives an annotation's ``"segmentation"`` value, returns an H x W mask (nonzero = foreground).
SegmentationDecoder = Callable[[Any], np.ndarray]

#: Every value of :attr:`V1Decision.reason`.
REASONS = ("used", "sparse", "deformed", "no_masks")

# (row slice, column slice) of a window of the full image.
_Window = tuple[slice, slice]


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
        if not _is_real(t) or not 0.0 < t <= 1.0:
            raise ValueError(f"V1Config.coverage_threshold must be in (0, 1], got {t!r}")
        for name in ("sparsity_threshold", "deformation_threshold"):
            t = getattr(self, name)
            if not _is_real(t) or not 0.0 <= t <= 1.0:
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


def coverage(mask: np.ndarray, coarse: np.ndarray) -> float:
    """Fraction of ``mask``'s pixels that lie inside ``coarse``.

    Args:
        mask: H x W bool (a SAM mask).
        coarse: H x W bool.

    Returns:
        |mask & coarse| / |mask| in [0, 1]; 0.0 for an empty ``mask``.
    """
    _check_pair(mask, coarse, "mask", "coarse")
    area = int(np.count_nonzero(mask))
    if area == 0:
        return 0.0
    return float(np.count_nonzero(mask & coarse) / area)


def sparsity(coarse: np.ndarray) -> float:
    """Sparsity coefficient: 1 - area / area of the filled convex hull of the whole mask.

    The hull is taken over the outer contour points of all components together
    (``cv2.convexHull``) and rasterised with ``cv2.fillPoly`` (boundary pixels included), so a
    solid convex blob scores ~0, a thin ring or far-apart small blobs score close to 1.

    Args:
        coarse: H x W bool.

    Returns:
        Sparsity in [0, 1); 0.0 for an empty mask (nothing to be sparse about).
    """
    _check_bool(coarse, "coarse")
    if coarse.ndim != 2:
        raise ValueError(f"coarse must be H x W, got shape {coarse.shape}")
    area = np.count_nonzero(coarse)
    if area == 0:
        return 0.0
    # Work inside the foreground's bounding box: the hull never leaves it.
    x, y, w, h = cv2.boundingRect(np.ascontiguousarray(coarse).view(np.uint8))
    crop = np.ascontiguousarray(coarse[y : y + h, x : x + w]).view(np.uint8)
    contours, _ = cv2.findContours(crop, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.convexHull(np.concatenate(contours, axis=0))
    filled = np.zeros((h, w), np.uint8)
    cv2.fillPoly(filled, [hull], 1)
    hull_area = np.count_nonzero(filled)
    return float(min(max(1.0 - area / hull_area, 0.0), 1.0))


def deformation(union: np.ndarray, coarse: np.ndarray) -> float:
    """How much SAM's union changes the coarse mask: 1 - IoU(union, coarse).

    Args:
        union: H x W bool.
        coarse: H x W bool.

    Returns:
        1 - IoU in [0, 1]; 0.0 when both are empty.
    """
    _check_pair(union, coarse, "union", "coarse")
    union_area = int(np.count_nonzero(union | coarse))
    if union_area == 0:
        return 0.0
    return 1.0 - float(np.count_nonzero(union & coarse) / union_area)


def decode_segmentation(segmentation: Any) -> np.ndarray:
    """The default decoder: an array is used as is, an uncompressed RLE dict is decoded.

    Args:
        segmentation: an annotation's ``"segmentation"``: an H x W array (nonzero = foreground)
            or ``{"size": [h, w], "counts": [int, ...]}``.

    Returns:
        H x W bool.
    """
    if isinstance(segmentation, np.ndarray):
        if segmentation.ndim != 2:
            raise ValueError(f"SAM segmentation must be H x W, got shape {segmentation.shape}")
        return segmentation if segmentation.dtype == bool else segmentation != 0
    if isinstance(segmentation, Mapping) and "counts" in segmentation:
        return decode_rle(segmentation)
    raise ValueError(_unsupported(segmentation))


def select_and_union(
    anns: Iterable[Mapping[str, Any]],
    coarse: np.ndarray,
    threshold: float,
    decode: SegmentationDecoder | None = None,
) -> tuple[np.ndarray, int]:
    """Union of the SAM masks that ``coarse`` covers enough (coverage >= ``threshold``).

    Masks are decoded one at a time and the work is limited to a box around each:
    an uncompressed RLE (default decoder) is decoded only over the columns of its foreground, whose
    tight box is read off the run lengths; an array mask (given, or from ``decode``) is cropped to
    its ``"bbox"`` when the pixels there add up to its ``"area"``, else to the box that
    ``cv2.boundingRect`` finds, so a stale bbox or area costs time, never correctness.

    Masks must be at the coarse mask's resolution: if AMG ran on a downscaled image, upscale its
    masks (and their bbox) to the coarse size first; a size mismatch raises ValueError.

    Args:
        anns: AMG annotations (see the module docstring); read once, may be a generator.
        coarse: H x W bool coarse mask.
        threshold: coverage threshold in (0, 1].
        decode: turns ``ann["segmentation"]`` into an H x W mask (nonzero = foreground), e.g.
            ``pycocotools.mask.decode`` for compressed RLE; None for :func:`decode_segmentation`
            (with the RLE column shortcut above). Called once per annotation.

    Returns:
        (union, kept): H x W bool union of the kept masks (all False when none) and their number.
    """
    union, kept, _ = _select(anns, coarse, threshold, decode)
    return union, kept


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

    union, kept, num_masks = _select(anns, binary, cfg.coverage_threshold, decode)
    if kept < cfg.min_kept:
        return coarse, V1Decision(False, "no_masks", num_masks, kept, sparse, None)

    deform = deformation(union, binary)
    if cfg.deformation_gate and deform > cfg.deformation_threshold:
        return coarse, V1Decision(False, "deformed", num_masks, kept, sparse, deform)
    return union.view(np.uint8) * np.uint8(255), V1Decision(
        True, "used", num_masks, kept, sparse, deform
    )


# --------------------------------------------------------------------------------- internals


def _select(
    anns: Iterable[Mapping[str, Any]],
    coarse: np.ndarray,
    threshold: float,
    decode: SegmentationDecoder | None,
) -> tuple[np.ndarray, int, int]:
    """select_and_union, also returning how many annotations were seen."""
    _check_bool(coarse, "coarse")
    if coarse.ndim != 2:
        raise ValueError(f"coarse must be H x W, got shape {coarse.shape}")
    if not _is_real(threshold) or not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    union = np.zeros(coarse.shape, dtype=bool)
    kept = seen = 0
    for i, ann in enumerate(anns):
        seen += 1
        win, mask = _mask_in_window(ann, i, coarse.shape, decode)
        if coverage(mask, coarse[win]) >= threshold:
            union[win] |= mask
            kept += 1
    return union, kept, seen


def _mask_in_window(
    ann: Mapping[str, Any], index: int, shape: tuple[int, ...], decode: SegmentationDecoder | None
) -> tuple[_Window, np.ndarray]:
    """Annotation ``index``'s mask restricted to a window that holds all its pixels.

    Returns:
        (window, mask): slices into the full image and the C-contiguous bool mask inside them.
    """
    if "segmentation" not in ann:
        raise ValueError(f"SAM annotation {index} has no 'segmentation' (keys: {sorted(ann)})")
    seg = ann["segmentation"]
    h, w = shape

    if decode is None and isinstance(seg, Mapping) and "counts" in seg:
        # The tight box comes from the runs themselves: only those columns are decoded.
        _check_size(rle_size(seg), shape, index)
        counts = rle_counts(seg, h, w)
        y0, y1, x0, x1 = rle_box(counts, h)
        mask = np.ascontiguousarray(decode_rle_window(counts, h, y0, y1, x0, x1))
        return (slice(y0, y1), slice(x0, x1)), mask

    mask = decode_segmentation(seg) if decode is None else np.asarray(decode(seg))
    if mask.ndim != 2:
        raise ValueError(f"SAM mask {index} must be H x W, got shape {mask.shape}")
    _check_size(mask.shape, shape, index)
    box = _bbox_window(ann.get("bbox"), h, w)
    area = ann.get("area")
    if box is not None and area is not None:
        y0, y1, x0, x1 = box
        crop = mask[y0:y1, x0:x1]
        crop = crop if crop.dtype == bool else crop != 0
        if np.count_nonzero(crop) == int(area):  # the bbox holds the whole mask
            return (slice(y0, y1), slice(x0, x1)), np.ascontiguousarray(crop)
    mask = np.ascontiguousarray(mask if mask.dtype == bool else mask != 0)
    x0, y0, bw, bh = cv2.boundingRect(mask.view(np.uint8))
    return (slice(y0, y0 + bh), slice(x0, x0 + bw)), mask[y0 : y0 + bh, x0 : x0 + bw]


def _bbox_window(bbox: Any, h: int, w: int) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1), end-exclusive and clipped, of an XYWH bbox with inclusive extents."""
    if bbox is None:
        return None
    try:
        x, y, bw, bh = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, bw, bh)):
        return None
    # segment_anything's w = right - left with both edges inside the mask: one more column.
    x0, y0 = max(math.floor(x), 0), max(math.floor(y), 0)
    x1, y1 = min(math.ceil(x + bw) + 1, w), min(math.ceil(y + bh) + 1, h)
    if x1 <= x0 or y1 <= y0:
        return None
    return y0, y1, x0, x1


def _unsupported(segmentation: Any) -> str:
    return (
        f"unsupported SAM segmentation of type {type(segmentation).__name__}: expected an H x W "
        "array or an uncompressed RLE dict; run the mask generator with output_mode "
        "'binary_mask' or 'uncompressed_rle', or pass decode= (e.g. pycocotools.mask.decode)"
    )


def _check_size(size: tuple[int, ...], shape: tuple[int, ...], index: int) -> None:
    if tuple(size) != tuple(shape):
        raise ValueError(
            f"SAM mask {index} is {size[0]} x {size[1]} (h x w) but the coarse mask is "
            f"{shape[0]} x {shape[1]}; masks from a downscaled image must be upscaled "
            "(with their bbox) to the coarse mask's size first"
        )


def _check_bool(a: Any, name: str) -> None:
    if not isinstance(a, np.ndarray) or a.dtype != bool:
        got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
        raise TypeError(f"{name} must be a bool array, got {got} (binarise first, e.g. m > 127)")


def _check_pair(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    _check_bool(a, name_a)
    _check_bool(b, name_b)
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}")


def _is_real(x: Any) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


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
