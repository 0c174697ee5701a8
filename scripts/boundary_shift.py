"""How far each cascade scale moves the boundary (the measurement behind ``inference.band_width``).

    python scripts/boundary_shift.py --ckpt last.pt --sizes 2048x1536 4000x3000
    python scripts/boundary_shift.py --ckpt model_45705 --data /datasets/BIG/test --num-images 10

Runs the reference cascade (with the factorized decoder: the same function up to float rounding)
on each image and prints, per scale, how many pixels change label and how far from that scale's
input boundary they lie, in input pixels of the scale.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from samsr.data.io import read_coarse_mask, read_image
from samsr.engine.benchmark_cli import parse_size
from samsr.engine.benchmark_data import data_groups, synthetic_groups
from samsr.engine.boundary_shift import WITHIN, boundary_shift
from samsr.engine.loading import load_refiner
from samsr.errors import exit_on_error


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="samsr checkpoint or official CRM file")
    p.add_argument("--sizes", nargs="+", type=parse_size, default=[parse_size("2048x1536")])
    p.add_argument("--data", nargs="+", help="BIG-layout folders instead of synthetic images")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--cache-dir", default="data/benchmark")
    p.add_argument("--device", default="auto")
    p.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides (model.*)")
    args = p.parse_args(argv)
    refiner = load_refiner(
        args.ckpt, "faithful", args.device, ["inference.decoder_factorized=true", *args.set]
    )
    if args.data:
        groups = data_groups(args.data, None, args.num_images)
    else:
        groups = synthetic_groups(args.cache_dir, args.sizes, args.num_images)
    widths = " | ".join(f"<= {k} px" for k in WITHIN)
    print(f"| image | scale | changed px | max (input px) | p99.9 | {widths} |")
    print("|---|---|---|---|---|" + "---|" * len(WITHIN))
    for group in groups:
        for item in group.items:
            device = refiner.device
            image = torch.from_numpy(read_image(item.image)).permute(2, 0, 1)[None].to(device)
            coarse = np.ascontiguousarray(read_coarse_mask(item.coarse))
            coarse_t = torch.from_numpy(coarse)[None, None].to(device)
            shifts = boundary_shift(refiner.model, image, coarse_t, refiner.cascade)
            for s in shifts:
                within = " | ".join(f"{100 * s.within[k]:.2f} %" for k in WITHIN)
                print(
                    f"| {group.name}/{item.name} | {s.scale:g} | {s.changed} | {s.max_px:.0f} | "
                    f"{s.p999_px:.1f} | {within} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_error(main)())
