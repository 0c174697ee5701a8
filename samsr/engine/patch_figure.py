"""Thesis figure 4.1: why patches alone fail at high resolution.

For each image of a BIG-layout split: input | patch-based output (full-resolution sliding
windows) | global output (the whole image at 512) | GT, the class maps in VOC's colours over the
image; one PNG per image and a contact sheet of all of them::

    python scripts/figure_patches.py --ckpt <pspnet run>/checkpoints/last.pt --split <BIG>/test \
        --out figures/4_1 [--max-images 6] [--device cuda]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from omegaconf import OmegaConf

from samsr.data.io import read_image, read_mask, write_image
from samsr.data.layouts import find_big_split
from samsr.device import resolve_device
from samsr.engine.builders import build_model
from samsr.engine.checkpoint import LoadedCheckpoint
from samsr.engine.loading import checkpoint_model_config
from samsr.engine.segmentation_eval import object_channel
from samsr.errors import ConfigError
from samsr.inference.sliding import SegmentationPredictor
from samsr.visualize import patch_figure_row

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a PSPNet checkpoint (scripts/train.py)")
    p.add_argument("--split", required=True, help="a BIG-layout folder (<name>_im.jpg + _gt.png)")
    p.add_argument("--out", default="figures/4_1", help="output folder")
    p.add_argument("--max-images", type=int, default=6)
    p.add_argument("--width", type=int, default=2000, help="width of each row in pixels")
    p.add_argument("--device", default="auto")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    loaded = LoadedCheckpoint.read(args.ckpt)
    model_cfg = checkpoint_model_config(loaded)
    if str(model_cfg.get("task")) != "segmentation":
        raise ConfigError(f"{args.ckpt} is a {model_cfg.get('name')} refiner, not a PSPNet run.")
    device = resolve_device(args.device)
    model = build_model(model_cfg, weights=loaded)  # the predictors move it and set eval
    settings = OmegaConf.to_container(model_cfg.inference, resolve=True)
    assert isinstance(settings, dict)
    modes = {
        m: SegmentationPredictor(model, device=device, **{**settings, "mode": m})
        for m in ("sliding", "global")
    }
    out = Path(args.out)
    rows = []
    for item in find_big_split(args.split, require_coarse=False)[: args.max_images]:
        assert item.gt is not None
        image = read_image(item.image)
        gt = np.where(read_mask(item.gt) > 128, object_channel(item.name), 0).astype(np.uint8)
        maps = {m: predict(image) for m, predict in modes.items()}
        row = patch_figure_row(image, maps["sliding"], maps["global"], gt, args.width)
        write_image(out / f"{item.name}.png", row)
        rows.append(row)
        print(f"{out / (item.name + '.png')}")
    if rows:
        width = min(r.shape[1] for r in rows)
        sheet = np.vstack([cv2.resize(r, (width, r.shape[0])) if r.shape[1] != width else r
                           for r in rows])  # fmt: skip
        write_image(out / "figure_4_1.png", sheet)
        print(f"contact sheet: {out / 'figure_4_1.png'}")
    return 0
