"""Evaluation of a semantic segmentation network (the patch baseline) on a BIG-layout split.

BIG names each object's files ``<name>_<k>_im.jpg`` / ``<name>_<k>_gt.png``, where ``k``, the last
integer of the name, is the object's PASCAL VOC class id (1-20). CascadePSP's ``eval_post.py``
reads it as ``this_class = k - 1``, the index among the 20 object classes; in samsr's 21-channel
output (channel 0 = background) that class is channel ``this_class + 1 = k``. The predicted mask
of the object is where the full-resolution class map equals ``k``; it is scored against the GT
with samsr's IoU/mBA, once per image (there is no coarse input).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from samsr.data.io import DataError, check_same_size, read_image, read_mask, write_mask
from samsr.data.layouts import find_big_split
from samsr.engine.evaluator import write_results
from samsr.metrics import EfficiencyMeter, RefinementMeter

__all__ = ["evaluate_segmentation", "object_channel"]

SegmentFn = Callable[[np.ndarray], np.ndarray]
"""``H x W x 3 uint8 RGB -> H x W class map``."""


def object_channel(name: str) -> int:
    """The output channel of the object ``name`` is about: the last integer in the name (BIG's
    VOC class id; ``eval_post.py``'s ``this_class + 1``)."""
    found = re.findall(r"\d+", name)
    if not found:
        raise DataError(
            f"{name!r} has no class number: BIG names end in _<VOC class id> (e.g. "
            "car_0042_7_gt.png); rename the files or evaluate them with a refiner."
        )
    return int(found[-1])


def evaluate_segmentation(
    segment: SegmentFn,
    split_dir: str | Path,
    device: Any,
    source: str,
    out_dir: str | Path | None = None,
    method: str = "pspnet",
    export_dir: str | Path | None = None,
    save_masks: bool = False,
    max_images: int | None = None,
    warmup: int = 1,
    num_classes: int = 21,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Segments every image of a BIG-layout split and scores the object's class mask.

    Args:
        segment: the predictor (e.g. :class:`~samsr.inference.sliding.SegmentationPredictor`).
        split_dir: folder with ``<name>_im.jpg`` + ``<name>_gt.png`` (no coarse masks needed).
        device: where the model runs (timing, peak memory).
        source: the row's name in the report (e.g. ``pspnet_sliding``).
        out_dir: where ``metrics.json`` and ``results.md`` go (None: not written).
        method: the method's name in the report.
        export_dir: write each object mask as ``<export_dir>/<name>_seg.png`` (0/255), a coarse
            source the refiners read (``data.test.coarse_dirs``).
        save_masks: also write ``<out_dir>/masks/<source>/<name>_mask.png``.
        max_images: only the first ``max_images`` images (by name).
        warmup: images whose time is left out of the mean.
        num_classes: the network's classes (a name's class beyond them is an error).
        progress: show a progress bar.

    Returns:
        ``{source: metrics}`` (``iou``, ``miou``, ``mba``, ``time_s``, ``peak_mem_gib``, ...).
    """
    items = find_big_split(split_dir, require_coarse=False)[:max_images]
    channels = [object_channel(item.name) for item in items]  # every name checked up front
    for item, channel in zip(items, channels):
        if not 0 < channel < num_classes:
            raise DataError(
                f"{item.gt}: class {channel} is not an object class of a {num_classes}-class "
                "network (1 .. num_classes - 1)."
            )
    meter = RefinementMeter()
    eff = EfficiencyMeter(device, warmup=warmup)
    bar = tqdm(zip(items, channels), total=len(items), desc=f"eval {source}",
               disable=not progress, leave=False)  # fmt: skip
    for item, channel in bar:
        assert item.gt is not None
        image = read_image(item.image)
        gt = read_mask(item.gt)
        check_same_size(gt, item.gt, image.shape[:2], item.image, "ground truth")
        with eff.measure(size=gt.shape[:2]):
            classes = segment(image)
        mask = np.where(classes == channel, 255, 0).astype(np.uint8)
        meter.update(item.name, gt, mask)
        if export_dir is not None:
            write_mask(Path(export_dir) / f"{item.name}_seg.png", mask)
        if save_masks and out_dir is not None:
            write_mask(Path(out_dir) / "masks" / source / f"{item.name}_mask.png", mask)
    result = {**meter.compute(), **eff.compute(), "per_image": meter.per_image()}
    results = {source: result}
    if out_dir is not None:
        write_results(results, out_dir, method=method)
    return results
