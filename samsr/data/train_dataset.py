"""Datasets: random training crops with synthesised coarse masks, and BIG-layout evaluation items.

See :mod:`samsr.data` for the sample dicts (the batch contract).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from samsr.data.coarse_synthesis import lowres_coarse, synthesize_coarse
from samsr.data.io import (
    DataError,
    check_same_size,
    read_coarse_mask,
    read_image,
    read_mask,
    resize_mask,
)
from samsr.data.layouts import BigItem, Pair, find_big_split, find_pairs, holdout_split
from samsr.data.transforms import CropFlip, image_to_tensor, mask_to_tensor, photometric

__all__ = ["EvalDataset", "RefinementTrainDataset"]

log = logging.getLogger(__name__)

ExtraLoader = Callable[[Pair, tuple[int, int]], np.ndarray]
"""``(pair, (H, W)) -> H x W x C`` uint8 map aligned with the image (e.g. a cached SAM map)."""
SideLoader = Callable[[Pair, CropFlip], dict[str, torch.Tensor]]
"""``(pair, crop geometry) -> extra sample entries`` (e.g. SAM-SR v3's cached SAM tokens)."""


class RefinementTrainDataset(Dataset):
    """Random crops of image/GT pairs with a coarse mask synthesised from the cropped GT.

    Per sample (SPEC section 3): read image and GT (binarised ``> 128``, or non-zero for 0/1 masks),
    pad-if-needed + random ``crop_size`` crop + horizontal flip jointly, synthesise the coarse
    mask from the cropped GT (:func:`~samsr.data.coarse_synthesis.synthesize_coarse`), colour
    jitter + random grayscale on the image only.

    Randomness: each ``__getitem__`` uses its own ``np.random.Generator``.

    * ``seed=None`` (training): seeded from ``(s, index)`` where ``s`` is drawn from torch's global
      RNG. DataLoader workers have distinct torch seeds (derived from the main process's), so
      workers and epochs differ, and a run under ``torch.manual_seed`` is reproducible (for the same
      ``num_workers``/sampler order).
    * ``seed=int``: seeded from ``(seed, epoch, index)``: sample ``i`` is a pure function of them
      (fixed validation crops, tests). Call :meth:`set_epoch` to vary it per epoch.

    Args:
        roots: Dataset folders, merged; each folder's layout is detected (or given by ``layout``).
        crop_size: Crop side S.
        layout: ``"auto"`` or a layout of :func:`~samsr.data.layouts.find_pairs`, for every root.
        iou_range: Range of the coarse mask's IoU target.
        lowres_prob: not in the reference (0 by default): the probability that a sample's
            coarse mask is that of a lower-resolution segmentor
            (:func:`~samsr.data.coarse_synthesis.lowres_coarse`: boundary errors only) instead
            of the reference perturbation (:func:`~samsr.data.coarse_synthesis.synthesize_coarse`:
            region errors at an IoU in ``iou_range``).
        lowres_factors: (min, max) resolution factor of those segmentors.
        lowres_thresholds: (min, max) threshold (0..255) at which their upsampled maps are
            binarised: how far they over- or under-segment.
        seed: See above.
        strict: Unmatched files raise (True) or are skipped with a warning (False).
        photometric: Apply colour jitter and random grayscale.
        flip_prob: Horizontal flip probability.
        max_rounds: Maximum perturbation rounds of the coarse synthesis.
        extra_loader: Optional callable giving an aligned ``H x W x C`` uint8 map per pair; it is
            cropped/flipped like the image and returned as ``extra`` (``C x S x S`` in [0, 1]).
        side_loader: Optional callable ``(pair, CropFlip) -> dict of tensors`` merged into the
            sample (data that is not an image-aligned map, e.g. SAM-SR v3's cached SAM tokens).
        holdout_every: > 0 leaves out every n-th pair of each root by name
            (:func:`~samsr.data.layouts.holdout_split`; the held-out pairs are a validation set,
            e.g. exported with ``export_big_layout(holdout_every=n)``); 0 keeps every pair.

    Raises:
        DataError: Missing roots, no pairs at all, duplicate root folder names.
    """

    def __init__(
        self,
        roots: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
        crop_size: int = 224,
        layout: str = "auto",
        iou_range: tuple[float, float] = (0.8, 1.0),
        lowres_prob: float = 0.0,
        lowres_factors: tuple[float, float] = (4.0, 32.0),
        lowres_thresholds: tuple[float, float] = (64.0, 192.0),
        seed: int | None = None,
        strict: bool = True,
        photometric: bool = True,
        flip_prob: float = 0.5,
        max_rounds: int = 250,
        extra_loader: ExtraLoader | None = None,
        side_loader: SideLoader | None = None,
        holdout_every: int = 0,
    ) -> None:
        if isinstance(roots, (str, os.PathLike)):
            roots = [roots]
        if not roots:
            raise DataError("RefinementTrainDataset needs at least one data root (roots=[...]).")
        self.roots = [Path(r) for r in roots]
        self.crop_size = int(crop_size)
        self.iou_range = (float(iou_range[0]), float(iou_range[1]))
        if not 0.0 <= lowres_prob <= 1.0:
            raise DataError(f"lowres_prob must be in [0, 1], got {lowres_prob}.")
        self.lowres_prob = float(lowres_prob)
        self.lowres_factors = (float(lowres_factors[0]), float(lowres_factors[1]))
        lo, hi = (float(t) for t in lowres_thresholds)
        if not 0.0 <= lo <= hi <= 255.0:
            raise DataError(
                f"lowres_thresholds must satisfy 0 <= min <= max <= 255, got {lowres_thresholds}."
            )
        self.lowres_thresholds = (lo, hi)
        self.seed = seed
        self.photometric = photometric
        self.flip_prob = flip_prob
        self.max_rounds = max_rounds
        self.extra_loader = extra_loader
        self.side_loader = side_loader
        self.epoch = 0
        self.pairs: list[Pair] = []
        self.names: list[str] = []
        root_names: dict[str, Path] = {}
        for root in self.roots:
            if root.name in root_names:
                raise DataError(
                    f"two data roots share the folder name {root.name!r}: {root_names[root.name]} "
                    f"and {root}; sample names would collide. Rename or link one of them."
                )
            root_names[root.name] = root
            kept, _ = holdout_split(find_pairs(root, layout=layout, strict=strict), holdout_every)
            for pair in kept:
                self.pairs.append(pair)
                self.names.append(f"{root.name}/{pair.name}")
        if not self.pairs:
            raise DataError(f"no training pairs found in {[str(r) for r in self.roots]}.")

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch mixed into the per-sample seed when ``seed`` is given."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        if self.seed is not None:
            return np.random.default_rng([int(self.seed), self.epoch, index])
        draw = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        return np.random.default_rng([draw, index])

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Reads pair ``index`` at full size: (``H x W x 3`` uint8 RGB, ``H x W`` uint8 0/255)."""
        pair = self.pairs[index]
        image = read_image(pair.image)
        gt = read_mask(pair.mask)
        check_same_size(gt, pair.mask, image.shape[:2], pair.image)
        return image, gt

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Returns ``image`` 3xSxS, ``coarse``/``gt`` 1xSxS float32, ``meta`` (name, index)."""
        if not 0 <= index < len(self.pairs):
            raise IndexError(f"index {index} out of range for {len(self.pairs)} samples")
        rng = self._rng(index)
        image, gt = self.load(index)
        geometry = CropFlip.sample(*gt.shape, self.crop_size, rng, flip_prob=self.flip_prob)
        image = geometry.apply(image)
        gt = geometry.apply(gt)
        if self.lowres_prob and rng.random() < self.lowres_prob:
            coarse = lowres_coarse(gt, rng, self.lowres_factors, self.lowres_thresholds)
        else:
            coarse = synthesize_coarse(gt, rng, self.iou_range, max_rounds=self.max_rounds)
        image_f = image.astype(np.float32) / 255.0
        if self.photometric:
            image_f = photometric(image_f, rng)
        sample: dict[str, Any] = {
            "image": image_to_tensor(image_f),
            "coarse": mask_to_tensor(coarse),
            "gt": mask_to_tensor(gt),
            "meta": {"name": self.names[index], "index": index},
        }
        if self.extra_loader is not None:
            pair = self.pairs[index]
            extra = np.asarray(self.extra_loader(pair, (geometry.height, geometry.width)))
            sample["extra"] = self._extra_tensor(extra, pair, geometry)
        if self.side_loader is not None:
            sample.update(self.side_loader(self.pairs[index], geometry))
        return sample

    @staticmethod
    def _extra_tensor(extra: np.ndarray, pair: Pair, geometry: CropFlip) -> torch.Tensor:
        if extra.shape[:2] != (geometry.height, geometry.width):
            raise DataError(
                f"extra map for {pair.image} has shape {extra.shape}, expected "
                f"{geometry.height}x{geometry.width} (the image size)."
            )
        if extra.ndim == 2:
            extra = extra[..., None]
        return image_to_tensor(geometry.apply(extra.astype(np.uint8, copy=False)))


class EvalDataset(Dataset):
    """Full-resolution evaluation items of a BIG-layout split (not batched).

    Coarse masks keep their soft values (:func:`~samsr.data.io.read_coarse_mask`): the refiner
    is fed them as read, as the reference's test loader does; the metrics binarise them
    (``> 128``) for the coarse scores. A coarse mask of a different size than the image (e.g. a
    low-resolution segmentor's output) is resized to the image size (bilinear,
    ``cv2.INTER_LINEAR``, soft), with one logged warning per dataset (per source) naming the
    first such file and the sizes; a GT of a different size raises.

    Args:
        split_dir: Folder with ``<name>_im.jpg`` + ``<name>_gt.png``.
        coarse_dir: Folder with ``<name>_seg.png``; default ``split_dir``.
        source: Name of the coarse-mask source (segmentor), copied into each item.
        max_images: Keep only the first ``max_images`` items (sorted by name).

    Raises:
        DataError: See :func:`~samsr.data.layouts.find_big_split`.
    """

    def __init__(
        self,
        split_dir: str | os.PathLike[str],
        coarse_dir: str | os.PathLike[str] | None = None,
        source: str = "seg",
        max_images: int | None = None,
    ) -> None:
        self.split_dir = Path(split_dir)
        self.coarse_dir = None if coarse_dir is None else Path(coarse_dir)
        self.source = source
        items = find_big_split(self.split_dir, self.coarse_dir)
        self.items: list[BigItem] = items if max_images is None else items[: int(max_images)]
        if not self.items:
            raise DataError(f"max_images={max_images} leaves no items in {self.split_dir}.")
        self._resize_logged = False  # the coarse-mask resize is logged once per source

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Returns ``image`` HxWx3 uint8 RGB, ``gt`` HxW uint8 {0,255}, ``coarse`` HxW uint8
        0..255 (soft values kept), name, source."""
        if not 0 <= index < len(self.items):
            raise IndexError(f"index {index} out of range for {len(self.items)} items")
        item = self.items[index]
        assert item.gt is not None and item.coarse is not None  # find_big_split requires both
        image = read_image(item.image)
        gt = read_mask(item.gt)
        height, width = image.shape[:2]
        check_same_size(gt, item.gt, (height, width), item.image, "ground truth")
        coarse = read_coarse_mask(item.coarse)
        if coarse.shape != (height, width):
            if not self._resize_logged:
                self._resize_logged = True
                log.warning(
                    "coarse masks of source '%s' differ in size from their images (first: %s "
                    "%dx%d vs image %s %dx%d, WxH); resized to the image size (bilinear, "
                    "cv2.INTER_LINEAR)",
                    self.source,
                    item.coarse,
                    coarse.shape[1],
                    coarse.shape[0],
                    item.image.name,
                    width,
                    height,
                )
            coarse = resize_mask(coarse, (height, width))
        return {
            "image": image,
            "gt": gt,
            "coarse": coarse,
            "name": item.name,
            "source": self.source,
        }
