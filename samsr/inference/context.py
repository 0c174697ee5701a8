"""The measured context radius of a CRM encoder: how much halo a tile needs.

A tile is encoded without the input beyond its window: there the convolutions see zero padding
instead of the image. That change reaches a feature cell ``d`` input pixels inside the window
only if the cell's effective receptive field extends ``d`` pixels; the theoretical field of a
dilated ResNet-50 (~270 px wide) is far larger than the effective one. :func:`measure_context`
encodes one input whole and its right part as a window (:meth:`CRM.encode_window`, exactly what a
tile does), and finds for every feature level the distance from the window's edge beyond which the
window's features differ from the whole input's by less than ``tol`` times that level's standard
deviation. The fused map's radius (what the decoder reads) is the halo a tile needs.

The input is synthetic (smooth noise for the image, a smooth blob mask, zero extra channels) and
deterministic; the radius depends on the weights, so it is measured per model (and cached).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from samsr.models.components.fusion import Fusion
from samsr.models.crm import CRM, MASK_CHANNEL

__all__ = ["ContextRadius", "context_halo", "measure_context"]

_ALIGN = 8  # window offsets are multiples of the encoder's total stride
LEVELS = ("f1", "f2", "f3", "fused")


@dataclass(frozen=True)
class ContextRadius:
    """Measured context radii in input pixels.

    Attributes:
        levels: radius of each encoder level (f1 stride 2, f2 stride 4, f3 stride 8) and of the
            fused map (``"fused"``).
        tol: the relative error threshold they were measured at.
        errors: per level, the largest relative error at each distance (input px) from the
            window's edge, sampled at that level's cells: ``{level: [(distance, error), ...]}``.
    """

    levels: dict[str, int]
    tol: float
    errors: dict[str, list[tuple[int, float]]]

    @property
    def halo(self) -> int:
        """The tile halo: the fused map's radius rounded up to a multiple of 8."""
        return -(-self.levels["fused"] // _ALIGN) * _ALIGN


def _smooth_noise(shape: tuple[int, ...], sigma: float, gen: torch.Generator) -> Tensor:
    """Gaussian noise low-passed by a box filter of width ~2*sigma, rescaled to unit std."""
    x = torch.randn(shape, generator=gen)
    k = max(1, int(2 * sigma) | 1)
    x = F.avg_pool2d(F.pad(x, (k // 2,) * 4, mode="reflect"), k, stride=1)
    return (x - x.mean()) / x.std().clamp_min(1e-6)


def synthetic_input(model: CRM, height: int, width: int, seed: int = 0) -> Tensor:
    """1 x C x height x width normalised input: smooth noise image, +-1 blob mask, zero extras."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros((1, model.in_channels, height, width))
    x[:, :MASK_CHANNEL] = _smooth_noise((1, 3, height, width), 4.0, gen)
    blob = _smooth_noise((1, 1, height, width), 24.0, gen)
    x[:, MASK_CHANNEL : MASK_CHANNEL + 1] = torch.where(blob > 0, 1.0, -1.0)
    return x


def _features(model: CRM, x: Tensor, offset: int, full_size: tuple[int, int]) -> dict[str, Tensor]:
    """Every level of the encoder and the fused map for the window of ``x`` from column
    ``offset`` (0: the whole input)."""
    levels = model.encoder(x)
    strides = model.encoder.strides
    sizes = model.encoder.level_sizes(*full_size)
    offsets = [(0, offset // s) for s in strides]
    fused = model.fusion.forward_window(levels, offsets, sizes)
    return {name: f.float() for name, f in zip(LEVELS, (*levels, fused))}


def measure_context(
    model: CRM,
    tol: float = 1e-3,
    height: int = 128,
    width: int = 768,
    window: int = 256,
    seed: int = 0,
) -> ContextRadius:
    """Measures the context radius of ``model``'s encoder and fusion (see the module doc).

    Args:
        model: a CRM in eval mode (any device).
        tol: relative error (max over channels and rows / the level's std) counted as no change.
        height: rows of the synthetic input.
        width: columns of the synthetic input.
        window: the column where the window starts (a multiple of 8): the largest distance
            measured is ``width - window`` px.
        seed: seed of the synthetic input.

    Returns:
        The radii (the largest distance measured where no distance has an error below ``tol``).
    """
    if window % _ALIGN or not 0 < window < width:
        raise ValueError(f"window must be a multiple of 8 inside (0, {width}), got {window}.")
    if getattr(model, "guided", False) or not isinstance(model.fusion, Fusion):
        raise ValueError(
            f"measure_context measures CRM's ResNet encoder and fusion, not a "
            f"{type(model).__name__}: set inference.tile_halo to a number of pixels."
        )
    device = next(model.parameters()).device
    x = synthetic_input(model, height, width, seed).to(device)
    with torch.inference_mode():
        full = _features(model, x, 0, (height, width))
        part = _features(model, x[..., window:], window, (height, width))
    radii, errors = {}, {}
    for (name, f), stride in zip(full.items(), (*model.encoder.strides, 2)):
        ref = f[..., window // stride :]
        rel = (part[name] - ref).abs().amax(dim=(0, 1, 2)) / f.std().clamp_min(1e-12)
        # a cell's distance from the edge: its centre's input column minus the window's start
        dist = [(c * stride + stride // 2) for c in range(rel.numel())]
        curve = [(d, float(e)) for d, e in zip(dist, rel.tolist())]
        above = [d for d, e in curve if e >= tol]
        if above and above[-1] == curve[-1][0]:
            raise ValueError(
                f"{name}'s context reaches past the {width - window} px measured (error "
                f"{curve[-1][1]:.2g} >= tol {tol:g} there): measure with a larger width."
            )
        radii[name] = (max(above) + stride // 2 + 1) if above else 0
        errors[name] = curve
    return ContextRadius(levels=radii, tol=tol, errors=errors)


_CACHE: weakref.WeakKeyDictionary[CRM, dict[float, ContextRadius]] = weakref.WeakKeyDictionary()


def context_halo(model: CRM, tol: float = 1e-3) -> int:
    """The measured tile halo of ``model`` (:meth:`ContextRadius.halo`), cached per model.

    The measurement (two encoder passes over a 128 x 768 input) runs once per model and ``tol``;
    the cache is not invalidated if the weights change afterwards. A model with a
    ``context_radius_px`` attribute (SAM-SR v3: an exact receptive field) gives it instead.
    """
    exact = getattr(model, "context_radius_px", None)
    if exact is not None:
        return -(-int(exact) // _ALIGN) * _ALIGN
    per_model = _CACHE.setdefault(model, {})
    if tol not in per_model:
        per_model[tol] = measure_context(model, tol)
    return per_model[tol].halo
