"""Tiles for bounded-memory inference: which input pixels to encode for which query pixels.

A tile owns a rectangle of the padded full-resolution query grid (its *core*). Its queries read
the feature cells ``[a - 1, b + 1)`` around the core's cells ``[a, b)`` (the decoder's local
ensemble), and those features are computed from an input window grown by the halo (rounded to
multiples of 8, the encoder's total stride, so that the tile's feature grid is the full one's).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from samsr.models.components.fusion import resize_window_axis

__all__ = ["Tile", "plan_tiles", "scaled_window"]

_ALIGN = 8  # total stride of the encoder levels (2, 4, 8)


@dataclass(frozen=True)
class Tile:
    """One tile at one scale.

    Attributes:
        q: (y0, y1, x0, x1) core in the padded full-resolution query grid.
        x: (y0, y1, x0, x1) input window at this scale (y0, x0 multiples of 8).
    """

    q: tuple[int, int, int, int]
    x: tuple[int, int, int, int]


def _first_query(cell: int, n_query: int, n_feat: int) -> int:
    """First query index whose containing feature cell is >= ``cell``.

    Query i's centre lies in cell floor((2i + 1) * n_feat / (2 * n_query)).
    """
    num = 2 * cell * n_query - n_feat
    return min(max(0, -((-num) // (2 * n_feat))), n_query)


def _axis(n_query: int, n_in: int, tile: int, halo: int) -> list[tuple[int, int, int, int]]:
    """(query start, query end, input start, input end) per tile along one axis."""
    n_feat = (n_in - 1) // 2 + 1
    core = max(tile // 2 // (_ALIGN // 2) * (_ALIGN // 2), _ALIGN // 2)  # feature cells per tile
    halo_f = -(-halo // 2)
    out = []
    for a in range(0, n_feat, core):
        b = min(a + core, n_feat)
        q0, q1 = _first_query(a, n_query, n_feat), _first_query(b, n_query, n_feat)
        if b == n_feat:
            q1 = n_query
        if q1 <= q0:
            continue
        f0, f1 = max(a - 1 - halo_f, 0), min(b + 1 + halo_f, n_feat)
        x0 = (2 * f0) // _ALIGN * _ALIGN
        x1 = min(-(-(2 * f1) // _ALIGN) * _ALIGN, n_in)
        out.append((q0, q1, x0, x1))
    return out


def plan_tiles(
    query_size: tuple[int, int], input_size: tuple[int, int], tile: int, halo: int
) -> list[Tile]:
    """Tiles covering the query grid for one scale.

    Args:
        query_size: (Hp, Wp) of the padded full-resolution query grid.
        input_size: (hs, ws) of the encoder input at this scale.
        tile: input pixels per tile side (core).
        halo: input pixels of context on each side.

    Returns:
        Tiles in row-major order; their query cores partition the query grid.
    """
    rows = _axis(query_size[0], input_size[0], tile, halo)
    cols = _axis(query_size[1], input_size[1], tile, halo)
    return [Tile((r[0], r[1], c[0], c[1]), (r[2], r[3], c[2], c[3])) for r in rows for c in cols]


def scaled_window(src: Tensor, size: tuple[int, int], window: tuple[int, int, int, int]) -> Tensor:
    """A window of ``F.interpolate(src, size, bilinear, align_corners=True)`` without the rest.

    Args:
        src: B x C x H x W full-resolution tensor.
        size: (hs, ws) of the resized tensor.
        window: (y0, y1, x0, x1) in the resized tensor.

    Returns:
        B x C x (y1 - y0) x (x1 - x0); exactly ``src``'s pixels if ``size`` is its own size,
        otherwise equal to the full resize up to float rounding.
    """
    y0, y1, x0, x1 = window
    h, w = src.shape[-2:]
    if (h, w) == tuple(size):
        return src[..., y0:y1, x0:x1]
    out = src
    for dim, n_src, n_dst, a, b in ((2, h, size[0], y0, y1), (3, w, size[1], x0, x1)):
        scale = (n_src - 1) / (n_dst - 1) if n_dst > 1 else 0.0
        s0 = int(a * scale)
        s1 = min(int((b - 1) * scale) + 2, n_src)
        part = out.narrow(dim, s0, s1 - s0)
        out = resize_window_axis(part, dim, n_src, n_dst, s0, a, b - a)
    return out
