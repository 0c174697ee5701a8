"""samsr.data.io: image/mask reading (all the formats the datasets use), atomic writes, errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from samsr.data.io import DataError, read_image, read_mask, write_image, write_mask


def _rgb(h: int = 6, w: int = 5) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_read_image_rgb_order(tmp_path: Path) -> None:
    image = _rgb()
    Image.fromarray(image).save(tmp_path / "x.png")
    out = read_image(tmp_path / "x.png")
    assert out.dtype == np.uint8 and out.shape == (6, 5, 3)
    np.testing.assert_array_equal(out, image)


def test_read_image_gray_rgba_16bit(tmp_path: Path) -> None:
    gray = _rgb()[..., 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g.png"), np.stack([gray] * 3, -1))

    rgba = np.concatenate([_rgb(), np.full((6, 5, 1), 7, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgba[..., :3])

    wide = (_rgb().astype(np.uint16) * 257)[..., ::-1]  # BGR for cv2
    cv2.imwrite(str(tmp_path / "w.png"), np.ascontiguousarray(wide))
    np.testing.assert_array_equal(read_image(tmp_path / "w.png"), _rgb())


def test_read_image_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.jpg"):
        read_image(tmp_path / "missing.jpg")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="broken.jpg"):
        read_image(bad)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty.png"):
        read_mask(empty)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0, 255, 128, 129], [0, 255, 0, 255]),  # 0/255 and soft: > 128
        ([0, 1, 1, 0], [0, 255, 255, 0]),  # 0/1: any non-zero
        ([0, 3, 200, 100], [0, 0, 255, 0]),  # soft 8-bit
    ],
)
def test_read_mask_binarisation(tmp_path: Path, values: list[int], expected: list[int]) -> None:
    mask = np.array([values], np.uint8)
    Image.fromarray(mask).save(tmp_path / "m.png")
    out = read_mask(tmp_path / "m.png")
    assert out.dtype == np.uint8 and out.shape == (1, 4)
    np.testing.assert_array_equal(out, [expected])


def test_read_mask_channels_and_modes(tmp_path: Path) -> None:
    # RGB: channel 0 (R) only
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[0, 1] = (0, 255, 255)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "rgb.png"), [[255, 0, 0], [0, 0, 0]])
    # gray + alpha: gray value, alpha ignored
    la = np.zeros((2, 3, 2), np.uint8)
    la[..., 1] = 255
    la[1, 2, 0] = 200
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "la.png"), [[0, 0, 0], [0, 0, 255]])
    # RGBA
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[1, 1] = (250, 250, 250, 0)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "rgba.png"), [[0, 0, 0], [0, 255, 0]])
    # palette with indices 0/1 (colours irrelevant)
    pal = Image.fromarray(np.array([[0, 1, 0]], np.uint8), "P")
    pal.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png"), [[0, 255, 0]])
    # 1-bit
    Image.fromarray(np.array([[True, False]])).convert("1").save(tmp_path / "b.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "b.png"), [[255, 0]])
    # 16-bit 0/65535 and 16-bit 0/1
    cv2.imwrite(str(tmp_path / "w.png"), np.array([[0, 65535, 30000]], np.uint16))
    np.testing.assert_array_equal(read_mask(tmp_path / "w.png"), [[0, 255, 0]])
    cv2.imwrite(str(tmp_path / "w1.png"), np.array([[0, 1, 1]], np.uint16))
    np.testing.assert_array_equal(read_mask(tmp_path / "w1.png"), [[0, 255, 255]])


def test_read_mask_jpeg(tmp_path: Path) -> None:
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    cv2.imwrite(str(tmp_path / "m.jpg"), mask)
    out = read_mask(tmp_path / "m.jpg")
    assert set(np.unique(out)) <= {0, 255}
    assert out[8, 8] == 255 and out[0, 0] == 0


def test_write_mask_atomic_roundtrip(tmp_path: Path) -> None:
    mask = np.zeros((5, 7), np.uint8)
    mask[1:3, 2:6] = 255
    target = tmp_path / "sub" / "m.png"
    write_mask(target, mask)
    np.testing.assert_array_equal(cv2.imread(str(target), cv2.IMREAD_UNCHANGED), mask)
    write_mask(target, mask > 0)  # bool -> 0/255, overwrite in place
    np.testing.assert_array_equal(read_mask(target), mask)
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.png"]  # no temp files left
    with pytest.raises(DataError, match="png"):
        write_mask(tmp_path / "m.jpg", mask)
    with pytest.raises(DataError, match="H x W"):
        write_mask(tmp_path / "m3.png", np.zeros((2, 2, 3), np.uint8))


def test_write_image_roundtrip(tmp_path: Path) -> None:
    image = _rgb(8, 9)
    write_image(tmp_path / "x.png", image)
    np.testing.assert_array_equal(read_image(tmp_path / "x.png"), image)
    write_image(tmp_path / "x.jpg", image)
    assert read_image(tmp_path / "x.jpg").shape == (8, 9, 3)
