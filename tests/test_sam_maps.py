"""SAM colour maps: painting, cache layout, manifest, loader, and the precompute CLI (tiny SAM)."""

from __future__ import annotations

import argparse
import json
import os
import zlib
from pathlib import Path

import numpy as np
import pytest

from samsr.data.io import DataError, read_image, write_image, write_mask
from samsr.data.layouts import Pair
from samsr.data.sam_maps import (
    MANIFEST_NAME,
    SamMapLoader,
    check_manifest,
    load_map,
    make_manifest,
    manifest_key,
    map_is_current,
    map_name,
    map_path,
    write_manifest,
    write_map,
)
from samsr.data.synthetic import render_sample
from samsr.engine.image_runs import ImageItem, collect_images, parse_shard
from samsr.engine.precompute import main, precompute_maps, prepare_cache
from samsr.guidance import decode_annotation, map_seed, paint_sam_map

# --------------------------------------------------------------------------- helpers


def rle(mask: np.ndarray) -> dict:
    """SAM's uncompressed RLE of an H x W bool mask (column-major, background run first)."""
    flat = np.asarray(mask, bool).T.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def box(shape: tuple[int, int], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def ann(mask: np.ndarray, as_rle: bool = True) -> dict:
    return {"segmentation": rle(mask) if as_rle else mask, "area": int(mask.sum())}


def colours(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(32, 256, size=(n, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- painting


@pytest.mark.parametrize("as_rle", [True, False])
def test_paint_small_over_large_and_gaps_black(as_rle):
    shape = (20, 30)
    large, small = box(shape, 2, 18, 2, 20), box(shape, 5, 9, 6, 12)
    # the small mask comes first in the list: sorting by area must still put it on top
    sam_map = paint_sam_map([ann(small, as_rle), ann(large, as_rle)], shape, seed=7)
    first, second = colours(7, 2)  # drawn in painting order: large, then small
    assert sam_map.shape == (20, 30, 3) and sam_map.dtype == np.uint8
    assert (sam_map[small] == second).all()
    assert (sam_map[large & ~small] == first).all()
    assert (sam_map[~large] == 0).all()
    assert (sam_map[large] >= 32).all()  # a painted pixel is never black


def test_paint_paths_agree_and_match_sam_decoder():
    from samsr.guidance import decode_mask

    rng = np.random.default_rng(0)
    shape = (33, 47)
    anns = []
    for _ in range(12):
        y, x = rng.integers(0, 30), rng.integers(0, 44)
        mask = box(shape, y, y + rng.integers(1, 20), x, x + rng.integers(1, 30))
        mask |= rng.random(shape) < 0.02
        anns.append(ann(mask))
    fast = paint_sam_map(anns, shape, seed=3)
    assert np.array_equal(fast, paint_sam_map(anns, shape, seed=3, decode=decode_annotation))
    assert np.array_equal(fast, paint_sam_map(anns, shape, seed=3, decode=decode_mask))
    for a in anns:
        assert np.array_equal(decode_annotation(a), decode_mask(a))


def test_paint_upsamples_working_frame_and_handles_empty():
    small = box((10, 15), 0, 5, 0, 5)
    sam_map = paint_sam_map([ann(small)], (20, 30), seed=1)
    assert sam_map.shape == (20, 30, 3)
    assert (sam_map[:10, :10] == colours(1, 1)[0]).all() and (sam_map[10:, 10:] == 0).all()
    assert not paint_sam_map([], (4, 5), seed=1).any()
    with pytest.raises(DataError, match="different sizes"):
        paint_sam_map([ann(small), ann(box((20, 30), 0, 2, 0, 2))], (20, 30), seed=1)


def test_colours_deterministic_per_name():
    assert map_seed("DUTS-TR/x") == zlib.crc32(b"DUTS-TR/x") == map_seed("DUTS-TR/x")
    anns = [ann(box((8, 8), 0, 8, 0, 8)), ann(box((8, 8), 2, 4, 2, 4))]
    a1 = paint_sam_map(anns, (8, 8), map_seed("ds/a"))
    a2 = paint_sam_map(anns, (8, 8), map_seed("ds/a"))
    b = paint_sam_map(anns, (8, 8), map_seed("ds/b"))
    assert np.array_equal(a1, a2)
    assert not np.array_equal(a1, b)


# --------------------------------------------------------------------------- layout, manifest


def test_map_path_layout(tmp_path):
    cache = tmp_path / "cache"
    root = tmp_path / "train" / "DUTS-TR"
    assert map_path(cache, root, root / "x.jpg") == cache / "DUTS-TR" / "x_sam.png"
    fss = tmp_path / "fss"
    assert map_path(cache, fss, fss / "cat" / "1.jpg") == cache / "fss" / "cat" / "1_sam.png"
    big = tmp_path / "BIG" / "test"
    assert map_path(cache, big, big / "a_im.jpg") == cache / "test" / "a_im_sam.png"
    assert map_name(fss, fss / "cat" / "1.jpg") == "fss/cat/1"
    with pytest.raises(DataError, match="not inside"):
        map_path(cache, root, tmp_path / "elsewhere" / "x.jpg")


def test_manifest_check(tmp_path):
    amg = {"points_per_side": 32, "pred_iou_thresh": 0.88, "max_side": None}
    with pytest.raises(DataError, match="no SAM cache manifest"):
        check_manifest(tmp_path, make_manifest("tiny", None, amg))
    write_manifest(tmp_path, {**make_manifest("tiny", None, amg), "info": {"created": "now"}})
    assert check_manifest(tmp_path, make_manifest("tiny", None, amg))["sam_type"] == "tiny"
    assert check_manifest(tmp_path, {"sam_type": "tiny"})  # a subset of the fields is enough
    other = make_manifest("vit_b", None, {**amg, "points_per_side": 16})
    with pytest.raises(DataError) as err:
        check_manifest(tmp_path, other)
    text = str(err.value)
    assert 'sam_type: cache "tiny", expected "vit_b"' in text
    assert "amg.points_per_side: cache 32, expected 16" in text
    assert "--overwrite" in text and "another cache folder" in text
    with pytest.raises(DataError, match="amg.max_side"):
        check_manifest(tmp_path, make_manifest("tiny", None, {"points_per_side": 32}), exact=True)


def test_make_manifest_records_checkpoint(tmp_path):
    ckpt = tmp_path / "sam_vit_b_01ec64.pth"
    ckpt.write_bytes(b"12345")
    manifest = make_manifest("vit_b", ckpt, {"crop_overlap_ratio": (1, 2)})
    assert manifest["checkpoint"] == {"name": "sam_vit_b_01ec64.pth", "size": 5}
    assert manifest["amg"]["crop_overlap_ratio"] == [1, 2]
    with pytest.raises(DataError, match="checkpoint not found"):
        make_manifest("vit_b", tmp_path / "missing.pth", {})


def test_write_map_key_and_load(tmp_path):
    sam_map = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    path = tmp_path / "a" / "x_sam.png"
    write_map(path, sam_map, "k1")
    assert map_is_current(path, "k1") and not map_is_current(path, "k2")
    assert not map_is_current(tmp_path / "missing.png", "k1")
    assert np.array_equal(load_map(path, (6, 9)), sam_map)
    with pytest.raises(DataError, match=r"9x6 \(WxH\).*10x6 \(WxH\)"):
        load_map(path, (6, 10))
    with pytest.raises(DataError, match="not found"):
        load_map(tmp_path / "nope_sam.png")


# --------------------------------------------------------------------------- loader


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A flat dataset of 3 tiny synthetic images (64-96 px)."""
    root = tmp_path_factory.mktemp("data") / "tiny"
    for i, (h, w) in enumerate([(64, 80), (96, 72), (70, 90)]):
        image, mask = render_sample(np.random.default_rng(i), h, w)
        write_image(root / f"img{i}.jpg", image)
        write_mask(root / f"img{i}.png", mask)
    return root


def test_loader_errors_and_dataset(dataset, tmp_path):
    from samsr.data.train_dataset import RefinementTrainDataset

    cache = tmp_path / "cache"
    loader = SamMapLoader(cache, [dataset])
    pair = Pair(image=dataset / "img0.jpg", mask=dataset / "img0.png", name="img0")
    with pytest.raises(DataError) as err:
        loader(pair, (64, 80))
    assert "python scripts/precompute_sam.py" in str(err.value)
    assert str(cache / "tiny" / "img0_sam.png") in str(err.value)
    for i, hw in enumerate([(64, 80), (96, 72), (70, 90)]):
        write_map(cache / "tiny" / f"img{i}_sam.png", np.full((*hw, 3), 50 + i, np.uint8), "k")
    assert loader(pair, (64, 80)).shape == (64, 80, 3)
    with pytest.raises(DataError, match=r"80x64 \(WxH\).*81x64 \(WxH\)"):
        loader(pair, (64, 81))
    outside = Pair(image=tmp_path / "x.jpg", mask=tmp_path / "x.png", name="x")
    with pytest.raises(DataError, match="none of the SAM map loader's dataset roots"):
        loader(outside, (4, 4))
    with pytest.raises(DataError, match="no SAM cache manifest"):
        SamMapLoader(cache, [dataset], expected_manifest={"sam_type": "tiny"})
    data = RefinementTrainDataset([dataset], crop_size=32, seed=0, extra_loader=loader)
    extra = data[1]["extra"]
    assert tuple(extra.shape) == (3, 32, 32)
    assert np.isclose(extra.max().item(), 51 / 255)


# --------------------------------------------------------------------------- precompute CLI

TINY_AMG = ["--tiny-sam", "--device", "cpu", "--points-per-side", "4", "--no-progress"]
PERMISSIVE = ["--pred-iou-thresh", "0", "--stability-score-thresh", "0"]


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_precompute_resumes_and_guards_settings(dataset, tmp_path, capsys):
    cache = tmp_path / "cache"
    base = ["--images", str(dataset), "--out", str(cache), *TINY_AMG, *PERMISSIVE]
    maps = [cache / "tiny" / f"img{i}_sam.png" for i in range(3)]

    assert main([*base, "--shard", "0/2"]) == 0  # "interrupted halfway": images 0 and 2
    assert "done 2, skipped 0, failed 0" in capsys.readouterr().out
    assert maps[0].is_file() and maps[2].is_file() and not maps[1].exists()
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    assert manifest["sam_type"] == "tiny" and manifest["amg"]["points_per_side"] == 4
    before = {i: _stat(maps[i]) for i in (0, 2)}

    assert main(base) == 0  # the full run computes only the missing map
    assert "done 1, skipped 2, failed 0" in capsys.readouterr().out
    assert {i: _stat(maps[i]) for i in (0, 2)} == before
    for i, path in enumerate(maps):
        image = read_image(dataset / f"img{i}.jpg")
        sam_map = load_map(path, image.shape[:2])
        assert sam_map.any()  # permissive thresholds: at least one mask painted

    other = ["--images", str(dataset), "--out", str(cache), *TINY_AMG]  # SAM's default thresholds
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "amg.pred_iou_thresh: cache 0.0, expected 0.88" in err and "--overwrite" in err
    assert main([*other, "--overwrite"]) == 0
    assert "done 3, skipped 0" in capsys.readouterr().out
    assert json.loads((cache / MANIFEST_NAME).read_text())["amg"]["pred_iou_thresh"] == 0.88


def test_precompute_reports_failures_and_goes_on(dataset, tmp_path, capsys):
    root = tmp_path / "mixed"
    root.mkdir()
    for name in ("img0.jpg", "img0.png"):
        (root / name).write_bytes((dataset / name).read_bytes())
    (root / "bad.jpg").write_bytes(b"not an image")
    (root / "bad.png").write_bytes((dataset / "img0.png").read_bytes())
    cache = tmp_path / "cache"
    assert main(["--images", str(root), "--out", str(cache), *TINY_AMG, *PERMISSIVE]) == 1
    captured = capsys.readouterr()
    assert "done 1, skipped 0, failed 1" in captured.out
    assert str(root / "bad.jpg") in captured.out and "bad.jpg" in captured.err
    assert (cache / "mixed" / "img0_sam.png").is_file()
    assert not (cache / "mixed" / "bad_sam.png").exists()


def test_stale_maps_are_recomputed(dataset, tmp_path):
    items = collect_images([dataset])
    cache = tmp_path / "cache"
    calls: list[str] = []

    def fake(image: np.ndarray, name: str) -> list[dict]:
        calls.append(name)
        return [ann(box(image.shape[:2], 0, 10, 0, 10))]

    key_old = prepare_cache(cache, make_manifest("tiny", None, {"a": 1}))
    assert precompute_maps(items[:2], cache, key_old, fake, progress=False).done == 2
    key_new = prepare_cache(cache, make_manifest("tiny", None, {"a": 2}), overwrite=True)
    assert key_new != key_old == manifest_key(make_manifest("tiny", None, {"a": 1}))
    summary = precompute_maps(items, cache, key_new, fake, progress=False)
    assert (summary.done, summary.skipped) == (3, 0)  # old-settings maps are not kept
    summary = precompute_maps(items, cache, key_new, fake, progress=False)
    assert (summary.done, summary.skipped, summary.total) == (0, 3, 3)
    assert calls == ["tiny/img0", "tiny/img1", "tiny/img0", "tiny/img1", "tiny/img2"]


def test_collect_images_layouts(dataset, tmp_path):
    big = tmp_path / "test"
    big.mkdir()
    image = read_image(dataset / "img0.jpg")
    write_image(big / "b_im.jpg", image)
    write_image(big / "a_im.png", image)
    items = collect_images([dataset, big])
    assert [i.name for i in items] == [
        "tiny/img0",
        "tiny/img1",
        "tiny/img2",
        "test/a_im",
        "test/b_im",
    ]
    assert items[3] == ImageItem(big, big / "a_im.png", "test/a_im")
    twin = tmp_path / "other" / "tiny"
    twin.mkdir(parents=True)
    with pytest.raises(DataError, match="share the name 'tiny'"):
        collect_images([dataset, twin])
    with pytest.raises(DataError, match="not found"):
        collect_images([tmp_path / "missing"])


def test_shard_parsing(capsys, dataset, tmp_path):
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(argparse.ArgumentTypeError, match="0 <= I < N"):
            parse_shard(bad)
    with pytest.raises(SystemExit) as exc:
        main(["--images", str(dataset), "--out", str(tmp_path), "--tiny-sam", "--shard", "2/2"])
    assert exc.value.code == 2
    assert "--shard" in capsys.readouterr().err


def test_bad_amg_override(dataset, tmp_path, capsys):
    args = ["--images", str(dataset), "--out", str(tmp_path / "c"), "--tiny-sam"]
    assert main([*args, "--amg", "no_such_setting=1"]) == 2
    assert "unknown AMG setting(s) ['no_such_setting']" in capsys.readouterr().err
    assert main([*args, "--amg", "crop_overlap_ratio=2"]) == 2
    assert "crop_overlap_ratio" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "c" / MANIFEST_NAME)


def test_training_and_evaluation_maps_follow_one_rule(dataset, tmp_path):
    # With AMG at a working size (amg.max_side), precompute (training) and the SAM-guided
    # refiner (evaluation) paint at that size and resize with one rule (INTER_NEAREST_EXACT), so
    # the maps agree on every pixel; the model's tiny-SAM seed reaches precompute too.
    from samsr.engine.precompute import make_sam_maps
    from samsr.guidance import AmgConfig, MapGuidance, SamRunner, SamSettings, build_tiny_sam
    from samsr.inference.sam_refiner import SamGuidedRefiner

    amg = {"points_per_side": 4, "points_per_batch": 16, "pred_iou_thresh": 0.0,
           "stability_score_thresh": 0.0, "max_side": 37}  # fmt: skip
    sam = SamSettings(tiny=True, seed=3)
    summary = make_sam_maps([str(dataset)], tmp_path / "c", sam, AmgConfig(**amg), "cpu")
    assert summary.done == 3 and not summary.failed
    cached = read_image(tmp_path / "c" / "tiny" / "img2_sam.png")  # a 70 x 90 image

    class Spy:  # stands in for the CRM refiner: records the map it is given
        device = "cpu"

        def __call__(self, image, coarse, extra=None):
            self.extra = extra
            return coarse

    spy = Spy()
    image = read_image(dataset / "img2.jpg")
    coarse = np.zeros(image.shape[:2], np.uint8)
    runner = SamRunner(build_tiny_sam(seed=3))
    guided = SamGuidedRefiner(spy, runner, MapGuidance(AmgConfig(**amg)))
    guided(image, coarse, name="tiny/img2")
    assert spy.extra.shape == cached.shape and spy.extra.any()
    np.testing.assert_array_equal(spy.extra, cached)
    other = SamRunner(build_tiny_sam(seed=0))  # another seed paints another map
    other.set_image(image, max_side=37)
    seed0 = paint_sam_map(other.generate(AmgConfig(**amg)), (70, 90), map_seed("tiny/img2"))
    assert not np.array_equal(seed0, cached)


def test_one_manifest_comparison_for_both_caches():
    from samsr.data.sam_cache import manifest_diffs

    have = {"sam_type": "tiny", "amg": {"points_per_side": 4}, "info": {"date": "x"}, "extra": 1}
    assert manifest_diffs(have, {"sam_type": "tiny", "amg": {"points_per_side": 4}}) == []
    assert manifest_diffs(have, {"amg": {"points_per_side": 8}, "img_size": 64}) == [
        "amg.points_per_side: cache 4, expected 8",
        "img_size: cache (missing), expected 64",
    ]
    exact = manifest_diffs(
        have, {"sam_type": "tiny", "amg": {"points_per_side": 4}}, True, ("info",)
    )
    assert exact == ["extra: cache 1, expected (missing)"]
