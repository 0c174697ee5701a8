"""Semantic segmentation of a high-resolution image in bounded memory (the patch-based baseline).

Two modes; in both, the H x W class map is the only full-size array:

* :func:`sliding_class_map`: ``window`` x ``window`` windows at the full resolution, a fraction
  ``overlap`` of a window shared by neighbours (the last row and column flush with the image's
  edge), logits averaged where windows overlap. Rows of windows run top to bottom and the pixel
  rows no later window touches are finalised, so the logit accumulator is K x window x W.
* :func:`global_class_map`: the whole image resized to ``size`` on its long side, one forward,
  the logits upsampled to the full resolution ``band`` rows at a time.

Images are H x W x 3 uint8 RGB; the model takes B x 3 x h x w RGB in [0, 1] and returns
``{"logits": B x K x h x w}``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samsr.models.crm import IMAGENET_MEAN

__all__ = [
    "SegmentationPredictor",
    "global_class_map",
    "sliding_class_map",
    "sliding_logits",
    "window_starts",
]

MODES = ("sliding", "global")


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Window offsets along one axis: ``ceil(window * (1 - overlap))`` apart, the last flush with
    the end; ``[0]`` when the axis fits in one window."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}.")
    if length <= window:
        return [0]
    stride = max(1, math.ceil(window * (1.0 - overlap)))
    count = math.ceil((length - window) / stride) + 1
    return [min(i * stride, length - window) for i in range(count)]


def _to_tensor(pixels: np.ndarray, device: torch.device) -> Tensor:
    """h x w x 3 uint8 -> 1 x 3 x h x w float32 in [0, 1] on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
    return x.permute(2, 0, 1)[None].float() / 255.0


def _window_logits(model: nn.Module, crops: list[Tensor], window: int) -> Tensor:
    """Logits (N x K x h x w, float32) of crops of one size h x w <= window, each padded to
    ``window`` on the bottom and right with the mean colour (zero after normalisation), as in the
    original PSPNet test."""
    h, w = crops[0].shape[-2:]
    batch = torch.cat(crops, dim=0)
    if (h, w) != (window, window):
        mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1)
        padded = mean.expand(batch.shape[0], 3, window, window).clone()
        padded[..., :h, :w] = batch
        batch = padded
    return model(batch)["logits"][..., :h, :w].float()


@torch.inference_mode()
def sliding_logits(
    model: nn.Module,
    image: np.ndarray,
    window: int = 512,
    overlap: float = 1 / 3,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[int, Tensor]]:
    """The window-averaged logits of an image, in bands of final rows, top to bottom.

    Args:
        model: the network (eval mode).
        image: H x W x 3 uint8 RGB.
        window: the window side (the training crop: 512).
        overlap: the fraction of a window neighbours share (1/3: the original test's stride of
            2/3 of a window).
        batch_size: windows per forward.
        device: where the model runs.

    Yields:
        ``(top, K x n x W logits)`` of pixel rows ``[top, top + n)``: the mean over the windows
        covering each pixel. Memory: one K x window x W accumulator.
    """
    device = torch.device(device)
    height, width = image.shape[:2]
    ys, xs = window_starts(height, window, overlap), window_starts(width, window, overlap)
    win_h, win_w = min(window, height), min(window, width)
    acc: Tensor | None = None  # K x win_h x W: logit sums of pixel rows [top, top + win_h)
    count = torch.zeros(win_h, width, device=device)
    top = 0
    for y in ys:
        if acc is not None and y > top:  # rows [top, y) are final: no later window covers them
            done = y - top
            yield top, acc[:, :done] / count[:done]
            acc = torch.cat([acc[:, done:], torch.zeros_like(acc[:, :done])], dim=1)
            count = torch.cat([count[done:], torch.zeros_like(count[:done])], dim=0)
            top = y
        for first in range(0, len(xs), batch_size):
            row_xs = xs[first : first + batch_size]
            crops = [_to_tensor(image[y : y + win_h, x : x + win_w], device) for x in row_xs]
            logits = _window_logits(model, crops, window)
            if acc is None:
                acc = torch.zeros(logits.shape[1], win_h, width, device=device)
            for x, lg in zip(row_xs, logits):
                acc[:, y - top : y - top + win_h, x : x + win_w] += lg
                count[y - top : y - top + win_h, x : x + win_w] += 1
    assert acc is not None
    yield top, (acc / count)[:, : height - top]


def sliding_class_map(
    model: nn.Module,
    image: np.ndarray,
    window: int = 512,
    overlap: float = 1 / 3,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """The class of every pixel from overlapping full-resolution windows (the argmax of
    :func:`sliding_logits`, same arguments).

    Returns:
        H x W uint8 class map.
    """
    out = np.zeros(image.shape[:2], np.uint8)
    for top, logits in sliding_logits(model, image, window, overlap, batch_size, device):
        out[top : top + logits.shape[1]] = logits.argmax(0).to(torch.uint8).cpu().numpy()
    return out


@torch.inference_mode()
def global_class_map(
    model: nn.Module,
    image: np.ndarray,
    size: int = 512,
    band: int = 512,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """The class of every pixel from one forward on the image resized to ``size`` (long side,
    ``cv2.INTER_AREA``); the logits are upsampled bilinearly (``align_corners=False``, as
    ``F.interpolate``) to the full resolution ``band`` rows at a time.

    Returns:
        H x W uint8 class map.
    """
    device = torch.device(device)
    height, width = image.shape[:2]
    scale = size / max(height, width)
    small_h, small_w = max(1, round(height * scale)), max(1, round(width * scale))
    small = cv2.resize(image, (small_w, small_h), interpolation=cv2.INTER_AREA)
    logits = model(_to_tensor(small, device))["logits"].float()  # 1 x K x h x w
    h, w = logits.shape[-2:]
    out = np.zeros((height, width), np.uint8)
    # normalised source x of each output column (grid_sample, align_corners=False: -1 and 1 are
    # the outer pixel edges, so a pixel centre maps to (x + 0.5) / W * 2 - 1 of the output)
    gx = (torch.arange(width, device=device) + 0.5) / width * 2 - 1
    for y0 in range(0, height, band):
        y1 = min(height, y0 + band)
        gy = (torch.arange(y0, y1, device=device) + 0.5) / height * 2 - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)
        up = F.grid_sample(logits, grid[None], mode="bilinear", padding_mode="border",
                           align_corners=False)  # fmt: skip
        out[y0:y1] = up[0].argmax(0).to(torch.uint8).cpu().numpy()
    return out


@dataclass
class SegmentationPredictor:
    """A segmentation network and its high-resolution inference settings (``model.inference``).

    Args:
        model: the network (put in eval mode).
        mode: ``sliding`` (full-resolution windows: the patch-based baseline) or ``global``
            (the whole image resized to ``size``).
        window: sliding window side.
        overlap: sliding windows' shared fraction.
        batch_size: sliding windows per forward.
        size: global mode's long side.
        band: global mode's upsampling band (rows).
        device: where the model runs.
    """

    model: nn.Module
    mode: str = "sliding"
    window: int = 512
    overlap: float = 1 / 3
    batch_size: int = 4
    size: int = 512
    band: int = 512
    device: torch.device | str = "cpu"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"model.inference.mode must be one of {MODES}, got {self.mode!r}.")
        if self.window <= 0 or self.size <= 0 or self.batch_size <= 0 or self.band <= 0:
            raise ValueError("model.inference window, size, batch_size and band must be > 0.")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"model.inference.overlap must be in [0, 1), got {self.overlap}.")
        self.device = torch.device(self.device)
        self.model = self.model.to(self.device).eval()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """H x W x 3 uint8 RGB -> H x W uint8 class map."""
        if self.mode == "sliding":
            return sliding_class_map(
                self.model, image, self.window, self.overlap, self.batch_size, self.device
            )
        return global_class_map(self.model, image, self.size, self.band, self.device)
