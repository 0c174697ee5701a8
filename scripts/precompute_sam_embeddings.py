"""Precompute SAM image embeddings (SAM-SR v3): ``python scripts/precompute_sam_embeddings.py -h``.

``python scripts/precompute_sam_embeddings.py --images data/train/DUTS-TR data/train/fss --out
data/sam_embeddings/vit_h --sam-type vit_h --sam-checkpoint checkpoints/sam_vit_h_4b8939.pth``;
rerun the same command to resume; split over GPUs with
``CUDA_VISIBLE_DEVICES=k python scripts/precompute_sam_embeddings.py --shard k/4 ...``::

    for k in 0 1 2 3; do
        CUDA_VISIBLE_DEVICES=$k python scripts/precompute_sam_embeddings.py --shard $k/4 ... &
    done; wait
"""

import sys

from samsr.engine.precompute_embeddings import main
from samsr.errors import exit_on_error

if __name__ == "__main__":
    sys.exit(exit_on_error(main)())
