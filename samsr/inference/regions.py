"""Decoding fewer pixels (thesis 3.1): bounding-box and contour regions, strided decoding.

All functions work on one window of the padded full-resolution query grid (the whole grid, or
one tile) and write into the probability buffer of the previous scale: a pixel that is not
decoded keeps its previous value (the coarse mask at the first scale), except in strided decoding
where pixels of agreeing grid cells take the interpolation of the decoded corners.

``decode(ys, xs)`` is any callable returning the float32 probability of the pixels at rows
``ys`` and columns ``xs`` (1-D int64 tensors, window-local); the cascade passes the model's
decoder, tests pass a counting stub.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["bbox_region", "contour_region", "decode_region", "strided_grid", "strided_fill"]

PixelDecoder = Callable[[Tensor, Tensor], Tensor]


def bbox_region(label: Tensor, margin: int) -> Tensor:
    """The bounding box of ``label``'s foreground grown by ``margin`` pixels, as a mask.

    Args:
        label: H x W bool mask.
        margin: pixels added on every side (clipped to the image).

    Returns:
        H x W bool, True inside the box (all False if ``label`` is empty).
    """
    region = torch.zeros_like(label, dtype=torch.bool)
    rows = torch.nonzero(label.any(dim=1)).flatten()
    if rows.numel() == 0:
        return region
    cols = torch.nonzero(label.any(dim=0)).flatten()
    y0 = max(int(rows[0]) - margin, 0)
    y1 = int(rows[-1]) + margin + 1
    x0 = max(int(cols[0]) - margin, 0)
    x1 = int(cols[-1]) + margin + 1
    region[y0:y1, x0:x1] = True
    return region


def contour_region(label: Tensor, width: int) -> Tensor:
    """Pixels within ``width`` pixels (Chebyshev distance) of both foreground and background.

    That is the band of half-width ``width`` around the mask's contours: dilation of the
    foreground AND dilation of the background, with a (2 * width + 1) square.

    Args:
        label: H x W bool mask.
        width: half-width of the band (>= 1).

    Returns:
        H x W bool band (empty if ``label`` is all foreground or all background).
    """
    k = 2 * width + 1
    if label.device.type == "cpu":  # OpenCV's separable rectangle dilation: fast on large masks
        lab = label.numpy().astype(np.uint8)
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (k, k))
        near_fg = cv2.dilate(lab, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
        near_bg = cv2.dilate(1 - lab, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)
        return torch.from_numpy((near_fg & near_bg).astype(bool))
    x = label[None, None].to(torch.float16)

    def dilate(m: Tensor) -> Tensor:
        m = F.max_pool2d(m, (k, 1), stride=1, padding=(width, 0))
        return F.max_pool2d(m, (1, k), stride=1, padding=(0, width))

    return ((dilate(x) > 0) & (dilate(1 - x) > 0))[0, 0]


def decode_region(
    decode: PixelDecoder, prob: Tensor, region: Tensor | None, chunk_size: int
) -> int:
    """Decodes every pixel of a window (or of ``region`` in it) into ``prob``.

    Args:
        decode: the pixel decoder (window-local rows/cols -> probability).
        prob: h x w float32 view of the probability buffer, updated in place.
        region: h x w bool (None: every pixel).
        chunk_size: pixels per band of rows handed to ``decode`` (bounds index memory).

    Returns:
        Number of pixels decoded.
    """
    h, w = prob.shape
    band = max(1, chunk_size // max(w, 1))
    count = 0
    for r0 in range(0, h, band):
        r1 = min(r0 + band, h)
        if region is None:
            ys = torch.arange(r0, r1, device=prob.device).repeat_interleave(w)
            xs = torch.arange(w, device=prob.device).repeat(r1 - r0)
        else:
            ys, xs = torch.nonzero(region[r0:r1], as_tuple=True)
            if ys.numel() == 0:
                continue
            ys = ys + r0
        prob[ys, xs] = decode(ys, xs)
        count += ys.numel()
    return count


def strided_grid(n_pixels: int, stride: int, device: torch.device | None = None) -> Tensor:
    """Grid lines of strided decoding along one axis: 0, n, 2n, ... and the last pixel."""
    lines = torch.arange(0, n_pixels, stride, device=device)
    if int(lines[-1]) != n_pixels - 1:
        lines = torch.cat([lines, torch.tensor([n_pixels - 1], device=device)])
    return lines


def _cells(n_pixels: int, lines: Tensor) -> tuple[Tensor, Tensor]:
    """For every pixel of an axis: its grid cell (lines[c], lines[c + 1]) and the offset in it."""
    pix = torch.arange(n_pixels, device=lines.device)
    cell = torch.searchsorted(lines, pix, right=True) - 1
    cell.clamp_(0, max(lines.numel() - 2, 0))
    start = lines[cell]
    length = (lines[(cell + 1).clamp(max=lines.numel() - 1)] - start).clamp(min=1)
    t = (pix - start).float() / length.float()
    return cell, t


def strided_fill(
    decode: PixelDecoder,
    prob: Tensor,
    region: Tensor | None,
    stride: int,
    chunk_size: int = 2**18,
    margin: float = 0.0,
) -> int:
    """Strided decoding of a window (thesis 3.1, "strided n").

    1. Decode the grid pixels: rows and columns 0, n, 2n, ... plus the last one.
    2. Every other pixel lies in a grid cell (the rectangle between two consecutive grid rows and
       columns; a pixel on a grid line belongs to the cell below / to the right). If the cell's
       four corners disagree (some >= 0.5, some not), the pixel is decoded; otherwise it takes
       the bilinear interpolation of the four corner values (all on the same side of 0.5).

    With ``margin`` > 0 (not in the thesis), the corners must also be confident: a cell is
    interpolated only if all four are below ``0.5 - margin`` or all from ``0.5 + margin``, so
    soft transitions, which the next scale reads as its input mask, are decoded too.

    With a ``region``, only its pixels are changed; grid corners outside it keep their previous
    value and still take part in the agreement test.

    Args:
        decode: the pixel decoder (window-local rows/cols -> probability).
        prob: h x w float32 view of the probability buffer (previous values), updated in place.
        region: h x w bool (None: every pixel).
        stride: n >= 2.
        chunk_size: bounds the size of each ``decode`` call.
        margin: confidence margin of the agreement test in [0, 0.5) (0: the thesis's rule).

    Returns:
        Number of pixels decoded.
    """
    h, w = prob.shape
    if h < 2 or w < 2 or stride < 2:
        return decode_region(decode, prob, region, chunk_size)
    dev = prob.device
    rows = strided_grid(h, stride, dev)
    cols = strided_grid(w, stride, dev)
    # 1. the grid
    gy = rows.repeat_interleave(cols.numel())
    gx = cols.repeat(rows.numel())
    if region is not None:
        keep = region[gy, gx]
        gy, gx = gy[keep], gx[keep]
    count = _decode_into(decode, prob, gy, gx, chunk_size)
    corners = prob[rows][:, cols]  # gh x gw: decoded, or previous outside the region
    # 2. agreement per cell
    # a corner's side: 0 below 0.5 - margin, 2 from 0.5 + margin, 1 between (never agrees)
    lab = (corners >= 0.5 + margin).to(torch.uint8) * 2
    if margin > 0:
        lab[(corners >= 0.5 - margin) & (corners < 0.5 + margin)] = 1
    a, b, c, d = lab[:-1, :-1], lab[:-1, 1:], lab[1:, :-1], lab[1:, 1:]
    disagree = (a != b) | (a != c) | (a != d) | (a == 1)  # (gh - 1) x (gw - 1)
    cy, ty = _cells(h, rows)
    cx, tx = _cells(w, cols)
    on_grid = torch.zeros((h, w), dtype=torch.bool, device=dev)
    on_grid[rows[:, None], cols[None, :]] = True
    todo = disagree[cy][:, cx] & ~on_grid
    fill = ~disagree[cy][:, cx] & ~on_grid
    if region is not None:
        todo &= region
        fill &= region
    # interpolation of agreeing cells: along x on the grid rows, then along y
    tx_, ty_ = tx[None, :], ty[:, None]
    along_x = corners[:, cx] * (1 - tx_) + corners[:, cx + 1] * tx_
    del corners
    interp = along_x[cy] * (1 - ty_) + along_x[cy + 1] * ty_
    del along_x
    prob[fill] = interp[fill]
    del interp, fill
    ys, xs = torch.nonzero(todo, as_tuple=True)
    return count + _decode_into(decode, prob, ys, xs, chunk_size)


def _decode_into(decode: PixelDecoder, prob: Tensor, ys: Tensor, xs: Tensor, chunk: int) -> int:
    for s in range(0, ys.numel(), chunk):
        y, x = ys[s : s + chunk], xs[s : s + chunk]
        prob[y, x] = decode(y, x)
    return int(ys.numel())
