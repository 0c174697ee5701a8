"""SAM-guided refinement at full resolution: SAM-SR v1, v2.1, v2.2 on top of a CRM :class:`Refiner`.

Per image, SAM's image encoder runs once (:class:`samsr.guidance.SamRunner`), then the model's
guidance strategy (:mod:`samsr.guidance.strategy`) gives the refiner its inputs:

* **v1**: the SAM masks the coarse mask covers enough are united and replace the coarse mask as
  CRM's input, unless a gate says SAM would not help (:mod:`samsr.guidance.v1`);
* **v2.1**: the masks are painted into the area-sorted, randomly coloured RGB map
  (:func:`samsr.guidance.maps.paint_sam_map`, seeded by the image name) that the 7-channel CRM takes
  as extra input;
* **v2.2**: no AMG; sets of three grid points inside the coarse mask prompt SAM, and the
  confidence-weighted merge of its masks is 2 extra channels (:mod:`samsr.guidance.prompts`).

SAM and refiner costs are timed apart (``last_times``; :meth:`report` gives their means), because
the thesis reports them apart. With ``AmgConfig.max_side`` SAM sees a downscaled image: the
selection (v1) and the painting (v2.1) happen at that size and the result is resized to the full
resolution with the one nearest rule (:func:`samsr.guidance.maps.resize_nearest`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from samsr.device import synchronize
from samsr.inference.refiner import Refiner

if TYPE_CHECKING:
    from samsr.guidance.runner import SamRunner
    from samsr.guidance.strategy import Guidance

__all__ = ["SamGuidedRefiner"]


class SamGuidedRefiner:
    """``(image, coarse, name) -> refined mask`` for SAM-SR v1 / v2.1 / v2.2: SAM, then the CRM.

    Per image: SAM encodes it once (at the strategy's working size), the guidance strategy turns
    SAM's view into the refiner's inputs (:class:`samsr.guidance.strategy.Guided`), the refiner
    refines. SAM's and the refiner's times are kept apart.

    Args:
        refiner: the CRM refiner (4 input channels for v1, 7 for v2.1, 6 for v2.2).
        runner: SAM (:class:`samsr.guidance.SamRunner`).
        guidance: the strategy (:class:`samsr.guidance.V1Guidance`, ``MapGuidance``,
            ``PromptGuidance``: ``model.guidance``).
    """

    takes_name = True  # the evaluator passes each image's name (seeds colours and prompts)

    def __init__(self, refiner: Refiner, runner: SamRunner, guidance: Guidance) -> None:
        self.refiner = refiner
        self.runner = runner
        self.guidance = guidance
        self.last_times: dict[str, float] = {}
        self._times: dict[str, list[float]] = {"sam_s": [], "refine_s": []}

    def _tick(self) -> float:
        synchronize(self.refiner.device)
        return time.perf_counter()

    def __call__(self, image: np.ndarray, coarse: np.ndarray, name: str = "") -> np.ndarray:
        """Refines one mask.

        Args:
            image: H x W x 3 uint8 RGB.
            coarse: H x W uint8 coarse mask (0/255).
            name: the image's name (seeds the v2.1 colours and v2.2 prompts; any stable string).

        Returns:
            H x W uint8 refined mask.
        """
        t0 = self._tick()
        self.runner.set_image(image, key=name or None, max_side=self.guidance.max_side)
        guided = self.guidance.guide(self.runner, image, coarse, name)
        t1 = self._tick()
        out = self.refiner(image, guided.coarse, extra=guided.extra)
        t2 = self._tick()
        self.last_times = {"sam_s": t1 - t0, "refine_s": t2 - t1}
        for key, value in self.last_times.items():
            self._times[key].append(value)
        return out

    def report(self) -> dict[str, Any]:
        """Mean SAM and refiner milliseconds per image (all images), and the strategy's counts."""
        out: dict[str, Any] = {}
        for key, values in self._times.items():
            if values:
                out[key.replace("_s", "_ms")] = 1000 * float(np.mean(values))
        out.update(self.guidance.report())
        return out

    def reset(self) -> None:
        """Clears the accumulated times and counts (e.g. between coarse sources)."""
        self._times = {"sam_s": [], "refine_s": []}
        self.guidance.reset()
