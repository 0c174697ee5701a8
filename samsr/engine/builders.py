"""The only place that turns configuration into objects (models, datasets, refiners)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from samsr.data.train_dataset import EvalDataset
from samsr.engine.checkpoint import load_model_weights
from samsr.inference import CascadeConfig, Refiner


class ConfigError(ValueError):
    """A configuration value is missing or invalid."""


def build_model(model_cfg: DictConfig, weights: str | None = None) -> nn.Module:
    """Instantiate ``model.net``; load ``weights`` (samsr or official CRM checkpoint) if given."""
    model = instantiate(model_cfg.net)
    if weights:
        load_model_weights(model, weights, model_name=model_cfg.get("name"))
    return model


def build_loss(model_cfg: DictConfig) -> nn.Module:
    """Instantiate the training loss of the model config."""
    return instantiate(model_cfg.loss)


def prepare_data(data_cfg: DictConfig) -> None:
    """Run the data config's ``prepare`` step (e.g. generate the synthetic set); idempotent."""
    if data_cfg.get("prepare"):
        instantiate(data_cfg.prepare)


def build_train_dataset(data_cfg: DictConfig) -> torch.utils.data.Dataset:
    """The training dataset of ``data.train``."""
    if not data_cfg.get("train"):
        raise ConfigError(
            f"data={data_cfg.get('name')} has no training set (data.train is null); "
            "train with data=train_merged, data=duts_sample or data=synthetic."
        )
    return instantiate(data_cfg.train)


def build_eval_datasets(
    data_cfg: DictConfig, split: str, max_images: int | None = None
) -> dict[str, EvalDataset]:
    """One BIG-layout dataset per coarse source of ``data.<split>``."""
    split_cfg = data_cfg.get(split)
    if split not in ("val", "test") or not split_cfg:
        raise ConfigError(f"data={data_cfg.get('name')} has no '{split}' split (use val or test)")
    coarse_dirs = split_cfg.get("coarse_dirs") or {None: None}
    return {
        str(source or "seg"): EvalDataset(
            split_cfg.split_dir,
            coarse_dir=coarse_dir,
            source=str(source or "seg"),
            max_images=max_images,
        )
        for source, coarse_dir in coarse_dirs.items()
    }


def cascade_config(inference_cfg: DictConfig) -> CascadeConfig:
    """The cascade settings of an ``inference`` config (unknown keys are an error)."""
    values = OmegaConf.to_container(inference_cfg, resolve=True)
    assert isinstance(values, dict)
    known = {f.name for f in dataclasses.fields(CascadeConfig)}
    ignored = {"name", "amp_dtype"}
    unknown = sorted(k for k in values if k not in known and k not in ignored)
    if unknown:
        raise ConfigError(
            f"unknown inference option(s) {unknown}; valid options: {sorted(known | ignored)}"
        )
    try:
        return CascadeConfig(**{k: v for k, v in values.items() if k in known})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid inference config: {err}") from err


def build_refiner(model: nn.Module, inference_cfg: DictConfig, device: torch.device) -> Refiner:
    """The full-resolution predictor for ``model`` with the ``inference`` settings."""
    return Refiner(
        model,
        device=device,
        cascade=cascade_config(inference_cfg),
        amp_dtype=inference_cfg.get("amp_dtype"),
    )


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers (stored in checkpoints and metrics)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
