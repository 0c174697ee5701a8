"""samsr.inference: the full-resolution predictor (multi-scale cascade, Refiner)."""

from samsr.inference.cascade import CascadeConfig, refine
from samsr.inference.refiner import Refiner

__all__ = ["CascadeConfig", "Refiner", "refine"]
