"""How far each scale of the cascade moves the mask's boundary: the measurement behind the
``band_width`` option (``scripts/boundary_shift.py``).

At every scale the cascade turns its input mask (the coarse mask, then the previous scale's
output) into a new one. A pixel whose label (>= 0.5) changes lies at some distance from the input
mask's boundary: the Chebyshev distance to the nearest pixel of the other label, the distance that
:func:`samsr.inference.regions.contour_region` bands by. Expressed in pixels of that scale's input
(full-resolution pixels x scale), the largest such distance is the ``band_width`` that decodes
every pixel the scale changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import Tensor

from samsr.inference.cascade import CascadeConfig, refine
from samsr.models.crm import CRM

__all__ = ["ScaleShift", "boundary_shift", "label_distance"]

WITHIN = (4, 8, 16, 24, 32)  # band widths (input px of the scale) reported as coverage


@dataclass
class ScaleShift:
    """Label changes of one scale.

    Attributes:
        scale: the scale.
        changed: pixels whose label changed (unpadded full resolution).
        max_px: the largest distance of a changed pixel from the input boundary, in input pixels
            of this scale (0 if none changed).
        p999_px: its 99.9th percentile.
        within: fraction of the changed pixels within each of :data:`WITHIN` input pixels.
    """

    scale: float
    changed: int
    max_px: float
    p999_px: float
    within: dict[int, float]


def label_distance(label: np.ndarray) -> np.ndarray:
    """Chebyshev distance (px) of every pixel to the nearest pixel of the other label (H x W
    float32; a pixel next to the boundary is 1; all-one-label masks give a large value)."""
    lab = label.astype(np.uint8)
    to_bg = cv2.distanceTransform(lab, cv2.DIST_C, 3)
    to_fg = cv2.distanceTransform(1 - lab, cv2.DIST_C, 3)
    return np.where(lab > 0, to_bg, to_fg)


def boundary_shift(
    model: CRM, image: Tensor, coarse: Tensor, cfg: CascadeConfig | None = None
) -> list[ScaleShift]:
    """Runs the cascade (default: the reference protocol) and measures every scale's changes.

    Args:
        model: the CRM in eval mode.
        image: 1 x 3 x H x W RGB (uint8, or float in [0, 1]).
        coarse: 1 x 1 x H x W coarse mask (uint8, or float in [0, 1]).
        cfg: the cascade settings.

    Returns:
        One :class:`ScaleShift` per scale, in order.
    """
    cfg = cfg or CascadeConfig()
    h, w = image.shape[-2:]
    unit = coarse.float().div(255) if coarse.dtype == torch.uint8 else coarse.float()
    previous = [(unit[0, 0] >= 0.5).cpu().numpy()]
    shifts: list[ScaleShift] = []

    def on_scale(scale: float, prob: Tensor) -> None:
        label = (prob[0, 0, cfg.pad : cfg.pad + h, cfg.pad : cfg.pad + w] >= 0.5).cpu().numpy()
        before = previous[0]
        changed = label != before
        dist = label_distance(before)[changed] * scale
        n = int(changed.sum())
        within = {k: float((dist <= k).mean()) if n else 1.0 for k in WITHIN}
        top = float(dist.max()) if n else 0.0
        p999 = float(np.percentile(dist, 99.9)) if n else 0.0
        shifts.append(ScaleShift(scale, n, top, p999, within))
        previous[0] = label

    refine(model, image, coarse, cfg, on_scale=on_scale)
    return shifts
