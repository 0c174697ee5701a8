"""Evaluate a refiner: ``python scripts/eval.py ckpt_path=... [data=big] [inference=faithful]``."""

import hydra
from omegaconf import DictConfig

from samsr.engine.run import run_eval


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_eval(cfg)


if __name__ == "__main__":
    main()
