"""Evaluate a refiner: ``python scripts/eval.py ckpt_path=... [data=big] [inference=faithful]``;
split over several GPUs with ``torchrun --nproc_per_node=N scripts/eval.py ...``."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from samsr.distributed import hydra_rank_overrides
from samsr.engine.run import run_eval
from samsr.errors import exit_on_error


@hydra.main(version_base="1.3", config_path="../samsr/configs", config_name="eval")
@exit_on_error  # samsr's errors: one line on stderr, exit status 2
def main(cfg: DictConfig) -> None:
    # the command line's overrides: the checkpoint's own model config, but for what they set
    run_eval(cfg, overrides=list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    sys.argv += hydra_rank_overrides(sys.argv[1:])  # torchrun ranks > 0: no second run folder
    main()
