"""SAM-SR v2.1's guidance map: SAM's automatic masks painted in random colours (SPEC section 6).

A SAM map paints the masks of SAM's automatic mask generation (AMG) on a black canvas: masks are
sorted by area, largest first, and each gets a random RGB colour (channels in [32, 255], never
black), so later, smaller masks lie on top and the pixels no mask covers stay black (uncertain
regions). The colours come from ``np.random.default_rng(map_seed(name))`` drawn in that order, so a
map depends only on the masks and the image's name. Masks made on a downscaled image are painted at
their size and the map is upscaled with one rule, ``cv2.INTER_NEAREST_EXACT``, for training caches
and evaluation alike (:func:`resize_nearest`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from samsr.errors import DataError
from samsr.guidance.rle import decode_rle_window, is_uncompressed_rle, rle_counts, rle_size
from samsr.guidance.strategy import Guided

if TYPE_CHECKING:
    from samsr.guidance.runner import AmgConfig, SamRunner

__all__ = [
    "COLOUR_RANGE",
    "MapGuidance",
    "annotation_area",
    "decode_annotation",
    "map_seed",
    "paint_sam_map",
    "resize_nearest",
]

COLOUR_RANGE = (32, 256)
"""Colour channels are drawn from ``[32, 256)``: never black, which means "no mask"."""

Decoder = Callable[[Mapping[str, Any]], np.ndarray]
"""``ann -> H x W`` bool mask of one AMG annotation."""


def resize_nearest(x: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a mask or map to ``hw`` (``cv2.INTER_NEAREST_EXACT``).

    The one rule for SAM outputs made at a working size (``amg.max_side``): OpenCV's plain
    ``INTER_NEAREST`` picks pixels half a pixel off, so it differs along every mask edge.
    """
    if x.shape[:2] == tuple(hw):
        return x
    return cv2.resize(x, (int(hw[1]), int(hw[0])), interpolation=cv2.INTER_NEAREST_EXACT)


def map_seed(name: str) -> int:
    """Colour seed of an image: CRC-32 of its UTF-8 name (stable across runs, unlike ``hash``)."""
    return zlib.crc32(name.encode("utf-8"))


def _segmentation(ann: Mapping[str, Any]) -> Any:
    try:
        return ann["segmentation"]
    except (KeyError, TypeError) as exc:
        raise DataError(
            f"SAM annotation without 'segmentation' (keys: {list(ann)}); expected an AMG dict."
        ) from exc


def _rle_counts(seg: Any) -> np.ndarray | None:
    """The checked run lengths of an uncompressed RLE dict, or None for other segmentations."""
    if not is_uncompressed_rle(seg):
        return None
    try:
        return rle_counts(seg, *rle_size(seg))
    except ValueError as exc:
        raise DataError(f"bad SAM annotation: {exc}") from exc


def _mask_size(seg: Any) -> tuple[int, int]:
    if isinstance(seg, Mapping):
        height, width = seg["size"]
        return int(height), int(width)
    return tuple(np.shape(seg)[:2])  # type: ignore[return-value]


def decode_annotation(ann: Mapping[str, Any]) -> np.ndarray:
    """Decodes one AMG annotation's mask.

    Args:
        ann: AMG dict whose ``segmentation`` is an ``H x W`` bool array (``binary_mask``), an
            uncompressed RLE dict (``uncompressed_rle``: ``size`` [H, W], column-major ``counts``
            starting with background) or a COCO RLE (``coco_rle``, needs pycocotools).

    Returns:
        ``H x W`` bool mask.
    """
    seg = _segmentation(ann)
    counts = _rle_counts(seg)
    if counts is not None:
        height, width = _mask_size(seg)
        return decode_rle_window(counts, height, 0, height, 0, width)
    if isinstance(seg, Mapping):  # COCO RLE with compressed string counts
        try:
            from pycocotools import mask as mask_utils  # type: ignore[import-not-found]
        except ImportError as exc:
            raise DataError(
                "COCO RLE annotations need pycocotools (pip install pycocotools); or generate "
                "with output_mode='uncompressed_rle'."
            ) from exc
        return mask_utils.decode(dict(seg)).astype(bool)
    return np.asarray(seg, dtype=bool)


def annotation_area(ann: Mapping[str, Any]) -> int:
    """Mask area in pixels: the AMG ``area`` field, else counted from the segmentation."""
    if "area" in ann:
        return int(ann["area"])
    counts = _rle_counts(_segmentation(ann))
    if counts is not None:
        return int(counts[1::2].sum())
    return int(decode_annotation(ann).sum())


def paint_sam_map(
    anns: Sequence[Mapping[str, Any]],
    shape: tuple[int, int],
    seed: int,
    decode: Decoder | None = None,
) -> np.ndarray:
    """Paints AMG masks, largest first, each in a random colour on a black canvas.

    Masks are sorted by area (descending; ties keep their order) and painted in that order, so
    smaller masks lie on top; colours are drawn from ``np.random.default_rng(seed)`` in the same
    order (:data:`COLOUR_RANGE`). One mask is decoded at a time: uncompressed RLE runs are painted
    directly without decoding a full mask. Masks smaller than ``shape`` (AMG run on a downscaled
    image) are painted at their size and the map is resized (nearest neighbour).

    Args:
        anns: AMG annotation dicts (``segmentation``, optionally ``area``), all of one size.
        shape: ``(H, W)`` of the output map (the image size).
        seed: Colour seed, usually ``map_seed(name)``.
        decode: ``ann -> H x W`` bool mask; default :func:`decode_annotation` (RLE fast path).

    Returns:
        ``H x W x 3`` uint8 RGB map; pixels no mask covers are 0.
    """
    height, width = int(shape[0]), int(shape[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"paint_sam_map: bad shape {shape}")
    if not anns:
        return np.zeros((height, width, 3), np.uint8)
    areas = [annotation_area(a) for a in anns]
    order = sorted(range(len(anns)), key=lambda i: -areas[i])
    rng = np.random.default_rng(seed)
    palette = np.zeros((len(anns) + 1, 3), np.uint8)  # row 0: black, "no mask"
    palette[1:] = rng.integers(*COLOUR_RANGE, size=(len(anns), 3), dtype=np.uint8)
    mask_h, mask_w = _mask_size(_segmentation(anns[order[0]]))
    dtype = np.uint16 if len(anns) < np.iinfo(np.uint16).max else np.uint32
    labels_t = np.zeros((mask_w, mask_h), dtype)  # transposed: RLE counts are column-major
    flat = labels_t.reshape(-1)
    for label, index in enumerate(order, start=1):
        ann = anns[index]
        seg = _segmentation(ann)
        if _mask_size(seg) != (mask_h, mask_w):
            raise DataError(
                f"SAM masks of different sizes: {_mask_size(seg)} and {(mask_h, mask_w)} (HxW)."
            )
        counts = _rle_counts(seg) if decode is None else None
        if counts is not None:
            ends = np.cumsum(counts)
            for start, stop in zip((ends - counts)[1::2].tolist(), ends[1::2].tolist()):
                flat[start:stop] = label
        else:
            mask = (decode or decode_annotation)(ann)
            if mask.shape != (mask_h, mask_w):
                raise DataError(f"decoded mask is {mask.shape}, expected {(mask_h, mask_w)}.")
            labels_t.T[mask] = label
    return resize_nearest(np.ascontiguousarray(palette[labels_t.T]), (height, width))


class MapGuidance:
    """SAM-SR v2.1: SAM's automatic masks painted in colours seeded by the image name, as 3 extra
    channels (exactly the training cache's maps: same painting, same resize rule).

    Args:
        amg: SAM's automatic mask generation (its ``max_side`` is the working size).
    """

    def __init__(self, amg: AmgConfig) -> None:
        self.amg = amg
        self.max_side = amg.max_side

    def guide(self, runner: SamRunner, image: np.ndarray, coarse: np.ndarray, name: str) -> Guided:
        """The coarse mask unchanged, the colour map as extra channels."""
        anns = runner.generate(self.amg)
        return Guided(coarse, paint_sam_map(anns, coarse.shape[:2], map_seed(name)))

    def report(self) -> dict[str, Any]:
        """Nothing beyond SAM's time."""
        return {}

    def reset(self) -> None:
        """Nothing to forget."""
