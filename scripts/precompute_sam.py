"""Precompute SAM colour maps (SAM-SR v2.1): ``python scripts/precompute_sam.py --help``.

``python scripts/precompute_sam.py --images data/train/DUTS-TR data/BIG/test --out
data/sam_maps/vit_h --sam-type vit_h --sam-checkpoint checkpoints/sam_vit_h_4b8939.pth``;
rerun the same command to resume; split over GPUs with
``CUDA_VISIBLE_DEVICES=k python scripts/precompute_sam.py --shard k/4 ...``.
"""

import sys

from samsr.engine.precompute import main
from samsr.errors import exit_on_error

if __name__ == "__main__":
    sys.exit(exit_on_error(main)())
