"""SAM's masks as the automatic mask generator gives them: decoding and areas, every output mode."""

from __future__ import annotations

from typing import Any

import numpy as np

from samsr.guidance.rle import decode_rle, rle_area

__all__ = ["decode_mask", "mask_area"]


def _segmentation(ann: dict[str, Any]) -> Any:
    return ann.get("segmentation", ann)


def _pycocotools_mask() -> Any:
    try:
        from pycocotools import mask as mask_utils
    except ImportError as err:
        raise ImportError(
            "Decoding a 'coco_rle' SAM mask needs pycocotools: pip install pycocotools "
            "(or generate with AmgConfig(output_mode='uncompressed_rle'))."
        ) from err
    return mask_utils


def decode_mask(ann: dict[str, Any]) -> np.ndarray:
    """H x W bool mask of an AMG record (or of its ``segmentation``), in any output mode."""
    seg = _segmentation(ann)
    if isinstance(seg, np.ndarray):
        if seg.ndim != 2:
            raise ValueError(f"A binary_mask segmentation must be H x W, got {seg.shape}.")
        return seg.astype(bool, copy=False)
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if isinstance(seg["counts"], str | bytes):  # coco_rle
            return _pycocotools_mask().decode(seg).astype(bool)
        return decode_rle(seg)
    raise ValueError(
        "Not a SAM mask: expected a record whose 'segmentation' is an H x W array or an RLE dict "
        f"with 'size' and 'counts', got {type(seg).__name__}."
    )


def mask_area(ann: dict[str, Any]) -> int:
    """Number of foreground pixels of an AMG record (or of its ``segmentation``)."""
    seg = _segmentation(ann)
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if isinstance(seg["counts"], str | bytes):
            return int(_pycocotools_mask().area(seg))
        return rle_area(seg)
    return int(np.count_nonzero(decode_mask(ann)))
