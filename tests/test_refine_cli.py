"""``samsr refine``: photos and folders refined from a checkpoint that describes itself, masks as
people have them, checkpoints built from their stored config, eval finding its coarse sources."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from samsr.data.io import (
    DataError,
    read_coarse_mask,
    read_image,
    read_mask,
    write_image,
    write_mask,
)
from samsr.data.layouts import pair_for_refinement
from samsr.engine.builders import build_model, to_container
from samsr.engine.checkpoint import CheckpointError, atomic_torch_save, training_state
from samsr.engine.loading import checkpoint_model_config, load_refiner, resolve_model_config
from samsr.errors import ConfigError
from samsr.visualize import disagreement_window, draw_boundary, side_by_side

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A samsr checkpoint of a tiny CRM (not the config defaults: residual, 8-wide MLP)."""
    from conftest import compose_config, tiny_overrides

    tmp = tmp_path_factory.mktemp("ckpt")
    extra = ["model.net.residual=true", "model.net.decoder_hidden=[8,8]"]
    cfg = compose_config("train", tiny_overrides("train", []) + extra, tmp)
    torch.manual_seed(0)
    net = build_model(cfg.model)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = training_state(net, opt, sched, scaler, 1, to_container(cfg), "crm")
    return atomic_torch_save(state, tmp / "last.pt")


def _photo(rng: np.random.Generator, h: int = 150, w: int = 203) -> tuple[np.ndarray, np.ndarray]:
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    coarse = np.zeros((h, w), np.uint8)
    coarse[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
    return image, coarse


def _refine(*args: str) -> int:
    from samsr.cli import main

    return main(["refine", *args, "--device", "cpu"])


def test_checkpoint_config_builds_its_own_architecture(tiny_ckpt):
    cfg = checkpoint_model_config(tiny_ckpt)  # no overrides: ResNet-18, residual, 8-wide MLP
    assert cfg.net.backbone == "resnet18" and cfg.net.residual
    assert list(cfg.net.decoder_hidden) == [8, 8]
    refiner = load_refiner(tiny_ckpt, preset="fast", device="cpu")
    assert refiner.model.decoder.residual
    import samsr

    assert samsr.load_refiner is load_refiner  # exported at the package top


def test_explicit_overrides_win_with_a_warning(tiny_ckpt, caplog):
    from samsr.engine.configs import compose

    requested = compose("eval", ["model.net.decoder_hidden=[16,16]"]).model
    with caplog.at_level(logging.WARNING, logger="samsr"):
        # the command line names the key: it wins, and the difference is said
        cfg = resolve_model_config(tiny_ckpt, requested, ["model.net.decoder_hidden=[16,16]"])
    assert list(cfg.net.decoder_hidden) == [16, 16] and cfg.net.residual  # the rest: stored
    assert "model.net.decoder_hidden=[16, 16] differs from the checkpoint's [8, 8]" in caplog.text
    with pytest.raises(CheckpointError, match="do not fit"):
        build_model(cfg, weights=tiny_ckpt)
    # keys the command line does not name come from the checkpoint, silently
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="samsr"):
        cfg = resolve_model_config(tiny_ckpt, requested, ["inference=fast"])
    assert list(cfg.net.decoder_hidden) == [8, 8] and not caplog.text
    # model=samsr_v1 runs the checkpoint's CRM network behind SAM
    v1 = compose("eval", ["model=samsr_v1"]).model
    cfg = resolve_model_config(tiny_ckpt, v1, ["model=samsr_v1"])
    assert cfg.name == "samsr_v1" and cfg.net.backbone == "resnet18" and cfg.net.residual


def test_refine_one_photo_writes_every_output_and_facts(tiny_ckpt, tmp_path, caplog):
    image, coarse = _photo(np.random.default_rng(0))
    write_image(tmp_path / "photo_im.jpg", image)
    write_mask(tmp_path / "photo_seg.png", coarse)
    out = tmp_path / "out"
    args = [str(tmp_path / "photo_im.jpg"), "--mask", str(tmp_path / "photo_seg.png")]
    args += ["--ckpt", str(tiny_ckpt), "--out", str(out), "--width", "300"]
    assert _refine(*args, "--save", "mask,binary,overlay,side_by_side") == 0
    refined = cv2.imread(str(out / "photo_refined.png"), cv2.IMREAD_UNCHANGED)
    binary = cv2.imread(str(out / "photo_binary.png"), cv2.IMREAD_UNCHANGED)
    assert refined.shape == binary.shape == (150, 203)
    assert np.array_equal(binary, np.where(refined > 128, 255, 0))  # --threshold 0.5: > 128
    assert read_image(out / "photo_overlay.jpg").shape == (150, 203, 3)
    assert read_image(out / "photo_side_by_side.jpg").shape[1] == 300
    facts = json.loads((out / "refine.json").read_text())
    row = facts["images"]["photo"]
    assert row["status"] == "ok" and row["size"] == "203x150"
    assert row["time_s"] > 0 and row["peak_memory_gib"] > 0 and facts["preset"] == "fast"
    # a smaller copy of the mask is resized (said once); another shape fails that image only
    write_mask(tmp_path / "half_seg.png", cv2.resize(coarse, (101, 75)))
    half = [str(tmp_path / "photo_im.jpg"), "--mask", str(tmp_path / "half_seg.png")]
    with caplog.at_level(logging.WARNING, logger="samsr"):
        assert _refine(*half, "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "o2")) == 0
    assert "resized (bilinear)" in caplog.text
    write_mask(tmp_path / "cut_seg.png", coarse[:50])
    cut = [str(tmp_path / "photo_im.jpg"), "--mask", str(tmp_path / "cut_seg.png")]
    assert _refine(*cut, "--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "o3")) == 1
    # an error before any image (no such checkpoint) is one line and exit status 2
    assert _refine(*args, "--ckpt", str(tmp_path / "nope.pt")) == 2


def test_refine_a_folder_reports_broken_pairs_and_skips_finished_ones(tiny_ckpt, tmp_path, capsys):
    rng = np.random.default_rng(1)
    photos = tmp_path / "photos"
    for name in ("a", "b", "c"):
        image, coarse = _photo(rng, 96, 128)
        write_image(photos / f"{name}_im.jpg", image)
        write_mask(photos / f"{name}_seg.png", coarse)
        write_mask(photos / f"{name}_gt.png", coarse)  # a GT beside them is not an image
    (photos / "broken_im.jpg").write_bytes(b"not a jpeg at all")
    write_mask(photos / "broken_seg.png", coarse)
    write_image(photos / "lonely_im.jpg", image)  # no mask
    out = tmp_path / "out"
    args = [str(photos), "--mask", str(photos), "--ckpt", str(tiny_ckpt), "--out", str(out)]
    assert _refine(*args) == 2  # two images failed, the three others are refined
    err = capsys.readouterr().err
    assert "broken_im.jpg" in err and "lonely_im.jpg" in err and "no mask" in err
    records = json.loads((out / "refine.json").read_text())["images"]
    assert {k: v["status"] for k, v in records.items()} == {
        "a": "ok", "b": "ok", "c": "ok", "broken": "failed", "lonely": "failed",
    }  # fmt: skip
    first = (out / "a_refined.png").stat().st_mtime_ns
    assert _refine(*args) == 2  # a rerun redoes only what failed
    assert "3 of 5 image(s) already done" in capsys.readouterr().out
    assert (out / "a_refined.png").stat().st_mtime_ns == first
    assert json.loads((out / "refine.json").read_text())["images"]["a"]["status"] == "ok"
    assert _refine(*args, "--overwrite") == 2
    assert (out / "a_refined.png").stat().st_mtime_ns != first


def test_refine_with_sam_guidance_through_the_model_flags(tiny_ckpt, tmp_path):
    """``--model samsr_v1`` over a CRM checkpoint runs SAM first (a tiny random SAM here, set
    through ``--set`` as any model.sam key; ``--sam-checkpoint`` names a real one)."""
    from conftest import SAM_TINY

    image, coarse = _photo(np.random.default_rng(5), 64, 80)
    write_image(tmp_path / "s_im.jpg", image)
    write_mask(tmp_path / "s_seg.png", coarse)
    args = [str(tmp_path / "s_im.jpg"), "--mask", str(tmp_path / "s_seg.png")]
    args += ["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "out"), "--model", "samsr_v1"]
    for override in SAM_TINY:
        args += ["--set", override]
    assert _refine(*args) == 0
    assert read_mask(tmp_path / "out" / "s_refined.png").shape == (64, 80)
    missing = ["--sam-checkpoint", str(tmp_path / "no_sam.pth"), "--out", str(tmp_path / "o2")]
    assert _refine(*args[: -len(SAM_TINY) * 2], *missing) == 2  # SAM's file is checked up front


def test_pairing_by_name_in_one_folder_or_two(tmp_path):
    one = tmp_path / "flat"
    one.mkdir()
    for name in ("x.jpg", "x.png", "y.jpg", "y_seg.png", "z.png", "z_mask.png"):
        (one / name).write_bytes(b"")
    jobs = {j.name: j for j in pair_for_refinement(one, one)}
    assert {k: j.mask.name for k, j in jobs.items()} == {
        "x": "x.png", "y": "y_seg.png", "z": "z_mask.png",
    }  # fmt: skip
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for name in ("p.jpg", "q_im.png", "r.webp"):
        (images / name).write_bytes(b"")
    for name in ("p.png", "q_seg.png"):
        (masks / name).write_bytes(b"")
    jobs = {j.name: j for j in pair_for_refinement(images, masks)}
    assert jobs["p"].mask == masks / "p.png" and jobs["q"].mask == masks / "q_seg.png"
    assert jobs["r"].mask is None and "no mask for r.webp" in jobs["r"].problem
    single = pair_for_refinement(images / "p.jpg", masks)  # one image, masks looked up by name
    assert [(j.name, j.mask) for j in single] == [("p", masks / "p.png")]
    with pytest.raises(DataError, match="is one file"):
        pair_for_refinement(images, masks / "p.png")
    with pytest.raises(DataError, match="not found"):
        pair_for_refinement(tmp_path / "nowhere", masks)


def _save_pil(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    img = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    if mode == "P":  # a VOC-like palette: index i has its own colour
        img.putpalette([v for i in range(256) for v in (i * 37 % 256, i * 91 % 256, i)])
    img.save(path)


def test_masks_as_people_have_them(tmp_path):
    base = np.zeros((20, 30), np.uint8)
    base[5:15, 10:25] = 255
    soft = base.copy()
    soft[5:15, 10] = 100  # an anti-aliased edge: fed as it is
    cases = {
        "0_255.png": (base, None),
        "0_1.png": (base // 255, None),
        "soft.png": (soft, None),
        "rgb.png": (np.dstack([soft] * 3), None),
        "red.png": (np.dstack([base, 0 * base, 0 * base]), None),  # a colour-coded mask
    }
    for name, (array, mode) in cases.items():
        _save_pil(tmp_path / name, array, mode)
    for name in ("0_255.png", "0_1.png", "red.png"):
        assert np.array_equal(read_coarse_mask(tmp_path / name), base), name
    for name in ("soft.png", "rgb.png"):
        assert np.array_equal(read_coarse_mask(tmp_path / name), soft), name
    assert np.array_equal(read_mask(tmp_path / "soft.png"), np.where(soft > 128, 255, 0))
    # 16-bit: 0/65535 and 0/1
    cv2.imwrite(str(tmp_path / "wide.png"), base.astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "wide01.png"), (base // 255).astype(np.uint16))
    assert np.array_equal(read_coarse_mask(tmp_path / "wide.png"), base)
    assert np.array_equal(read_coarse_mask(tmp_path / "wide01.png"), base)
    # float TIFF in [0, 1]
    cv2.imwrite(str(tmp_path / "float.tiff"), base.astype(np.float32) / 255)
    assert np.array_equal(read_coarse_mask(tmp_path / "float.tiff"), base)
    # a cut-out: the alpha channel is the mask
    rgba = np.dstack([np.full_like(base, 90)] * 3 + [soft])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    assert np.array_equal(read_coarse_mask(tmp_path / "cutout.png"), soft)
    # label / palette maps: --label picks one object; without it, a clear refusal
    labels = np.zeros((20, 30), np.uint8)
    labels[5:15, 10:25], labels[0:3, 0:3] = 7, 3
    _save_pil(tmp_path / "palette.png", labels, "P")
    _save_pil(tmp_path / "labels.png", labels, "L")
    for name in ("palette.png", "labels.png"):
        with pytest.raises(DataError, match="--label"):
            read_coarse_mask(tmp_path / name)
        assert np.array_equal(read_coarse_mask(tmp_path / name, label=7), base), name
        with pytest.raises(DataError, match="label 5 does not occur.*ids: 0, 3, 7"):
            read_coarse_mask(tmp_path / name, label=5)
    cv2.imwrite(str(tmp_path / "labels16.png"), labels.astype(np.uint16) * 1000)
    assert np.array_equal(read_coarse_mask(tmp_path / "labels16.png", label=7000), base)
    two = (base // 255).astype(np.uint8)
    _save_pil(tmp_path / "palette01.png", two, "P")
    assert np.array_equal(read_coarse_mask(tmp_path / "palette01.png"), base)


def test_refine_reads_label_maps_exif_and_guards_huge_images(tiny_ckpt, tmp_path, monkeypatch):
    image, coarse = _photo(np.random.default_rng(2), 40, 60)
    labels = np.where(coarse > 0, 4, 0).astype(np.uint8)
    labels[:5, :5] = 9
    _save_pil(tmp_path / "p_seg.png", labels, "P")
    # the image is stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise)
    pil = Image.fromarray(np.ascontiguousarray(np.rot90(image)))
    exif = pil.getexif()
    exif[0x0112] = 6
    pil.save(tmp_path / "p_im.jpg", exif=exif, quality=95)
    assert read_image(tmp_path / "p_im.jpg").shape == (60, 40, 3)
    assert read_image(tmp_path / "p_im.jpg", exif=True).shape == (40, 60, 3)
    args = [str(tmp_path / "p_im.jpg"), "--mask", str(tmp_path / "p_seg.png")]
    args += ["--ckpt", str(tiny_ckpt), "--out", str(tmp_path / "out")]
    assert _refine(*args, "--exif") == 1  # a label map needs --label
    assert _refine(*args, "--label", "4") == 1  # stored sideways: the mask does not fit
    assert _refine(*args, "--label", "4", "--exif") == 0
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2400 px: over the limit
    out2 = ["--out", str(tmp_path / "out2"), "--label", "4", "--exif"]
    assert _refine(*args, *out2) == 1
    assert _refine(*args, *out2, "--allow-large-images") == 0


def test_eval_discovers_coarse_sources_in_a_folder(tmp_path):
    from conftest import compose_config

    from samsr.engine.builders import build_eval_datasets

    rng = np.random.default_rng(3)
    root = tmp_path / "mine"
    for name in ("u", "v"):
        image, gt = _photo(rng, 32, 48)
        write_image(root / "test" / f"{name}_im.jpg", image)
        write_mask(root / "test" / f"{name}_gt.png", gt)
        for source in ("my_segmentor", "another"):
            write_mask(root / "test_coarse" / source / f"{name}_seg.png", gt)
    cfg = compose_config("eval", ["data=folder", f"data.root={root}", "ckpt_path=x"], tmp_path)
    sets = build_eval_datasets(cfg.data, "test")
    assert sorted(sets) == ["another", "my_segmentor"] and len(sets["another"]) == 2
    assert list(build_eval_datasets(cfg.data, "test", sources=["another"])) == ["another"]
    with pytest.raises(
        ConfigError, match=r"eval.sources=\['pspnet'\].*\['another', 'my_segmentor'\]"
    ):
        build_eval_datasets(cfg.data, "test", sources=["pspnet"])
    big = compose_config("eval", ["data=big", f"data.root={root}", "ckpt_path=x"], tmp_path)
    assert list(big.data.test.coarse_dirs) == ["fcn8s", "deeplabv3plus", "refinenet", "pspnet"]


def test_eval_builds_the_checkpoints_model_without_experiment(tiny_ckpt, tmp_path):
    """``scripts/eval.py ckpt_path=...`` alone: the defaults say ResNet-50, the checkpoint holds
    a ResNet-18 with a residual 8-wide decoder; the stored config wins unless named."""
    from conftest import TINY_SYNTHETIC, compose_config

    from samsr.engine.run import run_eval

    eval_only = ["device=cpu", "eval.warmup=0", "inference=single_scale", "eval.max_images=1"]
    overrides = [f"ckpt_path={tiny_ckpt}", *eval_only]
    cfg = compose_config("eval", TINY_SYNTHETIC + overrides, tmp_path)
    assert cfg.model.net.backbone == "resnet50"
    results = run_eval(cfg, overrides=overrides)  # as scripts/eval.py passes its command line
    assert set(results) == {"down8", "down16"}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())
    with pytest.raises(CheckpointError, match="do not fit"):  # an explicit key wins (and fails)
        run_eval(cfg, overrides=[*overrides, "model.net.backbone=resnet50"])


@pytest.mark.slow
def test_installed_package_refines_from_another_folder(tiny_ckpt, tmp_path):
    """``pip install .`` (no deps: the test's environment has them) and ``samsr refine`` run
    from a folder that is not the checkout: the configs travel inside the package."""
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(target), str(ROOT)], check=True)
    assert (target / "samsr" / "configs" / "inference" / "fast.yaml").is_file()
    image, coarse = _photo(np.random.default_rng(4))
    write_image(tmp_path / "img.jpg", image)
    write_mask(tmp_path / "img.png", coarse)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = [str(target / "bin" / "samsr"), "refine", str(tmp_path / "img.jpg")]
    run += ["--mask", str(tmp_path / "img.png"), "--ckpt", str(tiny_ckpt), "--device", "cpu"]
    done = subprocess.run(run, cwd=elsewhere, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (elsewhere / "outputs" / "refine" / "img_refined.png").is_file()


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
    changed = (drawn != image).any(axis=-1)
    assert changed[100, 100:500].any() and not changed[0].any()
