"""One photo refined from a checkpoint: the model is built from the checkpoint's own config."""

from __future__ import annotations

import json

import numpy as np
import pytest

from samsr.data.io import read_mask, write_image, write_mask
from samsr.engine.loading import checkpoint_model_config, load_refiner
from samsr.engine.refine_cli import main
from samsr.engine.run import run_train
from samsr.visualize import disagreement_window, draw_boundary, side_by_side


@pytest.fixture
def tiny_ckpt(tiny_cfg):
    cfg = tiny_cfg(
        "train",
        ["trainer.max_steps=1", "trainer.val_every=0", "test_after_training=false",
         "model.net.residual=true", "model.net.decoder_hidden=[8,8]"],
    )  # fmt: skip
    return run_train(cfg)["checkpoint"]


def test_checkpoint_config_builds_its_own_architecture(tiny_ckpt):
    cfg = checkpoint_model_config(tiny_ckpt)  # no overrides: ResNet-18, residual, 8-wide MLP
    assert cfg.net.backbone == "resnet18" and cfg.net.residual
    assert list(cfg.net.decoder_hidden) == [8, 8]
    refiner = load_refiner(tiny_ckpt, preset="fast", device="cpu")
    assert refiner.model.decoder.residual


def test_refine_one_photo_writes_mask_picture_and_facts(tiny_ckpt, tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (150, 203, 3), dtype=np.uint8)
    coarse = np.zeros((150, 203), np.uint8)
    coarse[40:110, 60:150] = 255
    write_image(tmp_path / "photo_im.jpg", image)
    write_mask(tmp_path / "photo_seg.png", coarse)
    out = tmp_path / "out"
    args = [str(tmp_path / "photo_im.jpg"), "--mask", str(tmp_path / "photo_seg.png")]
    args += ["--ckpt", str(tiny_ckpt), "--device", "cpu", "--out", str(out), "--width", "300"]
    assert main(args) == 0
    assert read_mask(out / "photo_refined.png").shape == (150, 203)
    assert (out / "photo_side_by_side.jpg").is_file()
    facts = json.loads((out / "photo_refine.json").read_text())
    assert facts["size"] == "203x150" and facts["time_s"] > 0 and facts["peak_memory_gib"] > 0
    # a mask of another size is one clear line, not a traceback
    write_mask(tmp_path / "small_seg.png", coarse[:50])
    bad = [str(tmp_path / "photo_im.jpg"), "--mask", str(tmp_path / "small_seg.png")]
    assert main(bad + ["--ckpt", str(tiny_ckpt), "--device", "cpu", "--out", str(out)]) == 2


def test_side_by_side_zooms_where_the_masks_disagree():
    image = np.full((400, 600, 3), 128, np.uint8)
    a = np.zeros((400, 600), np.uint8)
    a[100:300, 100:500] = 255
    b = a.copy()
    b[250:300, 400:500] = 0  # the two masks differ only in the lower right
    y0, x0, h, w = disagreement_window(a, b, 100)
    assert (h, w) == (100, 100)
    assert y0 <= 250 < 300 <= y0 + h + 50 and x0 + w > 400  # the window covers the difference
    pic = side_by_side(image, a, b, width=600)
    # the whole image at 1/3 (200 x 133 per panel), then the 100 px window upsized to 200 px
    assert pic.shape[1] == 600 and pic.shape[0] == 133 + 200
    before = image.copy()
    side_by_side(image, a, b, width=600)
    assert np.array_equal(image, before)  # the inputs are not drawn on
    drawn = draw_boundary(image, a)
    assert (drawn != image).any(axis=-1)[100, 100:500].any() and not (drawn != image).any(axis=-1)[
        0
    ].any()
