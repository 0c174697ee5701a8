"""IoU and mean boundary accuracy (mBA), exactly as CascadePSP evaluates them (SPEC section 2).

Facts taken from CascadePSP's ``eval_post.py`` / ``util/compute_boundary_acc.py`` (described, not
copied):

* Masks are read as 8-bit grey images and binarised with ``value > 128``. A refined mask whose size
  differs from the GT is first resized to the GT size with PIL's bilinear filter (``Image.resize``
  with ``BILINEAR``); PIL is therefore the default resampler here (``resample="pil"``). OpenCV's
  ``INTER_LINEAR`` differs from it by 1 grey level at ~20 % of pixels and flips the thresholded
  value of some of them, so ``resample="cv2"`` is available but is not bit-exact.
* IoU is pooled: sum of intersections / sum of unions over the dataset.
* mBA of one image: radii ``1 + int((max_r - 1) / 5 * i)`` for ``i = 0..4`` with
  ``max_r = (w + h) / 300`` (that operation order, which matters when the product is an integer);
  band = morphological gradient of the 0/1 GT with an elliptical ``(2r+1, 2r+1)`` OpenCV kernel,
  non-zero; accuracy = fraction of band pixels where prediction == GT; mean of the 5 accuracies
  (a float64 sum in radius order, divided by 5). Dataset mBA = mean over images.
* An empty band (GT all background or all foreground) makes CascadePSP divide 0 by 0: that image's
  mBA is NaN and so is the dataset mean. Here :func:`boundary_accuracy` returns NaN as well, but
  :class:`RefinementMeter` leaves such images out of the mBA means and reports how many it left out
  (``num_mba_skipped``); on BIG this never happens.
* CascadePSP's ``eval_post.py`` also means to replace the refined mask by the coarse one when the
  coarse mask's 8-bit values sum to less than 32 * 32 ("small objects"), but its check only
  works for square coarse masks: it keeps its copy of the coarse mask only when the coarse mask's
  height equals its width, otherwise it has already overwritten that copy with the prediction.
  :class:`RefinementMeter` does exactly that by default (``small_coarse_rule="cascadepsp"``);
  ``"always"`` copies the coarse mask for every small coarse mask (the rule's evident intent) and
  ``"off"`` never does. ``num_small_coarse`` counts the small coarse masks (CascadePSP's
  "Number of small objects"), ``num_coarse_copied`` the images scored with the coarse mask.

Extensions (not in CascadePSP, used nowhere on 8-bit grey masks): RGB(A) masks take channel 0;
boolean masks are 0/255; float masks are probabilities in [0, 1], scaled by 255 and truncated (as
``(p * 255).astype(np.uint8)`` would save them). The encoding follows the dtype, never the values:
a uint8 mask whose maximum is 1 is 8-bit (background everywhere), as CascadePSP reads it. The
per-image mean IoU (``miou``) counts an image whose union is empty (empty GT and prediction) as 1.0.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

from samsr.metrics.boundary import boundary_accuracies, check_mask_pair

__all__ = [
    "RefinementMeter",
    "binarize",
    "intersection_union",
    "to_uint8_mask",
]

THRESHOLD = 128
_RESAMPLERS = ("pil", "cv2")
SMALL_COARSE_RULES = ("cascadepsp", "always", "off")


def to_uint8_mask(mask: np.ndarray) -> np.ndarray:
    """Converts a mask to a 2-D 8-bit grey image (0..255) without copying plain uint8 input.

    The encoding is decided by the dtype alone, never by the values (a near-empty soft
    prediction saved as 0/1 uint8 is background, as CascadePSP reads it):

    * uint8: 8-bit grey, returned as is;
    * other integer types: 8-bit grey values stored in a wider type (must lie in 0..255);
    * bool: False/True -> 0/255;
    * float: probabilities in [0, 1], scaled by 255 and truncated (as
      ``(p * 255).astype(np.uint8)`` saves them).

    0/1 label files are a file-format matter: :func:`samsr.data.io.read_mask` reads them.

    Args:
        mask: ``H x W`` or ``H x W x C`` (channel 0 is used).

    Returns:
        ``H x W`` uint8 array (a view of the input where possible).

    Raises:
        ValueError: On a bad shape or values outside the dtype's range.
    """
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"Expected an H x W or H x W x C mask, got shape {mask.shape}.")
    if mask.dtype == np.uint8:
        return mask
    if mask.dtype == np.bool_:
        return mask.astype(np.uint8) * np.uint8(255)
    if mask.size == 0:
        raise ValueError(f"Empty mask of shape {mask.shape}.")
    lo, hi = mask.min(), mask.max()
    if np.issubdtype(mask.dtype, np.floating):
        if np.isnan(lo) or np.isnan(hi) or lo < 0 or hi > 1:
            raise ValueError(
                f"Float masks are probabilities in [0, 1]; got [{lo}, {hi}] ({mask.dtype}). "
                "Pass 8-bit grey values as uint8."
            )
        return (mask * 255.0).astype(np.uint8)
    if np.issubdtype(mask.dtype, np.integer):
        if lo < 0 or hi > 255:
            raise ValueError(
                f"Integer masks hold 8-bit grey values in [0, 255]; got [{lo}, {hi}] "
                f"({mask.dtype})."
            )
        return mask.astype(np.uint8)
    raise ValueError(f"Unsupported mask dtype {mask.dtype}.")


def _resize(mask: np.ndarray, size: tuple[int, int], resample: str) -> np.ndarray:
    h, w = size
    if resample == "pil":
        from PIL import Image

        image = Image.fromarray(np.ascontiguousarray(mask))
        return np.asarray(image.resize((w, h), Image.Resampling.BILINEAR))
    return cv2.resize(mask, (w, h), interpolation=cv2.INTER_LINEAR)


def binarize(
    mask: np.ndarray, size: tuple[int, int] | None = None, resample: str = "pil"
) -> np.ndarray:
    """Binarises a mask with ``> 128``, resizing it (bilinear) to ``size`` first if needed.

    Args:
        mask: ``H x W`` or ``H x W x C`` mask (see :func:`to_uint8_mask` for accepted values).
        size: Target ``(height, width)``, normally the GT size; None keeps the mask's size.
        resample: ``"pil"`` (PIL bilinear, bit-exact with CascadePSP) or ``"cv2"``
            (``cv2.INTER_LINEAR``).

    Returns:
        ``size`` (or ``H x W``) boolean array.
    """
    if resample not in _RESAMPLERS:
        raise ValueError(f"resample must be one of {_RESAMPLERS}, got {resample!r}.")
    grey = to_uint8_mask(mask)
    if size is not None:
        size = (int(size[0]), int(size[1]))
        if size[0] <= 0 or size[1] <= 0:
            raise ValueError(f"Invalid target size {size}.")
        if grey.shape != size:
            grey = _resize(grey, size, resample)
    return grey > THRESHOLD


def intersection_union(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    """Counts intersection and union pixels of two binary masks.

    Args:
        pred: ``H x W`` bool prediction.
        gt: ``H x W`` bool ground truth.

    Returns:
        ``(intersection, union)`` pixel counts.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    check_mask_pair(pred, gt)
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


def _iou(i: int, u: int) -> float:
    return i / u if u else 1.0


class RefinementMeter:
    """Accumulates IoU and mBA of refined (and optionally coarse) masks over a dataset.

    Args:
        resample: Resampler for predictions whose size differs from the GT (see :func:`binarize`).
        small_coarse_sum: A coarse mask whose 8-bit values sum to less than this is "small".
        small_coarse_rule: When a small coarse mask replaces the refined mask in scoring:
            ``"cascadepsp"`` (default, bit-exact with ``eval_post.py``): only if the coarse mask is
            square (its height equals its width); ``"always"``: for every small coarse mask;
            ``"off"``: never.

    Example:
        >>> meter = RefinementMeter()
        >>> meter.update("a", gt, refined, coarse)  # doctest: +SKIP
        >>> meter.compute()["iou"]  # doctest: +SKIP
    """

    def __init__(
        self,
        resample: str = "pil",
        small_coarse_sum: int = 32 * 32,
        small_coarse_rule: str = "cascadepsp",
    ) -> None:
        if resample not in _RESAMPLERS:
            raise ValueError(f"resample must be one of {_RESAMPLERS}, got {resample!r}.")
        if small_coarse_rule not in SMALL_COARSE_RULES:
            raise ValueError(
                f"small_coarse_rule must be one of {SMALL_COARSE_RULES}, got {small_coarse_rule!r}."
            )
        self.resample = resample
        self.small_coarse_sum = small_coarse_sum
        self.small_coarse_rule = small_coarse_rule
        self._rows: list[dict[str, Any]] = []
        self._names: set[str] = set()
        self._has_coarse: bool | None = None

    def reset(self) -> None:
        """Forgets all images."""
        self._rows.clear()
        self._names.clear()
        self._has_coarse = None

    def __len__(self) -> int:
        return len(self._rows)

    def update(
        self,
        name: str,
        gt: np.ndarray,
        refined: np.ndarray,
        coarse: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """Adds one image.

        Args:
            name: Unique image name (used in :meth:`per_image`).
            gt: ``H x W`` (or ``H x W x C``) 8-bit GT mask.
            refined: Refined mask, any size (resized to ``H x W`` if needed).
            coarse: Coarse input mask, any size; give it for every image or for none.

        Returns:
            This image's row (see :meth:`per_image`).
        """
        if name in self._names:
            raise ValueError(f"Image {name!r} was already added to the meter.")
        has_coarse = coarse is not None
        if self._has_coarse is not None and has_coarse != self._has_coarse:
            raise ValueError(
                f"Image {name!r}: give a coarse mask for every image or for none "
                f"(earlier images {'had' if self._has_coarse else 'had no'} coarse mask)."
            )
        try:
            gt_bin = binarize(gt)
            size = gt_bin.shape
            ref_bin = binarize(refined, size, self.resample)
            if coarse is not None:
                coarse_grey = to_uint8_mask(coarse)
                # eval_post.py sums and checks the coarse mask as read, before any resize
                small = int(coarse_grey.sum(dtype=np.int64)) < self.small_coarse_sum
                square = coarse_grey.shape[0] == coarse_grey.shape[1]
                copied = small and (
                    self.small_coarse_rule == "always"
                    or (self.small_coarse_rule == "cascadepsp" and square)
                )
                if coarse_grey.shape != size:
                    coarse_grey = _resize(coarse_grey, size, self.resample)
                coarse_bin = coarse_grey > THRESHOLD
                if copied:
                    ref_bin = coarse_bin
        except ValueError as err:
            raise ValueError(f"Image {name!r}: {err}") from err

        i, u = intersection_union(ref_bin, gt_bin)
        row: dict[str, Any] = {"name": name, "height": size[0], "width": size[1]}
        row.update(intersection=i, union=u, iou=_iou(i, u))
        if coarse is None:
            row["mba"] = boundary_accuracies(gt_bin, [ref_bin])[0]
        else:
            ci, cu = intersection_union(coarse_bin, gt_bin)
            row["mba"], row["mba_coarse"] = boundary_accuracies(gt_bin, [ref_bin, coarse_bin])
            row.update(intersection_coarse=ci, union_coarse=cu, iou_coarse=_iou(ci, cu))
            row["small_coarse"] = bool(small)
            row["coarse_copied"] = bool(copied)
        self._rows.append(row)
        self._names.add(name)
        self._has_coarse = has_coarse
        return row

    def add_rows(self, rows: list[dict[str, Any]]) -> None:
        """Adds images already scored by another meter (its :meth:`per_image` rows, e.g. from
        the other ranks of a distributed evaluation), in the given order."""
        for row in rows:
            name = row["name"]
            has_coarse = "iou_coarse" in row
            if name in self._names:
                raise ValueError(f"Image {name!r} was already added to the meter.")
            if self._has_coarse is not None and has_coarse != self._has_coarse:
                raise ValueError(f"Image {name!r}: rows with and without coarse masks mixed.")
            self._rows.append(dict(row))
            self._names.add(name)
            self._has_coarse = has_coarse

    def per_image(self) -> list[dict[str, Any]]:
        """Per-image rows: name, height, width, iou, mba (+ iou_coarse, mba_coarse, counts)."""
        return [dict(row) for row in self._rows]

    def compute(self) -> dict[str, float | int]:
        """Aggregates the dataset metrics as fractions in [0, 1].

        Returns:
            ``iou`` (pooled), ``miou`` (per-image mean), ``mba`` (mean over images with a GT
            boundary), and with coarse masks ``*_coarse`` and ``*_delta`` (refined - coarse) of the
            three; plus ``num_images``, ``num_mba_skipped`` and (with coarse)
            ``num_small_coarse`` and ``num_coarse_copied``.
        """
        if not self._rows:
            raise ValueError("RefinementMeter is empty: call update() before compute().")
        suffixes = [""] + (["_coarse"] if self._has_coarse else [])
        out: dict[str, float | int] = {}
        for sfx in suffixes:
            total_i = sum(row["intersection" + sfx] for row in self._rows)
            total_u = sum(row["union" + sfx] for row in self._rows)
            out["iou" + sfx] = _iou(total_i, total_u)
            out["miou" + sfx] = _mean([row["iou" + sfx] for row in self._rows])
            out["mba" + sfx] = _mean([row["mba" + sfx] for row in self._rows], skip_nan=True)
        if self._has_coarse:
            for key in ("iou", "miou", "mba"):
                out[key + "_delta"] = out[key] - out[key + "_coarse"]
        out["num_images"] = len(self._rows)
        out["num_mba_skipped"] = sum(math.isnan(row["mba"]) for row in self._rows)
        if self._has_coarse:
            out["num_small_coarse"] = sum(row["small_coarse"] for row in self._rows)
            out["num_coarse_copied"] = sum(row["coarse_copied"] for row in self._rows)
        return out


def _mean(values: list[float], skip_nan: bool = False) -> float:
    """Mean accumulated left to right (like CascadePSP's running total); NaN if nothing is left."""
    if skip_nan:
        values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan
    total = 0.0
    for v in values:
        total += v
    return total / len(values)
