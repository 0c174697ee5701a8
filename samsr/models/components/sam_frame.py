"""Geometry between a network input and SAM's token grid (SAM-SR v3).

SAM encodes an image resized so that its long side is ``img_size`` (1024; ``ResizeLongestSide``),
normalised with SAM's pixel statistics and zero-padded at the bottom/right to a square. The
encoder's ``img_size / patch`` tokens per side (64 x 64) cover that square; only the top-left
``ceil(new_h / patch) x ceil(new_w / patch)`` tokens see the image (the *valid grid*), the rest see
padding and are dropped.

A :class:`Frame` tells where a network input (a training crop, or one cascade scale of the padded
high-resolution image) lies in the encoded image, so that the token features can be sampled at
every feature-map cell: per-crop encoding uses :meth:`Frame.identity`, the cascade
:meth:`Frame.cascade`. All coordinates are continuous pixel-edge coordinates (pixel ``i`` spans
``[i, i + 1)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SAM_PIXEL_MEAN",
    "SAM_PIXEL_STD",
    "Frame",
    "mask_to_token_frame",
    "resized_size",
    "sam_preprocess",
    "sample_tokens",
    "valid_grid",
]

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)  # segment_anything Sam.pixel_mean (0-255 scale)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)  # segment_anything Sam.pixel_std


def resized_size(h: int, w: int, img_size: int) -> tuple[int, int]:
    """SAM's resized size: long side ``img_size`` (``ResizeLongestSide.get_preprocess_shape``)."""
    scale = img_size / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def valid_grid(h: int, w: int, img_size: int, patch: int) -> tuple[int, int]:
    """Tokens per axis that see an ``h x w`` image (the rest of the square grid sees padding)."""
    nh, nw = resized_size(h, w, img_size)
    return -(-nh // patch), -(-nw // patch)


def sam_preprocess(image: Tensor, img_size: int) -> Tensor:
    """The SAM encoder input of a batch of images.

    Args:
        image: B x 3 x H x W RGB, uint8 or float in [0, 1].
        img_size: the encoder's input side (1024 for the official models).

    Returns:
        B x 3 x img_size x img_size: resized (bilinear, antialiased: SAM's
        ``apply_image_torch``), normalised with SAM's statistics, zero-padded bottom/right
        (``Sam.preprocess``).
    """
    x = image.float() if image.dtype == torch.uint8 else image.float() * 255.0
    size = resized_size(*x.shape[-2:], img_size)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(SAM_PIXEL_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(SAM_PIXEL_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return F.pad(x, (0, img_size - size[1], 0, img_size - size[0]))


@dataclass(frozen=True)
class Frame:
    """Where a network input lies in the encoded image.

    An input coordinate ``Y`` (rows; ``X`` alike) maps to the image coordinate
    ``scale_y * Y + offset_y``; positions outside the image are reflected back into it (the
    cascade reflect-pads the image).

    Attributes:
        height: height of the encoded image (pixels).
        width: width of the encoded image.
        scale_y, offset_y, scale_x, offset_x: the affine map, input -> image coordinates.
    """

    height: int
    width: int
    scale_y: float = 1.0
    offset_y: float = 0.0
    scale_x: float = 1.0
    offset_x: float = 0.0

    @classmethod
    def identity(cls, height: int, width: int) -> Frame:
        """The input is the encoded image itself (training: each crop encoded on its own)."""
        return cls(height, width)

    @classmethod
    def cascade(cls, height: int, width: int, pad: int, size: tuple[int, int]) -> Frame:
        """One cascade scale: the ``pad``-reflect-padded image resized to ``size`` with
        ``align_corners=True`` (input pixel ``i`` samples padded pixel ``i * (Hp - 1) / (h - 1)``).
        """

        def axis(n: int, m: int) -> tuple[float, float]:
            a = (n + 2 * pad - 1) / (m - 1) if m > 1 else 0.0
            return a, 0.5 - 0.5 * a - pad  # centre (Y - 0.5) * a, back to edges, minus pad

        sy, oy = axis(height, size[0])
        sx, ox = axis(width, size[1])
        return cls(height, width, sy, oy, sx, ox)


def _axis_positions(
    frame_scale: float,
    frame_offset: float,
    length: int,
    first: int,
    count: int,
    full: int,
    input_len: int,
    resized: int,
    patch: int,
    grid: int,
    device: torch.device,
) -> Tensor:
    """grid_sample coordinates (align_corners=False) of feature cells ``first .. first+count-1``."""
    cells = torch.arange(first, first + count, device=device, dtype=torch.float64)
    y = (cells + 0.5) * (input_len / full)  # the decoder's cell centres over the input
    y = frame_scale * y + frame_offset  # image coordinates
    c = y - 0.5  # pixel-centre index
    if length > 1:  # reflect into [0, length - 1] (as reflect padding does)
        period = 2 * (length - 1)
        c = torch.remainder(c, period)
        c = torch.minimum(c, period - c)
    else:
        c = torch.zeros_like(c)
    t = (c + 0.5) * (resized / length) / patch  # token coordinates
    return (2 * t / grid - 1).float()


def sample_tokens(
    tokens: Tensor,
    frame: Frame,
    img_size: int,
    patch: int,
    input_size: tuple[int, int],
    full_size: tuple[int, int],
    window: tuple[int, int, int, int] | None = None,
) -> Tensor:
    """Bilinearly samples token features at the centres of feature-map cells.

    Args:
        tokens: B x C x gh x gw features on the valid token grid (:func:`valid_grid`).
        frame: where the network input lies in the encoded image.
        img_size: SAM's input side; ``patch``: its patch size.
        input_size: (h, w) of the whole network input (in the cascade: this scale).
        full_size: (hf, wf) of the whole feature map; cell ``i`` is centred at input
            coordinate ``(i + 0.5) * h / hf`` (the implicit decoder's convention).
        window: ``(y0, x0, rows, cols)`` to sample only that window of the map (tiles).

    Returns:
        B x C x rows x cols (the whole map when ``window`` is None).
    """
    gh, gw = tokens.shape[-2:]
    nh, nw = resized_size(frame.height, frame.width, img_size)
    y0, x0, rows, cols = window if window is not None else (0, 0, *full_size)
    dev = tokens.device
    ys = _axis_positions(
        frame.scale_y, frame.offset_y, frame.height, y0, rows, full_size[0], input_size[0],
        nh, patch, gh, dev,
    )  # fmt: skip
    xs = _axis_positions(
        frame.scale_x, frame.offset_x, frame.width, x0, cols, full_size[1], input_size[1],
        nw, patch, gw, dev,
    )  # fmt: skip
    grid = torch.stack(torch.broadcast_tensors(xs.view(1, -1), ys.view(-1, 1)), dim=-1)
    grid = grid.unsqueeze(0).expand(tokens.shape[0], -1, -1, -1)
    # Positions stay fp32 whatever the tokens' dtype (bf16 would round a 5000 px row of cells to
    # a few hundred distinct columns): sample in fp32, return in the tokens' dtype.
    with torch.autocast(dev.type, enabled=False):
        out = F.grid_sample(
            tokens.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
        )
    return out.to(tokens.dtype)


def mask_to_token_frame(
    mask: Tensor, grid: tuple[int, int], img_size: int, patch: int, stride: int = 4
) -> Tensor:
    """A mask of the encoded image, in SAM's frame at ``stride`` cells per token.

    Args:
        mask: B x 1 x H x W in [-1, 1], aligned with the encoded image.
        grid: (gh, gw) valid token grid.
        img_size: SAM's input side; ``patch``: its patch size.
        stride: mask cells per token and axis (4: SAM's 256 x 256 low-resolution mask frame).

    Returns:
        B x 1 x (stride * gh) x (stride * gw): resized like the image (bilinear, antialiased),
        padded with -1 (background) where the grid sees SAM's padding.
    """
    h, w = mask.shape[-2:]
    nh, nw = resized_size(h, w, img_size)
    size = (max(1, round(nh * stride / patch)), max(1, round(nw * stride / patch)))
    m = mask.float()
    if tuple(m.shape[-2:]) != size:
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False, antialias=True)
    rows, cols = stride * grid[0], stride * grid[1]
    m = m[..., :rows, :cols]
    return F.pad(m, (0, cols - m.shape[-1], 0, rows - m.shape[-2]), value=-1.0)
