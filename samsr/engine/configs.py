"""samsr's Hydra configs (``samsr/configs``, shipped inside the package) composed outside a Hydra
entry point (``samsr refine``, the benchmark, checkpoint loading): one compose helper, so every
tool reads the same presets as the scripts, from a checkout or an installed package."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from samsr.errors import ConfigError

__all__ = ["CONFIG_DIR", "compose"]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
"""``samsr/configs/``: the package's configs (package data when installed)."""


def compose(config_name: str = "eval", overrides: Sequence[str] = ()) -> DictConfig:
    """The ``config_name`` config of :data:`CONFIG_DIR` with ``overrides``, composed with
    Hydra's compose API (no output folder, no logging set-up); inside a Hydra app (e.g.
    ``scripts/eval.py``), from the app's config search path. Errors are ConfigErrors."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        if GlobalHydra.instance().is_initialized():  # inside a Hydra app: its config search path
            return hydra_compose(config_name=config_name, overrides=list(overrides))
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:  # a bad preset, key or value
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{first} (overrides: {' '.join(overrides)})") from err
