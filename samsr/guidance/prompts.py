"""SAM-SR v2.2 prompts (thesis 3.3): point sets inside the coarse mask, a SAM mask per set, merged.

A grid of points (``spacing`` pixels apart) is laid over the coarse mask and the points inside it
are kept (at most ``max_points``, a seeded random subset); they are shuffled and grouped in sets
of ``points_per_set`` positive points. SAM predicts one mask and its IoU estimate per set, and the
masks are merged with their predicted IoU as weights:

* ``merged = sum_i iou_i * mask_i / sum_i iou_i`` (a soft SAM mask in [0, 1]);
* ``confidence = max_i iou_i * mask_i`` (how sure the most confident covering mask is).

Both become CRM's two extra input channels (6 in all with image and coarse mask). The SPEC names
6 channels without listing the sixth; the confidence map is this project's reading.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from samsr.guidance.maps import map_seed
from samsr.guidance.strategy import Guided

if TYPE_CHECKING:
    from samsr.guidance.runner import SamRunner

__all__ = [
    "BatchPromptMaps",
    "PromptGuidance",
    "PromptConfig",
    "grid_points",
    "merge_predictions",
    "point_sets",
    "sam_prompt_maps",
]

Predict = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, float]]
"""``(points N x 2 (x, y), labels N) -> (H x W bool mask, predicted IoU)``."""


@dataclass(frozen=True)
class PromptConfig:
    """Point prompts of SAM-SR v2.2.

    Attributes:
        spacing: grid step in pixels of the image SAM's masks are predicted for.
        max_points: cap on the points kept inside the mask (a seeded random subset beyond it).
        points_per_set: positive points per SAM prompt.
    """

    spacing: int = 32
    max_points: int = 48
    points_per_set: int = 3

    def __post_init__(self) -> None:
        for name in ("spacing", "max_points", "points_per_set"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PromptConfig.{name} must be an integer >= 1, got {value!r}.")
        if self.max_points < self.points_per_set:
            raise ValueError(
                f"PromptConfig.max_points ({self.max_points}) must be >= points_per_set "
                f"({self.points_per_set})."
            )


def grid_points(
    coarse: np.ndarray, spacing: int, max_points: int, rng: np.random.Generator
) -> np.ndarray:
    """Grid points inside a mask.

    Args:
        coarse: H x W bool mask.
        spacing: grid step; the grid is centred in the mask's bounding box.
        max_points: at most this many points (a random subset drawn with ``rng``).
        rng: random generator.

    Returns:
        N x 2 int64 (x, y) points inside the mask; if the grid misses a small mask entirely, its
        pixel nearest to the mask's centroid; empty (0 x 2) for an empty mask.
    """
    ys, xs = np.nonzero(coarse)
    if len(ys) == 0:
        return np.zeros((0, 2), np.int64)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    gy = np.arange(y0 + ((y1 - y0) % spacing) // 2, y1 + 1, spacing)
    gx = np.arange(x0 + ((x1 - x0) % spacing) // 2, x1 + 1, spacing)
    yy, xx = np.meshgrid(gy, gx, indexing="ij")
    inside = coarse[yy, xx]
    points = np.stack([xx[inside], yy[inside]], axis=1).astype(np.int64)
    if len(points) == 0:
        cy, cx = ys.mean(), xs.mean()
        i = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
        return np.array([[xs[i], ys[i]]], np.int64)
    if len(points) > max_points:
        points = points[np.sort(rng.choice(len(points), max_points, replace=False))]
    return points


def point_sets(points: np.ndarray, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffles the points and groups them in sets of ``size`` (the last, short set is topped up
    with points drawn from the others, so every prompt has ``size`` points when there are enough;
    fewer points than ``size`` give one set of all of them).

    Returns:
        List of k x 2 arrays.
    """
    if len(points) == 0:
        return []
    order = rng.permutation(len(points))
    shuffled = points[order]
    if len(points) <= size:
        return [shuffled]
    sets = [shuffled[i : i + size] for i in range(0, len(shuffled), size)]
    if len(sets[-1]) < size:
        missing = size - len(sets[-1])
        extra = shuffled[rng.choice(len(shuffled) - len(sets[-1]), missing, replace=False)]
        sets[-1] = np.concatenate([sets[-1], extra])
    return sets


def merge_predictions(
    predictions: list[tuple[np.ndarray, float]], shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Confidence-weighted merge of SAM's masks (see the module docstring).

    Args:
        predictions: (H x W bool mask, predicted IoU) per prompt.
        shape: (H, W), used when there is no prediction.

    Returns:
        (merged, confidence): H x W float32 maps in [0, 1]; zeros without predictions.
    """
    merged = np.zeros(shape, np.float32)
    confidence = np.zeros(shape, np.float32)
    total = 0.0
    for mask, iou in predictions:
        weight = float(np.clip(iou, 0.0, 1.0))
        merged[mask] += weight
        np.maximum(confidence, mask * np.float32(weight), out=confidence)
        total += weight
    if total > 0:
        merged /= total
    return merged, confidence


def sam_prompt_maps(
    predict: Predict, coarse: np.ndarray, cfg: PromptConfig, seed: int
) -> tuple[np.ndarray, int]:
    """The v2.2 extra channels for one image.

    Args:
        predict: SAM's point-prompt predictor (``SamRunner.predict_points`` on the image).
        coarse: H x W uint8 coarse mask (> 127 is foreground).
        cfg: prompt settings.
        seed: seeds the point subset and grouping (e.g. ``map_seed(name)``): deterministic.

    Returns:
        (H x W x 2 uint8 map: merged and confidence scaled by 255, number of prompts).
    """
    fg = coarse > 127
    rng = np.random.default_rng(seed)
    points = grid_points(fg, cfg.spacing, cfg.max_points, rng)
    sets = point_sets(points, cfg.points_per_set, rng)
    preds = [predict(s.astype(np.float64), np.ones(len(s), np.int64)) for s in sets]
    merged, confidence = merge_predictions(preds, fg.shape)
    out = np.stack([merged, confidence], axis=-1)
    return np.round(out * 255).astype(np.uint8), len(sets)


def _to_uint8(t: Tensor) -> np.ndarray:
    """[0, 1] floats -> uint8 numpy on the host, rounded (as the images were saved)."""
    return (t.detach().float() * 255).round().to(torch.uint8).cpu().numpy()


class BatchPromptMaps:
    """SAM-SR v2.2's extra channels for a training batch, computed on the training device.

    The prompts depend on each sample's (randomly synthesised) coarse mask, so they cannot be
    precomputed: every step, the batch's crops go through SAM's image encoder in one call, then
    each crop's point sets through the prompt decoder (one call per set), all on SAM's device in
    the training process (no SAM copy in the data workers). Each sample is seeded by its coarse
    mask's bytes, so a resumed run repeats the same prompts.

    Args:
        runner: SAM (on the training device).
        prompts: the prompt settings.
    """

    def __init__(self, runner: SamRunner, prompts: PromptConfig) -> None:
        self.runner = runner
        self.prompts = prompts

    def __call__(self, image: Tensor, coarse: Tensor) -> Tensor:
        """Maps of a batch.

        Args:
            image: B x 3 x S x S RGB in [0, 1].
            coarse: B x 1 x S x S coarse mask in [0, 1].

        Returns:
            B x 2 x S x S float32 in [0, 1] (merged mask, confidence), on ``image``'s device.
        """
        images = list(_to_uint8(image.permute(0, 2, 3, 1)))
        coarses = list(_to_uint8(coarse[:, 0]))
        maps = []
        with torch.inference_mode():
            for pin, mask in zip(self.runner.encode_batch(images), coarses):
                self.runner.select(pin)
                seed = zlib.crc32(np.ascontiguousarray(mask).tobytes())
                maps.append(
                    sam_prompt_maps(self.runner.predict_points, mask, self.prompts, seed)[0]
                )
        out = torch.from_numpy(np.stack(maps)).to(image.device, non_blocking=True)
        return out.permute(0, 3, 1, 2).float().div(255)


class PromptGuidance:
    """SAM-SR v2.2 at inference: point prompts inside the coarse mask, the merged SAM masks as 2
    extra channels (seeded by the image name).

    Args:
        prompts: the prompt settings.
        max_side: SAM encodes the image downscaled to this long side (None: full size).
    """

    def __init__(self, prompts: PromptConfig, max_side: int | None = None) -> None:
        self.prompts = prompts
        self.max_side = max_side

    def guide(self, runner: SamRunner, image: np.ndarray, coarse: np.ndarray, name: str) -> Guided:
        """The coarse mask unchanged, the prompt maps as extra channels."""
        maps, _ = sam_prompt_maps(runner.predict_points, coarse, self.prompts, map_seed(name))
        return Guided(coarse, maps)

    def report(self) -> dict[str, Any]:
        """Nothing beyond SAM's time."""
        return {}

    def reset(self) -> None:
        """Nothing to forget."""
