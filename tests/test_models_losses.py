"""RefinementLoss and the Sobel magnitude on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from samsr.models import RefinementLoss
from samsr.models.losses import sobel_magnitude


def test_perfect_prediction() -> None:
    gt = torch.zeros(2, 1, 16, 20)
    gt[..., 4:12, 5:15] = 1
    logits = (gt * 2 - 1) * 30  # saturated, correct everywhere
    out = RefinementLoss()(logits, gt)
    assert set(out) == {"bce", "l1", "l2", "grad", "total"}
    assert out["bce"] < 1e-10
    assert out["l1"] < 1e-10 and out["l2"] < 1e-10
    assert out["grad"] == 0  # identical maps -> identical magnitudes
    assert out["total"] < 1e-9


def test_terms_on_uniform_cases() -> None:
    logits = torch.zeros(1, 1, 6, 6)  # probability 0.5 everywhere
    loss = RefinementLoss(bce=1.0, l1=0.5, l2=0.5, grad=2.0)
    out = loss(logits, torch.ones(1, 1, 6, 6))
    assert math.isclose(out["bce"].item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(out["l1"].item(), 0.5, rel_tol=1e-6)
    assert math.isclose(out["l2"].item(), 0.25, rel_tol=1e-6)
    # soft GT: BCE uses gt > 0.5, L1/L2 the raw values
    out = loss(logits, torch.full((1, 1, 6, 6), 0.6))
    assert math.isclose(out["bce"].item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(out["l1"].item(), 0.1, rel_tol=1e-5)
    assert math.isclose(out["l2"].item(), 0.01, rel_tol=1e-4)
    expected = out["bce"] + 0.5 * out["l1"] + 0.5 * out["l2"] + 2.0 * out["grad"]
    assert torch.allclose(out["total"], expected)


def test_sobel_interior_of_constant_is_sqrt_eps() -> None:
    mag = sobel_magnitude(torch.full((1, 1, 7, 7), 0.8))
    # pixels whose 5x5 support stays inside the map see no gradient: sqrt(0 + 1e-4)
    assert torch.allclose(mag[0, 0, 2:5, 2:5], torch.full((3, 3), 0.01))
    assert (mag[0, 0, 0] > 0.01).all()  # zero padding makes the border an edge


def test_sobel_vertical_step_by_hand() -> None:
    x = torch.zeros(1, 1, 9, 12)
    x[..., 6:] = 1  # step between columns 5 and 6
    mag = sobel_magnitude(x)[0, 0, 4]  # an interior row
    # 3x3 average pool: p(5) = 1/3, p(6) = 2/3, p(7) = 1; Sobel-x (/4): g(j) = p(j-1) - p(j+1)
    assert math.isclose(mag[6].item(), math.sqrt((1 / 3 - 1) ** 2 + 1e-4), rel_tol=1e-5)
    assert math.isclose(mag[5].item(), math.sqrt((0 - 2 / 3) ** 2 + 1e-4), rel_tol=1e-5)
    assert math.isclose(mag[4].item(), math.sqrt((0 - 1 / 3) ** 2 + 1e-4), rel_tol=1e-5)
    assert math.isclose(mag[2].item(), 0.01, rel_tol=1e-5)


def test_grad_term_is_l1_between_magnitudes() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 10, 11)
    gt = (torch.rand(2, 1, 10, 11) > 0.5).float()
    out = RefinementLoss()(logits, gt)
    manual = (sobel_magnitude(gt) - sobel_magnitude(torch.sigmoid(logits))).abs().mean()
    assert torch.allclose(out["grad"], manual)


def test_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="same shape"):
        RefinementLoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
