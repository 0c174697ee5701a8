"""samsr.guidance: everything Segment Anything (SAM) for the SAM-SR variants, and nothing else.

The only package that imports ``segment_anything``; it sits on the models/metrics floor (it never
imports ``engine``, ``inference`` or ``data``), so ``data`` (training caches) and ``inference``
(the SAM-guided predictor) both build on it.

============  ===================================================================================
module        what
============  ===================================================================================
``build``     :class:`SamSettings` and the one builder from them (ViT-H/L/B from local official
              checkpoints, or the tiny random SAM); SAM-SR v3's frozen :func:`image_encoder`
``runner``    :class:`SamRunner`: one image encoded once, then automatic masks (:class:`AmgConfig`)
              and point prompts from that embedding
``masks``     :func:`decode_mask` / :func:`mask_area` of AMG records in every output mode
``rle``       SAM's uncompressed run-length encoding (decode, windows, boxes, areas)
``selection`` which SAM masks a coarse mask covers (coverage, sparsity, deformation, the union)
``v1``        SAM-SR v1: the selected masks replace the coarse mask unless a gate skips SAM
``maps``      SAM-SR v2.1: AMG masks painted in random colours (:func:`paint_sam_map`) and the one
              resize rule for SAM outputs (``INTER_NEAREST_EXACT``)
``prompts``   SAM-SR v2.2: point sets inside the coarse mask and the IoU-weighted merge
``strategy``  the one interface of guidance before the refiner (:class:`Guidance`): v1's
              :class:`V1Guidance`, v2.1's :class:`MapGuidance`, v2.2's :class:`PromptGuidance`,
              each selected by ``_target_`` in its model config (``model.guidance``)
============  ===================================================================================

Names are importable from the package (``from samsr.guidance import SamRunner``); each module is
imported on first use, so ``import samsr.guidance`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build": ("SAM_CHECKPOINTS", "SamEncoder", "SamSettings", "build_from_settings", "build_sam",
              "build_tiny_sam", "image_encoder"),
    "runner": ("OUTPUT_MODES", "AmgConfig", "SamRunner"),
    "masks": ("decode_mask", "mask_area"),
    "maps": ("COLOUR_RANGE", "MapGuidance", "annotation_area", "decode_annotation", "map_seed",
             "paint_sam_map", "resize_nearest"),
    "prompts": ("BatchPromptMaps", "PromptConfig", "PromptGuidance", "grid_points",
                "merge_predictions", "point_sets", "sam_prompt_maps"),
    "strategy": ("Guidance", "Guided", "working_size"),
    "selection": ("coverage", "deformation", "select_and_union", "sparsity"),
    "v1": ("V1Config", "V1Guidance", "V1Decision", "V1Stats", "guided_coarse"),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))
