"""samsr.guidance build/runner/masks: tiny SAM, cached-embedding runner, AMG settings, masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.utils.amg import mask_to_rle_pytorch

from samsr.guidance import (
    SAM_CHECKPOINTS,
    AmgConfig,
    SamRunner,
    build_sam,
    build_tiny_sam,
    decode_mask,
    mask_area,
)

# Permissive: the random tiny SAM's masks pass every filter.
LOOSE = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """64 x 80 x 3 uint8 RGB: a bright disc on noise."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 80, size=(64, 80, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:64, :80]
    img[(yy - 30) ** 2 + (xx - 45) ** 2 < 15**2] = 230
    return img


@pytest.fixture
def runner_and_count() -> tuple[SamRunner, list[int]]:
    """A runner on a fresh tiny SAM whose image encoder counts its calls (and still runs)."""
    sam = build_tiny_sam(seed=0)
    calls = [0]
    forward = sam.image_encoder.forward

    def counting_forward(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return forward(x)

    sam.image_encoder.forward = counting_forward
    return SamRunner(sam), calls


def test_tiny_sam_deterministic_and_embedding_shape(image):
    a, b, c = build_tiny_sam(seed=0), build_tiny_sam(seed=0), build_tiny_sam(seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert not a.training
    runner = SamRunner(a)
    runner.set_image(image)
    assert runner.embedding.shape == (1, 32, 4, 4)  # 1 x embed_dim x img_size/16 x img_size/16
    small = build_tiny_sam(img_size=32, embed_dim=16)
    runner = SamRunner(small)
    runner.set_image(image)
    assert runner.embedding.shape == (1, 16, 2, 2)


def test_tiny_sam_rejects_bad_sizes():
    with pytest.raises(ValueError, match="img_size"):
        build_tiny_sam(img_size=50)
    with pytest.raises(ValueError, match="embed_dim"):
        build_tiny_sam(embed_dim=12)


def test_runner_encodes_once_and_reuses_embedding(image, runner_and_count):
    runner, calls = runner_and_count
    runner.set_image(image)
    runner.set_image(image.copy())  # same content, no key
    assert calls[0] == 1
    runner.set_image(image, key="a")  # a key replaces the content check: new identity
    runner.set_image(image, key="a")
    assert calls[0] == 2
    assert runner.timings["encode"] > 0

    anns = runner.generate(AmgConfig(**LOOSE))
    assert calls[0] == 2  # AMG used the cached embedding
    assert isinstance(anns, list) and anns
    for ann in anns:
        assert isinstance(ann, dict)
        assert ann["segmentation"]["size"] == [64, 80]  # uncompressed RLE by default
        mask = decode_mask(ann)
        assert mask.shape == (64, 80) and mask.dtype == bool
        assert mask_area(ann) == ann["area"] == mask.sum()
        assert ann["scale"] == 1.0 and ann["orig_size"] == [64, 80]
    assert runner.timings["amg"] > 0

    mask, iou = runner.predict_points(np.array([[45.0, 30.0], [5.0, 5.0]]), np.array([1, 0]))
    assert mask.shape == (64, 80) and mask.dtype == bool
    assert isinstance(iou, float)
    assert calls[0] == 2
    assert runner.timings["prompt"] > 0

    runner.set_image(image[::-1].copy())  # different content
    assert calls[0] == 3


def test_generate_binary_mask_mode_matches_rle(image, runner_and_count):
    runner, calls = runner_and_count
    runner.set_image(image)
    rle = runner.generate(AmgConfig(**LOOSE))
    binary = runner.generate(AmgConfig(**LOOSE, output_mode="binary_mask"))
    assert calls[0] == 1
    assert len(rle) == len(binary)
    for r, b in zip(rle, binary):
        assert b["segmentation"].shape == (64, 80)
        np.testing.assert_array_equal(decode_mask(r), decode_mask(b))
        assert mask_area(b) == mask_area(r)


def test_max_side_downscales(image, runner_and_count):
    runner, calls = runner_and_count
    runner.set_image(image, max_side=40)
    assert runner.working_size == (32, 40) and runner.image_size == (64, 80)
    assert runner.scale == pytest.approx(0.5)
    anns = runner.generate(AmgConfig(**LOOSE, max_side=40))
    assert calls[0] == 1
    assert anns
    for ann in anns:
        assert decode_mask(ann).shape == (32, 40)
        assert ann["scale"] == pytest.approx(0.5) and ann["orig_size"] == [64, 80]
    mask, _ = runner.predict_points(np.array([[45.0, 30.0]]), np.array([1]))
    assert mask.shape == (64, 80)  # predict_points answers in the original frame

    runner.generate(AmgConfig(**LOOSE))  # another max_side: encoded again at full size
    assert calls[0] == 2 and runner.working_size == (64, 80)


def test_crop_layers_encode_crops_but_keep_the_image_embedding(image, runner_and_count):
    runner, calls = runner_and_count
    runner.set_image(image)
    before = runner.embedding.clone()
    anns = runner.generate(AmgConfig(**{**LOOSE, "points_per_side": 2}, crop_n_layers=1))
    assert calls[0] == 1 + 4  # the full image is cached; the 4 crops of layer 1 are encoded
    assert all(decode_mask(a).shape == (64, 80) for a in anns)
    assert torch.equal(runner.embedding, before)


def test_runner_input_errors(image):
    runner = SamRunner(build_tiny_sam())
    with pytest.raises(RuntimeError, match="set_image"):
        runner.generate(AmgConfig(**LOOSE))
    with pytest.raises(ValueError, match="uint8"):
        runner.set_image(image.astype(np.float32))
    runner.set_image(image)
    with pytest.raises(ValueError, match="N x 2"):
        runner.predict_points(np.array([1.0, 2.0]), np.array([1]))
    with pytest.raises(ValueError, match="labels"):
        runner.predict_points(np.array([[1.0, 2.0]]), np.array([3]))


def test_amg_config_defaults_and_validation():
    cfg = AmgConfig()
    assert cfg.output_mode == "uncompressed_rle" and cfg.max_side is None
    assert cfg.points_per_side == 32 and cfg.crop_overlap_ratio == pytest.approx(512 / 1500)
    assert "max_side" not in cfg.generator_kwargs()
    for field, value in [
        ("pred_iou_thresh", 1.5),
        ("points_per_side", 0),
        ("points_per_batch", 2.5),
        ("crop_n_layers", -1),
        ("output_mode", "png"),
        ("max_side", 0),
        ("crop_overlap_ratio", 1.0),
        ("min_mask_region_area", True),
    ]:
        with pytest.raises(ValueError, match=field):
            AmgConfig(**{field: value})
    with pytest.raises(ValueError, match="points_per_side"):
        AmgConfig(point_grids=[[[0.5, 0.5]]])  # both set
    grids = AmgConfig(points_per_side=None, point_grids=[[[0.5, 0.5]]]).generator_kwargs()
    assert grids["point_grids"][0].shape == (1, 2)


def test_decode_mask_formats():
    masks = torch.zeros(1, 5, 7, dtype=torch.bool)
    masks[0, 1:3, 2:6] = True
    rle = mask_to_rle_pytorch(masks)[0]
    np.testing.assert_array_equal(decode_mask({"segmentation": rle}), masks[0].numpy())
    assert mask_area({"segmentation": rle}) == 8
    assert mask_area({"segmentation": masks[0].numpy()}) == 8
    with pytest.raises(ValueError, match="Not a SAM mask"):
        decode_mask({"segmentation": [1, 2, 3]})
    coco = {"segmentation": {"size": [5, 7], "counts": "abc"}}
    try:
        import pycocotools  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pycocotools"):
            decode_mask(coco)


def test_build_sam_errors(tmp_path):
    assert set(SAM_CHECKPOINTS) == {"vit_h", "vit_l", "vit_b"}
    with pytest.raises(ValueError, match="vit_b, vit_h, vit_l"):
        build_sam("vit_x", tmp_path / "x.pth")
    missing = tmp_path / "sam_vit_b_01ec64.pth"
    with pytest.raises(FileNotFoundError) as err:
        build_sam("vit_b", missing)
    file_name, url = SAM_CHECKPOINTS["vit_b"]
    assert url in str(err.value) and file_name in str(err.value) and str(missing) in str(err.value)
    bogus = tmp_path / "bogus.pth"
    torch.save({"a": torch.zeros(1)}, bogus)
    with pytest.raises(ValueError, match="bogus.pth") as err:
        build_sam("vit_b", bogus)
    assert "vit_b" in str(err.value)
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ValueError, match="list.pth"):
        build_sam("vit_b", not_a_dict)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        build_sam("vit_b", garbage)


@pytest.mark.slow
def test_build_sam_round_trip_vit_b(tmp_path):
    """A (random) vit_b state dict saved as the official file loads back exactly (~360 MB)."""
    from segment_anything import sam_model_registry

    ref = sam_model_registry["vit_b"](checkpoint=None)
    path = tmp_path / SAM_CHECKPOINTS["vit_b"][0]
    torch.save(ref.state_dict(), path)
    sam = build_sam("vit_b", path)
    assert not sam.training
    assert all(torch.equal(v, sam.state_dict()[k]) for k, v in ref.state_dict().items())
    with pytest.raises(ValueError, match="model_type='vit_b'"):
        build_sam("vit_l", path)


def test_batched_encoding_prompts_like_set_image():
    # encode_batch runs set_image's preprocessing with one batched encoder call; a selected image
    # answers point prompts as if it had been set alone
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8) for _ in range(3)]
    batched, single = SamRunner(build_tiny_sam(seed=2)), SamRunner(build_tiny_sam(seed=2))
    pins = batched.encode_batch(images)
    points, labels = np.array([[10.0, 20.0], [25.0, 30.0]]), np.array([1, 1])
    for image, pin in zip(images, pins):
        batched.select(pin)
        single.set_image(image)
        assert batched.image_size == single.image_size == (48, 40)
        mask_b, iou_b = batched.predict_points(points, labels)
        mask_s, iou_s = single.predict_points(points, labels)
        assert np.mean(mask_b == mask_s) > 0.999 and abs(iou_b - iou_s) < 1e-4
    with pytest.raises(ValueError, match="same-size"):
        batched.encode_batch([images[0], images[0][:20]])
