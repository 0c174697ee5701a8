"""samsr.data.transforms: joint crop/pad/flip alignment and the image-only photometric jitter."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samsr.data.transforms import CropFlip, image_to_tensor, mask_to_tensor, photometric


def _coords(h: int, w: int) -> np.ndarray:
    """int32 H x W x 2 array whose pixels hold (y + 1, x + 1): 0 marks padding after a crop."""
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([ys + 1, xs + 1], -1).astype(np.int32)


def _reference(array: np.ndarray, geo: CropFlip) -> np.ndarray:
    """The same transform the slow way: pad like torchvision, slice, flip."""
    pad = [(geo.pad_top, geo.pad_top), (geo.pad_left, geo.pad_left)] + [(0, 0)] * (array.ndim - 2)
    padded = np.pad(array, pad)
    out = padded[geo.top : geo.top + geo.crop_h, geo.left : geo.left + geo.crop_w]
    return out[:, ::-1] if geo.flip else out


@pytest.mark.parametrize("size", [(50, 70), (30, 20), (10, 90), (64, 64), (200, 41)])
def test_crop_pad_flip_alignment(size: tuple[int, int]) -> None:
    h, w = size
    coords = _coords(h, w)
    image = (coords[..., 1:2] * 3 % 256).astype(np.uint8).repeat(3, -1)
    gt = ((coords[..., 0] + coords[..., 1]) % 2 * 255).astype(np.uint8)
    extra = (coords[..., 0:1] % 256).astype(np.uint8).repeat(3, -1)
    flips = set()
    for seed in range(20):
        geo = CropFlip.sample(h, w, 64, np.random.default_rng(seed))
        flips.add(geo.flip)
        out = geo.apply(coords)
        assert out.shape == (64, 64, 2)
        np.testing.assert_array_equal(out, _reference(coords, geo))
        np.testing.assert_array_equal(geo.apply(image), _reference(image, geo))
        np.testing.assert_array_equal(geo.apply(gt), _reference(gt, geo))
        np.testing.assert_array_equal(geo.apply(extra), _reference(extra, geo))
        valid = out[..., 0] > 0
        # every output pixel is the source pixel its coordinates name; padding is 0
        ys, xs = out[valid, 0] - 1, out[valid, 1] - 1
        np.testing.assert_array_equal(geo.apply(gt)[valid], gt[ys, xs])
        np.testing.assert_array_equal(geo.apply(image)[valid], image[ys, xs])
        assert (geo.apply(gt)[~valid] == 0).all() and (geo.apply(image)[~valid] == 0).all()
        # all source pixels are kept along a side shorter than the crop
        if h <= 64:
            assert valid.any(axis=1).sum() == h
        if w <= 64:
            assert valid.any(axis=0).sum() == w
        # the flip mirrors columns
        if geo.flip:
            row = out[valid.any(axis=1)][0]
            cols = row[row[:, 1] > 0, 1]
            assert (np.diff(cols) < 0).all()
    assert flips == {True, False}


def test_crop_positions_cover_range() -> None:
    tops = {CropFlip.sample(10, 100, 64, np.random.default_rng(s)).top for s in range(200)}
    # padded height 10 + 2 * 54 = 118 (torchvision's pad_if_needed), crop 64: tops in 0..54
    assert tops <= set(range(55)) and {0, 54} <= tops and len(tops) > 45


def test_apply_rejects_misaligned() -> None:
    geo = CropFlip.sample(20, 30, 16, np.random.default_rng(0))
    with pytest.raises(ValueError, match="does not match"):
        geo.apply(np.zeros((30, 20), np.uint8))


def test_tensor_conversion() -> None:
    image = np.full((4, 5, 3), 255, np.uint8)
    t = image_to_tensor(image)
    assert t.shape == (3, 4, 5) and t.dtype == torch.float32 and float(t.max()) == 1.0
    assert torch.equal(image_to_tensor(image.astype(np.float32) / 255), t)
    m = mask_to_tensor(np.array([[0, 255]], np.uint8))
    assert m.shape == (1, 1, 2) and m.dtype == torch.float32 and m.tolist() == [[[0.0, 1.0]]]


def test_photometric() -> None:
    image = np.random.default_rng(0).random((32, 32, 3), dtype=np.float32)
    a = photometric(image, np.random.default_rng(3))
    b = photometric(image, np.random.default_rng(3))
    assert np.array_equal(a, b) and a.shape == image.shape and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert not np.array_equal(a, image)
    grays = 0
    for seed in range(200):
        out = photometric(image, np.random.default_rng(seed))
        grays += int(
            np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
        )
        ratio = out.mean() / image.mean()
        assert 0.7 < float(ratio) < 1.3  # brightness 0.2, contrast/saturation 0.05
    assert 5 <= grays <= 40  # p = 0.1
    same = photometric(image, np.random.default_rng(0), 0.0, 0.0, 0.0, 0.0)
    np.testing.assert_array_equal(same, image)
    with pytest.raises(ValueError, match="H x W x 3"):
        photometric(np.zeros((3, 8, 8), np.float32), np.random.default_rng(0))
