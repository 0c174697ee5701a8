"""CRM's multi-scale inference on high-resolution images (the reference BIG protocol).

Reference facts (dvlab-research/Entity, High-Quality-Segmention: test.py,
dataset/offline_dataset_crm_pad32.py, util/image_saver_crm.py):

* the image is normalised (ImageNet mean/std) and the mask mapped to [-1, 1] at full
  resolution, then both are reflect-padded by 32 px (``F.pad(..., mode='reflect')``);
* queries: every pixel centre of the *padded* full-resolution grid, cell (2 / Hp, 2 / Wp),
  decoded in chunks (the reference: 50176 * 16 queries per chunk), row-major order;
* scales 0.125, 0.25, 0.5, 1.0 in turn: the padded normalised image and the current [-1, 1] mask
  are resized to ``(round(Hp * s), round(Wp * s))`` (Python ``round``) with bilinear
  interpolation, ``align_corners=True``; the features are computed once per scale;
* if the current full-resolution mask is (nearly) empty, ``(mask + 1).sum() < 2``, that scale's
  prediction is set to 0; the check uses the scale's *input* mask;
* the next scale's mask is ``(prob - 0.5) * 2`` over the whole padded grid (padding included);
* the output is the last scale's probability with the padding cropped; it is saved as
  ``uint8(prob * 255)`` (truncation; see :class:`samsr.inference.refiner.Refiner`).

Encoding and decoding are separate functions (decoding: :mod:`samsr.inference.decoding`; the
settings: :mod:`samsr.inference.cascade_config`) so that decoding fewer pixels and tiled encoding
can be added without touching the protocol.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samsr.device import autocast, resolve_dtype, synchronize
from samsr.inference.cascade_config import CascadeConfig
from samsr.inference.context import context_halo
from samsr.inference.decoding import PixelDecoder, decode_full, decoder_mode
from samsr.inference.regions import bbox_region, contour_region, decode_region, strided_fill
from samsr.inference.tiling import Tile, plan_region_tiles, plan_tiles, scaled_window
from samsr.models.components.sam_frame import Frame
from samsr.models.crm import CRM, MASK_CHANNEL

__all__ = [
    "CascadeConfig",
    "PixelDecoder",
    "decode_full",
    "encode_at_scale",
    "is_empty_mask",
    "pad_reflect",
    "band_width_px",
    "in_band",
    "refine",
    "resolve_halo",
    "scale_stride",
    "scaled_size",
]


def pad_reflect(x: Tensor, pad: int) -> Tensor:
    """Reflect-pads the last two dims by ``pad`` on every side (B x C x H x W)."""
    if pad == 0:
        return x
    h, w = x.shape[-2:]
    if min(h, w) <= pad:
        raise ValueError(
            f"The image ({h}x{w}) must be larger than the reflect padding ({pad} px) on both sides."
        )
    return F.pad(x, (pad, pad, pad, pad), mode="reflect")  # ref offline_dataset_crm_pad32


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """Input size at one scale: ``(round(h * s), round(w * s))`` (Python rounding, as the ref)."""
    return max(1, round(h * scale)), max(1, round(w * scale))


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x  # bilinear with align_corners=True at the same size is the identity
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)  # ref test.py


def is_empty_mask(mask: Tensor) -> bool:
    """The reference's empty-input test on a [-1, 1] mask: ``(mask + 1).sum() < 2``."""
    return bool((mask + 1).sum() < 2)


def _network_input(static: Tensor, mask: Tensor, channels_last: bool) -> Tensor:
    x = torch.cat([static[:, :MASK_CHANNEL], mask, static[:, MASK_CHANNEL:]], dim=1)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def encode_at_scale(
    model: CRM,
    static: Tensor,
    mask: Tensor,
    size: tuple[int, int],
    fusion_patch: int = 0,
    channels_last: bool = False,
    guide: Any = None,
) -> Tensor:
    """Resizes the normalised inputs to ``size`` and encodes them.

    Args:
        model: the CRM.
        static: 1 x (C - 1) x Hp x Wp normalised channels other than the mask (image, extras).
        mask: 1 x 1 x Hp x Wp current mask in [-1, 1].
        size: (h, w) at this scale.
        fusion_patch: > 0 runs the fusion in patches of that many rows (same output).
        channels_last: run the network on a channels-last input.
        guide: SAM context of this scale for SAM-guided models (SAM-SR v3), else None.

    Returns:
        1 x 256 x ceil(h/2) x ceil(w/2) features.
    """
    static_s = _resize(static, size)
    mask_s = _resize(mask, size)
    x = _network_input(static_s, mask_s, channels_last)
    del static_s, mask_s
    return model.encode_normalized(x, fusion_patch=fusion_patch, **_guide_kwargs(guide))


def _guide_kwargs(guide: Any) -> dict[str, Any]:
    """``guide=`` only for SAM-guided models (plain CRM encoders take no guide)."""
    return {} if guide is None else {"guide": guide}


def refine(
    model: CRM,
    image: Tensor,
    coarse: Tensor,
    cfg: CascadeConfig | None = None,
    extra: Tensor | None = None,
    timings: dict[str, float] | None = None,
    profile: bool = False,
    on_scale: Callable[[float, Tensor], None] | None = None,
) -> Tensor:
    """Refines one mask with the multi-scale cascade (runs under ``torch.inference_mode``).

    Args:
        model: the CRM in eval mode, on the inputs' device.
        image: 1 x 3 x H x W RGB, float in [0, 1] or uint8 (divided by 255 band by band, so
            no full-size float copy of the input is needed).
        coarse: 1 x 1 x H x W coarse mask, float in [0, 1] or uint8.
        cfg: cascade settings (default: the reference protocol).
        extra: optional 1 x E x H x W extra input channels (SAM-SR variants), kept fixed;
            float, or uint8 (divided by 255, like training's maps).
        timings: if given, counters are added to it: ``"decoded_px"`` (queries decoded over
            all scales), ``"encoded_px"`` (input pixels encoded over all scales, halos
            included), ``"tiles"`` / ``"tiles_skipped"`` (tiled mode), and ``"sam"`` seconds
            for SAM-guided models (SAM-SR v3: SAM's encoder runs once per image, before the
            scales; one synchronisation on each side of it).
        profile: also add ``"encode"`` and ``"decode"`` seconds to ``timings``, synchronising
            the device around every stage of every scale and tile (a profiling run: the
            synchronisations cost time, most of all in tiled mode; never in timed runs), and
            ``"trunk"``: the part of ``"encode"`` spent in ``model.encoder`` (the rest is the
            fusion and the inputs' resizing).
        on_scale: called after every scale with ``(scale, prob)``, ``prob`` the 1 x 1 x Hp x Wp
            padded probability buffer (a view: copy what you keep), for diagnostics.

    Returns:
        1 x 1 x H x W probability of the last scale (all zeros for an empty input mask).
    """
    cfg = cfg or CascadeConfig()
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be 1 x 3 x H x W, got {tuple(image.shape)}.")
    if coarse.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"coarse {tuple(coarse.shape)} does not match image {tuple(image.shape)}.")
    profile = profile and timings is not None
    with (
        torch.inference_mode(),
        decoder_mode(model, cfg.decoder_factorized, cfg.compile_decoder),
        _timed(model.encoder, timings if profile else None, "trunk", image.device),
    ):
        return _refine(model, image, coarse, cfg, extra, timings, profile, on_scale)


@contextmanager
def _timed(
    module: nn.Module, timings: dict[str, float] | None, key: str, device: torch.device
) -> Iterator[None]:
    """Adds the seconds of every ``module`` call (device synchronised) to ``timings[key]``;
    nothing when ``timings`` is None."""
    if timings is None:
        yield
        return
    starts: list[float] = []

    def before(*_: Any) -> None:
        synchronize(device)
        starts.append(time.perf_counter())

    def after(*_: Any) -> None:
        synchronize(device)
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - starts.pop()

    hooks = [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _as_unit(x: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [0, 1] (ref ToTensor: ``.float().div(255)``); float -> float32."""
    return x.float().div(255) if x.dtype == torch.uint8 else x.float()


def _reflect_fill(t: Tensor, pad: int) -> None:
    """Fills the ``pad``-wide border of ``t`` (... x Hp x Wp) by reflecting its interior, in place.

    Same values as ``F.pad(interior, (pad,) * 4, mode='reflect')`` (columns first, then whole
    rows, so the corners are reflected in both axes).
    """
    if pad == 0:
        return
    hp, wp = t.shape[-2:]
    rows = slice(pad, hp - pad)
    t[..., rows, :pad] = t[..., rows, pad + 1 : 2 * pad + 1].flip(-1)
    t[..., rows, wp - pad :] = t[..., rows, wp - 2 * pad - 1 : wp - pad - 1].flip(-1)
    t[..., :pad, :] = t[..., pad + 1 : 2 * pad + 1, :].flip(-2)
    t[..., hp - pad :, :] = t[..., hp - 2 * pad - 1 : hp - pad - 1, :].flip(-2)


def _padded_inputs(
    model: CRM,
    image: Tensor,
    coarse: Tensor,
    extra: Tensor | None,
    pad: int,
    keep_coarse: bool,
    band_rows: int = 256,
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalised, reflect-padded network inputs, built in row bands (no full-size temporaries).

    Args:
        model: the CRM (its :meth:`~CRM.normalize_inputs` defines the normalisation).
        image: 1 x 3 x H x W, float in [0, 1] or uint8.
        coarse: 1 x 1 x H x W, float in [0, 1] or uint8.
        extra: optional 1 x E x H x W extra channels (uint8 maps are divided by 255).
        pad: reflect padding.
        keep_coarse: also return the padded coarse probability (else an empty buffer).
        band_rows: rows normalised at a time.

    Returns:
        (static 1 x (C - 1) x Hp x Wp: every channel but the mask; mask 1 x 1 x Hp x Wp in
        [-1, 1]; prob 1 x 1 x Hp x Wp: the padded coarse mask in [0, 1] if ``keep_coarse``,
        uninitialised otherwise). Values equal ``pad_reflect(normalize_inputs(...))``.
    """
    _, _, h, w = image.shape
    if pad > 0 and min(h, w) <= pad:
        raise ValueError(
            f"The image ({h}x{w}) must be larger than the reflect padding ({pad} px) on both sides."
        )
    hp, wp = h + 2 * pad, w + 2 * pad
    opts = {"dtype": torch.float32, "device": image.device}
    static = torch.empty((1, model.in_channels - 1, hp, wp), **opts)
    mask = torch.empty((1, 1, hp, wp), **opts)
    prob = torch.empty((1, 1, hp, wp), **opts)
    cols = slice(pad, pad + w)
    for r0 in range(0, h, band_rows):
        r1 = min(r0 + band_rows, h)
        rows = slice(pad + r0, pad + r1)
        c_band = _as_unit(coarse[..., r0:r1, :])
        e_band = None if extra is None else _as_unit(extra[..., r0:r1, :])
        x = model.normalize_inputs(_as_unit(image[..., r0:r1, :]), c_band, e_band).float()
        static[:, :MASK_CHANNEL, rows, cols] = x[:, :MASK_CHANNEL]
        static[:, MASK_CHANNEL:, rows, cols] = x[:, MASK_CHANNEL + 1 :]
        mask[:, :, rows, cols] = x[:, MASK_CHANNEL : MASK_CHANNEL + 1]
        if keep_coarse:
            prob[:, :, rows, cols] = c_band
    for t in (static, mask, prob) if keep_coarse else (static, mask):
        _reflect_fill(t, pad)
    return static, mask, prob


def _region(cfg: CascadeConfig, label: Tensor) -> Tensor:
    if cfg.region == "bbox":
        return bbox_region(label, cfg.bbox_margin)
    return contour_region(label, cfg.contour_width)


def band_width_px(band_width: int, scale: float) -> int:
    """Half-width in full-resolution pixels of the band at ``scale``: ``band_width`` pixels of
    that scale's input."""
    return max(1, math.ceil(band_width / scale))


def in_band(cfg: CascadeConfig, scale: float) -> bool:
    """Whether ``scale`` is decoded in a band around its input mask's boundary."""
    return cfg.band_width > 0 and scale >= cfg.band_from


def resolve_halo(model: CRM, cfg: CascadeConfig) -> int:
    """``cfg.tile_halo`` in pixels (``"auto"``: the model's measured context radius)."""
    if cfg.tile_halo == "auto":
        return context_halo(model, cfg.context_tol)
    return int(cfg.tile_halo)


def scale_stride(cfg: CascadeConfig, scale: float) -> int:
    """The decoding stride at ``scale``: ``band_stride`` in the band (when set), else ``stride``."""
    return cfg.band_stride if in_band(cfg, scale) and cfg.band_stride > 0 else cfg.stride


def _fill(
    decode: PixelDecoder, prob: Tensor, region: Tensor | None, stride: int, cfg: CascadeConfig
) -> int:
    if stride > 1:
        return strided_fill(decode, prob, region, stride, cfg.chunk_size, cfg.stride_margin)
    return decode_region(decode, prob, region, cfg.chunk_size)


def _refine(
    model: CRM,
    image: Tensor,
    coarse: Tensor,
    cfg: CascadeConfig,
    extra: Tensor | None,
    timings: dict[str, float] | None,
    profile: bool = False,
    on_scale: Callable[[float, Tensor], None] | None = None,
) -> Tensor:
    _, _, h, w = image.shape
    device = image.device
    sparse = (
        cfg.region != "full" or max(cfg.stride, cfg.band_stride) > 1 or cfg.tile > 0
        or cfg.band_width > 0
    )  # fmt: skip
    halo = resolve_halo(model, cfg) if cfg.tile > 0 else 0
    enc_dtype = resolve_dtype(cfg.encoder_dtype, device)
    # prob: the previous scale's probability; pixels that are not decoded keep it
    static, mask, prob = _padded_inputs(model, image, coarse, extra, cfg.pad, keep_coarse=sparse)
    hp, wp = mask.shape[-2:]
    label = prob[0, 0] >= 0.5 if cfg.region != "full" and cfg.region_source == "coarse" else None
    region = _region(cfg, label) if label is not None else None
    del label

    def tick(sync: bool = profile) -> float:
        if sync:
            synchronize(device)
        return time.perf_counter()

    def add(key: str, value: float) -> None:
        if timings is not None and (profile or key not in _PROFILED):
            timings[key] = timings.get(key, 0.0) + value

    embedding = None
    if getattr(model, "guided", False) and not is_empty_mask(mask):
        t0 = tick(timings is not None)
        embedding = model.embed_image(image)  # SAM-SR v3: SAM's encoder once per image
        add("sam", tick(timings is not None) - t0)
    for i, scale in enumerate(cfg.scales):
        if i > 0:
            mask = (prob - 0.5) * 2  # ref: seg = (pred - 0.5) * 2
        if is_empty_mask(mask):
            # ref: this scale's prediction is zeroed, so every later scale's input is all -1
            # and is zeroed too: the output is empty
            return torch.zeros((1, 1, h, w), dtype=torch.float32, device=device)
        if cfg.region != "full" and cfg.region_source == "current":
            region = _region(cfg, prob[0, 0] >= 0.5 if i > 0 else mask[0, 0] >= 0)
        scale_region = region
        if in_band(cfg, scale):  # this scale's input boundary, width in its own pixels
            label = prob[0, 0] >= 0.5 if i > 0 else mask[0, 0] >= 0
            scale_region = contour_region(label, band_width_px(cfg.band_width, scale))
            del label
        size = scaled_size(hp, wp, scale)
        t0 = tick()
        guide = None
        if embedding is not None:  # the current mask enters SAM's tokens at every scale
            unpadded = mask[..., cfg.pad : cfg.pad + h, cfg.pad : cfg.pad + w]
            guide = model.guide(embedding, unpadded, Frame.cascade(h, w, cfg.pad, size))
        add("encode", tick() - t0)
        if cfg.tile > 0:
            n = _refine_tiles(
                model, static, mask, prob, scale_region, size, cfg, halo, enc_dtype,
                scale_stride(cfg, scale), add, tick, guide,
            )  # fmt: skip
            del mask, scale_region
            add("decoded_px", n)
            if on_scale is not None:
                on_scale(scale, prob)
            continue
        t0 = tick()
        with autocast(device, enc_dtype):
            feat = encode_at_scale(
                model, static, mask, size, cfg.fusion_patch, cfg.channels_last, guide
            )
        if enc_dtype is not None:  # the decoder reads float32 features
            feat = feat.float()
        prior = mask if model.decoder.pixel_prior else None  # the mask at full resolution
        del mask
        t1 = tick()
        if sparse:
            decode = PixelDecoder(model, feat, (hp, wp), cfg.chunk_size, prior=prior)
            n = _fill(decode, prob[0, 0], scale_region, scale_stride(cfg, scale), cfg)
            del decode
        else:
            prob = decode_full(model, feat, (hp, wp), cfg.chunk_size, out=prob, prior=prior)
            n = hp * wp
        del feat, prior, scale_region
        t2 = tick()
        add("encode", t1 - t0)
        add("decode", t2 - t1)
        add("decoded_px", n)
        add("encoded_px", size[0] * size[1])
        if on_scale is not None:
            on_scale(scale, prob)
    return prob[..., cfg.pad : cfg.pad + h, cfg.pad : cfg.pad + w].contiguous()


_PROFILED = ("encode", "decode")  # stage times, recorded only by profiling runs


def _refine_tiles(
    model: CRM,
    static: Tensor,
    mask: Tensor,
    prob: Tensor,
    region: Tensor | None,
    size: tuple[int, int],
    cfg: CascadeConfig,
    halo: int,
    enc_dtype: torch.dtype | None,
    stride: int,
    add: Callable[[str, float], None],
    tick: Callable[[], float],
    guide: Any = None,
) -> int:
    """One scale in tiles: encode each tile's window, decode its core into ``prob``.

    Tiles holding no pixel of ``region`` are not encoded (with ``cfg.tile_min``, the tiles are
    cut to the region in the first place); their pixels keep the previous scale's values. Up to
    ``cfg.tile_batch`` tiles with equal windows share one encoder call; the order in which tiles
    are decoded does not matter, since every tile reads this scale's input and writes only its
    own core. The encoder runs on the whole window (the halo is its context), the fusion only
    on the feature cells the core's queries read (``Tile.cells``; the fused halo is never read).
    """
    hp, wp = prob.shape[-2:]
    if region is not None and cfg.tile_min > 0:
        tiles = plan_region_tiles((hp, wp), size, cfg.tile, halo, region, cfg.tile_min)
    else:
        tiles = plan_tiles((hp, wp), size, cfg.tile, halo)
    active = []
    for tile in tiles:
        qy0, qy1, qx0, qx1 = tile.q
        if region is not None and not bool(region[qy0:qy1, qx0:qx1].any()):
            add("tiles_skipped", 1)
        else:
            active.append(tile)
    full_h, full_w = model.encoder.level_sizes(*size)[0]
    prior = mask if model.decoder.pixel_prior else None
    decoded = 0
    for batch in _tile_batches(active, cfg.tile_batch):
        t0 = tick()
        windows = [
            _network_input(
                scaled_window(static, size, t.x), scaled_window(mask, size, t.x), cfg.channels_last
            )
            for t in batch
        ]
        x = windows[0] if len(windows) == 1 else _stack(windows, cfg.channels_last)
        del windows
        with autocast(x.device, enc_dtype):
            encoded = model.encode_windows(
                x, [(t.x[0], t.x[2]) for t in batch], size, cfg.fusion_patch,
                cells=[t.cells for t in batch], **_guide_kwargs(guide),
            )  # fmt: skip
        del x
        add("encode", tick() - t0)
        for tile in batch:
            t1 = tick()
            feat, (fy, fx) = encoded.pop(0)  # freed once decoded
            qy0, qy1, qx0, qx1 = tile.q
            if enc_dtype is not None:  # the decoder reads float32 features
                feat = feat.float()
            decode = PixelDecoder(
                model,
                feat,
                (hp, wp),
                cfg.chunk_size,
                window=(fy, fx, full_h, full_w),
                offset=(qy0, qx0),
                prior=prior,
            )
            del feat
            core_region = None if region is None else region[qy0:qy1, qx0:qx1]
            decoded += _fill(decode, prob[0, 0, qy0:qy1, qx0:qx1], core_region, stride, cfg)
            del decode
            add("decode", tick() - t1)
            add("tiles", 1)
            add("encoded_px", (tile.x[1] - tile.x[0]) * (tile.x[3] - tile.x[2]))
    return decoded


def _stack(windows: list[Tensor], channels_last: bool) -> Tensor:
    """B x C x h x w batch of equal 1 x C x h x w windows (channels-last if asked)."""
    x = torch.cat(windows)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _tile_batches(tiles: list[Tile], size: int) -> list[list[Tile]]:
    """``tiles`` grouped by input window size, in batches of at most ``size`` (first-seen order)."""
    groups: dict[tuple[int, int], list[Tile]] = {}
    for t in tiles:
        groups.setdefault((t.x[1] - t.x[0], t.x[3] - t.x[2]), []).append(t)
    return [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]
