"""samsr.data datasets and synthetic data: the batch contract, determinism, error messages."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from samsr.data.io import DataError, read_image, read_mask
from samsr.data.layouts import find_big_split, find_pairs
from samsr.data.synthetic import export_big_layout, make_synthetic
from samsr.data.train_dataset import EvalDataset, RefinementTrainDataset

SMALL = {
    "num_train": 3,
    "train_long_side": 96,
    "num_val": 1,
    "num_test": 2,
    "test_long_side": (200, 260),
    "coarse_factors": (8, 16),
}


def _pair(folder: Path, stem: str, h: int, w: int, mask_hw: tuple[int, int] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(stem) + h)
    cv2.imwrite(str(folder / f"{stem}.jpg"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    mh, mw = mask_hw or (h, w)
    mask = np.zeros((mh, mw), np.uint8)
    cv2.circle(mask, (mw // 2, mh // 2), min(mh, mw) // 3, 255, -1)
    cv2.imwrite(str(folder / f"{stem}.png"), mask)


@pytest.fixture
def train_roots(tmp_path: Path) -> list[Path]:
    flat = tmp_path / "flat"
    _pair(flat, "a", 90, 120)
    _pair(flat, "b", 40, 50)  # smaller than the crop: padded
    fss = tmp_path / "fss"
    _pair(fss / "cat", "1", 70, 64)
    return [flat, fss]


def _check_train_sample(sample: dict, size: int) -> None:
    assert set(sample) == {"image", "coarse", "gt", "meta"}
    assert sample["image"].shape == (3, size, size) and sample["image"].dtype == torch.float32
    assert float(sample["image"].min()) >= 0.0 and float(sample["image"].max()) <= 1.0
    for key in ("coarse", "gt"):
        assert sample[key].shape == (1, size, size) and sample[key].dtype == torch.float32
        assert set(torch.unique(sample[key]).tolist()) <= {0.0, 1.0}


def test_train_dataset_contract(train_roots: list[Path]) -> None:
    ds = RefinementTrainDataset(train_roots, crop_size=64, seed=0)
    assert len(ds) == 3
    assert ds.names == ["flat/a", "flat/b", "fss/cat/1"]
    for i in range(len(ds)):
        sample = ds[i]
        _check_train_sample(sample, 64)
        assert sample["meta"] == {"name": ds.names[i], "index": i}
        assert sample["gt"].sum() > 0
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["image"].shape == (2, 3, 64, 64) and batch["gt"].shape == (2, 1, 64, 64)
    assert batch["meta"]["name"] == ["flat/a", "flat/b"]
    with pytest.raises(IndexError):
        ds[3]


def test_train_dataset_padding_is_zero(train_roots: list[Path]) -> None:
    ds = RefinementTrainDataset(train_roots, crop_size=64, seed=0, photometric=False)
    sample = ds[1]  # 40 x 50 image: 24 rows and 14 columns of padding
    rows = (sample["image"].sum(dim=(0, 2)) > 0).sum()
    cols = (sample["image"].sum(dim=(0, 1)) > 0).sum()
    assert int(rows) <= 40 and int(cols) <= 50


def test_train_dataset_randomness(train_roots: list[Path]) -> None:
    ds = RefinementTrainDataset(train_roots, crop_size=64, seed=0)
    a, b = ds[0], ds[0]
    assert all(torch.equal(a[k], b[k]) for k in ("image", "coarse", "gt"))
    ds.set_epoch(1)
    c = ds[0]
    assert not all(torch.equal(a[k], c[k]) for k in ("image", "coarse", "gt"))
    free = RefinementTrainDataset(train_roots, crop_size=64)
    torch.manual_seed(5)
    x = [free[0]["coarse"] for _ in range(3)]
    torch.manual_seed(5)
    y = [free[0]["coarse"] for _ in range(3)]
    assert all(torch.equal(p, q) for p, q in zip(x, y))
    assert not (torch.equal(x[0], x[1]) and torch.equal(x[1], x[2]))


def test_train_dataset_workers_differ(train_roots: list[Path]) -> None:
    ds = RefinementTrainDataset([train_roots[0]], crop_size=64)
    torch.manual_seed(0)
    loader = DataLoader(torch.utils.data.ConcatDataset([ds] * 4), batch_size=2, num_workers=2)
    batches = [b["coarse"] for b in loader]
    assert not torch.equal(batches[0], batches[1])  # same indices, different workers


def test_train_dataset_extra_map(train_roots: list[Path]) -> None:
    def loader(pair, size):  # an aligned map: the image with its channels reversed
        return read_image(pair.image)[..., ::-1].copy()

    ds = RefinementTrainDataset(
        train_roots, crop_size=64, seed=0, photometric=False, extra_loader=loader
    )
    sample = ds[0]
    assert sample["extra"].shape == (3, 64, 64)
    assert torch.equal(sample["extra"][2], sample["image"][0])


def test_train_dataset_errors(tmp_path: Path, train_roots: list[Path]) -> None:
    bad = tmp_path / "bad"
    _pair(bad, "odd", 60, 80, mask_hw=(60, 81))
    ds = RefinementTrainDataset([bad], crop_size=32)
    with pytest.raises(DataError, match="odd.png") as info:
        ds[0]
    assert "odd.jpg" in str(info.value) and "81x60" in str(info.value)
    broken = tmp_path / "broken"
    _pair(broken, "x", 30, 30)
    (broken / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match="x.jpg"):
        RefinementTrainDataset([broken], crop_size=32)[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        RefinementTrainDataset([tmp_path / "empty"])
    with pytest.raises(DataError, match="not found"):
        RefinementTrainDataset([tmp_path / "absent"])
    with pytest.raises(DataError, match="at least one"):
        RefinementTrainDataset([])


def _big_split(root: Path, coarse_hw: tuple[int, int] | None = None) -> tuple[Path, Path]:
    split, coarse = root / "test", root / "test_coarse" / "down8"
    split.mkdir(parents=True)
    coarse.mkdir(parents=True)
    for name, (h, w) in {"one": (60, 80), "two": (50, 40)}.items():
        cv2.imwrite(str(split / f"{name}_im.jpg"), np.full((h, w, 3), 128, np.uint8))
        gt = np.zeros((h, w), np.uint8)
        gt[10:30, 10:30] = 255
        cv2.imwrite(str(split / f"{name}_gt.png"), gt)
        ch, cw = coarse_hw or (h, w)
        cv2.imwrite(str(coarse / f"{name}_seg.png"), cv2.resize(gt, (cw, ch)))
    return split, coarse


def test_eval_dataset(tmp_path: Path) -> None:
    split, coarse = _big_split(tmp_path)
    ds = EvalDataset(split, coarse, source="down8")
    assert len(ds) == 2
    item = ds[0]
    assert item["name"] == "one" and item["source"] == "down8"
    assert item["image"].shape == (60, 80, 3) and item["image"].dtype == np.uint8
    for key in ("gt", "coarse"):
        assert item[key].shape == (60, 80) and item[key].dtype == np.uint8
        assert set(np.unique(item[key])) <= {0, 255}
    np.testing.assert_array_equal(item["gt"], item["coarse"])
    assert len(EvalDataset(split, coarse, max_images=1)) == 1


def test_eval_dataset_resizes_coarse(tmp_path: Path) -> None:
    split, coarse = _big_split(tmp_path, coarse_hw=(30, 20))
    item = EvalDataset(split, coarse)[1]
    mask = cv2.imread(str(coarse / "two_seg.png"), cv2.IMREAD_GRAYSCALE)
    # resized bilinearly and fed soft (the metrics binarise it for the coarse scores)
    assert item["coarse"].shape == (50, 40)
    assert np.array_equal(
        item["coarse"], cv2.resize(mask, (40, 50), interpolation=cv2.INTER_LINEAR)
    )


def test_eval_dataset_logs_coarse_resize_once_per_source(tmp_path: Path, caplog) -> None:
    split, coarse = _big_split(tmp_path, coarse_hw=(30, 20))  # images are 80x60 and 40x50
    ds = EvalDataset(split, coarse, source="lowres")
    with caplog.at_level(logging.WARNING, logger="samsr.data.train_dataset"):
        for index in (0, 1, 0):
            assert ds[index]["coarse"].shape[::-1] == ((80, 60), (40, 50))[index]
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    for part in ("'lowres'", "one_seg.png 20x30", "one_im.jpg 80x60", "bilinear", "INTER_LINEAR"):
        assert part in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="samsr.data.train_dataset"):
        EvalDataset(split, coarse, source="other")[1]  # another source: its own warning
        EvalDataset(*_big_split(tmp_path / "same"))[0]  # same sizes: nothing to say
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "coarse masks of source 'other' differ in size from their images"
    ]


def test_eval_dataset_gt_mismatch(tmp_path: Path) -> None:
    split, coarse = _big_split(tmp_path)
    cv2.imwrite(str(split / "two_gt.png"), np.zeros((51, 40), np.uint8))
    with pytest.raises(DataError, match="two_gt.png") as info:
        EvalDataset(split, coarse)[1]
    assert "two_im.jpg" in str(info.value)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_make_synthetic_deterministic_and_readable(tmp_path: Path) -> None:
    paths = make_synthetic(tmp_path / "a", seed=3, **SMALL)
    make_synthetic(tmp_path / "b", seed=3, **SMALL)
    first = _tree_bytes(tmp_path / "a")
    assert first == _tree_bytes(tmp_path / "b")
    assert len(first) == 3 * 2 + 3 * 2 + 3 * 2 + 1  # train, val+test (im, gt), 2 coarse, manifest
    pairs = find_pairs(paths["train"])
    assert [p.name for p in pairs] == ["syn_00000", "syn_00001", "syn_00002"]
    image, mask = read_image(pairs[0].image), read_mask(pairs[0].mask)
    assert max(image.shape[:2]) == 96 and image.shape[:2] == mask.shape
    assert 0.02 < (mask > 0).mean() < 0.6
    for split in ("val", "test"):
        for source in ("down8", "down16"):
            items = find_big_split(paths[split], paths[f"{split}_coarse/{source}"])
            assert len(items) == SMALL[f"num_{split}"]
            item = EvalDataset(paths[split], paths[f"{split}_coarse/{source}"])[0]
            assert 200 <= max(item["image"].shape[:2]) <= 260
            assert item["gt"].shape == item["coarse"].shape == item["image"].shape[:2]
    other = make_synthetic(tmp_path / "c", seed=4, **SMALL)
    assert _tree_bytes(other["root"]) != first


def test_make_synthetic_idempotent_and_guarded(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    make_synthetic(out, **SMALL)
    files = [p for p in out.rglob("*") if p.is_file() and "manifest" not in p.name]
    stamp = {p: p.stat().st_mtime_ns for p in files}
    data = _tree_bytes(out)
    (out / "train" / "syn_00001.png").unlink()  # an interrupted run: the pair is redone
    make_synthetic(out, **SMALL)
    for path, mtime in stamp.items():
        if path.stem != "syn_00001":
            assert path.stat().st_mtime_ns == mtime
    assert _tree_bytes(out) == data
    assert json.loads((out / "manifest.json").read_text())["args"]["num_train"] == 3
    with pytest.raises(DataError, match="another out_dir"):
        make_synthetic(out, **{**SMALL, "num_train": 4})


def test_export_big_layout(tmp_path: Path) -> None:
    src = tmp_path / "DUTS-TE"
    _pair(src / "DUTS-TE-Image", "img1", 64, 48)
    (src / "DUTS-TE-Image" / "img1.png").rename(src / "DUTS-TE-Image" / "tmp.png")
    (src / "DUTS-TE-Mask").mkdir()
    (src / "DUTS-TE-Image" / "tmp.png").rename(src / "DUTS-TE-Mask" / "img1.png")
    _pair(src / "DUTS-TE-Image", "img2", 40, 40)
    (src / "DUTS-TE-Image" / "img2.png").rename(src / "DUTS-TE-Mask" / "img2.png")
    paths = export_big_layout(out_dir=tmp_path / "big", source_root=src)
    assert (paths["test"] / "img1_im.jpg").read_bytes() == (
        src / "DUTS-TE-Image" / "img1.jpg"
    ).read_bytes()
    for source in ("down8", "down16"):
        ds = EvalDataset(paths["test"], paths[f"test_coarse/{source}"], source=source)
        assert [it.name for it in ds.items] == ["img1", "img2"]
        assert ds[0]["coarse"].shape == (64, 48)
    again = export_big_layout(find_pairs(src), tmp_path / "big")
    assert again == paths
    with pytest.raises(DataError, match="different arguments"):
        export_big_layout(find_pairs(src)[:1], tmp_path / "big")


def test_import_is_light() -> None:
    code = (
        "import sys, samsr.data; from samsr.data import find_pairs; print('torch' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-c", code]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=root, check=True)
    assert result.stdout.strip() == "False"
