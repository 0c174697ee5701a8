"""SAM-guided refinement at full resolution: SAM-SR v1 and v2.1 on top of a CRM :class:`Refiner`.

Per image, SAM's image encoder and automatic mask generation (AMG) run once
(:class:`samsr.guidance.SamRunner`), then

* **v1**: the SAM masks the coarse mask covers enough are united and replace the coarse mask as
  CRM's input, unless a gate says SAM would not help (:mod:`samsr.guidance.v1`);
* **v2.1**: the masks are painted into the area-sorted, randomly coloured RGB map
  (:func:`samsr.data.sam_maps.paint_sam_map`, seeded by the image name) that the 7-channel CRM takes
  as extra input;
* **v2.2**: no AMG; sets of three grid points inside the coarse mask prompt SAM, and the
  confidence-weighted merge of its masks is 2 extra channels (:mod:`samsr.guidance.prompts`).

SAM and refiner costs are timed apart (``last_times``; :meth:`report` gives their means), because
the thesis reports them apart. With ``AmgConfig.max_side`` SAM sees a downscaled image: the
selection (v1) and the painting (v2.1) happen at that size and the result is upscaled with nearest
neighbour to the full resolution.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from samsr.device import synchronize
from samsr.guidance.maps import map_seed, paint_sam_map, resize_nearest
from samsr.inference.refiner import Refiner

if TYPE_CHECKING:
    from samsr.guidance.prompts import PromptConfig
    from samsr.guidance.runner import AmgConfig, SamRunner
    from samsr.guidance.v1 import V1Config, V1Stats

__all__ = ["SamGuidedRefiner"]

VARIANTS = ("samsr_v1", "samsr_v2_1", "samsr_v2_2")


class SamGuidedRefiner:
    """``(image, coarse, name) -> refined mask`` for SAM-SR v1 / v2.1.

    Args:
        refiner: the CRM refiner (4 input channels for v1, 7 for v2.1).
        runner: the SAM runner (:class:`samsr.guidance.SamRunner`).
        variant: ``samsr_v1`` or ``samsr_v2_1``.
        amg: :class:`samsr.guidance.AmgConfig`.
        v1: ``samsr.guidance.v1.V1Config`` (v1 only).
        prompts: ``samsr.guidance.prompts.PromptConfig`` (v2.2 only).
    """

    takes_name = True  # the evaluator passes each image's name (v2.1 seeds its colours with it)

    def __init__(
        self,
        refiner: Refiner,
        runner: SamRunner,
        variant: str,
        amg: AmgConfig,
        v1: V1Config | None = None,
        prompts: PromptConfig | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
        if variant == "samsr_v1" and v1 is None:
            from samsr.guidance.v1 import V1Config

            v1 = V1Config()
        self.refiner = refiner
        self.runner = runner
        self.variant = variant
        self.amg = amg
        self.v1 = v1
        if variant == "samsr_v2_2" and prompts is None:
            from samsr.guidance.prompts import PromptConfig

            prompts = PromptConfig()
        self.prompts = prompts
        self.last_times: dict[str, float] = {}
        self._times: dict[str, list[float]] = {"sam_s": [], "refine_s": []}
        self._stats: V1Stats | None = None
        if variant == "samsr_v1":
            from samsr.guidance.v1 import V1Stats

            self._stats = V1Stats()

    def _tick(self) -> float:
        synchronize(self.refiner.device)
        return time.perf_counter()

    def __call__(self, image: np.ndarray, coarse: np.ndarray, name: str = "") -> np.ndarray:
        """Refines one mask.

        Args:
            image: H x W x 3 uint8 RGB.
            coarse: H x W uint8 coarse mask (0/255).
            name: the image's name (seeds the v2.1 colours; any stable string).

        Returns:
            H x W uint8 refined mask.
        """
        hw = coarse.shape[:2]
        t0 = self._tick()
        self.runner.set_image(image, key=name or None, max_side=self.amg.max_side)
        extra = None
        if self.variant == "samsr_v2_2":  # point prompts, no AMG
            from samsr.guidance.prompts import sam_prompt_maps

            extra, _ = sam_prompt_maps(
                self.runner.predict_points, coarse, self.prompts, map_seed(name)
            )
            return self._refine(image, coarse, extra, t0)
        anns = self.runner.generate(self.amg)
        sam_hw = self._sam_size(anns, hw)
        if self.variant == "samsr_v1":
            from samsr.guidance.v1 import guided_coarse

            small = resize_nearest(coarse, sam_hw)
            guided, decision = guided_coarse(anns, small, self.v1)
            self._stats.update(decision)
            if decision.used:
                coarse = resize_nearest(guided, hw)
        else:
            extra = paint_sam_map(anns, hw, map_seed(name))  # painted at sam_hw, resized to hw
        return self._refine(image, coarse, extra, t0)

    def _refine(
        self, image: np.ndarray, coarse: np.ndarray, extra: np.ndarray | None, t0: float
    ) -> np.ndarray:
        """Runs the CRM after SAM (started at ``t0``) and records both stages' times."""
        t1 = self._tick()
        out = self.refiner(image, coarse, extra=extra)
        t2 = self._tick()
        self.last_times = {"sam_s": t1 - t0, "refine_s": t2 - t1}
        for key, value in self.last_times.items():
            self._times[key].append(value)
        return out

    @staticmethod
    def _sam_size(anns: list[dict], hw: tuple[int, int]) -> tuple[int, int]:
        """The (h, w) SAM's masks have (the image size unless AMG ran downscaled)."""
        for ann in anns:
            seg = ann.get("segmentation")
            if isinstance(seg, np.ndarray):
                return int(seg.shape[0]), int(seg.shape[1])
            if isinstance(seg, dict) and "size" in seg:
                return int(seg["size"][0]), int(seg["size"][1])
        return hw

    def report(self) -> dict[str, Any]:
        """Mean SAM and refiner milliseconds per image (all images), and v1's gate counts."""
        out: dict[str, Any] = {}
        for key, values in self._times.items():
            if values:
                out[key.replace("_s", "_ms")] = 1000 * float(np.mean(values))
        if self._stats is not None:
            out["sam_v1"] = self._stats.summary()
        return out

    def reset(self) -> None:
        """Clears the accumulated times and counts (e.g. between coarse sources)."""
        self._times = {"sam_s": [], "refine_s": []}
        if self._stats is not None:
            from samsr.guidance.v1 import V1Stats

            self._stats = V1Stats()
