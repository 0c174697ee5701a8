"""The real-data recipe (experiment=duts_cpu) wired end to end on a tiny DUTS-layout folder made
from synthetic images (tests never read ../shared): hold-out split, evaluation exports, the
residual decoder and the low-resolution coarse masks; the loss falls over a few steps."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from samsr.data.coarse_synthesis import lowres_coarse, mask_iou
from samsr.data.layouts import find_pairs, holdout_split
from samsr.data.synthetic import make_synthetic
from samsr.data.train_dataset import RefinementTrainDataset

RECIPE_TINY = [
    "device=cpu",
    "trainer.batch_size=4",
    "trainer.num_workers=0",
    "trainer.log_every=1",
    "trainer.max_steps=30",
    "trainer.val_every=30",
    "trainer.val_max_images=2",
    "trainer.ckpt_every=30",
    "trainer.amp_dtype=null",
    "optim.scheduler.milestones=[25]",
    "data.train.crop_size=64",
    "model.net.decoder_hidden=[16,16]",
    "eval.warmup=0",
    "eval.max_images=2",
    "inference.chunk_size=4096",
]


def fake_duts(root: Path, n: int = 24) -> Path:
    """``root/DUTS-TR`` and ``root/DUTS-TE`` in the DUTS release layout, from synthetic pairs."""
    made = make_synthetic(root / "syn", num_train=n, train_long_side=96, num_val=1, num_test=1,
                          test_long_side=(96, 96))  # fmt: skip
    pairs = find_pairs(made["train"])
    for split, chosen in (("DUTS-TR", pairs), ("DUTS-TE", pairs[:4])):
        for kind in ("Image", "Mask"):
            (root / split / f"{split}-{kind}").mkdir(parents=True)
        for pair in chosen:
            shutil.copy(pair.image, root / split / f"{split}-Image" / f"{pair.name}.jpg")
            shutil.copy(pair.mask, root / split / f"{split}-Mask" / f"{pair.name}.png")
    return root


def test_holdout_split_is_by_name_and_disjoint(tmp_path):
    root = fake_duts(tmp_path, n=23)
    pairs = find_pairs(root / "DUTS-TR")
    kept, held = holdout_split(pairs, 10)
    assert len(held) == 3 and len(kept) == 20  # names 0, 10, 20 of 23
    assert {p.name for p in held} == {pairs[i].name for i in (0, 10, 20)}
    data = RefinementTrainDataset([root / "DUTS-TR"], crop_size=32, holdout_every=10)
    assert not {n.split("/")[-1] for n in data.names} & {p.name for p in held}
    with pytest.raises(ValueError, match="holdout_every"):
        holdout_split(pairs, 1)


def test_lowres_coarse_changes_only_boundaries():
    gt = np.zeros((200, 240), np.uint8)
    gt[50:150, 60:180] = 255
    rng = np.random.default_rng(0)
    for _ in range(5):
        coarse = lowres_coarse(gt, rng, factors=(8, 8))
        assert mask_iou(coarse > 0, gt > 0) > 0.85
        assert not coarse[:30].any() and coarse[90:110, 100:140].all()  # far from the edge: GT


def test_duts_recipe_runs_and_the_loss_falls(tmp_path):
    from conftest import compose_config
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from samsr.engine.run import run_train

    root = fake_duts(tmp_path / "duts")
    cfg = compose_config(
        "train",
        ["experiment=duts_cpu", f"data.root={root}", *RECIPE_TINY,
         "model.net.residual=true", "data.train.lowres_prob=0.5"],
        tmp_path,
    )  # fmt: skip
    assert cfg.model.net.pretrained is None and cfg.model.net.backbone == "resnet18"
    res = run_train(cfg)
    assert set(res["test"]) == {"down8", "down16"}
    val = sorted((res["run_dir"] / "val").glob("step_*"))
    assert val and (val[-1] / "metrics.json").is_file()  # the held-out tenth was the val set
    events = EventAccumulator(str(res["run_dir"] / "tensorboard"))
    events.Reload()
    loss = [e.value for e in events.Scalars("train/loss_total")]
    assert len(loss) == 30
    assert np.mean(loss[-10:]) < np.mean(loss[:5])


def test_recipe_options_reach_the_model_dataset_and_trainer(tmp_path):
    from conftest import compose_config

    from samsr.engine.builders import build_model, build_train_dataset, train_settings

    root = fake_duts(tmp_path / "duts")
    cfg = compose_config(
        "train",
        ["experiment=duts_cpu", f"data.root={root}", "model.net.residual_prior=pixel",
         "model.net.prior_scale=2.0", "data.train.lowres_thresholds=[96,160]",
         "trainer.decode_window=112"],
        tmp_path,
    )  # fmt: skip
    decoder = build_model(cfg.model).decoder
    assert decoder.pixel_prior and float(decoder.prior_scale.detach()) == 2.0
    assert build_train_dataset(cfg.data, cfg.model).lowres_thresholds == (96.0, 160.0)
    assert train_settings(cfg.trainer).decode_window == 112
    bad = compose_config(
        "train",
        ["experiment=duts_cpu", f"data.root={root}", "model.net.residual_prior=edge"],
        tmp_path,
    )
    with pytest.raises(Exception, match="residual_prior must be cell or pixel, got 'edge'"):
        build_model(bad.model)
