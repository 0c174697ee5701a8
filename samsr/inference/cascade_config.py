"""The settings of CRM's inference cascade (:func:`samsr.inference.cascade.refine`): the faithful
reference protocol by default, each speed or memory option named beside it (the ``inference``
config group)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["REGIONS", "REGION_SOURCES", "CascadeConfig"]

REGIONS = ("full", "bbox", "contour")
REGION_SOURCES = ("coarse", "current")


@dataclass
class CascadeConfig:
    """Settings of the multi-scale cascade.

    The defaults are the reference protocol (every option off). Options only change *how much* is
    computed, never the protocol itself; see ``samsr/configs/inference/*.yaml`` for measured
    presets.

    Attributes:
        scales: resize factors of the padded input, in processing order; the last one's output is
            returned.
        pad: reflect padding in pixels added around the image and mask (reference: 32).
        chunk_size: queries (pixels) per decoder call; bounds decoder memory, not the result.
        decoder_factorized: None keeps the model's setting; True/False overrides it for inference
            (True: the decoder's first layer once per feature cell; False: the reference MLP).
        fusion_patch: rows of the stride-2 feature map per fusion patch; 0 runs the fusion conv on
            the whole map at once (reference). Patched fusion writes each patch's output over the
            consumed input rows (1-row halo kept aside): same output, no second full-size map.
        region: which pixels are decoded at every scale: ``full`` (reference), ``bbox`` (inside
            the bounding box of the mask, grown by ``bbox_margin``) or ``contour`` (within
            ``contour_width`` pixels of the mask's boundary). Other pixels keep the previous
            scale's probability (the coarse mask at the first scale).
        region_source: the mask the region is computed from: ``coarse`` (the input mask, once) or
            ``current`` (each scale's input mask).
        bbox_margin: margin around the bounding box, in full-resolution pixels.
        contour_width: half-width of the contour band, in full-resolution pixels.
        stride: n > 1 decodes every n-th pixel of each axis (plus the last row/column), then
            every other pixel whose grid cell's four decoded corners disagree (>= 0.5 or not);
            pixels of agreeing cells take the bilinear interpolation of the corners. 1 = all.
        tile: > 0 runs encoder, fusion and decoding in tiles of ``tile`` x ``tile`` input pixels
            (at each scale) with ``tile_halo`` pixels of context on each side, so peak memory no
            longer grows with the image; tiles holding no pixel to decode are skipped. 0 = off.
        tile_halo: context around each tile in input pixels (rounded up to a multiple of 8);
            features match the untiled ones up to float rounding once it covers the encoder's
            receptive field (~100 px for ResNet-18, more for ResNet-50).
        channels_last: run the network on channels-last tensors (faster convolutions on some
            hardware; same function).
        cudnn_benchmark: let cuDNN autotune per shape (off: every image and scale is a new
            shape, so tuning costs more than it saves).
        tf32: TF32 for fp32 matmuls and convolutions on CUDA (off in the reference protocol;
            the speed presets allow it).
        flip: not in the reference: also refine the mirrored image and mask and average the
            two probabilities (test-time augmentation; twice the time).
    """

    scales: Sequence[float] = (0.125, 0.25, 0.5, 1.0)
    pad: int = 32
    chunk_size: int = 2**18
    decoder_factorized: bool | None = None
    fusion_patch: int = 0
    region: str = "full"
    region_source: str = "coarse"
    bbox_margin: int = 64
    contour_width: int = 32
    stride: int = 1
    tile: int = 0
    tile_halo: int = 128
    channels_last: bool = False
    cudnn_benchmark: bool = False
    tf32: bool = False
    flip: bool = False

    def __post_init__(self) -> None:
        self.scales = tuple(float(s) for s in self.scales)
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be a non-empty list of positive factors: {self.scales}")
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0, got {self.pad}.")
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {self.chunk_size}.")
        if self.fusion_patch < 0:
            raise ValueError(f"fusion_patch must be >= 0 (0 = off), got {self.fusion_patch}.")
        if self.region not in REGIONS:
            raise ValueError(f"region must be one of {REGIONS}, got {self.region!r}.")
        if self.region_source not in REGION_SOURCES:
            raise ValueError(
                f"region_source must be one of {REGION_SOURCES}, got {self.region_source!r}."
            )
        if self.bbox_margin < 0 or self.contour_width < 1:
            raise ValueError(
                f"bbox_margin must be >= 0 and contour_width >= 1, got {self.bbox_margin} and "
                f"{self.contour_width}."
            )
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1 (1 = decode every pixel), got {self.stride}.")
        if self.tile < 0 or self.tile_halo < 0:
            raise ValueError(
                f"tile and tile_halo must be >= 0, got {self.tile} and {self.tile_halo}."
            )
        if 0 < self.tile < 32:
            raise ValueError(f"tile must be 0 (off) or >= 32 input pixels, got {self.tile}.")

    @classmethod
    def recommended(cls) -> CascadeConfig:
        """The measured best trade-off for high-resolution images (``inference=fast``).

        Strided-4 decoding inside the coarse mask's bounding box, the factorized decoder, and
        tiled encoding with patched fusion (flat peak memory); see the README's benchmark.
        """
        return cls(
            chunk_size=65536,
            decoder_factorized=True,
            fusion_patch=64,
            region="bbox",
            stride=4,
            tile=1024,
            tile_halo=128,
            tf32=True,
        )
