"""Paired geometric transforms (image, GT and any aligned map) and image-only photometric ones.

Geometry is sampled once into a :class:`CropFlip` and applied to every array of a sample, so
images, masks and extra maps (e.g. SAM colour maps, ``H x W x 3``) stay pixel-aligned.

Random crop with padding follows torchvision's ``RandomCrop(size, pad_if_needed=True)`` (the
reference): a side shorter than the crop is padded by the shortfall on *both* ends with 0 (black
image, background masks), then a crop position is drawn uniformly. The object's position inside a
small image's crop is therefore random. Then a horizontal flip with p=0.5.

Photometric (image only, the reference's ``ColorJitter(0.2, 0.05, 0.05, 0)`` + ``RandomGrayscale``
with p=0.1): brightness, contrast and saturation factors drawn from ``U(1-x, 1+x)`` and applied in
a random order, then grayscale (3 equal channels) with p=0.1. Operates on ``H x W x 3`` float32
NumPy arrays in [0, 1] (NumPy, not torch: cheap and single-threaded inside data workers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "CropFlip",
    "image_to_tensor",
    "mask_to_tensor",
    "photometric",
]


@dataclass(frozen=True)
class CropFlip:
    """One sampled pad + crop + flip, applicable to any array aligned with the source image.

    Coordinates refer to the padded frame: the source occupies rows
    ``[pad_top, pad_top + height)`` and columns ``[pad_left, pad_left + width)``; the crop is
    ``crop_h x crop_w`` at ``(top, left)``.

    Attributes:
        height: Source height.
        width: Source width.
        pad_top: Padding above the source.
        pad_left: Padding left of the source.
        top: Crop row in the padded frame.
        left: Crop column in the padded frame.
        crop_h: Crop height.
        crop_w: Crop width.
        flip: Flip the crop horizontally.
    """

    height: int
    width: int
    pad_top: int
    pad_left: int
    top: int
    left: int
    crop_h: int
    crop_w: int
    flip: bool

    @classmethod
    def sample(
        cls,
        height: int,
        width: int,
        crop_size: int | tuple[int, int],
        rng: np.random.Generator,
        flip_prob: float = 0.5,
    ) -> CropFlip:
        """Draws a crop (padding short sides like torchvision's ``pad_if_needed``) and a flip.

        Args:
            height: Source height.
            width: Source width.
            crop_size: ``S`` or ``(crop_h, crop_w)``.
            rng: Random generator.
            flip_prob: Probability of a horizontal flip.

        Returns:
            The sampled geometry.
        """
        crop_h, crop_w = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
        if height < 1 or width < 1 or crop_h < 1 or crop_w < 1:
            raise ValueError(f"bad sizes: source {height}x{width}, crop {crop_h}x{crop_w}")
        pad_left = max(0, crop_w - width)
        pad_top = max(0, crop_h - height)
        padded_w, padded_h = width + 2 * pad_left, height + 2 * pad_top
        top = int(rng.integers(padded_h - crop_h + 1))
        left = int(rng.integers(padded_w - crop_w + 1))
        flip = bool(rng.random() < flip_prob)
        return cls(height, width, pad_top, pad_left, top, left, crop_h, crop_w, flip)

    def apply(self, array: np.ndarray, fill: float = 0) -> np.ndarray:
        """Pads, crops and flips an array aligned with the source.

        Args:
            array: ``H x W`` or ``H x W x C`` array of the source size.
            fill: Value of padded pixels.

        Returns:
            ``crop_h x crop_w (x C)`` array, same dtype, contiguous.
        """
        if array.shape[:2] != (self.height, self.width):
            raise ValueError(
                f"array of shape {array.shape} does not match the source {self.height}x{self.width}"
            )
        out = np.full((self.crop_h, self.crop_w, *array.shape[2:]), fill, dtype=array.dtype)
        # source rows/cols covered by the crop window
        y0 = max(self.top - self.pad_top, 0)
        y1 = min(self.top + self.crop_h - self.pad_top, self.height)
        x0 = max(self.left - self.pad_left, 0)
        x1 = min(self.left + self.crop_w - self.pad_left, self.width)
        if y1 > y0 and x1 > x0:
            oy, ox = y0 + self.pad_top - self.top, x0 + self.pad_left - self.left
            out[oy : oy + y1 - y0, ox : ox + x1 - x0] = array[y0:y1, x0:x1]
        if self.flip:
            out = out[:, ::-1]
        return np.ascontiguousarray(out)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``H x W x C`` uint8 (scaled by 1/255) or float -> ``C x H x W`` float32 tensor.

    The conversion runs in NumPy: tiny torch ops in a busy main process pay for thread start-up.
    """
    array = np.asarray(image)
    scaled = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array
    return torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 0, 1), dtype=np.float32))


def mask_to_tensor(mask: np.ndarray) -> torch.Tensor:
    """``H x W`` uint8 {0, 255} (non-zero = foreground) -> ``1 x H x W`` float32 in {0, 1}."""
    return torch.from_numpy((np.asarray(mask) > 0).astype(np.float32)[None])


def _gray(image: np.ndarray) -> np.ndarray:
    """``H x W x 3`` -> ``H x W x 1`` luma (ITU-R 601, as torchvision)."""
    return (0.299 * image[..., 0:1] + 0.587 * image[..., 1:2] + 0.114 * image[..., 2:3]).astype(
        np.float32
    )


def _blend(a: np.ndarray, b: np.ndarray | float, factor: float) -> np.ndarray:
    return np.clip(factor * a + (1.0 - factor) * b, 0.0, 1.0).astype(np.float32)


def photometric(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.2,
    contrast: float = 0.05,
    saturation: float = 0.05,
    grayscale_prob: float = 0.1,
) -> np.ndarray:
    """Colour jitter in random order, then random grayscale (image only).

    Same definitions as torchvision's ``adjust_brightness/contrast/saturation`` on float images:
    brightness scales, contrast blends with the mean luma, saturation blends with the per-pixel
    luma; results are clipped to [0, 1].

    Args:
        image: ``H x W x 3`` float32 RGB in [0, 1].
        rng: Random generator.
        brightness: Factor drawn from ``U(max(0, 1-b), 1+b)``.
        contrast: Factor drawn from ``U(max(0, 1-c), 1+c)``.
        saturation: Factor drawn from ``U(max(0, 1-s), 1+s)``.
        grayscale_prob: Probability of converting to grayscale.

    Returns:
        ``H x W x 3`` float32 RGB in [0, 1] (a new array).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 image, got {image.shape}")
    out = image.astype(np.float32, copy=True)
    amounts = (brightness, contrast, saturation)
    factors = [float(rng.uniform(max(0.0, 1.0 - a), 1.0 + a)) for a in amounts]
    for op in rng.permutation(3):
        if amounts[op] <= 0:
            continue
        factor = factors[op]
        if op == 0:
            out = np.clip(out * factor, 0.0, 1.0, dtype=np.float32)
        elif op == 1:
            out = _blend(out, float(_gray(out).mean()), factor)
        else:
            out = _blend(out, _gray(out), factor)
    if rng.random() < grayscale_prob:
        out = np.repeat(_gray(out), 3, axis=2)
    return out
