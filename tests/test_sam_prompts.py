"""SAM-SR v2.2: point prompts inside the coarse mask and the confidence-weighted merge."""

from __future__ import annotations

import numpy as np
import pytest

from samsr.guidance.prompts import (
    PromptConfig,
    grid_points,
    merge_predictions,
    point_sets,
    sam_prompt_maps,
)


def test_grid_points_lie_inside_and_respect_the_cap() -> None:
    mask = np.zeros((100, 120), bool)
    mask[20:80, 30:100] = True
    rng = np.random.default_rng(0)
    pts = grid_points(mask, 10, 1000, rng)
    assert len(pts) == 6 * 7 and mask[pts[:, 1], pts[:, 0]].all()
    capped = grid_points(mask, 10, 5, np.random.default_rng(0))
    assert len(capped) == 5 and {tuple(p) for p in capped} <= {tuple(p) for p in pts}
    assert grid_points(np.zeros((5, 5), bool), 2, 9, rng).shape == (0, 2)
    tiny = np.zeros((50, 50), bool)
    tiny[7, 9] = True  # the grid misses it: its own pixel is used
    assert grid_points(tiny, 16, 9, rng).tolist() == [[9, 7]]


def test_point_sets_have_the_set_size() -> None:
    rng = np.random.default_rng(0)
    pts = np.arange(14).reshape(7, 2)
    sets = point_sets(pts, 3, rng)
    assert [len(s) for s in sets] == [3, 3, 3]
    assert {tuple(p) for s in sets for p in s} == {tuple(p) for p in pts}
    assert [len(s) for s in point_sets(pts[:2], 3, rng)] == [2]
    assert point_sets(pts[:0], 3, rng) == []


def test_merge_is_weighted_by_predicted_iou() -> None:
    a = np.zeros((2, 3), bool)
    a[0] = True
    b = np.zeros((2, 3), bool)
    b[:, 0] = True
    merged, conf = merge_predictions([(a, 0.9), (b, 0.3)], (2, 3))
    np.testing.assert_allclose(merged, [[1.0, 0.75, 0.75], [0.25, 0.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(conf, [[0.9, 0.9, 0.9], [0.3, 0.0, 0.0]], rtol=1e-6)
    merged, conf = merge_predictions([], (2, 3))
    assert not merged.any() and not conf.any()


def test_one_prediction_per_set_and_deterministic_maps() -> None:
    coarse = np.zeros((64, 80), np.uint8)
    coarse[10:50, 20:70] = 255
    calls: list[np.ndarray] = []

    def predict(points, labels):  # SAM stand-in: a box around the prompt points
        calls.append(points)
        assert points.shape == (3, 2) and (labels == 1).all()
        mask = np.zeros((64, 80), bool)
        x0, y0 = points.min(0).astype(int)
        x1, y1 = points.max(0).astype(int)
        mask[y0 : y1 + 1, x0 : x1 + 1] = True
        return mask, 0.5

    cfg = PromptConfig(spacing=8, max_points=12, points_per_set=3)
    out, n = sam_prompt_maps(predict, coarse, cfg, seed=3)
    assert n == 4 and len(calls) == 4 and out.shape == (64, 80, 2) and out.dtype == np.uint8
    again, _ = sam_prompt_maps(predict, coarse, cfg, seed=3)
    assert np.array_equal(out, again)
    assert out[..., 1].max() == round(0.5 * 255)


def test_prompt_config_validation() -> None:
    with pytest.raises(ValueError, match="spacing"):
        PromptConfig(spacing=0)
    with pytest.raises(ValueError, match="max_points"):
        PromptConfig(max_points=2, points_per_set=3)
