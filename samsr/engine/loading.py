"""A ready predictor from a checkpoint file: the model it holds, built from its own stored config.

A samsr checkpoint stores the resolved config it was trained with, so its architecture needs no
command-line help; that config is laid over the current defaults of the same model (keys added
since it was written take their defaults). A file that is not a samsr checkpoint is taken for the
official CRM release (``model=crm``, ResNet-50). Explicit overrides still win over the stored
config, with a warning naming each key that then differs from the checkpoint
(:func:`resolve_model_config`). The file is read once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from samsr.data.sam_cache import flatten_keys
from samsr.device import resolve_device
from samsr.engine.builders import build_model, build_refiner, build_sam_refiner
from samsr.engine.checkpoint import CheckpointSource, LoadedCheckpoint
from samsr.engine.configs import compose
from samsr.inference import Refiner
from samsr.inference.sam_refiner import SamGuidedRefiner

__all__ = [
    "checkpoint_model_config",
    "load_refiner",
    "model_overrides",
    "resolve_model_config",
]

log = logging.getLogger(__name__)


def _loaded(source: CheckpointSource) -> LoadedCheckpoint:
    return source if isinstance(source, LoadedCheckpoint) else LoadedCheckpoint.read(source)


def _concrete(node: DictConfig) -> DictConfig:
    """A model config on its own: its interpolations (``${model.sam.amg}``, ...) resolved while
    it is still part of the config it came from."""
    return OmegaConf.create(OmegaConf.to_container(node, resolve=True))


def _defaults(name: str) -> DictConfig:
    return _concrete(compose("eval", [f"model={name}"]).model)


def checkpoint_model_config(source: CheckpointSource) -> DictConfig:
    """The ``model`` config of the network in ``source`` (see the module docstring)."""
    loaded = _loaded(source)
    if not loaded.is_samsr:
        return _defaults("crm")  # the official CRM release
    ckpt = loaded.content
    stored = (ckpt.get("config") or {}).get("model")
    if not isinstance(stored, dict) or "name" not in stored:
        return _defaults(str(ckpt.get("model_name") or "crm"))
    merged = OmegaConf.merge(_defaults(str(stored["name"])), OmegaConf.create(stored))
    return merged  # type: ignore[return-value]


def model_overrides(overrides: Sequence[str]) -> tuple[str | None, list[str], list[str], bool]:
    """What a list of Hydra overrides says about the model.

    Returns:
        ``(group, keys, deleted, whole)``: the ``model=`` choice (or None), the ``model.*`` keys
        set (without the ``model.`` prefix), the ones deleted (``~model.*``), and whether an
        ``experiment=`` choice sets the model config as a whole.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    group, keys, deleted, whole = None, [], [], False
    for override in OverridesParser.create().parse_overrides(overrides=list(overrides)):
        name = override.key_or_group
        if name == "model" and not override.is_delete():
            group = str(override.value())
        elif name == "experiment":
            whole = True
        elif name.startswith("model."):
            (deleted if override.is_delete() else keys).append(name[len("model.") :])
    return group, keys, deleted, whole


def resolve_model_config(
    source: CheckpointSource,
    requested: DictConfig,
    overrides: Sequence[str] | None = None,
    stored: DictConfig | None = None,
) -> DictConfig:
    """The model config to build for the weights in ``source``.

    Args:
        source: the checkpoint (file or already read).
        requested: the composed ``model`` config of the run (defaults, experiment, overrides).
        overrides: the run's command-line overrides. None: ``requested`` is explicit as a whole
            (a config built in Python). Otherwise the checkpoint's config is used, with only what
            the overrides set taken from ``requested``: ``model.*`` keys (``~model.*`` deletes),
            and, after ``model=<another model>`` or ``experiment=...``, all of ``requested``
            (after ``model=``, the network settings stay the checkpoint's when both configs build
            the same network, e.g. SAM-SR v1 over a CRM checkpoint).
        stored: ``checkpoint_model_config(source)`` when the caller already has it.

    Returns:
        The resolved config. Each key whose value then differs from the checkpoint's is logged
        as a warning (the given value wins).
    """
    stored = checkpoint_model_config(source) if stored is None else stored
    requested = _concrete(requested)
    if overrides is None:
        resolved = requested.copy()
    else:
        group, keys, deleted, whole = model_overrides(overrides)
        if whole or (group is not None and group != stored.get("name")):
            resolved = requested.copy()
            same_net = requested.net.get("_target_") == stored.net.get("_target_")
            if group is not None and not whole and same_net:
                resolved.net = stored.net.copy()
        else:
            resolved = stored.copy()
        for key in keys:
            OmegaConf.update(resolved, key, OmegaConf.select(requested, key), merge=False)
        for key in deleted:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(resolved, parent) if parent else resolved
            if isinstance(node, DictConfig) and leaf in node:
                del node[leaf]
    path = _loaded(source).path
    _warn_differences(stored, resolved, path)
    return resolved


def _warn_differences(stored: DictConfig, resolved: DictConfig, path: Path) -> None:
    old = flatten_keys(OmegaConf.to_container(stored, resolve=True))
    new = flatten_keys(OmegaConf.to_container(resolved, resolve=True))
    for key in sorted(set(old) & set(new)):
        if old[key] != new[key]:
            log.warning(
                "model.%s=%s differs from the checkpoint's %s (%s); the given value wins",
                key,
                new[key],
                old[key],
                path,
            )


def load_refiner(
    path: str | Path,
    preset: str = "fast",
    device: str = "auto",
    overrides: Sequence[str] = (),
) -> Refiner | SamGuidedRefiner:
    """The full-resolution predictor of a checkpoint: ``predictor(image, coarse) -> mask``.

    Args:
        path: a samsr checkpoint (``<run>/checkpoints/last.pt``) or the official CRM file.
        preset: an inference preset of ``samsr/configs/inference/`` (``fast``, ``faithful``, ...).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        overrides: more Hydra overrides: ``inference.*`` (e.g. ``inference.tile=1024``), and
            ``model=...``/``model.*`` (e.g. ``model=samsr_v1``, ``model.sam.checkpoint=...``),
            which win over the checkpoint's config (see :func:`resolve_model_config`).

    Returns:
        A :class:`~samsr.inference.Refiner` (numpy H x W x 3 uint8 image and H x W uint8 mask in,
        H x W uint8 mask out), or SAM + refiner for SAM-SR v1/v2.x checkpoints.
    """
    loaded = LoadedCheckpoint.read(path)
    # composed for the checkpoint's own model unless told otherwise, so that its keys (e.g.
    # model.sam.checkpoint) can be overridden
    stored = checkpoint_model_config(loaded)
    own = [] if model_overrides(overrides)[0] else [f"model={stored.name}"]
    cfg = compose("eval", [*own, f"inference={preset}", *overrides])
    model_cfg = resolve_model_config(loaded, cfg.model, overrides, stored=stored)
    torch_device = resolve_device(device)
    model = build_model(model_cfg, weights=loaded)
    del loaded  # the weights are in the model now
    log.info("%s: %s, inference=%s, %s", path, model_cfg.name, preset, torch_device)
    return build_sam_refiner(
        build_refiner(model, cfg.inference, torch_device), model_cfg, torch_device
    )
