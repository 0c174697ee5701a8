"""samsr.data.coarse_synthesis: boundary modification, perturbation, BIG-style coarse masks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from scipy import ndimage

from samsr.data.coarse_synthesis import (
    big_style_coarse,
    mask_iou,
    modify_boundary,
    perturb,
    random_structuring_element,
    synthesize_coarse,
    synthesize_coarse_detailed,
)


def _disk(h: int = 224, w: int = 224, r: int = 60, c: tuple[int, int] | None = None) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    cv2.circle(mask, c or (w // 2, h // 2), r, 255, -1)
    return mask


def _shapes() -> list[np.ndarray]:
    ring = _disk(r=80)
    cv2.circle(ring, (112, 112), 30, 0, -1)
    legs = _disk(r=40)
    for x in (60, 90, 130, 160):
        cv2.line(legs, (112, 112), (x, 210), 255, 3)
    blob = np.zeros((224, 224), np.uint8)
    cv2.ellipse(blob, (100, 120), (90, 50), 30, 0, 360, 255, -1)
    edge = np.zeros((224, 224), np.uint8)
    edge[:, :150] = 255  # object cut by the crop border
    return [_disk(), ring, legs, blob, edge]


def _binary(mask: np.ndarray) -> bool:
    return mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}


@pytest.mark.parametrize("shape_index", range(5))
def test_iou_below_target(shape_index: int) -> None:
    gt = _shapes()[shape_index]
    for seed in range(6):
        res = synthesize_coarse_detailed(gt, np.random.default_rng(seed))
        assert 0.8 <= res.iou_target < 1.0
        assert res.coarse.shape == gt.shape and _binary(res.coarse) and _binary(res.polygon)
        assert mask_iou(res.coarse, res.polygon) < res.iou_target
        assert 1 <= res.rounds <= 250
        assert mask_iou(res.polygon, gt) > 0.7  # the polygon is a coarsened GT


def test_reproducible_per_generator() -> None:
    gt = _shapes()[2]
    a = synthesize_coarse(gt, np.random.default_rng(7))
    b = synthesize_coarse(gt, np.random.default_rng(7))
    c = synthesize_coarse(gt, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_empty_full_tiny() -> None:
    rng = np.random.default_rng(0)
    for gt in (np.zeros((64, 80), np.uint8), np.full((64, 80), 255, np.uint8)):
        out = synthesize_coarse(gt, rng)
        assert out.shape == gt.shape and _binary(out)
    full = synthesize_coarse_detailed(np.full((64, 80), 255, np.uint8), rng)
    assert mask_iou(full.coarse, full.polygon) < full.iou_target  # holes were eroded in
    for shape in [(2, 2), (1, 30), (30, 2), (3, 3)]:
        gt = np.zeros(shape, np.uint8)
        gt[0, 0] = 255
        out = synthesize_coarse(gt, rng)
        assert out.shape == shape and _binary(out)
    tiny = np.zeros((2, 5), np.uint8)
    tiny[1, 1] = 255
    np.testing.assert_array_equal(perturb(tiny, 0.9, rng), tiny)


def test_bool_input_and_bad_shape() -> None:
    gt = _disk() > 0
    out = synthesize_coarse(gt, np.random.default_rng(0))
    assert out.shape == gt.shape and _binary(out)
    with pytest.raises(ValueError, match="H x W"):
        synthesize_coarse(np.zeros((4, 4, 3), np.uint8), np.random.default_rng(0))


def test_small_contours_dropped_holes_kept() -> None:
    gt = _disk(r=70)
    cv2.circle(gt, (112, 112), 25, 0, -1)  # a hole: kept by the even-odd fill
    gt[5:7, 5:7] = 255  # a 2x2 speck: contour of 4 points, dropped
    for seed in range(5):
        poly = modify_boundary(gt, np.random.default_rng(seed))
        assert poly[112, 112] == 0 and poly[60, 112] == 255
        assert poly[5:7, 5:7].max() == 0
    only_speck = np.zeros((20, 20), np.uint8)
    only_speck[3:5, 3:5] = 255  # nothing left to draw: the input comes back
    np.testing.assert_array_equal(modify_boundary(only_speck, np.random.default_rng(0)), only_speck)


def test_removed_run_is_a_protrusion() -> None:
    # A disk with a long thin spike pointing down: the runs whose ends lie closest are those
    # around the tip, so the tip is nearly always cut; a run starting anywhere rarely hits it.
    # (Runs never wrap past the contour's first point, the top-left pixel, as in the reference.)
    gt = _disk(r=50, c=(112, 84))
    cv2.rectangle(gt, (111, 124), (113, 204), 255, -1)
    tip = (slice(198, 205), slice(110, 115))
    full = int((gt[tip] > 0).sum())

    def tip_left(fraction: float, seed: int) -> int:
        rng = np.random.default_rng(seed)
        poly = modify_boundary(gt, rng, sample_rate=1.0, start_candidate_fraction=fraction)
        return int((poly[tip] > 0).sum())

    cut = [tip_left(0.1, seed) < full // 3 for seed in range(12)]
    kept = [tip_left(1.0, seed) == full for seed in range(12)]
    assert sum(cut) >= 9 and sum(kept) >= 9


def test_structuring_elements() -> None:
    rng = np.random.default_rng(0)
    shapes = {random_structuring_element(7, rng).shape for _ in range(200)}
    assert shapes == {(7, 7), (3, 7), (7, 3)}
    kinds = {random_structuring_element(7, rng).tobytes() for _ in range(200)}
    assert len(kinds) == 4  # square, ellipse, half-height, half-width


def test_perturb_stops_below_target() -> None:
    gt = _disk()
    for seed in range(5):
        target = 0.9
        out = perturb(gt, target, np.random.default_rng(seed))
        assert mask_iou(out, gt) < target and _binary(out)


def test_big_style_coarse_near_boundary() -> None:
    gt = np.zeros((384, 512), np.uint8)
    cv2.ellipse(gt, (250, 190), (150, 110), 20, 0, 360, 255, -1)
    cv2.rectangle(gt, (40, 40), (120, 300), 255, -1)
    for factor in (8, 16):
        coarse = big_style_coarse(gt, factor)
        assert coarse.shape == gt.shape and _binary(coarse)
        assert mask_iou(coarse, gt) > 0.95
        fg = gt > 0
        edge = fg ^ ndimage.binary_erosion(fg)
        dist = ndimage.distance_transform_edt(~edge)
        diff = coarse != gt
        assert diff.any() and dist[diff].max() <= factor
    thin = np.zeros((256, 256), np.uint8)
    thin[:, 100:102] = 255  # a 2 px line vanishes at factor 16
    assert big_style_coarse(thin, 16).max() == 0
