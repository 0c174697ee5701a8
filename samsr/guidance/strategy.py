"""The one interface of SAM guidance before the refiner (SAM-SR v1, v2.1, v2.2).

A guidance strategy says what SAM must see of an image (``max_side``: the working size SAM encodes
at) and turns SAM's view of it into what the CRM refiner is given (:class:`Guided`): the mask to
refine (v1 may replace the coarse mask) and extra input channels (v2.1's colour map, v2.2's
prompt maps). Each strategy is selected by ``_target_`` in its model config (``model.guidance``);
:class:`samsr.inference.sam_refiner.SamGuidedRefiner` composes SAM, one strategy and the refiner.
SAM-SR v3 needs no strategy: its SAM encoder sits inside the network.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

if TYPE_CHECKING:
    from samsr.guidance.runner import SamRunner

__all__ = ["Guidance", "Guided", "working_size"]


class Guided(NamedTuple):
    """What the refiner gets for one image.

    Attributes:
        coarse: H x W uint8 mask to refine (0/255).
        extra: H x W x E uint8 extra input channels, or None.
    """

    coarse: np.ndarray
    extra: np.ndarray | None


class Guidance(Protocol):
    """A SAM guidance strategy."""

    max_side: int | None  # SAM encodes the image downscaled to this long side (None: full size)

    def guide(self, runner: SamRunner, image: np.ndarray, coarse: np.ndarray, name: str) -> Guided:
        """SAM's guidance for one image (``runner`` has it set at ``max_side``).

        Args:
            runner: SAM with ``image`` encoded.
            image: H x W x 3 uint8 RGB.
            coarse: H x W uint8 coarse mask (0/255).
            name: the image's name (seeds colours and prompts).
        """
        ...

    def report(self) -> dict[str, Any]:
        """Counts since :meth:`reset` to merge into the metrics (e.g. v1's gate decisions)."""
        ...

    def reset(self) -> None:
        """Forgets the counts (between coarse sources)."""
        ...


def working_size(anns: list[dict[str, Any]], default: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of SAM's automatic masks (the image size unless AMG ran downscaled)."""
    for ann in anns:
        seg = ann.get("segmentation")
        if isinstance(seg, np.ndarray):
            return int(seg.shape[0]), int(seg.shape[1])
        if isinstance(seg, dict) and "size" in seg:
            return int(seg["size"][0]), int(seg["size"][1])
    return default
