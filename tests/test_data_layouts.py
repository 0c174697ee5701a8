"""samsr.data.layouts: flat / DUTS release / FSS / BIG folders, detection, and error messages."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from samsr.data.io import DataError
from samsr.data.layouts import detect_layout, find_big_split, find_pairs


def _image(path: Path, h: int = 12, w: int = 10) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), 90, np.uint8))


def _mask(path: Path, h: int = 12, w: int = 10) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((h, w), np.uint8)
    mask[3:8, 2:6] = 255
    cv2.imwrite(str(path), mask)


def _flat(root: Path, stems: list[str]) -> None:
    for stem in stems:
        _image(root / f"{stem}.jpg")
        _mask(root / f"{stem}.png")


def test_flat(tmp_path: Path) -> None:
    _flat(tmp_path, ["b", "a", "c"])
    assert detect_layout(tmp_path) == "flat"
    pairs = find_pairs(tmp_path)
    assert [p.name for p in pairs] == ["a", "b", "c"]
    assert pairs[0].image == tmp_path / "a.jpg" and pairs[0].mask == tmp_path / "a.png"
    assert find_pairs(tmp_path, layout="flat") == pairs


def test_duts_release(tmp_path: Path) -> None:
    root = tmp_path / "DUTS-TR"
    for stem in ["x2", "x1"]:
        _image(root / "DUTS-TR-Image" / f"{stem}.jpg")
        _mask(root / "DUTS-TR-Mask" / f"{stem}.png")
    assert detect_layout(root) == "duts"
    pairs = find_pairs(root)
    assert [p.name for p in pairs] == ["x1", "x2"]
    assert pairs[0].mask == root / "DUTS-TR-Mask" / "x1.png"


def test_genuine_dut_omron(tmp_path: Path) -> None:
    _image(tmp_path / "DUT-OMRON-image" / "im1.jpg")
    _mask(tmp_path / "pixelwiseGT-new-PNG" / "im1.png")
    pairs = find_pairs(tmp_path)
    assert len(pairs) == 1 and pairs[0].name == "im1"


def test_fss(tmp_path: Path) -> None:
    for cls in ["zebra", "ant"]:
        for n in ["1", "2"]:
            _image(tmp_path / cls / f"{n}.jpg")
            _mask(tmp_path / cls / f"{n}.png")
    assert detect_layout(tmp_path) == "fss"
    names = [p.name for p in find_pairs(tmp_path)]
    assert names == ["ant/1", "ant/2", "zebra/1", "zebra/2"]


def test_missing_mask_strict_and_lenient(tmp_path: Path) -> None:
    _flat(tmp_path, ["a"])
    _image(tmp_path / "lonely.jpg")
    with pytest.raises(DataError, match="lonely.jpg") as info:
        find_pairs(tmp_path)
    assert "lonely.png" in str(info.value) and "strict=False" in str(info.value)
    with pytest.warns(UserWarning, match="lonely.jpg"):
        pairs = find_pairs(tmp_path, strict=False)
    assert [p.name for p in pairs] == ["a"]


def test_mask_without_image(tmp_path: Path) -> None:
    _flat(tmp_path, ["a"])
    _mask(tmp_path / "orphan.png")
    with pytest.raises(DataError, match="orphan.png"):
        find_pairs(tmp_path)


def test_missing_and_empty_roots(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        find_pairs(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="tried layouts") as info:
        find_pairs(tmp_path / "empty")
    assert "flat" in str(info.value) and "fss" in str(info.value) and "duts" in str(info.value)
    with pytest.raises(DataError, match="unknown layout"):
        find_pairs(tmp_path, layout="coco")


def test_big_split(tmp_path: Path) -> None:
    split, coarse = tmp_path / "test", tmp_path / "test_coarse" / "pspnet"
    for name in ["bb_1", "aa_2"]:
        _image(split / f"{name}_im.jpg")
        _mask(split / f"{name}_gt.png")
        _mask(coarse / f"{name}_seg.png")
    items = find_big_split(split, coarse)
    assert [i.name for i in items] == ["aa_2", "bb_1"]
    assert items[0].gt == split / "aa_2_gt.png" and items[0].coarse == coarse / "aa_2_seg.png"
    # default coarse folder: the split folder itself
    _mask(split / "aa_2_seg.png")
    with pytest.raises(DataError, match="bb_1_im.jpg") as info:
        find_big_split(split)
    assert "bb_1_seg.png" in str(info.value)
    items = find_big_split(split, require_coarse=False)
    assert items[1].coarse is None and items[0].coarse == split / "aa_2_seg.png"


def test_big_split_errors(tmp_path: Path) -> None:
    split = tmp_path / "val"
    _image(split / "x_im.jpg")
    _mask(split / "x_seg.png")
    with pytest.raises(DataError, match="x_gt.png"):
        find_big_split(split)
    assert find_big_split(split, require_gt=False)[0].gt is None
    with pytest.raises(DataError, match="coarse mask folder"):
        find_big_split(split, tmp_path / "missing")
    (tmp_path / "void").mkdir()
    with pytest.raises(DataError, match="no BIG-layout images"):
        find_big_split(tmp_path / "void")
