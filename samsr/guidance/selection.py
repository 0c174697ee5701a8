"""Which SAM masks a coarse mask covers: coverage, the sparsity and deformation measures, and the
union of the selected masks (SAM-SR v1's selection, :mod:`samsr.guidance.v1`).

Annotations are in segment_anything's AMG format: ``"segmentation"`` (an H x W bool array, or an
uncompressed RLE dict ``{"size": [h, w], "counts": [...]}`` in column-major order, runs
alternating and starting with zeros), ``"area"`` (int, pixels), ``"bbox"`` ([x, y, w, h], XYWH,
inclusive extents as segment_anything writes them).

Memory: images can be 6000 x 4000 with ~900 masks, so masks are decoded one at a time and the
work is limited to each mask's bounding box (see :func:`select_and_union`); apart from the
caller's annotations, at most one decoded mask, the union and the coarse mask are alive at once.
numpy/OpenCV on the CPU only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import cv2
import numpy as np

from samsr.guidance.rle import decode_rle, decode_rle_window, rle_box, rle_counts, rle_size

__all__ = [
    "SegmentationDecoder",
    "coverage",
    "decode_segmentation",
    "deformation",
    "is_real",
    "select_and_union",
    "sparsity",
    "union_of_selected",
]

#: Receives an annotation's ``"segmentation"`` value, returns an H x W mask (nonzero = foreground).
SegmentationDecoder = Callable[[Any], np.ndarray]

# (row slice, column slice) of a window of the full image.
_Window = tuple[slice, slice]


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
    union, kept, _ = union_of_selected(anns, coarse, threshold, decode)
    return union, kept


# --------------------------------------------------------------------------------- internals


def union_of_selected(
    anns: Iterable[Mapping[str, Any]],
    coarse: np.ndarray,
    threshold: float,
    decode: SegmentationDecoder | None,
) -> tuple[np.ndarray, int, int]:
    """select_and_union, also returning how many annotations were seen."""
    _check_bool(coarse, "coarse")
    if coarse.ndim != 2:
        raise ValueError(f"coarse must be H x W, got shape {coarse.shape}")
    if not is_real(threshold) or not 0.0 < threshold <= 1.0:
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


def is_real(x: Any) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)
