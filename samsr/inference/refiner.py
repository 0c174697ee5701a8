"""The user-facing predictor: numpy image + coarse mask in, refined uint8 mask out.

Reference facts (dvlab-research/Entity, High-Quality-Segmention:
dataset/offline_dataset_crm_pad32.py, util/image_saver_crm.py): the image is read as RGB and
the coarse mask as 8-bit grayscale, both scaled by 1/255 (``ToTensor``; the mask is not
binarised); the refined probability is saved as ``(prob * 255).astype('uint8')``, i.e.
truncated, not rounded.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch
from torch import Tensor

from samsr.device import autocast, backend_flags, parse_dtype, resolve_device, synchronize
from samsr.inference.cascade import CascadeConfig, refine, resolve_halo
from samsr.inference.graph import folded_copy
from samsr.models.crm import CRM

__all__ = ["Refiner"]


def _check_image_tensor(image: Tensor, coarse: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(image, Tensor) or not isinstance(coarse, Tensor):
        raise ValueError("image and coarse must be torch tensors.")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if coarse.dim() == 2:
        coarse = coarse[None, None]
    elif coarse.dim() == 3:
        coarse = coarse.unsqueeze(0)
    if image.dim() != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"image must be 1 x 3 x H x W (or 3 x H x W), got {tuple(image.shape)}.")
    if coarse.dim() != 4 or coarse.shape[:2] != (1, 1):
        raise ValueError(f"coarse must be 1 x 1 x H x W (or H x W), got {tuple(coarse.shape)}.")
    if image.shape[-2:] != coarse.shape[-2:]:
        raise ValueError(
            f"Image size {tuple(image.shape[-2:])} and coarse mask size "
            f"{tuple(coarse.shape[-2:])} differ."
        )
    if not image.is_floating_point() or not coarse.is_floating_point():
        raise ValueError(
            f"image and coarse must be float tensors in [0, 1], got {image.dtype} and "
            f"{coarse.dtype} (use Refiner.__call__ for uint8 arrays)."
        )
    return image, coarse


class Refiner:
    """Runs a CRM on full-resolution images with the multi-scale cascade.

    Args:
        model: the CRM; moved to ``device`` and put in eval mode.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"`` or a torch device.
        cascade: cascade settings; default :meth:`CascadeConfig.recommended` (fast, bounded
            memory). Pass ``CascadeConfig()`` for the reference protocol (what evaluation
            uses through ``inference=faithful``). With ``fold_bn`` the refiner runs a copy of
            ``model`` with BatchNorm folded; with ``tile_halo="auto"`` the model's context
            radius is measured here, once (see :attr:`cascade` for the resolved settings).
        amp_dtype: None (float32), ``"bfloat16"`` or ``"float16"``: autocast for the network.
    """

    def __init__(
        self,
        model: CRM,
        device: str | torch.device = "cpu",
        cascade: CascadeConfig | None = None,
        amp_dtype: str | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.cascade = cascade or CascadeConfig.recommended()
        self.amp_dtype = parse_dtype(amp_dtype)
        if self.cascade.fold_bn:  # an inference copy: ``model`` itself keeps its BatchNorms
            self.model = folded_copy(self.model)
        if self.cascade.tile > 0 and self.cascade.tile_halo == "auto":  # measured once, here
            halo = resolve_halo(self.model, self.cascade)
            self.cascade = dataclasses.replace(self.cascade, tile_halo=halo)
        if self.cascade.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # set to a dict to accumulate decoded-pixel / tile counts and call seconds (see refine);
        # on by default for SAM-guided models (SAM-SR v3), whose SAM time is reported apart
        self.timings: dict[str, float] | None = {} if getattr(model, "guided", False) else None
        # True: also time each encode/decode stage (device syncs per stage: profiling only)
        self.profile = False
        self.calls = 0

    def report(self) -> dict[str, float]:
        """Mean ``sam_ms`` / ``refine_ms`` per image since :meth:`reset` (SAM-guided models;
        empty otherwise or when ``timings`` is off)."""
        t = self.timings
        if not t or "sam" not in t or self.calls == 0:
            return {}
        refine_s = t.get("call", 0.0) - t["sam"]
        return {"sam_ms": 1000 * t["sam"] / self.calls, "refine_ms": 1000 * refine_s / self.calls}

    def _run(self, image_t: Tensor, coarse_t: Tensor, extra: Tensor | None) -> Tensor:
        """The cascade under inference mode, autocast and the cascade's cuDNN/TF32 flags.

        With ``timings`` on, the call's seconds (device synchronised on both sides, once per
        image) are added to ``timings["call"]``.
        """
        timed = self.timings is not None
        self.calls += 1
        if timed:
            synchronize(self.device)
        t0 = time.perf_counter()
        flags = backend_flags(self.cascade.cudnn_benchmark, self.cascade.tf32)
        with flags, torch.inference_mode(), autocast(self.device, self.amp_dtype):
            prob = refine(
                self.model, image_t, coarse_t, self.cascade, extra, self.timings, self.profile
            )
            if self.cascade.flip:  # the mirrored input's answer, mirrored back, averaged
                mirror = None if extra is None else extra.flip(-1)
                flipped = refine(self.model, image_t.flip(-1), coarse_t.flip(-1), self.cascade,
                                 mirror, self.timings, self.profile)  # fmt: skip
                prob = (prob + flipped.flip(-1)) / 2
        if timed:
            synchronize(self.device)
            self.timings["call"] = self.timings.get("call", 0.0) + time.perf_counter() - t0
        return prob

    def reset(self) -> None:
        """Clears the accumulated timings (e.g. between coarse sources)."""
        if self.timings is not None:
            self.timings.clear()
        self.calls = 0

    def refine_tensor(
        self, image_t: Tensor, coarse_t: Tensor, extra: Tensor | None = None
    ) -> Tensor:
        """Refines tensors.

        Args:
            image_t: 1 x 3 x H x W (or 3 x H x W) RGB float in [0, 1].
            coarse_t: 1 x 1 x H x W (or H x W) mask float in [0, 1].
            extra: optional 1 x E x H x W extra channels for SAM-SR variants.

        Returns:
            1 x 1 x H x W float32 probability, on the refiner's device.
        """
        image_t, coarse_t = _check_image_tensor(image_t, coarse_t)
        image_t = image_t.to(self.device, torch.float32)
        coarse_t = coarse_t.to(self.device, torch.float32)
        if extra is not None:
            extra = extra.to(self.device)
        return self._run(image_t, coarse_t, extra)

    def __call__(
        self, image: np.ndarray, coarse: np.ndarray, extra: np.ndarray | None = None
    ) -> np.ndarray:
        """Refines one mask.

        Args:
            image: H x W x 3 uint8 RGB image.
            coarse: H x W uint8 coarse mask, 0/255 (soft 8-bit values are used as they are).
            extra: optional H x W x E uint8 map for models with extra input channels (SAM-SR
                v2.1's SAM map), read as value / 255.

        Returns:
            H x W uint8 refined mask, ``uint8(probability * 255)`` as the reference saves it.
        """
        if not isinstance(image, np.ndarray) or not isinstance(coarse, np.ndarray):
            raise ValueError(
                f"image and coarse must be numpy arrays, got {type(image).__name__} and "
                f"{type(coarse).__name__}."
            )
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be H x W x 3 (RGB), got shape {image.shape}.")
        if coarse.ndim == 3 and coarse.shape[2] == 1:
            coarse = coarse[..., 0]
        if coarse.ndim != 2:
            raise ValueError(f"coarse must be an H x W mask, got shape {coarse.shape}.")
        if image.dtype != np.uint8 or coarse.dtype != np.uint8:
            raise ValueError(
                f"image and coarse must be uint8, got {image.dtype} and {coarse.dtype}."
            )
        if image.shape[:2] != coarse.shape:
            raise ValueError(
                f"Image size {image.shape[:2]} and coarse mask size {coarse.shape} differ."
            )
        if coarse.max() == 1:
            raise ValueError(
                "coarse looks like a 0/1 mask; pass it as 0/255 (the model reads value / 255)."
            )
        # uint8 to the device; the cascade divides by 255 in float32 band by band (ref ToTensor:
        # byte tensor .float().div(255)), so no full-size float copy of the input is made here
        image_t = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
        coarse_t = torch.from_numpy(np.ascontiguousarray(coarse)).to(self.device)
        image_t = image_t.permute(2, 0, 1).unsqueeze(0)
        coarse_t = coarse_t[None, None]
        extra_t = None
        if extra is not None:
            if extra.ndim == 2:
                extra = extra[..., None]
            if extra.dtype != np.uint8 or extra.shape[:2] != coarse.shape:
                raise ValueError(
                    f"extra must be an H x W x E uint8 map of the image size {coarse.shape}, got "
                    f"{extra.dtype} {extra.shape}."
                )
            extra_t = torch.from_numpy(np.ascontiguousarray(extra)).to(self.device)
            extra_t = extra_t.permute(2, 0, 1).unsqueeze(0)
        prob = self._run(image_t, coarse_t, extra_t)
        # ref tensor_to_gray_im: (prob * 255).astype('uint8'), truncation
        return (prob[0, 0] * 255).to(torch.uint8).cpu().numpy()
