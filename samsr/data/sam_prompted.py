"""SAM-SR v2.2 training samples: SAM's point-prompt maps computed for every sample.

The v2.2 prompts are drawn inside each sample's (randomly synthesised) coarse mask, so the maps
cannot be precomputed: :class:`SamPromptedDataset` runs SAM on every training crop (one image
encoding plus one mask-decoder call per point set) in the data-loading workers and adds the two
channels as ``extra``. Cost: one SAM image encoding per sample (ViT-H: ~0.5 s on a recent GPU,
tens of seconds on a CPU), which dominates training; use ``model.sam.type=vit_b`` or a small
``data.train.crop_size`` to make it affordable, and several ``trainer.num_workers``.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from samsr.guidance.build import SamSettings
from samsr.guidance.prompts import PromptConfig, sam_prompt_maps

__all__ = ["SamPromptedDataset"]


class SamPromptedDataset(Dataset):
    """Wraps a training dataset and adds v2.2's SAM maps as ``extra`` (2 x S x S in [0, 1]).

    Args:
        base: a dataset of ``{"image": 3xSxS, "coarse": 1xSxS, ...}`` samples in [0, 1].
        sam: which SAM to build (``model.sam``).
        prompts: the prompt settings.
        device: where SAM runs (each worker process builds its own copy on first use).
    """

    def __init__(
        self, base: Dataset, sam: SamSettings, prompts: PromptConfig, device: str = "cpu"
    ) -> None:
        self.base = base
        self.sam = sam
        self.prompts = prompts
        self.device = device
        self._runner: Any = None  # built lazily: picklable before the workers start

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def _runner_for_worker(self) -> Any:
        if self._runner is None:
            from samsr.guidance.build import build
            from samsr.guidance.runner import SamRunner

            self._runner = SamRunner(build(self.sam, self.device))
        return self._runner

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.base[index]
        image = (sample["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        coarse = (sample["coarse"][0].numpy() * 255).round().astype(np.uint8)
        runner = self._runner_for_worker()
        with torch.inference_mode():
            runner.set_image(np.ascontiguousarray(image))
            # prompts depend on this sample's coarse mask: seeded by it, resuming repeats them
            maps, _ = sam_prompt_maps(
                runner.predict_points, coarse, self.prompts, zlib.crc32(coarse.tobytes())
            )
        sample["extra"] = torch.from_numpy(maps).permute(2, 0, 1).float().div(255)
        return sample
