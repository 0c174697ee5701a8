"""Tests for samsr.metrics: hand-countable IoU/mBA, CascadePSP conventions, reports, timing."""

from __future__ import annotations

import math
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from samsr.metrics import (
    EfficiencyMeter,
    RefinementMeter,
    average_gain,
    binarize,
    boundary,
    boundary_accuracy,
    boundary_radii,
    format_efficiency,
    format_refinement_table,
    format_report,
    intersection_union,
    measure,
    to_uint8_mask,
)

# --------------------------------------------------------------------------------------------
# binarize


def test_binarize_threshold_is_strictly_above_128():
    mask = np.array([[0, 128, 129, 255]], dtype=np.uint8)
    assert binarize(mask).tolist() == [[False, False, True, True]]


def test_binarize_rgb_takes_channel_0():
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 1, 0] = 255  # channel 0 set
    rgb[1, 2, 1] = 255  # channel 1 only: ignored
    expected = np.zeros((2, 3), dtype=bool)
    expected[0, 1] = True
    np.testing.assert_array_equal(binarize(rgb), expected)
    np.testing.assert_array_equal(binarize(rgb[..., :1]), expected)  # H x W x 1


def test_binarize_follows_the_dtype_never_the_values():
    # 8-bit is 8-bit: a 0/1 uint8 mask (e.g. probabilities all below 2/255, saved as uint8) is
    # background, as CascadePSP reads it; wider integers hold 8-bit values too.
    zero_one = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    background = np.zeros((2, 2), dtype=bool)
    np.testing.assert_array_equal(binarize(zero_one), background)
    np.testing.assert_array_equal(binarize(zero_one.astype(np.int64)), background)
    np.testing.assert_array_equal(binarize(np.array([[128, 129]], np.uint16)), [[False, True]])
    expected = zero_one.astype(bool)
    np.testing.assert_array_equal(binarize(expected), expected)
    # Float masks are probabilities: x255 truncated, then > 128 (0.5 -> 127, 0.51 -> 130), also
    # when every value is small (no rescaling by the maximum).
    probs = np.array([[0.0, 0.5], [0.51, 1.0]], dtype=np.float32)
    assert binarize(probs).tolist() == [[False, False], [True, True]]
    assert not binarize(np.full((2, 2), 0.004)).any()


def test_meter_scores_a_near_empty_prediction_as_background():
    gt = np.zeros((8, 8), np.uint8)
    gt[2:6, 2:6] = 255
    faint = (gt > 0).astype(np.uint8)  # a refined mask of probabilities < 2/255, as uint8
    meter = RefinementMeter()
    meter.update("faint", gt, faint)
    assert meter.compute()["iou"] == 0.0


def test_to_uint8_mask_keeps_uint8_without_copy_and_rejects_bad_input():
    mask = np.array([[0, 255], [7, 200]], dtype=np.uint8)
    assert to_uint8_mask(mask) is mask
    with pytest.raises(ValueError, match="H x W"):
        to_uint8_mask(np.zeros(5, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        to_uint8_mask(np.array([[-1, 3]], dtype=np.int16))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_uint8_mask(np.array([[0.0, 128.0]]))  # float grey values are not guessed
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_uint8_mask(np.array([[0.0, np.nan]]))


def test_binarize_resizes_to_size_bilinear():
    # 2 x 2 -> 4 x 4, half-pixel centres: columns sample x = -0.25, 0.25, 0.75, 1.25, so the
    # left column of 255 gives 255, 191, 64, 0 -> True, True, False, False.
    small = np.array([[255, 0], [255, 0]], dtype=np.uint8)
    expected = np.zeros((4, 4), dtype=bool)
    expected[:, :2] = True
    for resample in ("pil", "cv2"):
        out = binarize(small, size=(4, 4), resample=resample)
        assert out.shape == (4, 4)
        np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="resample"):
        binarize(small, size=(4, 4), resample="nearest")


def test_binarize_default_resample_is_pil_bilinear_like_cascadepsp():
    rng = np.random.default_rng(0)
    soft = cv2.GaussianBlur((rng.random((37, 53)) > 0.5).astype(np.uint8) * 255, (7, 7), 2)
    reference = np.asarray(Image.fromarray(soft).resize((201, 147), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(binarize(soft, size=(147, 201)), reference > 128)
    np.testing.assert_array_equal(binarize(soft, size=soft.shape), soft > 128)  # same size: as is


# --------------------------------------------------------------------------------------------
# IoU


def test_intersection_union_counts_by_hand():
    pred = np.array([[1, 1, 0], [0, 1, 0]], dtype=bool)
    gt = np.array([[1, 0, 0], [1, 1, 0]], dtype=bool)
    assert intersection_union(pred, gt) == (2, 4)
    with pytest.raises(ValueError, match="same size"):
        intersection_union(pred, gt[:, :2])


# --------------------------------------------------------------------------------------------
# mBA


@pytest.mark.parametrize(
    ("h", "w", "radii"),
    [
        (1600, 2048, [1, 3, 5, 7, 9]),
        (3600, 5000, [1, 6, 12, 17, 23]),
        # h + w = 3800: CascadePSP's order, (max_r - 1) / 5 * i, gives 7 where
        # (max_r - 1) * i / 5 would give 8.
        (1600, 2200, [1, 3, 5, 7, 10]),
        (8, 8, [1, 1, 1, 1, 1]),
        (1, 1, [1, 1, 1, 1, 1]),
    ],
)
def test_boundary_radii(h, w, radii):
    assert boundary_radii(h, w) == radii
    assert boundary_radii(w, h) == radii


def test_boundary_accuracy_square_shifted_by_one_pixel():
    # 8 x 8 image: all radii are 1, so the kernel is the 3 x 3 cross. GT: 4 x 4 square at
    # rows/cols 2..5. Band = 12 inner boundary pixels + 16 outer 4-neighbours = 28 pixels.
    gt = np.zeros((8, 8), dtype=bool)
    gt[2:6, 2:6] = True
    pred = np.zeros_like(gt)
    pred[2:6, 3:7] = True  # shifted right by one pixel
    # Wrong in the band: the 4 inner pixels of column 2 and the 4 outer pixels of column 6.
    assert boundary_accuracy(pred, gt) == pytest.approx(20 / 28)
    assert boundary_accuracy(gt, gt) == pytest.approx(1.0)
    assert boundary_accuracy(~gt, gt) == pytest.approx(0.0)


def test_boundary_accuracy_one_row_by_hand():
    gt = np.array([[1, 1, 0, 0]], dtype=bool)
    pred = np.array([[1, 0, 0, 0]], dtype=bool)
    # Band = columns 1 and 2 (neighbourhoods holding both classes); pred is wrong at column 1.
    assert boundary_accuracy(pred, gt) == pytest.approx(0.5)


@pytest.mark.parametrize("value", [False, True])
def test_boundary_accuracy_without_boundary_is_nan(value):
    gt = np.full((9, 7), value)
    assert math.isnan(boundary_accuracy(gt, gt))


def test_boundary_accuracy_rejects_size_mismatch():
    with pytest.raises(ValueError, match="same size"):
        boundary_accuracy(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


def _mba_scipy(pred: np.ndarray, gt: np.ndarray) -> float:
    """Independent mBA: scipy grey dilation/erosion with OpenCV's elliptical footprint.

    Outside the image is neutral (OpenCV's default morphology border): 0 for the dilation and 1
    for the erosion of a 0/1 image.
    """
    ndimage = pytest.importorskip("scipy.ndimage")
    h, w = gt.shape
    gt_u8 = gt.astype(np.uint8)
    max_r = (w + h) / 300
    accs = []
    for i in range(5):
        r = 1 + int((max_r - 1) / 5 * i)
        fp = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)).astype(bool)
        dil = ndimage.grey_dilation(gt_u8, footprint=fp, mode="constant", cval=0)
        ero = ndimage.grey_erosion(gt_u8, footprint=fp, mode="constant", cval=1)
        band = dil != ero
        accs.append(np.sum(band & (pred == gt)) / np.sum(band))
    return sum(accs) / 5


def _random_blobs(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    sigma = rng.uniform(2, 12)
    field = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), sigma)
    return field > np.quantile(field, rng.uniform(0.3, 0.8))


@pytest.mark.parametrize("dense_fraction", [2.0, -1.0], ids=["windows", "dense"])
@pytest.mark.parametrize("seed", range(5))
def test_boundary_accuracy_matches_independent_scipy_implementation(
    seed, dense_fraction, monkeypatch
):
    monkeypatch.setattr(boundary, "_DENSE_FRACTION", dense_fraction)  # force one code path
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(5, 420, size=2) * 2 + 1)  # odd sizes, radii up to 5
    gt = _random_blobs(rng, h, w)
    pred = np.roll(gt, int(rng.integers(-3, 4)), axis=int(rng.integers(0, 2)))
    pred ^= rng.random((h, w)) < 0.02
    assert boundary_accuracy(pred, gt) == pytest.approx(_mba_scipy(pred, gt), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_boundary_accuracy_fast_and_dense_paths_agree_exactly(seed, monkeypatch):
    # Large enough for radii 1, 3, 5, 7, 9; blobs touch the image border.
    rng = np.random.default_rng(100 + seed)
    h, w = 1501 + 2 * seed, 2047 - 2 * seed
    gt = np.zeros((h, w), np.uint8)
    for _ in range(4):
        center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(5, w // 2)), int(rng.integers(5, h // 2)))
        cv2.ellipse(gt, center, axes, float(rng.integers(0, 180)), 0, 360, 1, -1)
    gt = gt.astype(bool) ^ _random_blobs(rng, h, w) & (rng.random((h, w)) < 0.001)
    preds = [np.roll(gt, 2, axis=1) ^ (rng.random((h, w)) < 0.05), gt]
    monkeypatch.setattr(boundary, "_DENSE_FRACTION", 2.0)  # never dense
    fast = boundary.boundary_accuracies(gt, preds)
    monkeypatch.setattr(boundary, "_DENSE_FRACTION", -1.0)  # always dense
    dense = boundary.boundary_accuracies(gt, preds)
    assert fast == dense  # bit for bit
    assert fast[1] == 1.0


# --------------------------------------------------------------------------------------------
# RefinementMeter


def _u8(rows: list[list[int]]) -> np.ndarray:
    return np.array(rows, dtype=np.uint8) * 255


def test_meter_pooled_iou_differs_from_per_image_mean():
    meter = RefinementMeter()
    # Image a: I = 1, U = 2 (IoU 0.5). Image b: I = 9, U = 10 (IoU 0.9).
    meter.update("a", _u8([[1, 1, 0, 0]]), _u8([[1, 0, 0, 0]]))
    meter.update("b", _u8([[1] * 10 + [0]]), _u8([[1] * 9 + [0, 0]]))
    out = meter.compute()
    assert out["iou"] == pytest.approx(10 / 12)
    assert out["miou"] == pytest.approx(0.7)
    # Both images: band = the 2 pixels at the edge, the prediction gets one of them right.
    assert out["mba"] == pytest.approx(0.5)
    assert out["num_images"] == 2
    assert "iou_coarse" not in out
    rows = meter.per_image()
    assert [r["name"] for r in rows] == ["a", "b"]
    assert rows[0]["iou"] == pytest.approx(0.5)


def test_meter_with_coarse_reports_coarse_and_deltas():
    gt = np.zeros((8, 8), np.uint8)
    gt[2:6, 2:6] = 255
    coarse = np.roll(gt, 1, axis=1)  # I = 12, U = 20; mBA = 20 / 28
    meter = RefinementMeter()
    meter.update("sq", gt, refined=gt, coarse=coarse)
    out = meter.compute()
    assert out["iou"] == 1.0 and out["mba"] == pytest.approx(1.0)
    assert out["iou_coarse"] == pytest.approx(12 / 20)
    assert out["mba_coarse"] == pytest.approx(20 / 28)
    assert out["iou_delta"] == pytest.approx(1 - 12 / 20)
    assert out["miou_delta"] == pytest.approx(1 - 12 / 20)
    assert out["mba_delta"] == pytest.approx(1 - 20 / 28)
    assert out["num_small_coarse"] == 0
    row = meter.per_image()[0]
    assert row["iou_coarse"] == pytest.approx(0.6)
    assert row["mba_coarse"] == pytest.approx(20 / 28)


def test_meter_resizes_refined_and_coarse_to_gt_size():
    gt = np.zeros((4, 4), np.uint8)
    gt[:, :2] = 255
    small = np.array([[255, 0], [255, 0]], dtype=np.uint8)
    meter = RefinementMeter()
    meter.update("x", gt, refined=small, coarse=small)
    out = meter.compute()
    assert out["iou"] == 1.0 and out["iou_coarse"] == 1.0
    assert meter.per_image()[0]["height"] == 4


def test_meter_small_coarse_rule_copies_coarse_like_cascadepsp():
    gt = np.zeros((8, 8), np.uint8)
    gt[2:6, 2:6] = 255
    coarse = np.zeros_like(gt)
    coarse[0, 0:3] = 255  # values sum to 765 < 32 * 32
    meter = RefinementMeter()
    meter.update("s", gt, refined=gt, coarse=coarse)
    out = meter.compute()
    assert out["num_small_coarse"] == 1 and out["num_coarse_copied"] == 1
    assert out["iou"] == out["iou_coarse"] == 0.0  # refined replaced by the coarse mask
    off = RefinementMeter(small_coarse_rule="off")
    off.update("s", gt, refined=gt, coarse=coarse)
    assert off.compute()["iou"] == 1.0 and off.compute()["num_coarse_copied"] == 0
    with pytest.raises(ValueError, match="small_coarse_rule"):
        RefinementMeter(small_coarse_rule="sometimes")


def test_meter_small_coarse_rule_only_fires_on_square_images_like_eval_post():
    # eval_post.py keeps the coarse copy only when the coarse mask's height equals its width: on a
    # non-square image the refined mask is scored even when the coarse mask is small.
    gt = np.zeros((8, 10), np.uint8)
    gt[2:6, 2:6] = 255
    coarse = np.zeros_like(gt)
    coarse[0, 0:3] = 255
    meter = RefinementMeter()
    meter.update("wide", gt, refined=gt, coarse=coarse)
    out = meter.compute()
    assert out["num_small_coarse"] == 1 and out["num_coarse_copied"] == 0
    assert out["iou"] == 1.0
    always = RefinementMeter(small_coarse_rule="always")
    always.update("wide", gt, refined=gt, coarse=coarse)
    assert always.compute()["iou"] == 0.0 and always.compute()["num_coarse_copied"] == 1


def test_meter_skips_images_without_gt_boundary_from_mba():
    meter = RefinementMeter()
    meter.update("empty", np.zeros((5, 5), np.uint8), np.zeros((5, 5), np.uint8))
    meter.update("row", _u8([[1, 1, 0, 0]]), _u8([[1, 0, 0, 0]]))
    out = meter.compute()
    assert out["num_mba_skipped"] == 1
    assert out["mba"] == pytest.approx(0.5)  # mean over the one image with a boundary
    assert out["miou"] == pytest.approx((1.0 + 0.5) / 2)  # empty GT and prediction: IoU 1
    assert out["iou"] == pytest.approx(1 / 2)  # pooled: (0 + 1) / (0 + 2)
    only_empty = RefinementMeter()
    only_empty.update("e", np.zeros((5, 5), np.uint8), np.zeros((5, 5), np.uint8))
    assert math.isnan(only_empty.compute()["mba"])


def test_meter_errors():
    meter = RefinementMeter()
    with pytest.raises(ValueError, match="empty"):
        meter.compute()
    gt = _u8([[1, 0]])
    meter.update("a", gt, gt, gt)
    with pytest.raises(ValueError, match="already"):
        meter.update("a", gt, gt, gt)
    with pytest.raises(ValueError, match="coarse"):
        meter.update("b", gt, gt)
    with pytest.raises(ValueError, match="'c'"):
        meter.update("c", gt, np.zeros(4, np.uint8), gt)
    assert len(meter) == 1  # failed updates add nothing
    meter.reset()
    with pytest.raises(ValueError, match="empty"):
        meter.compute()
    with pytest.raises(ValueError, match="resample"):
        RefinementMeter(resample="area")


def test_meter_is_fast_at_5000x3600():
    h, w = 3600, 5000
    gt = np.zeros((h, w), np.uint8)
    cv2.ellipse(gt, (2500, 1800), (1700, 1200), 20, 0, 360, 255, -1)
    coarse = cv2.resize(cv2.resize(gt, (w // 8, h // 8), interpolation=cv2.INTER_AREA), (w, h))
    refined = cv2.resize(gt, (w // 4, h // 4), interpolation=cv2.INTER_AREA)
    meter = RefinementMeter()
    start = time.perf_counter()
    meter.update("big", gt, refined, coarse)
    elapsed = time.perf_counter() - start
    out = meter.compute()
    assert out["mba"] > out["mba_coarse"] > 0.5
    assert elapsed < 5.0  # ~0.5 s on 2 CPU cores; generous for loaded CI machines


# --------------------------------------------------------------------------------------------
# Reports


def _results() -> dict[str, dict[str, float]]:
    return {
        "FCN-8s": {
            "iou_coarse": 0.70, "mba_coarse": 0.50, "iou": 0.80, "mba": 0.60,
            "iou_delta": 0.10, "mba_delta": 0.10, "miou_delta": 0.20,
        },
        "PSPNet": {
            "iou_coarse": 0.90, "mba_coarse": 0.60, "iou": 0.95, "mba": 0.80,
            "iou_delta": 0.05, "mba_delta": 0.20, "miou_delta": 0.00,
        },
    }  # fmt: skip


def test_average_gain_is_mean_of_deltas():
    gain = average_gain(_results())
    assert gain["iou_delta"] == pytest.approx(0.075)
    assert gain["mba_delta"] == pytest.approx(0.15)
    assert gain["miou_delta"] == pytest.approx(0.10)
    with pytest.raises(ValueError):
        average_gain({})
    with pytest.raises(ValueError, match="iou_delta"):
        average_gain({"x": {"iou": 0.5, "mba": 0.5}})


def test_format_refinement_table():
    lines = format_refinement_table(_results(), method="CRM").splitlines()
    assert lines[0] == "| coarse source | coarse IoU/mBA | CRM IoU/mBA | delta IoU/mBA |"
    assert lines[2] == "| FCN-8s | 70.00/50.00 | 80.00/60.00 | +10.00/+10.00 |"
    assert lines[3] == "| PSPNet | 90.00/60.00 | 95.00/80.00 | +5.00/+20.00 |"
    assert lines[4] == "| avg. gain |  |  | +7.50/+15.00 |"
    assert len(lines) == 5


def test_format_report_from_meters():
    meter = RefinementMeter()
    gt = np.zeros((8, 8), np.uint8)
    gt[2:6, 2:6] = 255
    meter.update("sq", gt, refined=gt, coarse=np.roll(gt, 1, axis=1))
    eff = EfficiencyMeter("cpu", warmup=0)
    eff.update(0.5, 2**30, size=(8, 8))
    text = format_report({"synthetic": meter.compute()}, "CRM", eff.compute(), title="BIG test")
    assert text.startswith("## BIG test\n\n| coarse source |")
    assert "| synthetic | 60.00/71.43 | 100.00/100.00 | +40.00/+28.57 |" in text
    assert "| avg. gain |  |  | +40.00/+28.57 |" in text
    assert "| CRM | 0.500 | 1.00 | cpu (" in text
    assert text.endswith("| 8x8 |\n")


def test_format_efficiency_handles_missing_values():
    text = format_efficiency({"time_s": 1.25, "peak_mem_gib": math.nan, "device": "cpu"})
    assert "| refined | 1.250 | n/a | cpu |" in text


# --------------------------------------------------------------------------------------------
# Efficiency


def test_stopwatch_measures_elapsed_time():
    with measure("cpu") as watch:
        time.sleep(0.02)
    assert 0.015 < watch.elapsed < 1.0


def test_efficiency_meter_skips_warmup_and_takes_max_memory():
    meter = EfficiencyMeter("cpu", dtype="bfloat16", warmup=1, batch_size=1)
    with pytest.raises(ValueError, match="empty"):
        meter.compute()
    meter.update(10.0, 100, size=(10, 20))
    meter.update(1.0, 300, size=(30, 40))
    meter.update(2.0, 200, size=(20, 30))
    out = meter.compute()
    assert out["time_s"] == pytest.approx(1.5)
    assert out["time_s_all"] == pytest.approx(13 / 3)
    assert out["num_timed"] == 2 and out["num_warmup"] == 1 and out["num_images"] == 3
    assert out["peak_mem_gib"] == pytest.approx(300 / 2**30)
    assert out["dtype"] == "bfloat16" and out["device"] == "cpu" and out["batch_size"] == 1
    assert out["mean_height"] == pytest.approx(20) and out["max_width"] == 40
    one = EfficiencyMeter("cpu", warmup=5)
    one.update(3.0)
    assert one.compute()["time_s"] == 3.0 and one.compute()["num_timed"] == 1
    assert math.isnan(one.compute()["peak_mem_gib"])
    with pytest.raises(ValueError):
        EfficiencyMeter("cpu", warmup=-1)


def test_efficiency_meter_measure_context_records_time_and_peak():
    meter = EfficiencyMeter("cpu", warmup=0)
    with meter.measure(size=(3, 4)):
        buf = np.ones(8 * 2**20, dtype=np.uint8)  # touch 8 MiB
        del buf
    with pytest.raises(RuntimeError), meter.measure():
        raise RuntimeError("model failed")
    rows = meter.per_image()
    assert len(rows) == 1  # the failed call is not recorded
    assert rows[0]["time_s"] > 0 and rows[0]["peak_bytes"] > 8 * 2**20
    assert rows[0]["size"] == (3, 4)
