"""CRM's multi-level feature fusion (the reference's ``ASPP_no4level``, no atrous convs).

Reference facts (dvlab-research/Entity, High-Quality-Segmention/models/network/aspp.py):

* per level: ``_ASPPModule`` = 1x1 conv (no bias) + BN + ReLU, then a second BN + ReLU + Dropout
  (``bn1_128`` / ``bn1_256`` / ``bn1_1024``), i.e. conv -> BN -> ReLU -> BN -> ReLU -> Dropout;
* the stride-4 and stride-8 maps are upsampled to the conv1 (stride-2) size with bilinear
  interpolation, ``align_corners=True``, and concatenated in level order (64 + 64 + 128);
* ``last_conv`` = 3x3 conv 256->256 (padding 1, no bias) + BN + ReLU + Dropout(0.5);
* init: conv weights ``kaiming_normal_`` (fan_in), BN weight 1 / bias 0.

Memory (thesis 3.1): the reference materialises the upsampled levels, their concatenation and
the fuse conv's output, all at stride 2 with 256 channels: about three full-size 256-channel maps
at once. :meth:`Fusion.forward_patched` writes every level straight into one preallocated
concatenation and then runs the 3x3 conv in row patches whose output overwrites the rows it has
consumed (the one input row the next patch still needs is kept aside): one full-size map, the
same numbers (the patch convolution sees exactly the rows and zero padding of the full one).
:meth:`Fusion.forward_window` fuses a tile of the encoder output, upsampling with the full map's
sampling positions so that tiles line up with the untiled result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Fusion", "interp_matrix", "resize_window", "resize_window_axis"]


class _Branch(nn.Module):
    """1x1 conv + BN + ReLU + BN + ReLU + Dropout on one encoder level."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)  # ref _ASPPModule.bn
        self.bn2 = nn.BatchNorm2d(out_channels)  # ref bn1_<in_channels>
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv(x)))
        return self.dropout(self.relu(self.bn2(x)))


class Fusion(nn.Module):
    """Projects the three encoder levels, upsamples them to stride 2, concatenates and fuses.

    Args:
        in_channels: channels of the (conv1, layer1, layer3) encoder features.
        branch_channels: output channels of the per-level 1x1 projections (sum = fuse input).
        out_channels: channels of the fused feature map.
        dropout: dropout probability after every projection and after the fuse conv.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (64, 256, 1024),
        branch_channels: Sequence[int] = (64, 64, 128),
        out_channels: int = 256,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(branch_channels):
            raise ValueError(
                f"in_channels {tuple(in_channels)} and branch_channels "
                f"{tuple(branch_channels)} must have the same length."
            )
        self.branches = nn.ModuleList(
            _Branch(c_in, c_out, dropout) for c_in, c_out in zip(in_channels, branch_channels)
        )
        concat_channels = sum(branch_channels)
        self.fuse_conv = nn.Conv2d(concat_channels, out_channels, 3, padding=1, bias=False)
        self.fuse_bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.concat_channels = concat_channels
        self.out_channels = out_channels
        for m in self.modules():  # ref aspp.py _init_weight
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def concat(self, feats: Sequence[Tensor]) -> Tensor:
        """Projects every level and concatenates them at the first level's size.

        Args:
            feats: (f1, f2, f3) encoder features, f1 the largest (B x C1 x h x w).

        Returns:
            B x sum(branch_channels) x h x w.
        """
        if len(feats) != len(self.branches):
            raise ValueError(f"Expected {len(self.branches)} feature maps, got {len(feats)}.")
        maps = [branch(f) for branch, f in zip(self.branches, feats)]
        size = maps[0].shape[-2:]
        # ref: F.interpolate(..., size=x_1.size()[2:], mode='bilinear', align_corners=True)
        maps = [maps[0]] + [
            F.interpolate(m, size=size, mode="bilinear", align_corners=True) for m in maps[1:]
        ]
        return torch.cat(maps, dim=1)

    def fuse(self, concat: Tensor) -> Tensor:
        """3x3 conv + BN + ReLU + Dropout on the concatenation (runnable on spatial patches).

        Args:
            concat: B x concat_channels x h x w.

        Returns:
            B x out_channels x h x w.
        """
        return self.dropout(self.relu(self.fuse_bn(self.fuse_conv(concat))))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Fuses (f1, f2, f3) into B x out_channels x h x w at f1's size (stride 2)."""
        return self.fuse(self.concat(feats))

    def forward_patched(self, feats: list[Tensor], patch_rows: int) -> Tensor:
        """Same as :meth:`forward` (inference), with one full-size map instead of about three.

        Args:
            feats: [f1, f2, f3] encoder features; **the list is emptied** so that each level can
                be freed as soon as it has been used.
            patch_rows: rows of the stride-2 map per fuse-conv patch (> 0).

        Returns:
            B x out_channels x h x w, equal to ``forward(feats)`` in eval mode.
        """
        if patch_rows <= 0:
            raise ValueError(f"patch_rows must be > 0, got {patch_rows}.")
        if len(feats) != len(self.branches):
            raise ValueError(f"Expected {len(self.branches)} feature maps, got {len(feats)}.")
        levels = list(feats)
        feats.clear()
        buf: Tensor | None = None
        c0 = 0
        size = levels[0].shape[-2:]
        for i, branch in enumerate(self.branches):
            m = branch(levels[i])
            levels[i] = m[:0]  # drop the encoder level (and keep nothing large alive)
            if buf is None:
                b = m.shape[0]
                fmt = _memory_format(m)
                buf = torch.empty(
                    (b, self.concat_channels, *size),
                    dtype=m.dtype,
                    device=m.device,
                    memory_format=fmt,
                )
            c1 = c0 + m.shape[1]
            dst = buf[:, c0:c1]
            if i == 0:
                dst.copy_(m)
            elif dst.is_contiguous():  # ref: bilinear, align_corners=True, written in place
                torch._C._nn.upsample_bilinear2d(m, list(size), True, None, None, out=dst)
            else:
                dst.copy_(F.interpolate(m, size=size, mode="bilinear", align_corners=True))
            del m, dst
            c0 = c1
        assert buf is not None
        return self._fuse_rows(buf, patch_rows)

    def _fuse_rows(self, concat: Tensor, patch_rows: int) -> Tensor:
        """:meth:`fuse` in row patches, overwriting ``concat`` when the channel counts allow."""
        b, c, h, w = concat.shape
        in_place = c == self.out_channels
        out = concat if in_place else concat.new_empty((b, self.out_channels, h, w))
        zero_row = concat.new_zeros((b, c, 1, w))
        above = zero_row  # the input row just above the current patch
        for a in range(0, h, patch_rows):
            e = min(a + patch_rows, h)
            below = concat[:, :, e : e + 1] if e < h else zero_row
            x = torch.cat([above, concat[:, :, a:e], below], dim=2)
            if e < h:
                above = concat[:, :, e - 1 : e].clone()  # needed by the next patch
            # rows padded explicitly; the bias is None unless BatchNorm was folded into it
            y = F.conv2d(x, self.fuse_conv.weight, self.fuse_conv.bias, 1, (0, 1))
            del x
            out[:, :, a:e] = self.dropout(self.relu(self.fuse_bn(y)))
            del y
        return out

    def forward_window(
        self,
        feats: Sequence[Tensor],
        offsets: Sequence[tuple[int, int]],
        full_sizes: Sequence[tuple[int, int]],
        patch_rows: int = 0,
    ) -> Tensor:
        """Fuses a window (tile) of the encoder levels as if the whole map were fused.

        Args:
            feats: (f1, f2, f3) features of the tile.
            offsets: (row, col) of each level's window in its full map.
            full_sizes: (h, w) of each level's full map.
            patch_rows: > 0 runs the fuse conv in row patches in place (as
                :meth:`forward_patched`).

        Returns:
            B x out_channels x h1 x w1 over f1's window (rows/cols near the window's outer edge
            differ from the untiled map; tiles carry a halo for that).
        """
        if len(feats) != len(self.branches):
            raise ValueError(f"Expected {len(self.branches)} feature maps, got {len(feats)}.")
        oy, ox = offsets[0]
        full_h1, full_w1 = full_sizes[0]
        h1, w1 = feats[0].shape[-2:]
        buf: Tensor | None = None
        c0 = 0
        for i, (branch, f) in enumerate(zip(self.branches, feats)):
            m = branch(f)
            if i > 0:
                m = resize_window(m, full_sizes[i], full_sizes[0], offsets[i], (oy, ox), (h1, w1))
            if buf is None:
                shape = (m.shape[0], self.concat_channels, h1, w1)
                buf = m.new_empty(shape).contiguous(memory_format=_memory_format(m))
            buf[:, c0 : c0 + m.shape[1]] = m
            c0 += m.shape[1]
            del m
        assert buf is not None
        return self._fuse_rows(buf, patch_rows) if patch_rows > 0 else self.fuse(buf)

    def crop_window(
        self,
        feats: Sequence[Tensor],
        offsets: Sequence[tuple[int, int]],
        full_sizes: Sequence[tuple[int, int]],
        cells: tuple[int, int, int, int],
    ) -> tuple[list[Tensor], list[tuple[int, int]], tuple[int, int, int, int]]:
        """The parts of a window's levels that the fused ``cells`` depend on.

        A tile's halo is the encoder's context; its fused features are read only near the
        tile's core. The fused map at ``cells`` needs the concatenation one cell further (the
        3x3 fuse conv), i.e. those cells of f1 and the rows/cols of f2, f3 that the bilinear
        upsampling reads for them. Fusing the crops gives the window's values at ``cells``.

        Args:
            feats: (f1, f2, f3) of the window, as for :meth:`forward_window`.
            offsets: (row, col) of each level's window in its full map.
            full_sizes: (h, w) of each level's full map.
            cells: (y0, y1, x0, x1) wanted cells of the full f1-sized map.

        Returns:
            (cropped levels, their offsets, (r0, r1, c0, c1)): the wanted cells, clipped to the
            window, as rows/cols of the fused crop.
        """
        (oy, ox), (h1, w1) = offsets[0], feats[0].shape[-2:]
        (fh, fw) = full_sizes[0]
        y0, y1 = max(cells[0], oy), min(cells[1], oy + h1)
        x0, x1 = max(cells[2], ox), min(cells[3], ox + w1)
        if y0 >= y1 or x0 >= x1:
            raise ValueError(f"cells {cells} lie outside the window ({h1}x{w1} at ({oy}, {ox})).")
        cy0, cy1 = max(y0 - 1, oy), min(y1 + 1, oy + h1)  # the fuse conv's ring
        cx0, cx1 = max(x0 - 1, ox), min(x1 + 1, ox + w1)
        out_feats, out_offsets = [], []
        for i, f in enumerate(feats):
            (ly, lx), (n_h, n_w) = offsets[i], f.shape[-2:]
            if i == 0:
                ry, rx = (cy0, cy1), (cx0, cx1)
            else:
                ry = _source_span(cy0, cy1, full_sizes[i][0], fh, ly, n_h)
                rx = _source_span(cx0, cx1, full_sizes[i][1], fw, lx, n_w)
            out_feats.append(f[..., ry[0] - ly : ry[1] - ly, rx[0] - lx : rx[1] - lx])
            out_offsets.append((ry[0], rx[0]))
        return out_feats, out_offsets, (y0 - cy0, y1 - cy0, x0 - cx0, x1 - cx0)


def _source_span(a: int, b: int, full_in: int, full_out: int, off: int, n: int) -> tuple[int, int]:
    """Input rows of a window (``n`` rows at ``off``) that :func:`resize_window_axis` reads for
    output rows ``[a, b)`` of the full map, one more on each side against float rounding."""
    scale = (full_in - 1) / (full_out - 1) if full_out > 1 else 0.0
    lo = math.floor(a * scale) - 1
    hi = math.floor((b - 1) * scale) + 3
    return max(lo, off), min(hi, off + n)


def _memory_format(x: Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return (
        torch.channels_last if channels_last and not x.is_contiguous() else torch.contiguous_format
    )


def interp_matrix(
    full_in: int, full_out: int, in_offset: int, out_offset: int, out_len: int, n: int
) -> Tensor:
    """The ``out_len x n`` weights of :func:`resize_window_axis` as a matrix (float32, CPU).

    Row ``d`` holds the two bilinear weights (align_corners=True, full-map positions) of output
    ``out_offset + d`` on the window's ``n`` inputs from ``in_offset`` (clamped to the window).
    """
    scale = (full_in - 1) / (full_out - 1) if full_out > 1 else 0.0
    dst = torch.arange(out_offset, out_offset + out_len, dtype=torch.float32)
    src = dst * torch.tensor(scale, dtype=torch.float32)
    i0 = src.floor().clamp_(max=full_in - 1)
    lam = src - i0
    i0 = i0.long()
    i1 = (i0 + 1).clamp_(max=full_in - 1)
    i0 = (i0 - in_offset).clamp_(0, n - 1)
    i1 = (i1 - in_offset).clamp_(0, n - 1)
    rows = torch.arange(out_len)
    m = torch.zeros(out_len, n)
    m.index_put_((rows, i0), 1 - lam, accumulate=True)
    m.index_put_((rows, i1), lam, accumulate=True)
    return m


def resize_window(
    x: Tensor,
    full_in: tuple[int, int],
    full_out: tuple[int, int],
    in_offset: tuple[int, int],
    out_offset: tuple[int, int],
    out_size: tuple[int, int],
) -> Tensor:
    """Bilinear (align_corners=True) resize of a window of a full map, both axes.

    The same values as :func:`resize_window_axis` along each axis (up to float rounding: the
    weights are applied as two small matrix products, several times faster on a CPU than
    gathering rows and columns).

    Args:
        x: B x C x n_h x n_w, the input window (channels-last is the fast layout).
        full_in: (h, w) of the full input map.
        full_out: (h, w) of the full output map.
        in_offset: (row, col) of the window in the full input map.
        out_offset: (row, col) of the wanted output window in the full output map.
        out_size: (rows, cols) of the output window.

    Returns:
        B x C x rows x cols, channels-last.
    """
    b, c, n_h, n_w = x.shape
    (out_h, out_w), opts = out_size, {"dtype": x.dtype, "device": x.device}
    m_y = interp_matrix(full_in[0], full_out[0], in_offset[0], out_offset[0], out_h, n_h)
    m_x = interp_matrix(full_in[1], full_out[1], in_offset[1], out_offset[1], out_w, n_w)
    rows = torch.matmul(m_x.to(**opts), x.permute(0, 2, 3, 1))  # B x n_h x out_w x C
    out = torch.matmul(m_y.to(**opts), rows.reshape(b, n_h, out_w * c))
    return out.view(b, out_h, out_w, c).permute(0, 3, 1, 2)


def resize_window_axis(
    x: Tensor, dim: int, full_in: int, full_out: int, in_offset: int, out_offset: int, out_len: int
) -> Tensor:
    """Bilinear (align_corners=True) resize along one axis of a window of a full map.

    Output index ``d`` of the full map samples input position ``d * (full_in - 1) /
    (full_out - 1)``, as ``F.interpolate`` does on the full map; the window holds input rows
    ``in_offset ...`` and output rows ``out_offset ... out_offset + out_len``. Positions outside
    the input window are clamped to its edge.

    Args:
        x: tensor whose axis ``dim`` is the input window.
        dim: the axis to resize.
        full_in: size of the full input axis.
        full_out: size of the full output axis.
        in_offset: the input window's start in the full input axis.
        out_offset: the output window's start in the full output axis.
        out_len: output window length.

    Returns:
        ``x`` with axis ``dim`` of length ``out_len``.
    """
    n = x.shape[dim]
    scale = (full_in - 1) / (full_out - 1) if full_out > 1 else 0.0
    dst = torch.arange(out_offset, out_offset + out_len, device=x.device, dtype=torch.float32)
    src = dst * torch.tensor(scale, dtype=torch.float32)
    i0 = src.floor().clamp_(max=full_in - 1)
    lam = (src - i0).to(x.dtype)
    i0 = i0.long()
    i1 = (i0 + 1).clamp_(max=full_in - 1)
    i0 = (i0 - in_offset).clamp_(0, n - 1)
    i1 = (i1 - in_offset).clamp_(0, n - 1)
    shape = [1] * x.dim()
    shape[dim] = out_len
    lam = lam.view(shape)
    lead = (slice(None),) * dim  # advanced indexing: far faster than index_select on the
    a = x[(*lead, i0)]  # last dim of large CPU tensors
    return torch.lerp(a, x[(*lead, i1)], lam)
