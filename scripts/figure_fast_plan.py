"""Where `inference=fast` works at the last scale: the band it decodes and the tiles it encodes.

    python scripts/figure_fast_plan.py --ckpt last.pt --image img_im.png --coarse img_seg.png \\
        --out docs/fast_plan.jpg

Runs the preset's cascade up to the last scale and draws, over the image, the band around that
scale's input mask (decoded, green) and the region tiles' cores (blue) and input windows with
their halo (thin, light blue); the caption gives the pixels encoded against the whole image.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

from samsr.data.io import read_coarse_mask, read_image
from samsr.engine.loading import load_refiner
from samsr.errors import exit_on_error
from samsr.inference.cascade import band_width_px, in_band, refine, scaled_size
from samsr.inference.regions import contour_region
from samsr.inference.tiling import plan_region_tiles


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--coarse", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="fast")
    p.add_argument("--width", type=int, default=1600, help="width of the picture")
    args = p.parse_args(argv)
    refiner = load_refiner(args.ckpt, args.preset, "cpu")
    cfg = refiner.cascade
    last = cfg.scales[-1]
    if not (in_band(cfg, last) and cfg.tile > 0 and cfg.tile_min > 0):
        raise SystemExit(f"--preset {args.preset} has no band with region tiles at its last scale")
    image = read_image(args.image)
    coarse = read_coarse_mask(args.coarse)
    h, w = coarse.shape
    seen: dict[float, torch.Tensor] = {}
    head = cfg.scales[:-1]

    def keep(scale: float, prob: torch.Tensor) -> None:
        seen[scale] = prob[0, 0].clone()

    image_t = torch.from_numpy(image).permute(2, 0, 1)[None]
    coarse_t = torch.from_numpy(np.ascontiguousarray(coarse))[None, None]
    refine(refiner.model, image_t, coarse_t, dataclasses.replace(cfg, scales=head), on_scale=keep)
    prob = seen[head[-1]]  # the last scale's input, padded
    hp, wp = prob.shape
    band = contour_region(prob >= 0.5, band_width_px(cfg.band_width, last))
    size = scaled_size(hp, wp, last)
    tiles = plan_region_tiles((hp, wp), size, cfg.tile, int(cfg.tile_halo), band, cfg.tile_min)
    pad = cfg.pad
    picture = image.copy()
    band_np = band[pad : pad + h, pad : pad + w].numpy()
    picture[band_np] = (0.5 * picture[band_np] + 0.5 * np.array([0, 200, 0])).astype(np.uint8)
    f = size[0] / hp  # input px per query px at the last scale (1 at scale 1)
    for t in tiles:
        y0, y1, x0, x1 = (v - pad for v in t.q)
        cv2.rectangle(picture, (x0, y0), (x1 - 1, y1 - 1), (30, 60, 230), 6)
        wy0, wy1, wx0, wx1 = (round(v / f) - pad for v in t.x)
        cv2.rectangle(picture, (wx0, wy0), (wx1 - 1, wy1 - 1), (120, 170, 255), 2)
    encoded = sum((t.x[1] - t.x[0]) * (t.x[3] - t.x[2]) for t in tiles)
    scale = args.width / w
    small = cv2.resize(picture, (args.width, round(h * scale)), interpolation=cv2.INTER_AREA)
    caption = (
        f"scale {last:g}: band {band_width_px(cfg.band_width, last)} px, {len(tiles)} tiles, "
        f"halo {cfg.tile_halo} px: {encoded / 1e6:.2f} of {size[0] * size[1] / 1e6:.2f} Mpx encoded"
    )
    bar = np.full((40, small.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, caption, (10, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 0), 2)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor(np.vstack([small, bar]), cv2.COLOR_RGB2BGR))
    print(f"{out}: {caption}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_error(main)())
