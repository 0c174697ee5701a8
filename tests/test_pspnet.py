"""The patch-based baseline: PSPNet, its loss, its two high-resolution inference modes, the VOC and
SBD loaders, the upscale-and-crop sampler and the BIG evaluation with its export (tiny models, CPU,
synthetic data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from samsr.data.io import DataError, read_coarse_mask, write_image
from samsr.data.layouts import find_big_split
from samsr.data.synthetic_classes import make_synthetic_classes
from samsr.data.voc import (
    IGNORE_INDEX,
    UpscaleCropDataset,
    read_label,
    upscale_crop,
    voc_items,
    voc_palette,
)
from samsr.engine.segmentation_eval import evaluate_segmentation, object_channel
from samsr.engine.trainer import build_optimizer
from samsr.inference.sliding import (
    SegmentationPredictor,
    global_class_map,
    sliding_logits,
    window_starts,
)
from samsr.models.losses import SegmentationLoss
from samsr.models.pspnet import HEAD_LR_MULT, DilatedResNet, PyramidPooling, build_pspnet


def test_pspnet_forward_backward_with_the_auxiliary_head():
    torch.manual_seed(0)
    net = build_pspnet("tiny", num_classes=5).train()
    x = torch.rand(2, 3, 65, 81)
    out = net(x)
    assert out["logits"].shape == out["aux"].shape == (2, 5, 65, 81)
    target = torch.randint(0, 5, (2, 65, 81))
    target[:, :3] = IGNORE_INDEX
    losses = SegmentationLoss(aux_weight=0.4)(out["logits"], target, aux=out["aux"])
    expected = F.cross_entropy(out["logits"], target, ignore_index=255)
    expected = expected + 0.4 * F.cross_entropy(out["aux"], target, ignore_index=255)
    torch.testing.assert_close(losses["total"], expected)
    losses["total"].backward()
    assert all(p.grad is not None for p in net.parameters())
    assert set(net.eval()(x)) == {"logits"}  # no auxiliary output at inference


def test_dilated_resnet_has_output_stride_8_and_refuses_other_depths():
    x3, x4 = DilatedResNet("tiny")(torch.randn(1, 3, 64, 96))
    assert x3.shape == (1, 1024, 8, 12) and x4.shape == (1, 2048, 8, 12)
    with pytest.raises(ValueError, match="model.net.depth must be 50, 101 or tiny"):
        DilatedResNet(34)


def test_imagenet_weights_load_into_the_backbone(tmp_path):
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    reference = ResNet(Bottleneck, [1, 1, 1, 1])  # the same parameters as a tiny backbone
    path = tmp_path / "r.pth"
    torch.save(reference.state_dict(), path)
    backbone = DilatedResNet("tiny")
    backbone.depth = "50"  # as a ResNet-50 would load its file (fc is ignored)
    backbone.load_imagenet(str(path))
    torch.testing.assert_close(backbone.layer4[0].conv2.weight, reference.layer4[0].conv2.weight)
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="is not a torchvision resnet50 state dict"):
        backbone.load_imagenet(str(path))


def test_pyramid_pooling_concatenates_every_bin():
    ppm = PyramidPooling(64, bins=(1, 2, 3, 6))
    out = ppm(torch.randn(2, 64, 13, 17))
    assert out.shape == (2, 64 + 4 * 16, 13, 17) and ppm.out_channels == 128


def test_heads_learn_ten_times_faster_than_the_backbone():
    from functools import partial

    net = build_pspnet("tiny", num_classes=3)
    opt = build_optimizer(net, partial(torch.optim.SGD, lr=0.01, momentum=0.9))
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == pytest.approx([0.01, 0.01 * HEAD_LR_MULT])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))


@pytest.mark.parametrize(
    "length,window,overlap", [(1000, 512, 1 / 3), (512, 512, 0.5), (100, 512, 0.25), (1537, 512, 0)]
)
def test_window_starts_cover_the_axis_flush_with_its_end(length, window, overlap):
    offsets = window_starts(length, window, overlap)
    assert offsets[0] == 0 and offsets[-1] == max(0, length - window)
    covered = np.zeros(length, bool)
    for o in offsets:
        covered[o : o + window] = True
    assert covered.all()
    assert (np.diff(offsets) > 0).all()


class _Pointwise(nn.Module):
    """Logits of each pixel alone (a 1x1 conv): windows cannot change them."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, x):
        return {"logits": self.conv(x)}


def _stitch(model, image, **kw):
    bands = list(sliding_logits(model, image, **kw))
    tops = [t for t, _ in bands]
    assert tops == sorted(tops) and tops[0] == 0
    return torch.cat([b for _, b in bands], dim=1)


@pytest.mark.parametrize("window,overlap", [(128, 1 / 3), (96, 0.5), (512, 0.25), (100, 0.0)])
def test_sliding_windows_are_stitched_without_seams(window, overlap):
    yy, xx = np.mgrid[:300, :410]
    # the content encodes the position, so the logits depend on where a pixel is
    image = np.dstack([(yy * 7) % 256, (xx * 5) % 256, (yy * xx) % 251]).astype(np.uint8)
    model = _Pointwise().eval()
    whole = model(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)["logits"][0]
    stitched = _stitch(model, image, window=window, overlap=overlap, batch_size=3)
    assert stitched.shape == whole.shape
    torch.testing.assert_close(stitched, whole.detach(), rtol=0, atol=1e-5)


def test_overlap_weights_sum_to_one():
    class Ones(nn.Module):
        def forward(self, x):
            return {"logits": torch.ones(x.shape[0], 2, *x.shape[-2:])}

    image = np.zeros((250, 333, 3), np.uint8)
    stitched = _stitch(Ones(), image, window=64, overlap=0.4, batch_size=5)
    assert stitched.shape == (2, 250, 333)
    torch.testing.assert_close(stitched, torch.ones_like(stitched))


def test_windows_are_padded_with_the_mean_colour():
    seen = []

    class Spy(nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return {"logits": torch.zeros(x.shape[0], 2, *x.shape[-2:])}

    _stitch(Spy(), np.full((40, 50, 3), 9, np.uint8), window=64, overlap=0.25)
    (x,) = seen
    assert x.shape == (1, 3, 64, 64)
    torch.testing.assert_close(x[0, :, :40, :50], torch.full((3, 40, 50), 9 / 255))
    torch.testing.assert_close(x[0, 0, 50:, :], torch.full((14, 64), 0.485))


def test_global_mode_upsamples_like_interpolate_band_by_band():
    class Smooth(nn.Module):
        def forward(self, x):  # a 4-class map that varies smoothly with the position
            h, w = x.shape[-2:]
            yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
            return {"logits": torch.stack([yy, xx, 1 - yy, 1 - xx * yy])[None] * 3}

    model = Smooth()
    image = np.zeros((333, 500, 3), np.uint8)
    out = global_class_map(model, image, size=64, band=50)
    small = model(torch.zeros(1, 3, 43, 64))["logits"]
    ref = F.interpolate(small, (333, 500), mode="bilinear", align_corners=False)[0].argmax(0)
    assert (out == ref.numpy()).mean() > 0.999


def test_predictor_refuses_bad_settings():
    with pytest.raises(ValueError, match="model.inference.mode"):
        SegmentationPredictor(_Pointwise(), mode="tiles")
    with pytest.raises(ValueError, match="overlap"):
        SegmentationPredictor(_Pointwise(), overlap=1.0)


def test_upscale_crop_equals_cropping_the_upscaled_image():
    rng = np.random.default_rng(0)
    image = cv_smooth(rng, 60, 90)
    label = (np.arange(90)[None, :] // 30 + 3 * (np.arange(60)[:, None] // 20)).astype(np.uint8)
    long_side, crop, top, left = 450, 128, 70, 200
    import cv2

    full = cv2.resize(image, (450, 300), interpolation=cv2.INTER_LINEAR)
    full_lab = cv2.resize(label, (450, 300), interpolation=cv2.INTER_NEAREST)
    img, lab = upscale_crop(image, label, long_side, crop, top, left)
    assert img.shape == (128, 128, 3) and lab.shape == (128, 128)
    diff = np.abs(img.astype(int) - full[top : top + crop, left : left + crop].astype(int))
    assert diff.max() <= 2  # warpAffine's and resize's fixed-point weights differ by a level
    agree = lab == full_lab[top : top + crop, left : left + crop]
    assert agree.mean() > 0.97  # nearest: only pixels on class edges may differ by one pixel
    # a window reaching past the upscaled image is padded: mean colour, ignored label
    img, lab = upscale_crop(image, label, long_side, crop, 250, 400)
    assert (lab[50:, :] == IGNORE_INDEX).all() and (lab[:, 50:] == IGNORE_INDEX).all()
    assert (lab[:50, :50] != IGNORE_INDEX).all()
    assert (img[60, 60] == np.round(np.array([0.485, 0.456, 0.406]) * 255)).all()


def cv_smooth(rng, h, w):
    import cv2

    noise = rng.integers(0, 256, (h // 6, w // 6, 3)).astype(np.uint8)
    return cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)


def _fake_voc(root, ids_train, ids_val, size=(40, 60)):
    voc = root / "VOCdevkit" / "VOC2012"
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    (voc / "SegmentationClass").mkdir()
    for split, ids in (("train", ids_train), ("val", ids_val)):
        (lists / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for k, i in enumerate(ids):
            write_image(voc / "JPEGImages" / f"{i}.jpg", np.full((*size, 3), 100, np.uint8))
            label = np.zeros(size, np.uint8)
            label[10:20, 10:30] = k + 1
            label[9, 10:30] = 255
            im = Image.fromarray(label, mode="P")
            im.putpalette(voc_palette())
            im.save(voc / "SegmentationClass" / f"{i}.png")
    return voc


def _fake_sbd(root, ids_train, ids_val, size=(40, 60)):
    scipy_io = pytest.importorskip("scipy.io")
    ds = root / "benchmark_RELEASE" / "dataset"
    (ds / "img").mkdir(parents=True)
    (ds / "cls").mkdir()
    for split, ids in (("train", ids_train), ("val", ids_val)):
        (ds / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for i in ids:
            write_image(ds / "img" / f"{i}.jpg", np.full((*size, 3), 50, np.uint8))
            seg = np.zeros(size, np.uint8)
            seg[5:15, 5:15] = 7
            gt = {"Segmentation": seg, "Boundaries": np.zeros(1), "CategoriesPresent": 7}
            scipy_io.savemat(ds / "cls" / f"{i}.mat", {"GTcls": gt})
    return ds


def test_voc_loader_reads_palette_indices(tmp_path):
    _fake_voc(tmp_path, ["2007_000001", "2007_000002"], ["2007_000003"])
    items = voc_items(tmp_path, "train")
    assert [i.name for i in items] == ["2007_000001", "2007_000002"]
    label = read_label(items[1].label)
    assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 2, 255}
    assert [i.name for i in voc_items(tmp_path / "VOCdevkit" / "VOC2012", "val")] == ["2007_000003"]
    with pytest.raises(DataError, match="image list not found"):
        voc_items(tmp_path, "trainaug")
    with pytest.raises(DataError, match="PASCAL VOC 2012 not found"):
        voc_items(tmp_path / "nothing")


def test_sbd_extends_the_training_list_outside_voc_val(tmp_path):
    _fake_voc(tmp_path, ["a", "b"], ["v"])
    _fake_sbd(tmp_path, ["b", "s1", "v"], ["s2"])
    items = voc_items(tmp_path, "train", sbd_root=tmp_path)
    assert [i.name for i in items] == ["a", "b", "s1", "s2"]  # VOC val image "v" left out
    by_name = {i.name: i for i in items}
    assert by_name["b"].label.suffix == ".png"  # VOC's own label wins
    label = read_label(by_name["s1"].label)
    assert label.shape == (40, 60) and set(np.unique(label)) == {0, 7}


def test_sampler_crops_from_a_2k_to_6k_upscale(tmp_path, monkeypatch):
    _fake_voc(tmp_path, ["a", "b", "c"], ["v"], size=(30, 50))
    items = voc_items(tmp_path, "train")
    ds = UpscaleCropDataset(items, crop_size=64, long_side=(2000, 6000), num_classes=21)
    sides = []
    real = upscale_crop

    def spy(image, label, long_side, crop, top, left, ignore_index=255):
        sides.append(long_side)
        scale = long_side / 50
        assert 0 <= top <= max(0, round(30 * scale) - crop)
        assert 0 <= left <= round(50 * scale) - crop
        return real(image, label, long_side, crop, top, left, ignore_index)

    monkeypatch.setattr("samsr.data.voc.upscale_crop", spy)
    torch.manual_seed(0)
    for k in range(30):
        sample = ds[k % 3]
        assert sample["image"].shape == (3, 64, 64) and sample["label"].shape == (64, 64)
        assert sample["label"].dtype == torch.int64
    assert min(sides) >= 2000 and max(sides) <= 6000 and max(sides) - min(sides) > 1000
    with pytest.raises(DataError, match="model has 2 classes"):
        UpscaleCropDataset(items, crop_size=64, num_classes=2)[1]


def test_synthetic_classes_and_the_big_evaluation_export(tmp_path):
    root = make_synthetic_classes(tmp_path / "sc", 4, 3, 1, 2, test_long_side=(300, 400))
    items = voc_items(root, "train")
    assert len(items) == 3 and set(np.unique(read_label(items[0].label))) <= {0, 1, 2, 3, 255}
    big = find_big_split(root / "big" / "test", require_coarse=False)
    assert len(big) == 2

    def segment(image):  # an oracle that segments by the GT: the export must carry it exactly
        return oracle_map[tuple(image.shape[:2])]

    oracle_map = {}
    from samsr.data.io import read_image, read_mask

    for item in big:
        gt = read_mask(item.gt)
        oracle_map[read_image(item.image).shape[:2]] = np.where(
            gt > 128, object_channel(item.name), 0
        ).astype(np.uint8)
    export = tmp_path / "test_coarse" / "pspnet"
    res = evaluate_segmentation(
        segment, root / "big" / "test", "cpu", "pspnet_sliding", out_dir=tmp_path / "out",
        export_dir=export, num_classes=4,
    )  # fmt: skip
    assert res["pspnet_sliding"]["iou"] == 1.0 and res["pspnet_sliding"]["num_images"] == 2
    assert (tmp_path / "out" / "metrics.json").is_file()
    # the export is a coarse source the refiners' BIG loader reads
    paired = find_big_split(root / "big" / "test", export)
    for item in paired:
        coarse = read_coarse_mask(item.coarse)
        assert ((coarse > 128) == (read_mask(item.gt) > 128)).all()


def test_object_channel_is_the_last_integer_of_the_name():
    assert object_channel("2008_000123_15") == 15
    assert object_channel("car_7") == 7
    with pytest.raises(DataError, match="no class number"):
        object_channel("dog")


# ----------------------------------------------------------------- through the real configs

SEGMENTATION_DATA = ["synthetic_classes", "voc"]
SEGMENTATION_EXPERIMENTS = ["pspnet_smoke", "pspnet_synthetic", "pspnet_voc"]


@pytest.mark.parametrize("data", SEGMENTATION_DATA)
@pytest.mark.parametrize("name", ["train", "eval"])
def test_segmentation_configs_compose_and_resolve(tmp_path, data, name):
    from conftest import compose_config
    from omegaconf import OmegaConf

    extra = ["ckpt_path=x.pt"] if name == "eval" else []
    cfg = compose_config(name, ["model=pspnet", f"data={data}", *extra], tmp_path)
    OmegaConf.resolve(cfg)
    assert cfg.model.task == cfg.data.task == "segmentation"
    assert cfg.data.train.num_classes == cfg.model.net.num_classes


@pytest.mark.parametrize("experiment", [None, *SEGMENTATION_EXPERIMENTS])
@pytest.mark.parametrize("debug", [None, "default"])
def test_segmentation_experiments_build_model_and_data(tmp_path, experiment, debug):
    from conftest import TINY_SYNTHETIC, compose_config, tiny_overrides

    from samsr.engine.builders import build_model, build_train_dataset, prepare_data

    extra = ["model=pspnet"] + ([f"experiment={experiment}"] if experiment else [])
    extra += [f"debug={debug}"] if debug else []
    if experiment == "pspnet_voc":  # VOC's release layout: a tiny fake tree
        _fake_voc(tmp_path / "voc", ["a", "b"], ["v"])
        extra += [f"data.root={tmp_path / 'voc'}"]
    else:
        extra += TINY_SYNTHETIC
    cfg = compose_config("train", tiny_overrides("train", extra) + extra, tmp_path)
    assert isinstance(build_model(cfg.model), nn.Module)
    prepare_data(cfg.data)
    sample = build_train_dataset(cfg.data, cfg.model)[0]
    side = cfg.data.train.crop_size
    assert sample["image"].shape == (3, side, side) and sample["label"].shape == (side, side)


def test_a_refiner_refuses_segmentation_data_and_back(tiny_cfg, tmp_path):
    from conftest import TINY_SYNTHETIC, compose_config

    from samsr.engine.run import run_train
    from samsr.errors import ConfigError

    over = ["model=pspnet", "data=synthetic", "model.net.depth=tiny", *TINY_SYNTHETIC]
    with pytest.raises(ConfigError, match="use data=voc or data=synthetic_classes"):
        run_train(compose_config("train", over, tmp_path))
    with pytest.raises(ConfigError, match="model=crm is a refinement model"):
        run_train(tiny_cfg("train", ["data=synthetic_classes"]))


def test_pspnet_trains_resumes_exactly_and_evaluates_in_both_modes(tiny_cfg, tmp_path):
    import json

    from samsr.engine.run import run_eval, run_train

    def weights(path):
        return torch.load(path, map_location="cpu", weights_only=False)["model"]

    common = ["model=pspnet", "trainer.ckpt_every=1", "trainer.val_every=0"]
    full = run_train(tiny_cfg("train", [*common, "trainer.max_steps=2"]))
    assert full["test"]["pspnet_sliding"]["num_images"] == 2
    half = run_train(
        tiny_cfg(
            "train",
            [
                *common,
                "trainer.max_steps=1",
                "test_after_training=false",
                f"paths.output_dir={tmp_path / 'half'}",
            ],
        )  # fmt: skip
    )
    resumed = run_train(
        tiny_cfg(
            "train",
            [
                *common,
                "trainer.max_steps=2",
                "test_after_training=false",
                f"resume={half['checkpoint']}",
            ],
        )  # fmt: skip
    )
    a, b = weights(full["checkpoint"]), weights(resumed["checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in a)

    export = tmp_path / "data" / "synthetic_classes" / "big" / "test_coarse" / "pspnet_samsr"
    for mode in ("sliding", "global"):
        out = tmp_path / f"eval_{mode}"
        run_eval(
            tiny_cfg(
                "eval",
                [
                    "model=pspnet",
                    f"ckpt_path={full['checkpoint']}",
                    f"paths.output_dir={out}",
                    f"model.inference.mode={mode}",
                    f"eval.export_coarse={export}_{mode}",
                ],
            )  # fmt: skip
        )
        metrics = json.loads((out / "metrics.json").read_text())
        assert set(metrics) == {f"pspnet_{mode}"}
        assert metrics[f"pspnet_{mode}"]["num_images"] == 2
        assert "| evaluation | pspnet IoU/mBA |" in (out / "results.md").read_text()
        assert len(list(Path(f"{export}_{mode}").glob("*_seg.png"))) == 2

    # figure 4.1 from the checkpoint: one row per image (4 panels), and the contact sheet
    from samsr.engine.patch_figure import main as figure

    split = export.parent.parent / "test"
    fig = tmp_path / "fig"
    assert figure(["--ckpt", str(full["checkpoint"]), "--split", str(split), "--out", str(fig),
                   "--width", "400", "--device", "cpu"]) == 0  # fmt: skip
    rows = sorted(fig.glob("test_*.png"))
    assert len(rows) == 2 and (fig / "figure_4_1.png").is_file()
    assert np.asarray(Image.open(rows[0])).shape[1] == 400

    # the export is a coarse source of the refiners (found beside the split: coarse_dirs=null)
    crm = run_train(tiny_cfg("train", ["trainer.max_steps=1", "test_after_training=false",
                                       f"paths.output_dir={tmp_path / 'crm'}"]))  # fmt: skip
    results = run_eval(
        tiny_cfg(
            "eval",
            [
                f"ckpt_path={crm['checkpoint']}",
                f"data.test.split_dir={split}",
                "data.test.coarse_dirs=null",
                f"paths.output_dir={tmp_path / 'refined'}",
            ],
        )  # fmt: skip
    )
    assert set(results) == {"pspnet_samsr_sliding", "pspnet_samsr_global"}


def test_training_from_scratch_loads_the_imagenet_file_into_the_backbone(tmp_path):
    # the same entry point as CRM's encoder: model.net.pretrained=<file> (or imagenet)
    from conftest import compose_config
    from torchvision.models import resnet50

    from samsr.engine.builders import build_model, load_pretrained
    from samsr.engine.checkpoint import CheckpointError

    torch.manual_seed(0)
    reference = resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    over = ["model=pspnet", "data=synthetic_classes", "model.net.depth=50",
            f"model.net.pretrained={path}"]  # fmt: skip
    cfg = compose_config("train", over, tmp_path)
    model = build_model(cfg.model)
    assert load_pretrained(model, cfg.model, str(tmp_path)) == str(path)
    loaded = model.encoder.layer3[5].conv2.weight
    torch.testing.assert_close(loaded, reference.layer3[5].conv2.weight)
    torch.save({"fc.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a torchvision resnet50 state dict"):
        load_pretrained(model, cfg.model, str(tmp_path))
