"""A ready predictor from a checkpoint file: the model it holds, built from its own stored config.

A samsr checkpoint stores the resolved config it was trained with, so its architecture needs no
command-line help; that config is laid over the current defaults of the same model (keys added
since it was written take their defaults). A file that is not a samsr checkpoint is taken for the
official CRM release (``model=crm``, ResNet-50).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from samsr.device import resolve_device
from samsr.engine.builders import build_model, build_refiner, build_sam_refiner
from samsr.engine.checkpoint import CKPT_FORMAT, load_checkpoint
from samsr.engine.configs import compose
from samsr.inference import Refiner
from samsr.inference.sam_refiner import SamGuidedRefiner

__all__ = ["checkpoint_model_config", "load_refiner"]

log = logging.getLogger(__name__)


def checkpoint_model_config(path: str | Path) -> DictConfig:
    """The ``model`` config of the network in ``path`` (see the module docstring)."""
    ckpt = load_checkpoint(path)
    if not (isinstance(ckpt, dict) and ckpt.get("format") == CKPT_FORMAT):
        return compose("eval", ["model=crm"]).model  # the official CRM release
    stored = (ckpt.get("config") or {}).get("model")
    if not isinstance(stored, dict) or "name" not in stored:
        return compose("eval", [f"model={ckpt.get('model_name') or 'crm'}"]).model
    defaults = compose("eval", [f"model={stored['name']}"]).model
    return OmegaConf.merge(defaults, OmegaConf.create(stored))  # type: ignore[return-value]


def load_refiner(
    path: str | Path,
    preset: str = "fast",
    device: str = "auto",
    overrides: Sequence[str] = (),
) -> Refiner | SamGuidedRefiner:
    """The full-resolution predictor of a checkpoint: ``predictor(image, coarse) -> mask``.

    Args:
        path: a samsr checkpoint (``<run>/checkpoints/last.pt``) or the official CRM file.
        preset: an inference preset of ``configs/inference/`` (``fast``, ``faithful``, ...).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        overrides: more ``inference.*`` overrides, e.g. ``("inference.tile=1024",)``.

    Returns:
        A :class:`~samsr.inference.Refiner` (numpy H x W x 3 uint8 image and H x W uint8 mask in,
        H x W uint8 mask out), or SAM + refiner for SAM-SR v1/v2.x checkpoints.
    """
    model_cfg = checkpoint_model_config(path)
    inference_cfg = compose("eval", [f"inference={preset}", *overrides]).inference
    torch_device = resolve_device(device)
    model = build_model(model_cfg, weights=str(path))
    log.info("%s: %s, inference=%s, %s", path, model_cfg.name, preset, torch_device)
    return build_sam_refiner(
        build_refiner(model, inference_cfg, torch_device), model_cfg, torch_device
    )
