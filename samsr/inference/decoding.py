"""Decoding CRM's implicit decoder over the padded full-resolution query grid: every pixel in
row-major chunks (:func:`decode_full`, the reference), or arbitrary pixels (:class:`PixelDecoder`,
for the region and strided options of the cascade)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from samsr.models.components.implicit_decoder import coord_seq
from samsr.models.crm import CRM

__all__ = ["PixelDecoder", "decode_full", "decoder_mode"]


def decode_full(
    model: CRM,
    feat: Tensor,
    out_size: tuple[int, int],
    chunk_size: int,
    out: Tensor | None = None,
    prior: Tensor | None = None,
) -> Tensor:
    """Decodes the probability of every pixel of an ``out_size`` grid, ``chunk_size`` at a time.

    Args:
        model: the CRM.
        feat: 1 x C x h x w features.
        out_size: (H, W) of the query grid (the padded full resolution).
        chunk_size: queries per decoder call.
        out: optional preallocated 1 x 1 x H x W float32 buffer to write into.
        prior: 1 x 1 x H x W normalised mask ([-1, 1]) for a pixel-prior decoder, else None.

    Returns:
        1 x 1 x H x W probability (``out`` if given).
    """
    h, w = out_size
    device = feat.device
    if out is None:
        out = torch.empty((1, 1, h, w), dtype=torch.float32, device=device)
    flat = out.view(-1)
    ys = coord_seq(h, device=device)  # ref make_coord((Hp, Wp)) rows
    xs = coord_seq(w, device=device)  # ref make_coord((Hp, Wp)) cols
    cell_value = torch.tensor([2 / h, 2 / w], dtype=torch.float32, device=device)  # ref cell
    total = h * w
    feat = model.decoder.prepare(feat)  # once per scale, not once per chunk
    prior_flat = None if prior is None else prior.reshape(-1)
    for start in range(0, total, chunk_size):
        stop = min(start + chunk_size, total)
        index = torch.arange(start, stop, device=device)
        coords = torch.stack((ys[index // w], xs[index % w]), dim=-1).unsqueeze(0)
        cell = cell_value.expand(1, stop - start, 2)
        chunk_prior = None if prior_flat is None else prior_flat[start:stop].unsqueeze(0)
        logits = model.decode(feat, coords, cell, prepared=True, prior=chunk_prior)
        flat[start:stop] = torch.sigmoid(logits[0])  # ref pred_224 = sigmoid(ret)
    return out


class PixelDecoder:
    """Decodes the probability of arbitrary pixels of the padded full-resolution grid.

    Args:
        model: the CRM.
        feat: 1 x C x h x w features (the whole map, or a window of it).
        grid_size: (Hp, Wp) of the query grid.
        chunk_size: queries per decoder call.
        window: ``(y0, x0, full_h, full_w)`` if ``feat`` is a window of the full feature map.
        offset: (row, col) added to the pixel indices passed to :meth:`__call__`.
        prior: 1 x 1 x Hp x Wp normalised mask ([-1, 1]) for a pixel-prior decoder, else None.
    """

    def __init__(
        self,
        model: CRM,
        feat: Tensor,
        grid_size: tuple[int, int],
        chunk_size: int,
        window: tuple[int, int, int, int] | None = None,
        offset: tuple[int, int] = (0, 0),
        prior: Tensor | None = None,
    ) -> None:
        self.model = model
        self.prior = None if prior is None else prior[0, 0]
        self.feat = model.decoder.prepare(feat).contiguous()  # once, not once per chunk
        h, w = grid_size
        dev = feat.device
        self.ys = coord_seq(h, device=dev)  # ref make_coord((Hp, Wp)) rows
        self.xs = coord_seq(w, device=dev)
        self.cell = torch.tensor([2 / h, 2 / w], dtype=torch.float32, device=dev)  # ref cell
        self.chunk_size = chunk_size
        self.window = window
        self.offset = offset
        self.count = 0

    def __call__(self, ys: Tensor, xs: Tensor) -> Tensor:
        """Probabilities (float32, N) at pixel rows ``ys`` and columns ``xs`` (int64, N)."""
        n = ys.numel()
        out = torch.empty(n, dtype=torch.float32, device=ys.device)
        oy, ox = self.offset
        for s in range(0, n, self.chunk_size):
            e = min(s + self.chunk_size, n)
            rows, cols = ys[s:e] + oy, xs[s:e] + ox
            coords = torch.stack((self.ys[rows], self.xs[cols]), dim=-1)
            cell = self.cell.expand(1, e - s, 2)
            prior = None if self.prior is None else self.prior[rows, cols].unsqueeze(0)
            logits = self.model.decode(
                self.feat, coords.unsqueeze(0), cell, prepared=True, window=self.window, prior=prior
            )
            out[s:e] = torch.sigmoid(logits[0])
        self.count += n
        return out


@contextmanager
def decoder_mode(model: CRM, factorized: bool | None, compiled: bool = False) -> Iterator[None]:
    """Temporarily sets the decoder's factorized flag (None: leave it) and whether its query
    computation runs through ``torch.compile``."""
    decoder = model.decoder
    old = decoder.factorized, decoder.compiled
    if factorized is not None:
        decoder.factorized = bool(factorized)
    decoder.compiled = bool(compiled)
    try:
        yield
    finally:
        decoder.factorized, decoder.compiled = old
