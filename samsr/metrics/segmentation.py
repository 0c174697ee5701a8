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
* CascadePSP's ``eval_post.py`` also replaces the refined mask by the coarse one when the coarse
  mask's 8-bit values sum to less than 32 * 32 ("small objects"). :class:`RefinementMeter` does the
  same by default (``small_coarse_sum=1024``; ``None`` turns it off) and counts the images
  (``num_small_coarse``).

Extensions (not in CascadePSP, used nowhere on 8-bit grey masks): RGB(A) masks take channel 0;
boolean and 0/1 integer masks are scaled to 0/255; float masks in [0, 1] are probabilities, scaled
by 255 and truncated (as ``(p * 255).astype(np.uint8)`` would save them). The per-image mean IoU
(``miou``) counts an image whose union is empty (empty GT and prediction) as 1.0.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

__all__ = [
    "RefinementMeter",
    "binarize",
    "boundary_accuracy",
    "boundary_radii",
    "intersection_union",
    "to_uint8_mask",
]

THRESHOLD = 128
NUM_RADII = 5
_RESAMPLERS = ("pil", "cv2")
# Side of the square blocks used to skip uniform regions in the mBA computation.
_BLOCK = 32
# Above this fraction of the image in active blocks, the full-image OpenCV path is faster.
_DENSE_FRACTION = 0.35


def to_uint8_mask(mask: np.ndarray) -> np.ndarray:
    """Converts a mask to a 2-D 8-bit grey image (0..255) without copying plain uint8 input.

    Args:
        mask: ``H x W`` or ``H x W x C`` (channel 0 is used). uint8 0..255 is returned as is;
            bool and integer masks whose maximum is <= 1 are scaled to 0/255; float masks with
            maximum <= 1 are probabilities, scaled by 255 and truncated; other float/integer masks
            must lie in 0..255.

    Returns:
        ``H x W`` uint8 array (a view of the input where possible).

    Raises:
        ValueError: On a bad shape, negative values or values above 255.
    """
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ValueError(f"Expected an H x W or H x W x C mask, got shape {mask.shape}.")
    if mask.dtype == np.bool_:
        return mask.astype(np.uint8) * np.uint8(255)
    if mask.size == 0:
        raise ValueError(f"Empty mask of shape {mask.shape}.")
    hi = mask.max()
    if mask.dtype == np.uint8:
        return mask * np.uint8(255) if hi <= 1 else mask
    lo = mask.min()
    if np.isnan(lo) or np.isnan(hi) or lo < 0 or hi > 255:
        raise ValueError(
            f"Mask values must lie in [0, 255] (8-bit) or [0, 1]; got [{lo}, {hi}] ({mask.dtype})."
        )
    if np.issubdtype(mask.dtype, np.floating):
        scale = 255.0 if hi <= 1.0 else 1.0
        return (mask * scale).astype(np.uint8)
    if np.issubdtype(mask.dtype, np.integer):
        return mask.astype(np.uint8) * np.uint8(255 if hi <= 1 else 1)
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


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape or pred.ndim != 2 or gt.size == 0:
        raise ValueError(
            "Prediction and GT must be non-empty H x W masks of the same size, got "
            f"{pred.shape} and {gt.shape} (use binarize(pred, size=gt.shape[:2]) to resize)."
        )


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
    _check_pair(pred, gt)
    return int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))


def boundary_radii(h: int, w: int) -> list[int]:
    """Returns the 5 band radii of mBA for an ``h x w`` GT.

    ``max_r = (w + h) / 300`` and ``r_i = 1 + int((max_r - 1) / 5 * i)``, ``i = 0..4``
    (e.g. 2048 x 1600 -> 1, 3, 5, 7, 9; 5000 x 3600 -> 1, 6, 12, 17, 23).
    """
    max_r = (w + h) / 300
    return [1 + int((max_r - 1) / NUM_RADII * i) for i in range(NUM_RADII)]


def _kernel(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


@functools.lru_cache(maxsize=128)
def _kernel_profile(radius: int) -> tuple[np.ndarray, int, int]:
    """Describes OpenCV's elliptical kernel of radius ``radius`` for the distance-based band test.

    Returns:
        ``(half_widths, sure_max, amb_max)``: the half-width of each of the ``2r+1`` kernel rows
        (offset ``dy = row - r``); every offset with ``dx^2 + dy^2 <= sure_max`` is in the kernel;
        no offset with ``dx^2 + dy^2 > amb_max`` is.
    """
    kernel = _kernel(radius).astype(bool)
    offsets = np.abs(np.arange(2 * radius + 1) - radius)
    half = (kernel.sum(axis=1) - 1) // 2
    if not (
        np.array_equal(kernel, offsets[None, :] <= half[:, None])
        and np.array_equal(half, half[::-1])
    ):
        raise RuntimeError(
            f"OpenCV's elliptical kernel of radius {radius} is not a symmetric stack of centred "
            "rows; the mBA band computation assumes it is."
        )
    norms = offsets[None, :] ** 2 + offsets[:, None] ** 2
    outside = min(int(norms[~kernel].min(initial=(radius + 1) ** 2)), (radius + 1) ** 2)
    return half, outside - 1, int(norms[kernel].max())


def _active_block_runs(integral: np.ndarray, block: int) -> list[tuple[int, int, int]]:
    """Finds the blocks whose 3 x 3 block neighbourhood holds both foreground and background.

    Any other block has no band pixel for a kernel radius <= ``block`` (its whole neighbourhood is
    one class), so skipping it is exact.

    Args:
        integral: ``(H + 1) x (W + 1)`` integral image (``cv2.integral``) of the 0/1 GT.
        block: Block side in pixels.

    Returns:
        ``(block_row, first_block_col, end_block_col)`` runs of consecutive active blocks.
    """
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    ys = np.append(np.arange(0, h, block), h)
    xs = np.append(np.arange(0, w, block), w)
    corners = integral[np.ix_(ys, xs)].astype(np.int64)
    counts = corners[1:, 1:] - corners[:-1, 1:] - corners[1:, :-1] + corners[:-1, :-1]
    areas = np.outer(np.diff(ys), np.diff(xs))
    square = np.ones((3, 3), np.uint8)
    # OpenCV's default border is neutral for dilation, so the image edge adds nothing.
    near_fg = cv2.dilate((counts > 0).view(np.uint8), square)
    near_bg = cv2.dilate((counts < areas).view(np.uint8), square)
    active = (near_fg & near_bg).astype(bool)
    runs = []
    for by in np.flatnonzero(active.any(axis=1)):
        line = np.concatenate(([False], active[by], [False])).astype(np.int8)
        edges = np.flatnonzero(np.diff(line))
        runs.extend((int(by), int(a), int(b)) for a, b in zip(edges[::2], edges[1::2]))
    return runs


def _exact_band(
    integral: np.ndarray, ys: np.ndarray, xs: np.ndarray, is_fg: np.ndarray, half: np.ndarray
) -> np.ndarray:
    """Tests pixels directly: does the kernel placed on each hold a pixel of the other class?

    Args:
        integral: ``(H + 1) x (W + 1)`` integral image of the 0/1 GT.
        ys, xs: ``N`` pixel coordinates.
        is_fg: ``N`` bool, the class of each pixel.
        half: ``2r + 1`` kernel row half-widths.

    Returns:
        ``N`` bool, True where the pixel is in the band.
    """
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    radius = len(half) // 2
    hit = np.zeros(ys.shape, dtype=bool)
    for k, a in enumerate(half.tolist()):
        rows = ys + (k - radius)
        inside = (rows >= 0) & (rows < h)  # rows beyond the image are ignored, as in OpenCV
        rows = np.where(inside, rows, 0)
        lo = np.maximum(xs - a, 0)
        hi = np.minimum(xs + a, w - 1) + 1
        below = rows + 1
        fg = integral[below, hi] - integral[rows, hi] - integral[below, lo] + integral[rows, lo]
        hit |= inside & np.where(is_fg, fg < hi - lo, fg > 0)
    return hit


def _band_counts_dense(
    gt_u8: np.ndarray, radii: list[int], preds: Sequence[np.ndarray]
) -> tuple[list[int], list[list[int]]]:
    """Band sizes and correct-pixel counts per radius, literally (full-image OpenCV gradient)."""
    gt = gt_u8.view(bool)
    agree = [pred == gt for pred in preds]
    edge, good = [], [[] for _ in preds]
    for r in radii:
        band = cv2.morphologyEx(gt_u8, cv2.MORPH_GRADIENT, _kernel(r)) != 0
        edge.append(int(np.count_nonzero(band)))
        for p, same in enumerate(agree):
            good[p].append(int(np.count_nonzero(band & same)))
    return edge, good


def _band_counts_windows(
    gt_u8: np.ndarray,
    integral: np.ndarray,
    runs: list[tuple[int, int, int]],
    block: int,
    radii: list[int],
    preds: Sequence[np.ndarray],
) -> tuple[list[int], list[list[int]]]:
    """The same counts as :func:`_band_counts_dense`, from distance transforms on windows.

    The band of radius r (non-zero morphological gradient of the GT with OpenCV's elliptical
    kernel K_r) is the set of pixels p whose neighbourhood p + K_r holds a pixel of the class
    opposite to p's. With D(p) the exact Euclidean distance from p to the nearest such pixel, p is
    in the band if D^2 <= sure_max(r), is not if D^2 > amb_max(r), and the thin shell in between
    is tested directly. D comes from two exact distance transforms, one pass for all radii,
    computed only on windows around the active blocks.
    """
    h, w = gt_u8.shape
    gt = gt_u8.view(bool)
    profiles = [_kernel_profile(r) for r in radii]
    margin = max(radii) + 1
    edge = [0] * len(radii)
    good = [[0] * len(radii) for _ in preds]
    shell: list[list[np.ndarray]] = [[] for _ in radii]  # flat indices of pixels to test directly
    for by, bx0, bx1 in runs:
        y0, y1 = by * block, min((by + 1) * block, h)
        x0, x1 = bx0 * block, min(bx1 * block, w)
        # The window holds every pixel within `margin` of the run (or reaches the image edge,
        # beyond which OpenCV's morphology sees nothing either).
        wy0, wx0 = max(y0 - margin, 0), max(x0 - margin, 0)
        window = np.ascontiguousarray(gt_u8[wy0 : min(y1 + margin, h), wx0 : min(x1 + margin, w)])
        dist = cv2.distanceTransform(window, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        dist += cv2.distanceTransform(window ^ 1, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        d = np.minimum(dist[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0], margin + 1)
        d2 = np.rint(d.astype(np.float64) ** 2).astype(np.int32)
        gt_run = gt[y0:y1, x0:x1]
        agree = [pred[y0:y1, x0:x1] == gt_run for pred in preds]
        for i, (_, sure_max, amb_max) in enumerate(profiles):
            band = d2 <= sure_max
            edge[i] += int(np.count_nonzero(band))
            for p, same in enumerate(agree):
                good[p][i] += int(np.count_nonzero(band & same))
            amb_y, amb_x = np.nonzero((d2 > sure_max) & (d2 <= amb_max))
            if amb_y.size:
                shell[i].append((amb_y + y0) * w + (amb_x + x0))
    for i, (half, _, _) in enumerate(profiles):
        if not shell[i]:
            continue
        ys, xs = np.divmod(np.concatenate(shell[i]), w)
        is_fg = gt[ys, xs]
        hit = _exact_band(integral, ys, xs, is_fg, half)
        ys, xs, is_fg = ys[hit], xs[hit], is_fg[hit]
        edge[i] += int(ys.size)
        for p, pred in enumerate(preds):
            good[p][i] += int(np.count_nonzero(pred[ys, xs] == is_fg))
    return edge, good


def _boundary_accuracies(gt: np.ndarray, preds: Sequence[np.ndarray]) -> list[float]:
    """mBA of several predictions against one GT, computing each band once.

    Equals CascadePSP's computation exactly. Where the GT boundary covers a small part of the
    image (the usual case), the bands come from distance transforms on windows around it
    (:func:`_band_counts_windows`, several times faster at 5000 x 3600); otherwise from OpenCV's
    morphological gradient on the full image (:func:`_band_counts_dense`).

    Args:
        gt: ``H x W`` bool.
        preds: ``H x W`` bool arrays.

    Returns:
        One mBA per prediction (NaN if the GT has no boundary).
    """
    h, w = gt.shape
    radii = boundary_radii(h, w)
    block = max(_BLOCK, max(radii) + 1)
    gt_u8 = np.ascontiguousarray(gt, dtype=bool).view(np.uint8)
    preds = [np.asarray(pred, dtype=bool) for pred in preds]
    integral = cv2.integral(gt_u8)
    runs = _active_block_runs(integral, block)
    active = sum((b - a) * block * block for _, a, b in runs)
    if active > _DENSE_FRACTION * h * w:
        edge, good = _band_counts_dense(gt_u8, radii, preds)
    else:
        edge, good = _band_counts_windows(gt_u8, integral, runs, block, radii, preds)
    if edge[0] == 0:
        return [math.nan for _ in preds]
    return [sum(g / e for g, e in zip(counts, edge)) / NUM_RADII for counts in good]


def boundary_accuracy(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean boundary accuracy (mBA) of one prediction at the GT's resolution.

    Args:
        pred: ``H x W`` bool prediction.
        gt: ``H x W`` bool ground truth (defines the radii and the band).

    Returns:
        mBA in [0, 1]; NaN if the GT has no boundary (all background or all foreground), where
        CascadePSP would divide 0 by 0.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    _check_pair(pred, gt)
    return _boundary_accuracies(gt, [pred])[0]


def _iou(i: int, u: int) -> float:
    return i / u if u else 1.0


class RefinementMeter:
    """Accumulates IoU and mBA of refined (and optionally coarse) masks over a dataset.

    Args:
        resample: Resampler for predictions whose size differs from the GT (see :func:`binarize`).
        small_coarse_sum: If the coarse mask's 8-bit values sum to less than this, the refined mask
            is replaced by the coarse one, as CascadePSP's ``eval_post.py`` does; None disables.

    Example:
        >>> meter = RefinementMeter()
        >>> meter.update("a", gt, refined, coarse)  # doctest: +SKIP
        >>> meter.compute()["iou"]  # doctest: +SKIP
    """

    def __init__(self, resample: str = "pil", small_coarse_sum: int | None = 32 * 32) -> None:
        if resample not in _RESAMPLERS:
            raise ValueError(f"resample must be one of {_RESAMPLERS}, got {resample!r}.")
        self.resample = resample
        self.small_coarse_sum = small_coarse_sum
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
                if coarse_grey.shape != size:
                    coarse_grey = _resize(coarse_grey, size, self.resample)
                small = (
                    self.small_coarse_sum is not None
                    and int(coarse_grey.sum(dtype=np.int64)) < self.small_coarse_sum
                )
                coarse_bin = coarse_grey > THRESHOLD
                if small:
                    ref_bin = coarse_bin
        except ValueError as err:
            raise ValueError(f"Image {name!r}: {err}") from err

        i, u = intersection_union(ref_bin, gt_bin)
        row: dict[str, Any] = {"name": name, "height": size[0], "width": size[1]}
        row.update(intersection=i, union=u, iou=_iou(i, u))
        if coarse is None:
            row["mba"] = _boundary_accuracies(gt_bin, [ref_bin])[0]
        else:
            ci, cu = intersection_union(coarse_bin, gt_bin)
            row["mba"], row["mba_coarse"] = _boundary_accuracies(gt_bin, [ref_bin, coarse_bin])
            row.update(intersection_coarse=ci, union_coarse=cu, iou_coarse=_iou(ci, cu))
            row["small_coarse"] = bool(small)
        self._rows.append(row)
        self._names.add(name)
        self._has_coarse = has_coarse
        return row

    def per_image(self) -> list[dict[str, Any]]:
        """Per-image rows: name, height, width, iou, mba (+ iou_coarse, mba_coarse, counts)."""
        return [dict(row) for row in self._rows]

    def compute(self) -> dict[str, float | int]:
        """Aggregates the dataset metrics as fractions in [0, 1].

        Returns:
            ``iou`` (pooled), ``miou`` (per-image mean), ``mba`` (mean over images with a GT
            boundary), and with coarse masks ``*_coarse`` and ``*_delta`` (refined - coarse) of the
            three; plus ``num_images``, ``num_mba_skipped`` and (with coarse) ``num_small_coarse``.
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
