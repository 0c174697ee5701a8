"""Train a refiner: ``python scripts/train.py [experiment=quickstart] [overrides...]``; on several
GPUs ``torchrun --nproc_per_node=N scripts/train.py ...`` (README, "Several GPUs")."""

import sys

import hydra
from omegaconf import DictConfig

from samsr.distributed import hydra_rank_overrides
from samsr.engine.run import run_train
from samsr.errors import exit_on_error


@hydra.main(version_base="1.3", config_path="../samsr/configs", config_name="train")
@exit_on_error  # samsr's errors: one line on stderr, exit status 2
def main(cfg: DictConfig) -> None:
    run_train(cfg)


if __name__ == "__main__":
    sys.argv += hydra_rank_overrides(sys.argv[1:])  # torchrun ranks > 0: no second run folder
    main()
