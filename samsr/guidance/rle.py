"""Uncompressed run-length encoding of masks (SAM's ``output_mode="uncompressed_rle"``).

``{"size": [h, w], "counts": [n0, n1, ...]}``: run lengths over the mask flattened in
column-major (Fortran) order, alternating background / foreground and starting with background
(``segment_anything.utils.amg.mask_to_rle_pytorch``). The one decoder used by SAM-SR's data,
models and inference; errors are ``ValueError`` (callers may re-raise their own type).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "decode_rle",
    "decode_rle_window",
    "is_uncompressed_rle",
    "rle_area",
    "rle_box",
    "rle_counts",
    "rle_size",
]


def is_uncompressed_rle(seg: Any) -> bool:
    """True for an RLE dict whose counts are a list/array (not COCO's compressed string)."""
    return isinstance(seg, Mapping) and isinstance(seg.get("counts"), list | tuple | np.ndarray)


def rle_size(rle: Mapping[str, Any]) -> tuple[int, int]:
    """(h, w) of an uncompressed RLE dict, with a clear error for anything else."""
    if isinstance(rle.get("counts"), str | bytes):
        raise ValueError(
            "a COCO RLE (compressed string counts) is not supported here: run the mask generator "
            "with output_mode 'binary_mask' or 'uncompressed_rle', or decode it with pycocotools"
        )
    size = rle.get("size")
    if size is None or len(size) != 2:
        raise ValueError(f"RLE 'size' must be [h, w], got {size!r}")
    return int(size[0]), int(size[1])


def rle_counts(rle: Mapping[str, Any], h: int, w: int) -> np.ndarray:
    """The run lengths as int64, checked: non-negative and summing to ``h * w``."""
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.ndim != 1 or (counts.size and counts.min() < 0) or counts.sum() != h * w:
        raise ValueError(
            f"RLE counts must be non-negative run lengths summing to h * w = {h * w}, "
            f"got {counts.size} counts summing to {int(counts.sum())}"
        )
    return counts


def rle_box(counts: np.ndarray, h: int) -> tuple[int, int, int, int]:
    """Tight (y0, y1, x0, x1), end-exclusive, of the foreground; zeros if empty."""
    ends = np.cumsum(counts)[1::2]  # foreground runs are the odd ones
    starts = ends - counts[1::2]
    nonempty = ends > starts
    starts, last = starts[nonempty], ends[nonempty] - 1
    if starts.size == 0:
        return 0, 0, 0, 0
    one_column = starts // h == last // h  # a run crossing columns covers rows h-1 and 0
    y0 = int(np.where(one_column, starts % h, 0).min())
    y1 = int(np.where(one_column, last % h + 1, h).max())
    return y0, y1, int(starts[0] // h), int(last[-1] // h + 1)


def decode_rle_window(counts: np.ndarray, h: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Rows y0:y1 of columns x0:x1 of a mask of height ``h``, as bool (a transposed view)."""
    ends = np.cumsum(counts)
    lo, hi = x0 * h, x1 * h  # flat column-major range of columns x0:x1
    lengths = np.clip(ends, lo, hi) - np.clip(ends - counts, lo, hi)
    values = (np.arange(counts.size) % 2).astype(bool)  # runs alternate, zeros first
    flat = np.repeat(values, lengths)
    return flat.reshape(x1 - x0, h).T[y0:y1]


def decode_rle(rle: Mapping[str, Any]) -> np.ndarray:
    """The whole h x w bool mask (same as ``segment_anything.utils.amg.rle_to_mask``)."""
    h, w = rle_size(rle)
    return decode_rle_window(rle_counts(rle, h, w), h, 0, h, 0, w)


def rle_area(rle: Mapping[str, Any]) -> int:
    """Foreground pixels: the sum of the odd runs."""
    h, w = rle_size(rle)
    return int(rle_counts(rle, h, w)[1::2].sum())
