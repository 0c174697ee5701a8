"""Pictures of refinement: the mask boundary drawn over the image, and image | coarse | refined.

Everything is numpy/OpenCV on uint8 arrays (H x W x 3 RGB images, H x W masks, nonzero or
> 127 = foreground), so a 6000 x 4000 photo costs a few full-size arrays and no plotting library.
:func:`side_by_side` downsizes the whole picture to a readable width and adds a full-resolution
zoom of the window where the two masks disagree most, where refinement is visible at all.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = [
    "BOUNDARY_RGB",
    "class_overlay",
    "disagreement_window",
    "draw_boundary",
    "label_colors",
    "overlay",
    "patch_figure_row",
    "side_by_side",
]

BOUNDARY_RGB = (255, 40, 40)
"""Colour of the drawn boundary."""
_LABEL_RGB = (255, 255, 255)


def label_colors(labels: np.ndarray) -> np.ndarray:
    """... x H x W class indices (0-255) -> ... x H x W x 3 uint8 RGB in VOC's palette."""
    from samsr.data.voc import voc_palette

    palette = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
    return palette[np.clip(labels, 0, 255).astype(np.intp)]


def _binary(mask: np.ndarray) -> np.ndarray:
    if mask.ndim != 2:
        raise ValueError(f"mask must be H x W, got shape {mask.shape}")
    return (mask > 127 if mask.dtype == np.uint8 else mask > 0.5).astype(np.uint8)


def draw_boundary(
    image: np.ndarray, mask: np.ndarray, thickness: int = 2, colour=BOUNDARY_RGB
) -> np.ndarray:
    """A copy of ``image`` (H x W x 3 uint8) with the outline of ``mask`` (H x W) drawn on it."""
    if image.shape[:2] != mask.shape:
        raise ValueError(f"mask {mask.shape} does not match image {image.shape[:2]}")
    contours, _ = cv2.findContours(_binary(mask), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    out = np.ascontiguousarray(image).copy()
    cv2.drawContours(out, contours, -1, colour, int(thickness), lineType=cv2.LINE_AA)
    return out


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """``image`` with the foreground of ``mask`` tinted and its boundary drawn."""
    fg = _binary(mask).astype(bool)
    out = image.copy()
    tint = np.array(BOUNDARY_RGB, np.float32)
    out[fg] = (out[fg].astype(np.float32) * (1 - alpha) + tint * alpha).astype(np.uint8)
    return draw_boundary(out, mask, thickness=max(1, round(max(image.shape[:2]) / 1500)))


def disagreement_window(a: np.ndarray, b: np.ndarray, side: int) -> tuple[int, int, int, int]:
    """(y0, x0, h, w) of the ``side`` x ``side`` window (clipped to the image) where masks
    ``a`` and ``b`` differ on the most pixels (the image centre if they agree everywhere)."""
    h, w = a.shape
    side = max(1, min(side, h, w))
    diff = (_binary(a) != _binary(b)).astype(np.float32)
    scale = max(1, side // 64)  # look for it on a coarser grid: cheap at 6k
    small = cv2.resize(diff, (max(1, w // scale), max(1, h // scale)), interpolation=cv2.INTER_AREA)
    k = max(1, side // scale)
    density = cv2.boxFilter(small, -1, (k, k), normalize=False, borderType=cv2.BORDER_CONSTANT)
    if float(density.max()) <= 0:
        cy, cx = h // 2, w // 2
    else:
        iy, ix = np.unravel_index(int(np.argmax(density)), density.shape)
        cy, cx = int(iy * scale + scale // 2), int(ix * scale + scale // 2)
    y0 = min(max(cy - side // 2, 0), h - side)
    x0 = min(max(cx - side // 2, 0), w - side)
    return y0, x0, side, side


def _label(panel: np.ndarray, text: str) -> np.ndarray:
    size = max(0.5, panel.shape[1] / 900)
    thick = max(1, round(size * 2))
    org = (int(10 * size), int(30 * size))
    cv2.putText(panel, text, org, cv2.FONT_HERSHEY_SIMPLEX, size, (0, 0, 0), thick + 2, cv2.LINE_AA)
    cv2.putText(panel, text, org, cv2.FONT_HERSHEY_SIMPLEX, size, _LABEL_RGB, thick, cv2.LINE_AA)
    return panel


def _fit(panel: np.ndarray, width: int) -> np.ndarray:
    h, w = panel.shape[:2]
    if w == width:
        return panel.copy()
    height = max(1, round(h * width / w))
    interp = cv2.INTER_AREA if width < w else cv2.INTER_LINEAR
    return cv2.resize(panel, (width, height), interpolation=interp)


def side_by_side(
    image: np.ndarray,
    coarse: np.ndarray,
    refined: np.ndarray,
    width: int = 2400,
    zoom: bool = True,
    labels: tuple[str, str, str] = ("image", "coarse", "refined"),
) -> np.ndarray:
    """image | coarse | refined, the boundaries drawn (H' x ``width`` x 3 uint8 RGB).

    The first row shows the whole image downsized; with ``zoom``, a second row shows the same
    three panels at full resolution (upsized if need be) in the window where coarse and refined
    disagree most (a quarter of the short side), framed in the first row.

    Args:
        image: H x W x 3 uint8 RGB.
        coarse: H x W mask (uint8 0..255, or floats in [0, 1]).
        refined: H x W mask.
        width: output width in pixels.
        zoom: add the full-resolution row.
        labels: the panel titles.
    """
    if coarse.shape != image.shape[:2] or refined.shape != image.shape[:2]:
        raise ValueError(
            f"masks {coarse.shape} / {refined.shape} do not match image {image.shape[:2]}"
        )
    h, w = image.shape[:2]
    panel_w = max(1, width // 3)
    thick = max(1, round(w / panel_w * 1.5))  # about 1.5 output pixels once downsized
    window = disagreement_window(coarse, refined, max(32, min(h, w) // 4)) if zoom else None
    full = [image.copy(), draw_boundary(image, coarse, thick), draw_boundary(image, refined, thick)]
    if window is not None:
        y0, x0, wh, ww = window
        for panel in full:
            cv2.rectangle(panel, (x0, y0), (x0 + ww, y0 + wh), (255, 220, 0), thick)
    rows = [np.hstack([_label(_fit(p, panel_w), t) for p, t in zip(full, labels)])]
    if window is not None:
        y0, x0, wh, ww = window
        crop = (slice(y0, y0 + wh), slice(x0, x0 + ww))
        parts = [image[crop], draw_boundary(image[crop], coarse[crop], 2)]
        parts.append(draw_boundary(image[crop], refined[crop], 2))
        rows.append(np.hstack([_fit(p, panel_w) for p in parts]))
    return np.vstack(rows)


def class_overlay(image: np.ndarray, classes: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """``image`` (H x W x 3 uint8) with every non-background pixel of ``classes`` (H x W) tinted
    in its VOC colour."""
    colours = label_colors(classes)
    fg = classes > 0
    out = image.copy()
    out[fg] = (image[fg] * (1 - alpha) + colours[fg] * alpha).astype(np.uint8)
    return out


def patch_figure_row(
    image: np.ndarray,
    patches: np.ndarray,
    whole: np.ndarray,
    gt_classes: np.ndarray,
    width: int = 2000,
) -> np.ndarray:
    """input | patch-based | global | GT (H' x ``width`` x 3 uint8), class maps over the image."""
    panel_w = max(1, width // 4)
    panels = [image, *(class_overlay(image, c) for c in (patches, whole, gt_classes))]
    titles = ["input", "patch-based", "global", "GT"]
    return np.hstack([_label(_fit(p, panel_w), t) for p, t in zip(panels, titles)])
