"""samsr: high-resolution segmentation refinement (CRM and the SAM-SR variants).

``samsr.load_refiner(ckpt, preset="fast", device="auto")`` gives a ready predictor,
``refiner(image, coarse) -> mask`` (see :func:`samsr.engine.loading.load_refiner`); the
``samsr refine`` command runs it over files and folders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_refiner"]

if TYPE_CHECKING:
    from samsr.engine.loading import load_refiner


def __getattr__(name: str) -> Any:
    # imported on first use: `import samsr` stays light (no torch, no Hydra)
    if name == "load_refiner":
        from samsr.engine.loading import load_refiner

        return load_refiner
    raise AttributeError(f"module 'samsr' has no attribute {name!r}")
