"""Evaluate a refiner: ``python scripts/eval.py ckpt_path=... [data=big] [inference=faithful]``;
split over several GPUs with ``torchrun --nproc_per_node=N scripts/eval.py ...``. The patch
baseline: ``python scripts/eval.py model=pspnet data=big ckpt_path=... [--export-coarse DIR]``."""

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


def _export_flag(argv: list[str]) -> list[str]:
    """``--export-coarse DIR`` (or ``--export-coarse=DIR``) as the override
    ``eval.export_coarse=DIR``: a segmentation model's masks written as a coarse source."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--export-coarse":
            value = next(args, None)
            if value is None:
                sys.exit("--export-coarse needs a folder: --export-coarse <dir>")
            out.append(f"eval.export_coarse={value}")
        elif arg.startswith("--export-coarse="):
            out.append(f"eval.export_coarse={arg.split('=', 1)[1]}")
        else:
            out.append(arg)
    return out


if __name__ == "__main__":
    sys.argv[1:] = _export_flag(sys.argv[1:])
    sys.argv += hydra_rank_overrides(sys.argv[1:])  # torchrun ranks > 0: no second run folder
    main()
