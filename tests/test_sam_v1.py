"""Tests for samsr.guidance.v1 and .selection: selection, gates and stats on hand-built masks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest

from samsr.guidance.rle import decode_rle
from samsr.guidance.selection import (
    coverage,
    decode_segmentation,
    deformation,
    select_and_union,
    sparsity,
)
from samsr.guidance.v1 import V1Config, V1Decision, V1Stats, guided_coarse

H, W = 40, 60


def _rect(y0: int, y1: int, x0: int, x1: int, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _rle(mask: np.ndarray) -> dict[str, Any]:
    """Column-major uncompressed RLE, runs alternating from zeros (segment_anything's layout)."""
    flat = mask.T.ravel().astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": list(mask.shape), "counts": counts}


def _ann(mask: np.ndarray, fmt: str = "array") -> dict[str, Any]:
    """An AMG-style annotation (bbox XYWH with inclusive extents, like segment_anything)."""
    ys, xs = np.nonzero(mask)
    bbox = [0, 0, 0, 0]
    if ys.size:
        bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min()), int(ys.max() - ys.min())]
    seg = mask if fmt == "array" else _rle(mask)
    return {
        "segmentation": seg,
        "area": int(mask.sum()),
        "bbox": bbox,
        "predicted_iou": 0.9,
        "stability_score": 0.95,
    }


class CountingDecoder:
    """The default decoder, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, segmentation: Any) -> np.ndarray:
        self.calls += 1
        return decode_segmentation(segmentation)


# The coarse mask: a solid rectangle (not sparse).
COARSE = _rect(10, 30, 10, 50)
INSIDE = _rect(12, 20, 12, 30)  # fully inside
OUTSIDE = _rect(0, 8, 0, 8)  # fully outside
HALF = _rect(12, 20, 40, 60)  # columns 40..49 inside, 50..59 outside: coverage 0.5


# --------------------------------------------------------------------------------------------
# RLE decoding


def test_decode_rle_hand_made() -> None:
    # [[0, 1, 0], [1, 1, 0]] in column-major order: 0 | 1 1 1 | 0 0 -> counts [1, 3, 2]
    expected = np.array([[0, 1, 0], [1, 1, 0]], dtype=bool)
    got = decode_rle({"size": [2, 3], "counts": [1, 3, 2]})
    assert got.dtype == bool and got.shape == (2, 3)
    np.testing.assert_array_equal(got, expected)
    # A mask starting with a foreground pixel starts with a zero-length background run.
    got = decode_rle({"size": [2, 2], "counts": [0, 1, 3]})
    np.testing.assert_array_equal(got, np.array([[1, 0], [0, 0]], dtype=bool))
    np.testing.assert_array_equal(decode_rle({"size": [3, 1], "counts": [3]}), np.zeros((3, 1)))


def test_decode_rle_round_trip_odd_sizes() -> None:
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 7), (7, 1), (13, 17)]:
        for p in (0.0, 0.3, 1.0):
            mask = rng.random(shape) < p
            np.testing.assert_array_equal(decode_rle(_rle(mask)), mask)
            np.testing.assert_array_equal(decode_segmentation(_rle(mask)), mask)


def test_decode_rle_bad_input() -> None:
    with pytest.raises(ValueError, match="summing to h \\* w = 6"):
        decode_rle({"size": [2, 3], "counts": [1, 3]})
    with pytest.raises(ValueError, match="uncompressed_rle"):
        decode_segmentation({"size": [2, 3], "counts": "abc"})  # compressed COCO RLE
    with pytest.raises(ValueError, match="unsupported"):
        decode_segmentation([[1, 0]])
    with pytest.raises(ValueError, match="H x W"):
        decode_segmentation(np.zeros((1, 2, 3), dtype=bool))


def test_decode_rle_matches_segment_anything() -> None:
    torch = pytest.importorskip("torch")
    amg = pytest.importorskip("segment_anything.utils.amg")
    rng = np.random.default_rng(1)
    masks = torch.from_numpy(rng.random((4, 9, 11)) < 0.4)
    masks[1] = True
    masks[2] = False
    for mask, rle in zip(masks, amg.mask_to_rle_pytorch(masks)):
        np.testing.assert_array_equal(decode_rle(rle), mask.numpy())
        np.testing.assert_array_equal(decode_rle(rle), amg.rle_to_mask(rle))
        assert _rle(mask.numpy()) == rle


# --------------------------------------------------------------------------------------------
# coverage, sparsity, deformation


def test_coverage_hand_counted() -> None:
    assert coverage(INSIDE, COARSE) == 1.0
    assert coverage(OUTSIDE, COARSE) == 0.0
    assert coverage(HALF, COARSE) == 0.5
    assert coverage(np.zeros((H, W), dtype=bool), COARSE) == 0.0
    with pytest.raises(TypeError, match="mask must be a bool array"):
        coverage(INSIDE.astype(np.uint8), COARSE)
    with pytest.raises(ValueError, match=r"\(40, 60\).*\(40, 61\)"):
        coverage(INSIDE, np.zeros((H, W + 1), dtype=bool))


def test_sparsity_solid_masks_are_not_sparse() -> None:
    assert sparsity(np.zeros((H, W), dtype=bool)) == 0.0  # empty: documented 0
    assert sparsity(np.ones((H, W), dtype=bool)) == 0.0
    assert sparsity(COARSE) == 0.0
    assert sparsity(_rect(5, 6, 7, 8)) == 0.0  # one pixel
    disc = np.zeros((101, 101), np.uint8)
    cv2.circle(disc, (50, 50), 40, 1, -1)
    assert sparsity(disc > 0) < 0.02


def test_sparsity_ring_and_far_blobs_are_sparse() -> None:
    ring = np.zeros((101, 101), np.uint8)
    cv2.circle(ring, (50, 50), 40, 1, 2)
    assert sparsity(ring > 0) > 0.8
    blobs = _rect(2, 6, 2, 6, (100, 100)) | _rect(90, 94, 90, 94, (100, 100))
    # hull of two 4x4 squares at opposite corners: a long diagonal band, far more than 32 pixels
    assert sparsity(blobs) > 0.9
    # an L of two 40 x 4 bars (304 px) in a 40 x 40 box: its hull is about half the box
    ell = _rect(0, 40, 0, 4, (40, 40)) | _rect(36, 40, 0, 40, (40, 40))
    assert 0.5 < sparsity(ell) < 0.8
    with pytest.raises(TypeError, match="coarse must be a bool array"):
        sparsity(ring)


def test_deformation_hand_counted() -> None:
    empty = np.zeros((H, W), dtype=bool)
    assert deformation(empty, empty) == 0.0
    assert deformation(COARSE, COARSE) == 0.0
    assert deformation(OUTSIDE, COARSE) == 1.0
    assert deformation(empty, COARSE) == 1.0
    # INSIDE (8 x 18 = 144 px) within COARSE (20 x 40 = 800 px): IoU = 144 / 800
    assert deformation(INSIDE, COARSE) == pytest.approx(1 - 144 / 800)
    assert isinstance(deformation(INSIDE, COARSE), float)


# --------------------------------------------------------------------------------------------
# select_and_union


@pytest.mark.parametrize("fmt", ["array", "rle"])
def test_select_keeps_inside_drops_outside(fmt: str) -> None:
    anns = [_ann(m, fmt) for m in (INSIDE, OUTSIDE, HALF)]
    union, kept = select_and_union(anns, COARSE, 0.8)
    assert kept == 1
    np.testing.assert_array_equal(union, INSIDE)
    union, kept = select_and_union(anns, COARSE, 0.4)
    assert kept == 2
    np.testing.assert_array_equal(union, INSIDE | HALF)
    union, kept = select_and_union([], COARSE, 0.8)
    assert kept == 0 and union.shape == (H, W) and not union.any()


def test_select_without_or_with_stale_bbox_gives_same_result() -> None:
    anns = [_ann(m) for m in (INSIDE, OUTSIDE, HALF)]
    expected, _ = select_and_union(anns, COARSE, 0.4)
    variants = [
        [{"segmentation": a["segmentation"]} for a in anns],  # no bbox, no area
        [{**a, "bbox": [0, 0, 1, 1]} for a in anns],  # bbox too small: area check fails
        [{**a, "segmentation": a["segmentation"].astype(np.uint8) * 255} for a in anns],
        [{**_ann(m, "rle"), "bbox": [0, 0, 1, 1]} for m in (INSIDE, OUTSIDE, HALF)],
    ]
    for variant in variants:
        union, kept = select_and_union(variant, COARSE, 0.4)
        assert kept == 2
        np.testing.assert_array_equal(union, expected)


def test_select_matches_brute_force_on_random_masks() -> None:
    rng = np.random.default_rng(2)
    coarse = rng.random((23, 31)) < 0.6
    masks = [rng.random((23, 31)) < p for p in (0.0, 0.01, 0.05, 0.3, 0.9)]
    masks += [_rect(3, 9, 4, 20, (23, 31)), _rect(0, 23, 30, 31, (23, 31))]
    for threshold in (0.3, 0.6, 1.0):
        expected = np.zeros_like(coarse)
        n = 0
        for m in masks:
            if m.any() and (m & coarse).sum() / m.sum() >= threshold:
                expected |= m
                n += 1
        for fmt in ("array", "rle"):
            union, kept = select_and_union((_ann(m, fmt) for m in masks), coarse, threshold)
            assert kept == n
            np.testing.assert_array_equal(union, expected)


def test_select_decodes_each_mask_once_with_a_custom_decoder() -> None:
    decoder = CountingDecoder()
    anns = [_ann(m, "rle") for m in (INSIDE, OUTSIDE, HALF)]
    union, kept = select_and_union(anns, COARSE, 0.8, decode=decoder)
    assert decoder.calls == 3 and kept == 1
    np.testing.assert_array_equal(union, INSIDE)


@pytest.mark.parametrize("fmt", ["array", "rle"])
def test_select_size_mismatch_names_both_sizes(fmt: str) -> None:
    small = _rect(2, 5, 2, 5, (20, 30))
    with pytest.raises(ValueError, match=r"SAM mask 1 is 20 x 30.*coarse mask is 40 x 60.*upscale"):
        select_and_union([_ann(INSIDE, fmt), _ann(small, fmt)], COARSE, 0.8)


def test_select_bad_arguments() -> None:
    with pytest.raises(ValueError, match="threshold"):
        select_and_union([], COARSE, 0.0)
    with pytest.raises(TypeError, match="coarse must be a bool array"):
        select_and_union([], COARSE.astype(np.uint8), 0.8)
    with pytest.raises(ValueError, match="no 'segmentation'"):
        select_and_union([{"area": 3}], COARSE, 0.8)


# --------------------------------------------------------------------------------------------
# guided_coarse


def _u8(mask: np.ndarray) -> np.ndarray:
    return mask.astype(np.uint8) * 255


def test_guided_coarse_uses_the_union() -> None:
    # SAM's view of the object: the coarse mask split in two masks, plus a mask outside.
    left, right = _rect(10, 30, 10, 30), _rect(10, 30, 30, 50)
    coarse = _u8(COARSE)
    out, decision = guided_coarse(
        [_ann(m, "rle") for m in (left, right, OUTSIDE)], coarse, V1Config()
    )
    assert decision == V1Decision(True, "used", 3, 2, 0.0, 0.0)
    assert out.dtype == np.uint8 and out is not coarse
    np.testing.assert_array_equal(out, _u8(left | right))
    # A slightly different union is used and returned as 0/255.
    out, decision = guided_coarse([_ann(_rect(10, 30, 10, 45))], coarse, V1Config())
    assert decision.used and decision.deformation == pytest.approx(1 - 700 / 800)
    assert set(np.unique(out)) == {0, 255}
    np.testing.assert_array_equal(out, _u8(_rect(10, 30, 10, 45)))


def test_guided_coarse_binarises_above_127() -> None:
    coarse = np.full((H, W), 127, np.uint8)
    coarse[COARSE] = 128
    _, decision = guided_coarse([_ann(COARSE)], coarse, V1Config())
    assert decision.used and decision.deformation == 0.0


def test_sparse_coarse_is_skipped_without_decoding() -> None:
    ring = np.zeros((H, W), np.uint8)
    cv2.circle(ring, (30, 20), 15, 255, 1)
    decoder = CountingDecoder()
    anns = [_ann(m) for m in (INSIDE, OUTSIDE)]
    out, decision = guided_coarse(anns, ring, V1Config(), decode=decoder)
    assert decision.reason == "sparse" and not decision.used
    assert decoder.calls == 0
    assert out is ring
    assert decision.num_masks == 2 and decision.num_kept == 0 and decision.deformation is None
    assert decision.sparsity is not None and decision.sparsity > 0.5

    # A generator is not consumed: its length is unknown.
    def gen() -> Iterator[dict[str, Any]]:
        raise AssertionError("annotations must not be read")
        yield {}

    blobs = _u8(_rect(0, 3, 0, 3) | _rect(37, 40, 57, 60))
    _, decision = guided_coarse(gen(), blobs, V1Config())
    assert decision.reason == "sparse" and decision.num_masks is None

    # With the gate off, the same coarse mask goes through selection.
    _, decision = guided_coarse(anns, ring, V1Config(sparsity_gate=False), decode=decoder)
    assert decision.reason != "sparse" and decoder.calls == 2


def test_deformed_union_is_skipped() -> None:
    coarse = _u8(COARSE)
    out, decision = guided_coarse([_ann(INSIDE)], coarse, V1Config())
    assert decision.reason == "deformed" and not decision.used and decision.num_kept == 1
    assert decision.deformation == pytest.approx(1 - 144 / 800)
    assert out is coarse
    out, decision = guided_coarse([_ann(INSIDE)], coarse, V1Config(deformation_gate=False))
    assert decision.reason == "used"
    np.testing.assert_array_equal(out, _u8(INSIDE))
    cfg = V1Config(deformation_threshold=0.9)
    assert guided_coarse([_ann(INSIDE)], coarse, cfg)[1].used


def test_no_kept_masks() -> None:
    coarse = _u8(COARSE)
    for anns in ([], [_ann(OUTSIDE), _ann(HALF)]):
        out, decision = guided_coarse(anns, coarse, V1Config())
        assert decision == V1Decision(False, "no_masks", len(anns), 0, 0.0, None)
        assert out is coarse
    # min_kept counts kept masks: one is not enough for 2.
    _, decision = guided_coarse([_ann(COARSE)], coarse, V1Config(min_kept=2))
    assert decision.reason == "no_masks" and decision.num_kept == 1
    # An empty coarse mask keeps nothing.
    _, decision = guided_coarse([_ann(INSIDE)], np.zeros((H, W), np.uint8), V1Config())
    assert decision.reason == "no_masks" and decision.sparsity == 0.0


def test_guided_coarse_bad_coarse() -> None:
    with pytest.raises(TypeError, match="uint8"):
        guided_coarse([], COARSE.astype(np.float32), V1Config())
    with pytest.raises(ValueError, match="H x W"):
        guided_coarse([], np.zeros((H, W, 3), np.uint8), V1Config())


# --------------------------------------------------------------------------------------------
# config, decision, stats


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("coverage_threshold", 0.0),
        ("coverage_threshold", 1.5),
        ("coverage_threshold", float("nan")),
        ("sparsity_threshold", -0.1),
        ("sparsity_threshold", "0.5"),
        ("deformation_threshold", 1.1),
        ("min_kept", 0),
        ("min_kept", 1.0),
        ("min_kept", True),
        ("sparsity_gate", 1),
        ("deformation_gate", None),
    ],
)
def test_config_validation_names_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"V1Config.{field}"):
        V1Config(**{field: value})


def test_config_defaults() -> None:
    cfg = V1Config()
    assert cfg.coverage_threshold == 0.8 and cfg.deformation_threshold == 0.2
    assert cfg.sparsity_gate and cfg.deformation_gate and cfg.min_kept == 1
    assert 0.0 <= cfg.sparsity_threshold <= 1.0
    V1Config(coverage_threshold=1, sparsity_threshold=0, deformation_threshold=1)


def test_decision_validation() -> None:
    with pytest.raises(ValueError, match="reason"):
        V1Decision(False, "tired", 0, 0, None, None)
    with pytest.raises(ValueError, match="contradicts"):
        V1Decision(True, "sparse", 0, 0, 0.9, None)


def test_stats_summary_counts() -> None:
    stats = V1Stats()
    assert stats.summary()["images"] == 0 and stats.summary()["mean_kept"] == 0.0
    for decision in [
        V1Decision(True, "used", 10, 4, 0.1, 0.05),
        V1Decision(True, "used", 12, 2, 0.2, 0.1),
        V1Decision(False, "sparse", 9, 0, 0.8, None),
        V1Decision(False, "deformed", 7, 3, 0.3, 0.5),
        V1Decision(False, "no_masks", 0, 0, 0.1, None),
    ]:
        stats.update(decision)
    assert stats.summary() == {
        "images": 5,
        "used": 2,
        "skipped": 3,
        "skipped_sparse": 1,
        "skipped_deformed": 1,
        "skipped_no_masks": 1,
        "used_fraction": 0.4,
        "mean_kept": (4 + 2 + 3 + 0) / 4,
        "mean_kept_used": 3.0,
    }
