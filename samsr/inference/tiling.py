"""Tiles for bounded-memory inference: which input pixels to encode for which query pixels.

A tile owns a rectangle of the padded full-resolution query grid (its *core*). Its queries read
the feature cells ``[a - 1, b + 1)`` around the core's cells ``[a, b)`` (the decoder's local
ensemble), and those features are computed from an input window grown by the halo (rounded to
multiples of 8, the encoder's total stride, so that the tile's feature grid is the full one's).
The halo is the encoder's context only: the fusion, as costly as the ResNet-50 trunk per pixel
(a 3x3 conv of 256 channels at stride 2), runs on the read cells (``Tile.cells``) alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from samsr.models.components.fusion import resize_window_axis

__all__ = ["Tile", "plan_region_tiles", "plan_tiles", "region_cells", "scaled_window"]

_ALIGN = 8  # total stride of the encoder levels (2, 4, 8)
_CELLS = _ALIGN // 2  # feature cells (stride 2) per alignment step


@dataclass(frozen=True)
class Tile:
    """One tile at one scale.

    Attributes:
        q: (y0, y1, x0, x1) core in the padded full-resolution query grid.
        x: (y0, y1, x0, x1) input window at this scale (y0, x0 multiples of 8).
        cells: (y0, y1, x0, x1) feature cells (stride 2 of this scale's input, in the full
            map) that the core's queries read: the core's cells and one more on each side.
            Only these of the window's fused features are needed.
    """

    q: tuple[int, int, int, int]
    x: tuple[int, int, int, int]
    cells: tuple[int, int, int, int]


def _first_query(cell: int, n_query: int, n_feat: int) -> int:
    """First query index whose containing feature cell is >= ``cell``.

    Query i's centre lies in cell floor((2i + 1) * n_feat / (2 * n_query)).
    """
    num = 2 * cell * n_query - n_feat
    return min(max(0, -((-num) // (2 * n_feat))), n_query)


_Span = tuple[int, int, int, int, int, int]


def _span(a: int, b: int, n_query: int, n_in: int, halo_f: int) -> _Span:
    """(query start, query end, input start, input end, read start, read end) of the feature
    cells ``[a, b)``: the read range is the cells the queries' local ensemble reads."""
    n_feat = (n_in - 1) // 2 + 1
    q0, q1 = _first_query(a, n_query, n_feat), _first_query(b, n_query, n_feat)
    if b == n_feat:
        q1 = n_query
    f0, f1 = max(a - 1 - halo_f, 0), min(b + 1 + halo_f, n_feat)
    x0 = (2 * f0) // _ALIGN * _ALIGN
    x1 = min(-(-(2 * f1) // _ALIGN) * _ALIGN, n_in)
    return q0, q1, x0, x1, max(a - 1, 0), min(b + 1, n_feat)


def _core_cells(tile: int) -> int:
    """Feature cells per tile side: ``tile`` input px, a multiple of 4 cells (8 px)."""
    return max(tile // 2 // _CELLS * _CELLS, _CELLS)


def _cell_ranges(n_in: int, tile: int) -> list[tuple[int, int]]:
    """The regular grid's feature-cell ranges ``[a, b)`` along one axis."""
    n_feat = (n_in - 1) // 2 + 1
    core = _core_cells(tile)
    return [(a, min(a + core, n_feat)) for a in range(0, n_feat, core)]


def _tile(ry: _Span, rx: _Span) -> Tile:
    return Tile((ry[0], ry[1], rx[0], rx[1]), (ry[2], ry[3], rx[2], rx[3]), (*ry[4:], *rx[4:]))


def _axis(n_query: int, n_in: int, tile: int, halo: int) -> list[_Span]:
    """:func:`_span` of every tile along one axis."""
    halo_f = -(-halo // 2)
    spans = [_span(a, b, n_query, n_in, halo_f) for a, b in _cell_ranges(n_in, tile)]
    return [span for span in spans if span[1] > span[0]]


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
    return [_tile(r, c) for r in rows for c in cols]


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


def _cell_index(n_query: int, n_feat: int, device: torch.device) -> Tensor:
    """The feature cell holding each query's centre along one axis (int64, n_query)."""
    i = torch.arange(n_query, device=device)
    return torch.div((2 * i + 1) * n_feat, 2 * n_query, rounding_mode="floor").clamp_(
        max=n_feat - 1
    )


def region_cells(region: Tensor, input_size: tuple[int, int], band_rows: int = 256) -> Tensor:
    """Which feature cells (stride 2 of the scale's input) hold a query of ``region``.

    Args:
        region: Hp x Wp bool mask of the padded full-resolution query grid.
        input_size: (hs, ws) of the encoder input at this scale.
        band_rows: query rows reduced at a time (bounds the temporary).

    Returns:
        ceil(hs / 2) x ceil(ws / 2) bool occupancy.
    """
    hq, wq = region.shape
    nf_h, nf_w = ((n - 1) // 2 + 1 for n in input_size)
    cy = _cell_index(hq, nf_h, region.device)
    cx = _cell_index(wq, nf_w, region.device)
    rows = torch.zeros((nf_h, wq), dtype=torch.int32, device=region.device)
    for r0 in range(0, hq, band_rows):
        r1 = min(r0 + band_rows, hq)
        rows.index_add_(0, cy[r0:r1], region[r0:r1].to(torch.int32))
    cells = torch.zeros((nf_h, nf_w), dtype=torch.int32, device=region.device)
    cells.index_add_(1, cx, rows)
    return (cells > 0).cpu()


def _shrink(occ: Tensor, a: int, b: int, dim: int) -> tuple[int, int] | None:
    """The occupied range of ``occ`` along ``dim``, aligned outward to whole steps, in [a, b)."""
    hit = torch.nonzero(occ.any(dim=1 - dim)).flatten()
    if hit.numel() == 0:
        return None
    lo = a + int(hit[0]) // _CELLS * _CELLS
    hi = min(a + -(-(int(hit[-1]) + 1) // _CELLS) * _CELLS, b)
    return lo, hi


def plan_region_tiles(
    query_size: tuple[int, int],
    input_size: tuple[int, int],
    tile: int,
    halo: int,
    region: Tensor,
    min_tile: int,
) -> list[Tile]:
    """Tiles covering only ``region``, each as small as pays off with its halo.

    Every tile of the regular grid (:func:`plan_tiles`) is the root of a quadtree over its
    feature cells: a node is cut to the bounding box of the region cells it holds (empty nodes
    are dropped) and split into quadrants, down to ``min_tile`` input pixels, whenever the
    quadrants' input windows (core + halo, clipped to the image) add up to fewer pixels than its
    own. So the plan never encodes more pixels than the grid's tiles that hold region pixels.
    The cores of the returned tiles are disjoint and hold every query of ``region``; queries
    outside them are not decoded.

    Args:
        query_size: (Hp, Wp) of the padded full-resolution query grid.
        input_size: (hs, ws) of the encoder input at this scale.
        tile: the largest tile side in input pixels (bounds memory).
        halo: input pixels of context on each side.
        region: Hp x Wp bool, the queries to decode.
        min_tile: the smallest tile side in input pixels.

    Returns:
        The tiles, grid tile by grid tile.
    """
    occ = region_cells(region, input_size)
    min_core = _core_cells(min_tile)
    halo_f = -(-halo // 2)
    (hq, wq), (hs, ws) = query_size, input_size

    def tile_of(ay: int, by: int, ax: int, bx: int) -> Tile:
        return _tile(_span(ay, by, hq, hs, halo_f), _span(ax, bx, wq, ws, halo_f))

    def area(t: Tile) -> int:
        return (t.x[1] - t.x[0]) * (t.x[3] - t.x[2])

    def halves(a: int, b: int) -> list[tuple[int, int]]:
        mid = a + max((b - a) // 2 // _CELLS, 1) * _CELLS
        return [(a, mid), (mid, b)] if b - a > min_core and mid < b else [(a, b)]

    def best(ay: int, by: int, ax: int, bx: int) -> tuple[int, list[Tile]]:
        sub = occ[ay:by, ax:bx]
        ys, xs = _shrink(sub, ay, by, 0), _shrink(sub, ax, bx, 1)
        if ys is None or xs is None:
            return 0, []
        (ay, by), (ax, bx) = ys, xs
        own = tile_of(ay, by, ax, bx)
        parts = [(y, x) for y in halves(ay, by) for x in halves(ax, bx)]
        if len(parts) > 1:
            cost, tiles = 0, []
            for (y0, y1), (x0, x1) in parts:
                c, t = best(y0, y1, x0, x1)
                cost, tiles = cost + c, tiles + t
            if cost < area(own):
                return cost, tiles
        return area(own), [own]

    plan = []
    for ay, by in _cell_ranges(hs, tile):
        for ax, bx in _cell_ranges(ws, tile):
            plan += best(ay, by, ax, bx)[1]
    return [t for t in plan if t.q[1] > t.q[0] and t.q[3] > t.q[2]]
