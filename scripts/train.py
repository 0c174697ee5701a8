"""Train a refiner: ``python scripts/train.py [experiment=quickstart] [overrides...]``."""

import hydra
from omegaconf import DictConfig

from samsr.engine.run import run_train


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> None:
    run_train(cfg)


if __name__ == "__main__":
    main()
