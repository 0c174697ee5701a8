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

Encoding and decoding are separate functions so that decoding fewer pixels and tiled encoding
can be added without touching the protocol.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from samsr.device import synchronize
from samsr.models.components.implicit_decoder import coord_seq
from samsr.models.crm import CRM

__all__ = [
    "CascadeConfig",
    "decode_full",
    "encode_at_scale",
    "is_empty_mask",
    "pad_reflect",
    "refine",
    "scaled_size",
]

MASK_CHANNEL = 3  # the input channel that holds the mask (ref: cat((image, seg), 1))


@dataclass
class CascadeConfig:
    """Settings of the multi-scale cascade.

    Attributes:
        scales: resize factors of the padded input, in processing order; the last one's output is
            returned.
        pad: reflect padding in pixels added around the image and mask (reference: 32).
        chunk_size: queries (pixels) per decoder call; bounds decoder memory, not the result.
    """

    scales: Sequence[float] = (0.125, 0.25, 0.5, 1.0)
    pad: int = 32
    chunk_size: int = 2**18

    def __post_init__(self) -> None:
        self.scales = tuple(float(s) for s in self.scales)
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be a non-empty list of positive factors: {self.scales}")
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0, got {self.pad}.")
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {self.chunk_size}.")


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


def encode_at_scale(model: CRM, static: Tensor, mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Resizes the normalised inputs to ``size`` and encodes them.

    Args:
        model: the CRM.
        static: 1 x (C - 1) x Hp x Wp normalised channels other than the mask (image, extras).
        mask: 1 x 1 x Hp x Wp current mask in [-1, 1].
        size: (h, w) at this scale.

    Returns:
        1 x 256 x ceil(h/2) x ceil(w/2) features.
    """
    static_s = _resize(static, size)
    mask_s = _resize(mask, size)
    x = torch.cat([static_s[:, :MASK_CHANNEL], mask_s, static_s[:, MASK_CHANNEL:]], dim=1)
    del static_s, mask_s
    return model.encode_normalized(x)


def decode_full(
    model: CRM,
    feat: Tensor,
    out_size: tuple[int, int],
    chunk_size: int,
    out: Tensor | None = None,
) -> Tensor:
    """Decodes the probability of every pixel of an ``out_size`` grid, ``chunk_size`` at a time.

    Args:
        model: the CRM.
        feat: 1 x C x h x w features.
        out_size: (H, W) of the query grid (the padded full resolution).
        chunk_size: queries per decoder call.
        out: optional preallocated 1 x 1 x H x W float32 buffer to write into.

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
    for start in range(0, total, chunk_size):
        stop = min(start + chunk_size, total)
        index = torch.arange(start, stop, device=device)
        coords = torch.stack((ys[index // w], xs[index % w]), dim=-1).unsqueeze(0)
        cell = cell_value.expand(1, stop - start, 2)
        logits = model.decode(feat, coords, cell, prepared=True)
        flat[start:stop] = torch.sigmoid(logits[0])  # ref pred_224 = sigmoid(ret)
    return out


def refine(
    model: CRM,
    image: Tensor,
    coarse: Tensor,
    cfg: CascadeConfig | None = None,
    extra: Tensor | None = None,
    timings: dict[str, float] | None = None,
) -> Tensor:
    """Refines one mask with the multi-scale cascade (runs under ``torch.inference_mode``).

    Args:
        model: the CRM in eval mode, on the inputs' device.
        image: 1 x 3 x H x W RGB in [0, 1].
        coarse: 1 x 1 x H x W coarse mask in [0, 1].
        cfg: cascade settings (default: the reference protocol).
        extra: optional 1 x E x H x W extra input channels (SAM-SR variants), kept fixed.
        timings: if given, ``"encode"`` and ``"decode"`` seconds are added to it (with device
            synchronisation, which costs a little).

    Returns:
        1 x 1 x H x W probability of the last scale (all zeros for an empty input mask).
    """
    cfg = cfg or CascadeConfig()
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be 1 x 3 x H x W, got {tuple(image.shape)}.")
    with torch.inference_mode():
        return _refine(model, image, coarse, cfg, extra, timings)


def _refine(
    model: CRM,
    image: Tensor,
    coarse: Tensor,
    cfg: CascadeConfig,
    extra: Tensor | None,
    timings: dict[str, float] | None,
) -> Tensor:
    _, _, h, w = image.shape
    device = image.device
    x = pad_reflect(model.normalize_inputs(image, coarse, extra).float(), cfg.pad)
    mask = x[:, MASK_CHANNEL : MASK_CHANNEL + 1].contiguous()
    static = torch.cat([x[:, :MASK_CHANNEL], x[:, MASK_CHANNEL + 1 :]], dim=1)
    del x
    hp, wp = mask.shape[-2:]

    def tick() -> float:
        if timings is not None:
            synchronize(device)
        return time.perf_counter()

    last = len(cfg.scales) - 1
    for i, scale in enumerate(cfg.scales):
        if is_empty_mask(mask):
            # ref: this scale's prediction is zeroed, so every later scale's input is all -1
            # and is zeroed too: the output is empty
            return torch.zeros((1, 1, h, w), dtype=torch.float32, device=device)
        t0 = tick()
        feat = encode_at_scale(model, static, mask, scaled_size(hp, wp, scale))
        t1 = tick()
        # the mask is no longer needed once encoded: decode into its buffer
        prob = decode_full(model, feat, (hp, wp), cfg.chunk_size, out=mask)
        del feat
        t2 = tick()
        if timings is not None:
            timings["encode"] = timings.get("encode", 0.0) + t1 - t0
            timings["decode"] = timings.get("decode", 0.0) + t2 - t1
        if i < last:
            mask = prob.sub_(0.5).mul_(2)  # ref: seg = (pred - 0.5) * 2, in place
    return prob[..., cfg.pad : cfg.pad + h, cfg.pad : cfg.pad + w].contiguous()
