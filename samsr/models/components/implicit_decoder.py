"""CRM's implicit (LIIF-style) decoder: an MLP queried at continuous coordinates, local ensemble.

Coordinate convention (reference ``make_coord``): a pixel/cell ``(i, j)`` of an ``h x w`` grid has
centre ``(y, x) = (-1 + (2i + 1) / h, -1 + (2j + 1) / w)``; coordinates are stored **y first**
(``[..., 0]`` = row, ``[..., 1]`` = column) and flipped to ``(x, y)`` only for ``grid_sample``.
The cell of a query grid is ``(2 / H, 2 / W)``, the size of one query pixel in the same units.

Reference facts (dvlab-research/Entity, High-Quality-Segmention/models/network/crm.py and
crm_transferCoord_transferFeat.py, ``CRMNet.forward``):

* four shifts ``(vy, vx)`` in the order (-1,-1), (-1,+1), (+1,-1), (+1,+1) (row shift outer);
  shift = ``v * r + 1e-6`` with ``r = 2 / h / 2`` (rows) or ``2 / w / 2`` (cols), the ``+1e-6``
  added for both signs; the shifted coords are clamped to ``[-1 + 1e-6, 1 - 1e-6]``;
* the feature and the feature-cell centre are read with ``grid_sample(mode='nearest',
  align_corners=False)``; ``rel_coord = (query - centre) * (h, w)`` (unshifted query);
* MLP input = cat[feature (C), rel_coord (2), query coord (2), cell * (h, w) (2)] (C + 6 dims);
* area_k = ``|rel_y * rel_x| + 1e-9``; total = sum of the four; the areas are swapped 0<->3 and
  1<->2 (each prediction weighted by the diagonally opposite area), summed in shift order.

Here the nearest cell is found with ``grid_sample`` on tiny row/column index maps (the same
kernel and the same source-index arithmetic as sampling the feature map itself), then the
feature is gathered: bitwise the same selection as the reference, without sampling 258 channels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ImplicitDecoder", "crop_windows", "make_coord", "query_grid", "query_windows"]

_EPS_SHIFT = 1e-6  # ref eps_shift
_CLAMP = 1e-6  # ref coord_.clamp_(-1 + 1e-6, 1 - 1e-6)
_AREA_EPS = 1e-9  # ref areas.append(area + 1e-9)


def coord_seq(
    n: int, v0: float = -1.0, v1: float = 1.0, device: torch.device | str | None = None
) -> Tensor:
    """Centres of ``n`` equal cells spanning [v0, v1], float32 (one axis of :func:`make_coord`)."""
    r = (v1 - v0) / (2 * n)
    # same expression and float32 op order as the reference, so values match bit for bit
    return v0 + r + (2 * r) * torch.arange(n, device=device).float()


def make_coord(
    shape: Sequence[int],
    ranges: Sequence[tuple[float, float]] | None = None,
    flatten: bool = True,
    device: torch.device | str | None = None,
) -> Tensor:
    """Cell-centre coordinates of a grid, y first (reference ``make_coord``).

    Args:
        shape: grid size per axis, e.g. (h, w).
        ranges: per-axis (v0, v1); default (-1, 1) for every axis.
        flatten: return (prod(shape)) x D instead of shape x D.
        device: where to build the tensor.

    Returns:
        h x w x 2 (or h*w x 2, row-major) float32 coordinates, ``[..., 0]`` = y.
    """
    seqs = [
        coord_seq(n, *(ranges[i] if ranges is not None else (-1.0, 1.0)), device=device)
        for i, n in enumerate(shape)
    ]
    ret = torch.stack(torch.meshgrid(*seqs, indexing="ij"), dim=-1)
    if flatten:
        ret = ret.view(-1, ret.shape[-1])
    return ret


def query_grid(
    h: int, w: int, batch: int = 1, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Queries for every pixel of an h x w grid (reference ``to_pixel_samples`` + cell).

    Args:
        h: grid height.
        w: grid width.
        batch: batch size B.
        device: where to build the tensors.

    Returns:
        (coords, cell), both B x (h*w) x 2 float32 (expanded views, row-major pixel order):
        coords = pixel centres (y, x) in [-1, 1]; cell = (2 / h, 2 / w) for every query.
    """
    coords = make_coord((h, w), device=device).unsqueeze(0).expand(batch, h * w, 2)
    cell = torch.tensor([2 / h, 2 / w], dtype=torch.float32, device=device)
    return coords, cell.expand(batch, h * w, 2)


def query_windows(h: int, w: int, corners: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Queries for one window per sample of an h x w grid: the same coordinates and cell as
    :func:`query_grid`'s pixels there, so decoding them gives those pixels' logits.

    Args:
        h: grid height.
        w: grid width.
        corners: B x 2 int64 (row, col) of each window's top-left pixel.
        size: (wh, ww) window size, the same for every sample.

    Returns:
        (coords, cell), both B x (wh*ww) x 2 float32, row-major within each window.
    """
    wh, ww = size
    if corners.dim() != 2 or corners.shape[1] != 2:
        raise ValueError(f"corners must be B x 2 (row, col), got {tuple(corners.shape)}.")
    if (
        bool((corners < 0).any())
        or bool((corners[:, 0] + wh > h).any())
        or bool((corners[:, 1] + ww > w).any())
    ):
        raise ValueError(f"{wh}x{ww} windows at {corners.tolist()} do not fit a {h}x{w} grid.")
    dev = corners.device
    rows = corners[:, :1] + torch.arange(wh, device=dev)  # B x wh
    cols = corners[:, 1:] + torch.arange(ww, device=dev)  # B x ww
    ys = coord_seq(h, device=dev)[rows]
    xs = coord_seq(w, device=dev)[cols]
    b = corners.shape[0]
    coords = torch.stack(
        (ys[:, :, None].expand(b, wh, ww), xs[:, None, :].expand(b, wh, ww)), dim=-1
    ).reshape(b, wh * ww, 2)
    cell = torch.tensor([2 / h, 2 / w], dtype=torch.float32, device=dev)
    return coords, cell.expand(b, wh * ww, 2)


def crop_windows(t: Tensor, corners: Tensor, size: tuple[int, int]) -> Tensor:
    """B x C x wh x ww: sample i's window at ``corners[i]`` (row, col) of B x C x H x W ``t``
    (the pixels :func:`query_windows` queries)."""
    wh, ww = size
    return torch.stack(
        [t[i, :, y : y + wh, x : x + ww] for i, (y, x) in enumerate(corners.tolist())]
    )


def _scale_yx(t: Tensor, h: int, w: int) -> Tensor:
    """Multiplies ``t[..., 0]`` by h and ``t[..., 1]`` by w in place (``t`` must own its memory)."""
    t[..., 0] *= h
    t[..., 1] *= w
    return t


def _nearest_index(index_map: Tensor, grid: Tensor) -> Tensor:
    """Nearest-cell index along one axis with the reference's ``grid_sample`` arithmetic.

    Args:
        index_map: B x 1 x h x 1 (row indices) or B x 1 x 1 x w (column indices), float32.
        grid: B x 1 x N x 2 sampling grid, (x, y) order.

    Returns:
        B x N int64 indices.
    """
    out = F.grid_sample(index_map, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out[:, 0, 0, :].long()


def _gather(feat: Tensor, index: Tensor) -> Tensor:
    """Reads the feature vectors at flat cell indices.

    Args:
        feat: B x C x h x w (contiguous or channels_last).
        index: B x N int64 flat indices (row * w + col).

    Returns:
        B x N x C.
    """
    b, c = feat.shape[:2]
    n = index.shape[1]
    if not feat.is_contiguous() and feat.is_contiguous(memory_format=torch.channels_last):
        rows = feat.permute(0, 2, 3, 1).reshape(b, -1, c)  # a view: B x hw x C
        if b == 1:
            return rows[0].index_select(0, index[0]).unsqueeze(0)
        return torch.gather(rows, 1, index.unsqueeze(-1).expand(b, n, c))
    flat = feat.reshape(b, c, -1)
    if b == 1:
        return flat[0].index_select(1, index[0]).t().unsqueeze(0)
    return torch.gather(flat, 2, index.unsqueeze(1).expand(b, c, n)).transpose(1, 2)


def _window_index(
    iy: Tensor, ix: Tensor, y0: int, x0: int, th: int, tw: int
) -> tuple[Tensor, Tensor]:
    """Flat index into a th x tw window at (y0, x0) of full-map cell indices, clamped into the
    window, and whether any cell lay outside it (a 0-dim bool tensor)."""
    ly = iy - y0
    lx = ix - x0
    outside = (ly.min() < 0) | (ly.max() >= th) | (lx.min() < 0) | (lx.max() >= tw)
    return ly.clamp(0, th - 1) * tw + lx.clamp(0, tw - 1), outside


def _outside_error(th: int, tw: int, y0: int, x0: int) -> ValueError:
    return ValueError(
        f"queries read feature cells outside the window ({th}x{tw} at ({y0}, {x0})): "
        "the tile's feature margin is too small."
    )


class ImplicitDecoder(nn.Module):
    """Shared MLP decoding a logit at any continuous coordinate with a 4-cell local ensemble.

    Args:
        feat_dim: channels C of the feature map.
        hidden: hidden widths of the MLP (ReLU after each); input C + 6, output 1.
        factorized: compute the feature part of the first linear layer once per feature cell
            (a 1x1 convolution) and gather its ``hidden[0]`` outputs per query, instead of
            gathering C channels and applying the layer per query and neighbour. The same
            function with the same parameters (differences at float rounding, ~3e-8 on logits),
            about 1.8x faster training on CPU. ``False`` is the reference computation.
        residual: not in the reference (off by default). The feature map carries one more
            channel, a prior in [-1, 1] (CRM puts its input mask there, see
            :class:`samsr.models.crm.CRM`); it is read with the same 4-cell ensemble as the
            features and ``prior_scale * prior`` is added to the MLP's logit, so the MLP predicts
            a correction of the prior. The MLP's last layer starts at zero: an untrained model
            returns the prior's logit (the coarse mask, smoothed at stride 2).
        prior: where a residual decoder's prior comes from: ``"cell"`` (the feature map's last
            channel, read with the ensemble: the mask smoothed at stride 2, see above) or
            ``"pixel"`` (the input mask's value at each query pixel, passed to :meth:`forward`
            as ``prior``; the feature map carries no prior channel): the untrained model then
            returns the mask exactly, pixel for pixel.
        prior_scale: initial value of the learnt scale (5: a prior of +-1 gives p = 0.993/0.007).

    Attribute ``compiled`` (default False, an inference option: see
    :func:`samsr.inference.decoding.decoder_mode`) runs the query computation through
    ``torch.compile`` (one compilation with dynamic shapes; float rounding only).
    """

    def __init__(
        self,
        feat_dim: int = 256,
        hidden: Sequence[int] = (32, 32, 32, 32),
        factorized: bool = False,
        residual: bool = False,
        prior: str = "cell",
        prior_scale: float = 5.0,
    ) -> None:
        super().__init__()
        if prior not in ("cell", "pixel"):
            raise ValueError(f"residual_prior must be cell or pixel, got {prior!r}.")
        self.factorized = factorized
        self.compiled = False  # inference option: the ensemble through torch.compile
        self.residual = residual
        self.prior = prior
        layers: list[nn.Module] = []
        last = feat_dim + 6  # feature, rel_coord, coord, rel_cell (ref MLP in_dim=256+6)
        for width in hidden:
            layers += [nn.Linear(last, int(width)), nn.ReLU()]
            last = int(width)
        layers.append(nn.Linear(last, 1))
        self.mlp = nn.Sequential(*layers)
        self.feat_dim = feat_dim
        if residual:
            nn.init.zeros_(layers[-1].weight)
            nn.init.zeros_(layers[-1].bias)
            self.prior_scale = nn.Parameter(torch.tensor(float(prior_scale)))

    @property
    def in_channels(self) -> int:
        """Channels of the feature map it reads: the features, plus a cell prior's channel."""
        return self.feat_dim + int(self.cell_prior)

    @property
    def cell_prior(self) -> bool:
        """A residual decoder reading its prior from the feature map's last channel."""
        return self.residual and self.prior == "cell"

    @property
    def pixel_prior(self) -> bool:
        """A residual decoder whose prior is given per query (``forward(prior=...)``)."""
        return self.residual and self.prior == "pixel"

    def prepare(self, feat: Tensor) -> Tensor:
        """The map the queries read: ``feat`` itself, or its first-layer projection if factorized.

        Decoding many query chunks against one feature map, call this once and pass the result
        to :meth:`forward` with ``prepared=True``.

        Args:
            feat: B x C x h x w feature map (B x (C + 1) x h x w with the prior if residual).

        Returns:
            B x C x h x w (reference) or B x hidden[0] x h x w (factorized), plus the prior
            channel if residual.
        """
        if feat.shape[1] != self.in_channels:
            raise ValueError(f"Expected {self.in_channels} feature channels, got {feat.shape[1]}.")
        if not self.factorized:
            return feat
        first: nn.Linear = self.mlp[0]  # type: ignore[assignment]
        proj = F.conv2d(feat[:, : self.feat_dim], first.weight[:, : self.feat_dim, None, None])
        return (
            torch.cat([proj, feat[:, self.feat_dim :].to(proj.dtype)], 1)
            if self.cell_prior
            else proj
        )

    def forward(
        self,
        feat: Tensor,
        coords: Tensor,
        cell: Tensor,
        prepared: bool = False,
        window: tuple[int, int, int, int] | None = None,
        prior: Tensor | None = None,
    ) -> Tensor:
        """Decodes logits at the query coordinates.

        Args:
            feat: B x C x h x w feature map (or the output of :meth:`prepare` if ``prepared``).
            coords: B x N x 2 query centres, (y, x) in [-1, 1] (:func:`make_coord` convention).
            cell: B x N x 2 query cell size (2 / H, 2 / W) of the query grid.
            prepared: ``feat`` already went through :meth:`prepare`.
            window: ``(y0, x0, full_h, full_w)`` if ``feat`` holds only the rows ``y0 ...`` and
                columns ``x0 ...`` of a ``full_h x full_w`` map (tiled inference); coordinates
                refer to the full map, and every query's 4 cells must lie inside ``feat``.
            prior: B x N input-mask values in [-1, 1] at the queries (a ``"pixel"`` prior
                decoder needs it; the others refuse it).

        Returns:
            B x N logits.
        """
        if self.pixel_prior != (prior is not None):
            raise ValueError(
                "a residual decoder with prior='pixel' needs prior= (the mask at each query)"
                if self.pixel_prior
                else "prior= is only for a residual decoder with prior='pixel'"
            )
        if not prepared:
            feat = self.prepare(feat)
        b = feat.shape[0]
        if coords.dim() != 3 or coords.shape[0] != b or coords.shape[-1] != 2:
            raise ValueError(f"coords must be {b} x N x 2, got {tuple(coords.shape)}.")
        if cell.shape != coords.shape:
            raise ValueError(f"cell must match coords {tuple(coords.shape)}, got {cell.shape}.")
        if self.compiled:
            ret, outside = _compiled_ensemble()(self, feat, coords, cell, window, prior, False)
            if window is not None and bool(outside):
                raise _outside_error(*feat.shape[-2:], *window[:2])
            return ret
        return _ensemble(self, feat, coords, cell, window, prior, True)[0]


def _ensemble(
    dec: ImplicitDecoder,
    feat: Tensor,
    coords: Tensor,
    cell: Tensor,
    window: tuple[int, int, int, int] | None,
    prior: Tensor | None,
    check: bool,
) -> tuple[Tensor, Tensor]:
    """The local ensemble of :meth:`ImplicitDecoder.forward` on a prepared map.

    Returns (B x N logits, whether a query read a cell outside ``window``: 0-dim bool). With
    ``check`` that raises at once instead (eager mode: before reading out of range); the
    compiled path (no data-dependent branch) clamps the cells and lets the caller raise.
    """
    b, _, th, tw = feat.shape
    y0, x0, h, w = (0, 0, th, tw) if window is None else window
    c = dec.feat_dim
    n = coords.shape[1]
    dev, dt = coords.device, coords.dtype
    # the feature-cell centres (ref feat_coord = make_coord(feat.shape[-2:]))
    ys = coord_seq(h, device=dev)
    xs = coord_seq(w, device=dev)
    rows = torch.arange(h, device=dev, dtype=dt).view(1, 1, h, 1).expand(b, 1, h, 1)
    cols = torch.arange(w, device=dev, dtype=dt).view(1, 1, 1, w).expand(b, 1, 1, w)
    rel_cell = _scale_yx(cell.clone(), h, w)  # ref rel_cell = cell * (h, w)
    rx = 2 / h / 2  # ref rx: half a feature cell along y (index 0)
    ry = 2 / w / 2  # ref ry: half a feature cell along x (index 1)

    # factorized: feat holds the first layer's feature term, once per cell (B x hidden0)
    first: nn.Linear = dec.mlp[0]  # type: ignore[assignment]
    rest = dec.mlp[1:]

    preds: list[Tensor] = []
    areas: list[Tensor] = []
    priors: list[Tensor] = []
    outside = torch.zeros((), dtype=torch.bool, device=dev)
    for vx in (-1, 1):  # ref: vx shifts coord[..., 0] (y), outer loop
        for vy in (-1, 1):  # ref: vy shifts coord[..., 1] (x), inner loop
            shifted = coords.clone()  # Python-scalar ops: no host-to-device copies
            shifted[..., 0] += vx * rx + _EPS_SHIFT
            shifted[..., 1] += vy * ry + _EPS_SHIFT
            shifted.clamp_(-1 + _CLAMP, 1 - _CLAMP)
            grid = shifted.flip(-1).unsqueeze(1)  # B x 1 x N x (x, y) for grid_sample
            iy = _nearest_index(rows, grid)
            ix = _nearest_index(cols, grid)
            if window is None:
                q_feat = _gather(feat, iy * w + ix)  # == grid_sample(feat, nearest)
            else:
                index, out = _window_index(iy, ix, y0, x0, th, tw)
                if check and bool(out):
                    raise _outside_error(th, tw, y0, x0)
                outside = outside | out
                q_feat = _gather(feat, index)
            if dec.cell_prior:  # the prior travels as the last channel
                priors.append(q_feat[..., -1])
                q_feat = q_feat[..., :-1]
            q_coord = torch.stack((ys[iy], xs[ix]), dim=-1)  # == grid_sample(feat_coord)
            rel_coord = _scale_yx(coords - q_coord, h, w)  # ref: (coord - q_coord) * (h, w)
            if dec.factorized:
                geo = torch.cat([rel_coord, coords, rel_cell], dim=-1)
                hid = q_feat + F.linear(geo, first.weight[:, c:], first.bias)
                preds.append(rest(hid.reshape(b * n, -1)).view(b, n))
            else:
                inp = torch.cat([q_feat, rel_coord, coords, rel_cell], dim=-1)  # ref order
                preds.append(dec.mlp(inp.view(b * n, -1)).view(b, n))
            areas.append(torch.abs(rel_coord[..., 0] * rel_coord[..., 1]) + _AREA_EPS)

    tot_area = torch.stack(areas).sum(dim=0)
    # ref local ensemble: areas swapped 0<->3, 1<->2 (each prediction weighted by the area of
    # the diagonally opposite cell), accumulated in shift order
    weights = areas[::-1]
    ret = preds[0] * (weights[0] / tot_area)
    for pred, area in zip(preds[1:], weights[1:]):
        ret = ret + pred * (area / tot_area)
    if dec.cell_prior:  # the prior, interpolated with the same weights
        prior = sum(q.float() * (area / tot_area) for q, area in zip(priors, weights))
    if dec.residual:
        ret = ret + dec.prior_scale * prior.float()
    return ret, outside


@functools.cache
def _compiled_ensemble() -> Callable[..., tuple[Tensor, Tensor]]:
    """:func:`_ensemble` through ``torch.compile`` (inductor, dynamic shapes: one compilation
    for every chunk, tile and scale size), built on first use."""
    return torch.compile(_ensemble, dynamic=True)
