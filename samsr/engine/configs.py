"""The repository's Hydra configs composed outside a Hydra entry point (the benchmark, checkpoint
loading): one compose helper, so every tool reads the same presets as the scripts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

__all__ = ["CONFIG_DIR", "compose"]

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
"""``configs/`` of the checkout."""


def compose(config_name: str = "eval", overrides: Sequence[str] = ()) -> DictConfig:
    """The ``config_name`` config of :data:`CONFIG_DIR` with ``overrides``, composed with
    Hydra's compose API (no output folder, no logging set-up)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))
