"""Shared fixtures: compose the real Hydra configs with one TINY override list."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from samsr.engine.configs import CONFIG_DIR

# Small enough for a CPU test run; every model config must accept these overrides.
TINY = [
    "device=cpu",
    "model.net.backbone=resnet18",
    "trainer.batch_size=2",
    "trainer.num_workers=0",
    "trainer.log_every=1",
    "trainer.image_every=1",
    "data.train.crop_size=48",
    "inference.scales=[0.5,1.0]",
    "inference.chunk_size=4096",
    "eval.warmup=0",
]

# SAM-SR v3 (model=samsr_v3_*) has no ResNet: the backbone override becomes a tiny random SAM.
TINY_V3 = [
    "model.sam.tiny=true",
    "model.sam.tiny_img_size=64",
    "model.net.local_width=16",
    "model.net.token_channels=16",
    "model.net.heads=4",
    "model.net.window=2",
]


# a tiny SAM whose (random) predictions pass AMG's filters, so that masks come out
SAM_TINY = [
    "model.sam.tiny=true",
    "model.sam.amg.points_per_side=4",
    "model.sam.amg.points_per_batch=16",
    "model.sam.amg.pred_iou_thresh=0.0",
    "model.sam.amg.stability_score_thresh=0.0",
]


# The patch baseline (model=pspnet): a tiny PSPNet on the tiny synthetic multi-class set.
TINY_PSPNET = [
    "model.net.depth=tiny",
    "data.train.long_side=[64,128]",
    "model.inference.window=48",
    "model.inference.size=64",
]


def disk_inputs(h: int, w: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A random 1 x 3 x h x w image in [0, 1) and a 1 x 1 x h x w float disk mask (0/1)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, h, w, generator=g)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    disk = ((yy - h * 0.45) ** 2 + (xx - w * 0.55) ** 2) < (min(h, w) * 0.3) ** 2
    return image, disk.float()[None, None]


def tiny_overrides(name: str, extra: list[str]) -> list[str]:
    """TINY for config ``name`` (train keeps the trainer keys) and the model chosen in ``extra``
    (a segmentation model also gets the synthetic multi-class set unless ``extra`` picks data)."""
    tiny = [o for o in TINY if name == "train" or not o.startswith("trainer.")]
    if any(o.startswith("model=samsr_v3") for o in extra):
        tiny = [o for o in tiny if not o.startswith("model.net.backbone=")] + TINY_V3
    if any(o == "model=pspnet" or o.startswith("experiment=pspnet") for o in extra):
        tiny = [o for o in tiny if not o.startswith("model.net.backbone=")] + TINY_PSPNET
        if not any(o.startswith("data=") or o.startswith("experiment=") for o in extra):
            tiny.append("data=synthetic_classes")
    return tiny


# A tiny synthetic set: 4 training images, 1 val and 2 test images of ~100 px, 2 coarse sources.
TINY_SYNTHETIC = [
    "data.prepare.num_train=4",
    "data.prepare.train_long_side=64",
    "data.prepare.num_val=1",
    "data.prepare.num_test=2",
    "data.prepare.test_long_side=[96,128]",
]


def compose_config(name: str, overrides: list[str], tmp_path: Path) -> DictConfig:
    """Compose ``samsr/configs/<name>.yaml`` with outputs and data under ``tmp_path``."""
    paths = [
        f"paths.root_dir={tmp_path}",
        f"paths.output_dir={tmp_path / 'run'}",
        f"paths.data_dir={tmp_path / 'data'}",
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=paths + overrides)


@pytest.fixture
def tiny_cfg(tmp_path):
    """Factory: ``tiny_cfg("train", [...])`` -> composed config with TINY + tiny synthetic data."""

    def make(name: str, extra: list[str] | None = None) -> DictConfig:
        tiny = tiny_overrides(name, extra or [])
        return compose_config(name, tiny + TINY_SYNTHETIC + (extra or []), tmp_path)

    return make


@pytest.fixture(scope="module")
def model():
    """A random ResNet-18 CRM in eval mode with non-trivial BN statistics (the mask matters)."""
    import torch

    from samsr.models import build_crm

    torch.manual_seed(0)
    m = build_crm("resnet18", dropout=0.0).eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    return m


@pytest.fixture(scope="session")
def device_under_test():
    """The device of the GPU tier (tests marked ``gpu``): ``SAMSR_TEST_DEVICE``, default ``cuda``.

    ``SAMSR_TEST_DEVICE=cpu python -m pytest -m gpu -q`` runs the tier on the CPU; a CUDA device
    on a machine without CUDA skips it, saying why; a name that is not a device here fails.
    """
    import os

    import torch

    from samsr.device import resolve_device

    name = os.environ.get("SAMSR_TEST_DEVICE", "cuda").strip() or "cuda"
    if name.lower().startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(
            f"SAMSR_TEST_DEVICE={name} but torch.cuda.is_available() is False (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda}); run on a CUDA machine, or "
            "set SAMSR_TEST_DEVICE=cpu to run the GPU tier on the CPU"
        )
    try:
        return resolve_device(name)
    except ValueError as err:  # a typo or a missing device is an error, not a skip
        pytest.fail(f"SAMSR_TEST_DEVICE={name}: {err}", pytrace=False)
