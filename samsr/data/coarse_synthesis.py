"""Coarse-mask synthesis: the reference's training-time degradation of a GT, and BIG-style masks.

Training (CascadePSP / CRM behaviour, re-implemented; SPEC section 3):

1. :func:`modify_boundary`: trace every contour of the mask (all contours, outer and hole, every
   boundary pixel). Contours with fewer than 10 points are dropped. For each other contour of n
   points, with k = int(0.1 n): among the start indices i in [0, n - k), sorted (stably) by the
   squared distance between points i and i + k, pick one uniformly among the first
   ceil(0.1 (n - k)) (the runs whose two ends lie closest together, i.e. protrusions) and delete
   the run of k points starting there (runs never wrap past the contour's first point, OpenCV's
   top-left-most pixel, as in the reference). Then keep a random int(0.1 m) of the m remaining
   points in their order. All resulting polygons are filled together (even-odd, so hole contours
   stay holes); if no polygon is left, the input mask is kept.
2. :func:`perturb`: for up to 250 rounds, 4 times per round: draw a random rectangle (top-left
   uniform over the image, bottom-right uniform between it and the image corner); with p=0.25 set
   the rectangle's centre pixel to a random 0/255 (seeds holes and islands); then dilate (p=0.5) or
   erode the rectangle with a random structuring element of size s in 3..9: a square, an s x s
   ellipse, or an ellipse of half height or half width (each 1/4). After each round stop as soon as
   IoU(perturbed, polygon mask) < target, the target being drawn from U(0.8, 1.0).

The reference draws from Python's ``random`` and NumPy's global state; here every function takes a
``np.random.Generator`` (same distributions, reproducible per sample).

Evaluation on synthetic / DUTS data: :func:`big_style_coarse` mimics a low-resolution segmentor's
output upsampled to full size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "SynthesisResult",
    "big_style_coarse",
    "lowres_coarse",
    "mask_iou",
    "modify_boundary",
    "perturb",
    "random_structuring_element",
    "synthesize_coarse",
    "synthesize_coarse_detailed",
]


def _as_binary(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    """``H x W`` -> uint8 {0, 255} with ``value > 127`` (the reference's threshold)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be an H x W array, got shape {mask.shape}")
    if mask.dtype == np.bool_:
        return mask.astype(np.uint8) * 255
    return np.where(mask > 127, np.uint8(255), np.uint8(0))


def mask_iou(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """IoU of two masks (non-zero = foreground), smoothed as in the reference.

    Args:
        a: ``H x W`` mask.
        b: ``H x W`` mask.
        eps: Added to intersection and union (two empty masks give 1).

    Returns:
        ``(|a & b| + eps) / (|a | b| + eps)``.
    """
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    inter = np.count_nonzero(a & b)
    union = np.count_nonzero(a | b)
    return (inter + eps) / (union + eps)


def modify_boundary(
    gt: np.ndarray,
    rng: np.random.Generator,
    regional_sample_rate: float = 0.1,
    sample_rate: float = 0.1,
    move_rate: float = 0.0,
    min_contour_points: int = 10,
    start_candidate_fraction: float = 0.1,
) -> np.ndarray:
    """Coarsens a mask's boundary into a polygon mask (step 1 of the module docstring).

    Args:
        gt: ``H x W`` mask (uint8 0/255 or bool; ``> 127`` is foreground).
        rng: Random generator.
        regional_sample_rate: Fraction of each contour's points removed as one consecutive run.
        sample_rate: Fraction of the remaining points kept as polygon vertices.
        move_rate: Std of a per-vertex radial move relative to the contour's centroid (the
            reference's default 0 disables it).
        min_contour_points: Contours with fewer points are dropped.
        start_candidate_fraction: Fraction of run starts (closest run ends first) to choose from.

    Returns:
        ``H x W`` uint8 polygon mask in {0, 255}.
    """
    binary = _as_binary(gt, "gt")
    contours, _ = cv2.findContours(binary, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    polygons = []
    for contour in contours:
        n = contour.shape[0]
        if n < min_contour_points:
            continue
        points = contour[:, 0, :]  # n x 2 (x, y)
        k = int(n * regional_sample_rate)
        dist = np.sum((points[: n - k] - points[k:]).astype(np.int64) ** 2, axis=1)
        order = np.argsort(dist, kind="stable")
        candidates = order[: math.ceil(start_candidate_fraction * len(order))]
        start = int(candidates[rng.integers(len(candidates))])
        points = np.concatenate([points[:start], points[start + k :]], axis=0)
        m = points.shape[0]
        keep = np.sort(rng.choice(m, size=int(m * sample_rate), replace=False))
        vertices = points[keep]
        if move_rate > 0 and len(vertices):
            moments = cv2.moments(contour)
            if moments["m00"] != 0:
                centre = np.array(
                    [round(moments["m10"] / moments["m00"]), round(moments["m01"] / moments["m00"])]
                )
                change = rng.normal(0.0, move_rate, size=(len(vertices), 1))
                moved = vertices + (vertices - centre) * change
                vertices = np.trunc(moved).astype(np.int32)  # the reference truncates to int
        if len(vertices):
            polygons.append(np.ascontiguousarray(vertices.reshape(-1, 1, 2), dtype=np.int32))
    if not polygons:
        return binary.copy()
    out = np.zeros_like(binary)
    cv2.drawContours(out, polygons, -1, 255, thickness=cv2.FILLED)
    return out


def random_structuring_element(size: int, rng: np.random.Generator) -> np.ndarray:
    """One of 4 kernels, equally likely: square, ellipse, half-height or half-width ellipse.

    Args:
        size: Kernel size s (the half sizes are ``s // 2``).
        rng: Random generator.

    Returns:
        uint8 kernel (``s x s``, ``s//2 x s`` or ``s x s//2``; rows x cols).
    """
    choice = int(rng.integers(4))
    if choice == 0:
        return cv2.getStructuringElement(cv2.MORPH_RECT, (size, size))
    if choice == 1:
        return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    if choice == 2:  # OpenCV sizes are (width, height): half height
        return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size // 2))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size // 2, size))


def perturb(
    mask: np.ndarray,
    iou_target: float,
    rng: np.random.Generator,
    max_rounds: int = 250,
    rects_per_round: int = 4,
    kernel_size_range: tuple[int, int] = (3, 9),
    dilate_prob: float = 0.5,
    pixel_flip_prob: float = 0.25,
) -> np.ndarray:
    """Randomly dilates/erodes rectangles until the IoU with ``mask`` drops below a target.

    Step 2 of the module docstring. Masks of height or width <= 2 are returned unchanged; if the
    target is not reached after ``max_rounds`` the last result is returned.

    Args:
        mask: ``H x W`` mask (``> 127`` is foreground); the IoU reference.
        iou_target: Stop once IoU(result, mask) < this.
        rng: Random generator.
        max_rounds: Maximum number of rounds.
        rects_per_round: Rectangles modified per round (IoU is checked after each round).
        kernel_size_range: Inclusive range of the structuring element size.
        dilate_prob: Probability of dilating (else eroding) a rectangle.
        pixel_flip_prob: Probability of setting the rectangle's centre pixel to a random value.

    Returns:
        ``H x W`` uint8 mask in {0, 255}.
    """
    return _perturb(
        mask,
        iou_target,
        rng,
        max_rounds,
        rects_per_round,
        kernel_size_range,
        dilate_prob,
        pixel_flip_prob,
    )[0]


def _perturb(
    mask: np.ndarray,
    iou_target: float,
    rng: np.random.Generator,
    max_rounds: int = 250,
    rects_per_round: int = 4,
    kernel_size_range: tuple[int, int] = (3, 9),
    dilate_prob: float = 0.5,
    pixel_flip_prob: float = 0.25,
) -> tuple[np.ndarray, int]:
    """:func:`perturb`, also returning the number of rounds used."""
    reference = _as_binary(mask)
    seg = reference.copy()
    h, w = seg.shape
    if h <= 2 or w <= 2:
        return seg, 0
    ref_fg = reference > 0
    lo, hi = kernel_size_range
    for round_index in range(1, max_rounds + 1):
        for _ in range(rects_per_round):
            x0, y0 = int(rng.integers(w)), int(rng.integers(h))
            x1, y1 = int(rng.integers(x0 + 1, w + 1)), int(rng.integers(y0 + 1, h + 1))
            if rng.random() < pixel_flip_prob:
                seg[(y0 + y1) // 2, (x0 + x1) // 2] = 255 * int(rng.integers(2))
            op = cv2.dilate if rng.random() < dilate_prob else cv2.erode
            kernel = random_structuring_element(int(rng.integers(lo, hi + 1)), rng)
            seg[y0:y1, x0:x1] = op(seg[y0:y1, x0:x1], kernel, iterations=1)
        seg_fg = seg > 0
        inter = np.count_nonzero(seg_fg & ref_fg)
        union = np.count_nonzero(seg_fg | ref_fg)
        if (inter + 1e-6) / (union + 1e-6) < iou_target:
            return seg, round_index
    return seg, max_rounds


@dataclass(frozen=True)
class SynthesisResult:
    """Output of :func:`synthesize_coarse_detailed`.

    Attributes:
        coarse: ``H x W`` uint8 {0, 255}, the synthesised coarse mask.
        polygon: ``H x W`` uint8 {0, 255}, the boundary-modified mask (the IoU reference).
        iou_target: The drawn target.
        rounds: Perturbation rounds used.
    """

    coarse: np.ndarray
    polygon: np.ndarray
    iou_target: float
    rounds: int


def synthesize_coarse_detailed(
    gt: np.ndarray,
    rng: np.random.Generator,
    iou_range: tuple[float, float] = (0.8, 1.0),
    max_rounds: int = 250,
    **kwargs: float | int | tuple[int, int],
) -> SynthesisResult:
    """Like :func:`synthesize_coarse`, also returning the polygon mask, target and rounds.

    ``kwargs`` go to :func:`modify_boundary` (``regional_sample_rate``, ``sample_rate``,
    ``move_rate``, ``min_contour_points``, ``start_candidate_fraction``) or :func:`perturb`
    (``rects_per_round``, ``kernel_size_range``, ``dilate_prob``, ``pixel_flip_prob``).
    """
    boundary_keys = {
        "regional_sample_rate",
        "sample_rate",
        "move_rate",
        "min_contour_points",
        "start_candidate_fraction",
    }
    perturb_keys = {"rects_per_round", "kernel_size_range", "dilate_prob", "pixel_flip_prob"}
    unknown = set(kwargs) - boundary_keys - perturb_keys
    if unknown:
        raise TypeError(f"unknown synthesis arguments: {sorted(unknown)}")
    lo, hi = iou_range
    iou_target = float(lo + rng.random() * (hi - lo))  # drawn first, as in the reference
    polygon = modify_boundary(gt, rng, **{k: v for k, v in kwargs.items() if k in boundary_keys})
    coarse, rounds = _perturb(
        polygon,
        iou_target,
        rng,
        max_rounds=max_rounds,
        **{k: v for k, v in kwargs.items() if k in perturb_keys},
    )
    return SynthesisResult(coarse=coarse, polygon=polygon, iou_target=iou_target, rounds=rounds)


def synthesize_coarse(
    gt: np.ndarray,
    rng: np.random.Generator,
    iou_range: tuple[float, float] = (0.8, 1.0),
    max_rounds: int = 250,
    **kwargs: float | int | tuple[int, int],
) -> np.ndarray:
    """Synthesises a training coarse mask from a (cropped) GT mask: boundary modification + perturb.

    Empty GT: the polygon mask is empty and the perturbation seeds a few random specks (as in the
    reference). Full GT: holes are eroded into it. Tiny masks (<= 2 px a side) come back unchanged.

    Args:
        gt: ``H x W`` uint8 GT in {0, 255} (bool also accepted).
        rng: Random generator.
        iou_range: The IoU target is drawn from ``U(iou_range)``.
        max_rounds: Maximum perturbation rounds.
        **kwargs: Further parameters, see :func:`synthesize_coarse_detailed`.

    Returns:
        ``H x W`` uint8 coarse mask in {0, 255}.
    """
    return synthesize_coarse_detailed(gt, rng, iou_range, max_rounds, **kwargs).coarse


def big_style_coarse(gt: np.ndarray, factor: float = 8, threshold: float = 128) -> np.ndarray:
    """A BIG-like coarse mask: GT downsampled by ``factor`` (area), upsampled bicubic, ``> 128``.

    Args:
        gt: ``H x W`` mask (uint8 0/255 or bool; ``> 127`` is foreground).
        factor: Downsampling factor (the small side is ``round(side / factor)``, at least 1).
        threshold: of the upsampled 0..255 map (128: BIG's rule).

    Returns:
        ``H x W`` uint8 mask in {0, 255}; differs from the GT only near its boundaries (and loses
        parts thinner than about ``factor`` pixels).
    """
    binary = _as_binary(gt, "gt").astype(np.float32)
    h, w = binary.shape
    small_size = (max(1, round(w / factor)), max(1, round(h / factor)))
    small = cv2.resize(binary, small_size, interpolation=cv2.INTER_AREA)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.where(big > threshold, np.uint8(255), np.uint8(0))


def lowres_coarse(
    gt: np.ndarray,
    rng: np.random.Generator,
    factors: tuple[float, float] = (4.0, 32.0),
    thresholds: tuple[float, float] = (64.0, 192.0),
) -> np.ndarray:
    """The mask of a segmentor that worked at a lower resolution (not in the reference).

    :func:`big_style_coarse` with a factor drawn log-uniformly from ``factors`` (how much lower
    the segmentor's resolution was) and a threshold drawn uniformly from ``thresholds`` (its
    bias towards over- or under-segmenting): errors along every boundary, thin parts lost,
    nothing far from the object changed, unlike :func:`synthesize_coarse`'s region errors.

    Args:
        gt: ``H x W`` mask (uint8 0/255 or bool).
        rng: the sample's generator.
        factors: (min, max) downsampling factor, >= 1.
        thresholds: (min, max) threshold of the upsampled 0..255 map.

    Returns:
        ``H x W`` uint8 mask in {0, 255}.
    """
    lo, hi = float(factors[0]), float(factors[1])
    if not 1.0 <= lo <= hi:
        raise ValueError(f"factors must satisfy 1 <= min <= max, got {factors}")
    factor = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    threshold = float(rng.uniform(*thresholds))
    return big_style_coarse(gt, factor, threshold)
