"""Refine one photo's mask with a checkpoint: ``scripts/refine.py IMAGE --mask MASK --ckpt CKPT``.

Writes ``<out>/<stem>_refined.png`` (the refined mask, 0..255) and
``<out>/<stem>_side_by_side.jpg`` (image | coarse | refined with the boundaries drawn, plus a
full-resolution zoom; :func:`samsr.visualize.side_by_side`), and prints the refinement's time
and peak memory (the model is warmed up on a small input first, so neither counts loading).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from samsr.data.io import check_same_size, read_image, read_mask, write_image, write_mask
from samsr.device import describe, peak_memory_bytes, peak_memory_kind, reset_peak_memory
from samsr.errors import SamsrError, report_error
from samsr.metrics.efficiency import Stopwatch

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``scripts/refine.py`` command line."""
    p = argparse.ArgumentParser(prog="refine.py", description=__doc__.splitlines()[0])
    p.add_argument("image", help="the photo (any size)")
    p.add_argument("--mask", required=True, help="its coarse mask (same size, 8-bit)")
    p.add_argument("--ckpt", required=True, help="samsr checkpoint or official CRM file")
    p.add_argument("--preset", default="fast", help="inference preset (configs/inference/)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--out", default="outputs/refine", help="output folder")
    p.add_argument("--width", type=int, default=2400, help="side-by-side picture width (px)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        from samsr.engine.loading import load_refiner

        image = read_image(args.image)
        coarse = read_mask(args.mask)
        check_same_size(coarse, args.mask, image.shape[:2], args.image)
        refiner = load_refiner(args.ckpt, args.preset, args.device)
    except (SamsrError, OSError, ValueError) as err:
        return report_error(err, "refine.py")
    device = refiner.device if hasattr(refiner, "device") else refiner.refiner.device
    warm = np.ascontiguousarray(image[:256, :256])
    refiner(warm, np.ascontiguousarray(coarse[:256, :256]))
    reset_peak_memory(device)
    with Stopwatch(device) as watch:
        refined = refiner(image, coarse)
    peak = peak_memory_bytes(device) / 2**30
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.image).stem.removesuffix("_im")
    write_mask(out / f"{stem}_refined.png", refined)
    from samsr.visualize import side_by_side

    write_image(out / f"{stem}_side_by_side.jpg", side_by_side(image, coarse, refined, args.width))
    facts = {
        "image": str(args.image),
        "size": f"{image.shape[1]}x{image.shape[0]}",
        "ckpt": str(args.ckpt),
        "preset": args.preset,
        "device": describe(device),
        "time_s": round(watch.elapsed, 3),
        "peak_memory_gib": round(peak, 3),
        "peak_memory_kind": peak_memory_kind(device),
    }
    (out / f"{stem}_refine.json").write_text(json.dumps(facts, indent=2) + "\n")
    print(json.dumps(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
