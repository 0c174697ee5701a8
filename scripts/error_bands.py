"""Where refined masks err: within BAND px of the coarse boundary, or farther from it.

``python scripts/error_bands.py <split dir> <coarse dir> <refined masks dir> [BAND]`` reads
``<name>_gt.png``, ``<name>_seg.png`` and ``<name>_mask.png`` (``scripts/eval.py
eval.save_masks=true`` writes the last) and prints the wrong-pixel counts of coarse and refined.
"""

import sys
from pathlib import Path

import cv2
import numpy as np

from samsr.data.io import read_mask

split_dir, coarse_dir, mask_dir = map(Path, sys.argv[1:4])
band_px = float(sys.argv[4]) if len(sys.argv) > 4 else 8.0
counts = dict.fromkeys(
    ("near_coarse", "near_refined", "far_coarse", "far_refined", "far_changed"), 0
)
far_total = 0
for path in sorted(mask_dir.glob("*_mask.png")):
    name = path.name.removesuffix("_mask.png")
    pred, gt = read_mask(path) > 127, read_mask(split_dir / f"{name}_gt.png") > 127
    coarse = read_mask(coarse_dir / f"{name}_seg.png") > 127
    edge = cv2.morphologyEx(coarse.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8))
    near = cv2.distanceTransform(1 - edge, cv2.DIST_L2, 3) <= band_px
    for where, sel in (("near", near), ("far", ~near)):
        counts[f"{where}_coarse"] += int(((coarse != gt) & sel).sum())
        counts[f"{where}_refined"] += int(((pred != gt) & sel).sum())
    counts["far_changed"] += int(((pred != coarse) & ~near).sum())
    far_total += int((~near).sum())
print(
    f"wrong within {band_px:g} px of the coarse boundary: coarse {counts['near_coarse']}, "
    f"refined {counts['near_refined']}"
)
print(
    f"wrong farther away: coarse {counts['far_coarse']}, refined {counts['far_refined']} "
    f"(refined differs from coarse on {100 * counts['far_changed'] / max(far_total, 1):.3f}%)"
)
