"""The settings of CRM's inference cascade (:func:`samsr.inference.cascade.refine`): the faithful
reference protocol by default, each speed or memory option named beside it (the ``inference``
config group)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ENCODER_DTYPES", "REGIONS", "REGION_SOURCES", "CascadeConfig"]

REGIONS = ("full", "bbox", "contour")
REGION_SOURCES = ("coarse", "current")
ENCODER_DTYPES = (None, "auto", "bfloat16", "float16")


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
        compile_decoder: run the decoder's query computation (neighbour lookup, MLP, local
            ensemble) through ``torch.compile`` (inductor, dynamic shapes: compiled once per
            process and decoder mode, then reused for every chunk, tile and scale; float
            rounding only). Needs a C++ compiler on CPUs, Triton on GPUs.
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
        stride_margin: not in the thesis: with ``stride`` > 1, a cell is interpolated only if
            its four corners are also confident (all below ``0.5 - stride_margin`` or all from
            ``0.5 + stride_margin``); soft transitions are decoded. 0 = the thesis's rule.
        tile: > 0 runs encoder, fusion and decoding in tiles of ``tile`` x ``tile`` input pixels
            (at each scale) with ``tile_halo`` pixels of context on each side, so peak memory no
            longer grows with the image; tiles holding no pixel to decode are skipped. 0 = off.
        tile_halo: context around each tile in input pixels (rounded up to a multiple of 8);
            features match the untiled ones up to float rounding once it covers the encoder's
            receptive field (~100 px for ResNet-18, more for ResNet-50). ``"auto"``: the
            model's measured context radius at ``context_tol``
            (:func:`samsr.inference.context.context_halo`, measured once per model).
        context_tol: relative feature error counted as no change when ``tile_halo`` is auto.
        tile_min: > 0 cuts the tiles of scales with a region (``region``, ``band_width``) to
            the region and splits them down to ``tile_min`` input pixels wherever the smaller
            windows, halo included, encode fewer pixels
            (:func:`samsr.inference.tiling.plan_region_tiles`); 0 = the regular grid.
        tile_batch: tiles encoded per encoder call: up to this many tiles of one scale whose
            input windows have the same size go through the encoder as one batch (fewer, larger
            kernel launches: a GPU lever); the fusion and decoding stay per tile. Peak memory
            grows with it (the batch's activations). 1 = one tile at a time.
        band_width: > 0 decodes, at every scale >= ``band_from``, only the band within
            ``ceil(band_width / scale)`` full-resolution pixels (``band_width`` pixels of that
            scale's input) of the boundary of that scale's input mask, and (tiled) encodes only
            tiles holding some of it; earlier scales use ``region``. 0 = off.
        band_from: the first scale decoded in a band.
        band_stride: > 0: the decoding stride at band scales (e.g. 1: every band pixel at the
            last scale, whose values are the output, while ``stride`` thins the earlier scales,
            whose values only feed the next one); 0 = ``stride``.
        fold_bn: fold every BatchNorm into the convolution before it, in an inference copy of
            the model (:mod:`samsr.inference.graph`; float rounding).
        encoder_dtype: None (the network's dtype), ``"bfloat16"``/``"float16"`` (autocast of
            the encoder and fusion only; features are cast back to float32 for the decoder) or
            ``"auto"`` (bfloat16 where the hardware has it: CUDA with bf16, CPUs with
            AVX512-BF16/AMX; float32 elsewhere).
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
    compile_decoder: bool = False
    fusion_patch: int = 0
    region: str = "full"
    region_source: str = "coarse"
    bbox_margin: int = 64
    contour_width: int = 32
    stride: int = 1
    stride_margin: float = 0.0
    tile: int = 0
    tile_halo: int | str = 128
    context_tol: float = 1e-3
    tile_min: int = 0
    tile_batch: int = 1
    band_width: int = 0
    band_from: float = 0.5
    band_stride: int = 0
    fold_bn: bool = False
    encoder_dtype: str | None = None
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
        if self.tile_halo != "auto" and (
            not isinstance(self.tile_halo, int) or isinstance(self.tile_halo, bool)
        ):
            raise ValueError(f"tile_halo must be pixels (>= 0) or 'auto', got {self.tile_halo!r}.")
        if self.tile < 0 or (self.tile_halo != "auto" and self.tile_halo < 0):
            raise ValueError(
                f"tile and tile_halo must be >= 0, got {self.tile} and {self.tile_halo}."
            )
        if 0 < self.tile < 32:
            raise ValueError(f"tile must be 0 (off) or >= 32 input pixels, got {self.tile}.")
        if self.tile_min < 0 or (self.tile_min > 0 and not 16 <= self.tile_min <= self.tile):
            raise ValueError(
                f"tile_min must be 0 (off) or in [16, tile={self.tile}] input pixels (it needs "
                f"tile > 0), got {self.tile_min}."
            )
        if self.tile_batch < 1:
            raise ValueError(
                f"tile_batch must be >= 1 (1 = one tile at a time), got {self.tile_batch}."
            )
        if not 0 < self.context_tol < 1:
            raise ValueError(f"context_tol must be in (0, 1), got {self.context_tol}.")
        if self.band_width < 0 or self.band_from <= 0:
            raise ValueError(
                f"band_width must be >= 0 (0 = off) and band_from > 0, got {self.band_width} and "
                f"{self.band_from}."
            )
        if not 0 <= self.stride_margin < 0.5:
            raise ValueError(f"stride_margin must be in [0, 0.5), got {self.stride_margin}.")
        if self.band_stride < 0:
            raise ValueError(f"band_stride must be >= 0 (0 = stride), got {self.band_stride}.")
        if self.encoder_dtype not in ENCODER_DTYPES:
            raise ValueError(
                f"encoder_dtype must be one of {ENCODER_DTYPES}, got {self.encoder_dtype!r}."
            )

    @classmethod
    def recommended(cls) -> CascadeConfig:
        """The measured best trade-off for high-resolution images (``inference=fast``).

        Strided-4 factorized decoding of every scale over the whole image (soft transitions
        decoded, not interpolated), tiles of at most 384 px with the measured context radius as
        halo, BatchNorm folded, channels-last and a bf16 encoder where the hardware has it; no
        band (how far the last scale moves the boundary is the model's); see the README's
        benchmark.
        """
        return cls(
            chunk_size=65536,
            decoder_factorized=True,
            stride=4,
            stride_margin=0.4,
            tile=384,
            tile_halo="auto",
            fusion_patch=64,
            fold_bn=True,
            channels_last=True,
            encoder_dtype="auto",
            tf32=True,
        )
