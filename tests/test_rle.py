"""The one uncompressed-RLE decoder (samsr.guidance.rle) against segment_anything's own coder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.utils import amg

from samsr.data.io import DataError
from samsr.guidance import annotation_area, decode_annotation, decode_mask, mask_area
from samsr.guidance.rle import (
    decode_rle,
    decode_rle_window,
    rle_area,
    rle_box,
    rle_counts,
    rle_size,
)


def _masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = [np.zeros((7, 5), bool), np.ones((7, 5), bool), rng.random((9, 13)) > 0.6]
    blob = np.zeros((20, 30), bool)
    blob[3:11, 17:25] = True
    out.append(blob)
    column = np.zeros((6, 4), bool)
    column[4:, 1] = True
    column[:2, 2] = True  # one run crossing from column 1 into column 2
    out.append(column)
    return out


@pytest.mark.parametrize("index", range(5))
def test_decode_box_and_area_match_the_library(index: int) -> None:
    mask = _masks()[index]
    rle = amg.mask_to_rle_pytorch(torch.from_numpy(mask)[None])[0]
    h, w = rle_size(rle)
    counts = rle_counts(rle, h, w)
    np.testing.assert_array_equal(decode_rle(rle), amg.rle_to_mask(rle))
    assert rle_area(rle) == amg.area_from_rle(rle) == int(mask.sum())
    ys, xs = np.nonzero(mask)
    box = (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) if ys.size else (0, 0, 0, 0)
    assert rle_box(counts, h) == tuple(int(v) for v in box)
    y0, y1, x0, x1 = 1, h - 1, 1, w - 1
    np.testing.assert_array_equal(decode_rle_window(counts, h, y0, y1, x0, x1), mask[1:-1, 1:-1])
    # every caller decodes through it
    ann = {"segmentation": rle}
    np.testing.assert_array_equal(decode_mask(ann), mask)
    np.testing.assert_array_equal(decode_annotation(ann), mask)
    assert mask_area(ann) == annotation_area(ann) == int(mask.sum())


def test_bad_rle_errors_keep_each_callers_type() -> None:
    bad = {"size": [2, 3], "counts": [1, 3]}
    with pytest.raises(ValueError, match="summing to h \\* w = 6"):
        decode_rle(bad)
    with pytest.raises(DataError, match="bad SAM annotation.*summing"):
        decode_annotation({"segmentation": bad})
    with pytest.raises(ValueError, match="uncompressed_rle"):
        rle_size({"size": [2, 3], "counts": "abc"})
    with pytest.raises(ValueError, match="must be \\[h, w\\]"):
        rle_size({"size": [2], "counts": [6]})
