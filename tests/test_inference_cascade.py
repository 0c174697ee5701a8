"""Multi-scale cascade and Refiner on a tiny random CRM (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samsr.inference import CascadeConfig, Refiner, refine
from samsr.inference.cascade import scaled_size
from samsr.models import CRM, build_crm
from samsr.models.components import make_coord

H, W = 45, 61  # odd on purpose


def _inputs(kind: str = "box") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, H, W, generator=g)
    coarse = torch.zeros(1, 1, H, W)
    if kind == "box":
        coarse[..., 10:30, 15:40] = 1
    elif kind == "full":
        coarse[:] = 1
    return image, coarse


def _reference_protocol(model, image, coarse, scales, pad, chunk):
    """test.py of the reference spelt out (full query tensors, resize at every scale)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    im = F.pad((image - mean) / std, (pad,) * 4, mode="reflect")
    seg = F.pad((coarse - 0.5) / 0.5, (pad,) * 4, mode="reflect")
    hp, wp = seg.shape[-2:]
    coord = make_coord((hp, wp)).unsqueeze(0)
    cell = torch.ones_like(coord)
    cell[:, :, 0] *= 2 / hp
    cell[:, :, 1] *= 2 / wp
    for s in scales:
        size = (round(hp * s), round(wp * s))
        im_ = F.interpolate(im, size=size, mode="bilinear", align_corners=True)
        seg_ = F.interpolate(seg, size=size, mode="bilinear", align_corners=True)
        feat = model.encode_normalized(torch.cat((im_, seg_), 1))
        outs = [
            torch.sigmoid(model.decode(feat, coord[:, i : i + chunk], cell[:, i : i + chunk]))
            for i in range(0, hp * wp, chunk)
        ]
        pred = torch.cat(outs, 1).view(1, 1, hp, wp)
        if (seg + 1).sum() < 2:
            pred = pred * 0
        seg = (pred - 0.5) * 2
    return pred[..., pad:-pad, pad:-pad]


def test_cascade_matches_reference_protocol(model: CRM) -> None:
    image, coarse = _inputs()
    cfg = CascadeConfig(chunk_size=4096)
    out = refine(model, image, coarse, cfg)
    with torch.no_grad():
        ref = _reference_protocol(model, image, coarse, cfg.scales, cfg.pad, chunk=4096)
    assert out.shape == (1, 1, H, W)
    assert torch.equal(out, ref)


def test_cascade_range_determinism_and_chunking(model: CRM) -> None:
    image, coarse = _inputs()
    a = refine(model, image, coarse, CascadeConfig(chunk_size=1000))
    b = refine(model, image, coarse, CascadeConfig(chunk_size=1000))
    c = refine(model, image, coarse, CascadeConfig(chunk_size=2**18))
    assert torch.equal(a, b)
    assert torch.allclose(a, c, atol=1e-6, rtol=0)
    assert a.dtype == torch.float32 and a.min() >= 0 and a.max() <= 1
    single = refine(model, image, coarse, CascadeConfig(scales=(0.5,), pad=0))
    assert single.shape == (1, 1, H, W)


def test_empty_mask_gives_empty_output(model: CRM) -> None:
    image, _ = _inputs()
    out = refine(model, image, torch.zeros(1, 1, H, W))
    assert torch.count_nonzero(out) == 0 and out.shape == (1, 1, H, W)
    # reference threshold: (mask * 2 - 1 + 1).sum() < 2 over the *padded* mask, i.e. sum < 1;
    # pixel (20, 30) has 3 x 3 copies after reflect-padding 32 px: 9 * 0.1 < 1 -> empty
    faint = torch.zeros(1, 1, H, W)
    faint[..., 20, 30] = 0.1
    assert torch.count_nonzero(refine(model, image, faint)) == 0
    one = torch.zeros(1, 1, H, W)
    one[..., 20, 30] = 1.0
    assert torch.count_nonzero(refine(model, image, one)) > 0


def test_full_mask_and_extra_channel_model() -> None:
    torch.manual_seed(0)
    m = build_crm("resnet18", in_channels=5).eval()
    image, coarse = _inputs("full")
    out = refine(m, image, coarse, CascadeConfig(scales=(0.25, 1.0)), extra=torch.rand(1, 1, H, W))
    assert out.shape == (1, 1, H, W) and torch.isfinite(out).all()


def test_config_and_size_helpers(model: CRM) -> None:
    assert scaled_size(1088, 1501, 0.125) == (136, 188)  # Python round(187.625) = 188
    assert scaled_size(100, 100, 0.125) == (12, 12)  # round(12.5) = 12 (half to even, as ref)
    with pytest.raises(ValueError):
        CascadeConfig(scales=())
    with pytest.raises(ValueError):
        CascadeConfig(pad=-1)
    assert CascadeConfig(scales=[0.5, 1]).scales == (0.5, 1.0)
    image, coarse = torch.rand(1, 3, 20, 40), torch.ones(1, 1, 20, 40)
    with pytest.raises(ValueError, match="reflect padding"):
        refine(model, image, coarse)


def test_same_size_bilinear_align_corners_is_identity() -> None:
    x = torch.randn(1, 4, 37, 53)  # the cascade skips the resize at scale 1.0 because of this
    assert torch.equal(F.interpolate(x, size=(37, 53), mode="bilinear", align_corners=True), x)


# ---------------------------------------------------------------------------------- Refiner


def test_refiner_uint8_matches_tensor_path(model: CRM) -> None:
    refiner = Refiner(model, device="cpu")
    image, coarse = _inputs()
    image_np = (image[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    coarse_np = (coarse[0, 0].numpy() * 255).astype(np.uint8)
    out = refiner(image_np, coarse_np)
    assert out.dtype == np.uint8 and out.shape == (H, W)
    prob = refiner.refine_tensor(
        torch.from_numpy(image_np).permute(2, 0, 1).float() / 255,
        torch.from_numpy(coarse_np).float() / 255,
    )
    expected = (prob[0, 0].numpy() * 255).astype(np.uint8)  # ref: truncation, not rounding
    assert np.array_equal(out, expected)
    assert not refiner.model.training
    empty = refiner(image_np, np.zeros((H, W), np.uint8))
    assert empty.max() == 0


def test_refiner_validation(model: CRM) -> None:
    refiner = Refiner(model)
    image = np.zeros((H, W, 3), np.uint8)
    mask = np.zeros((H, W), np.uint8)
    with pytest.raises(ValueError, match="differ"):
        refiner(image, np.zeros((H + 1, W), np.uint8))
    with pytest.raises(ValueError, match="H x W x 3"):
        refiner(image[..., 0], mask)
    with pytest.raises(ValueError, match="uint8"):
        refiner(image.astype(np.float32), mask)
    with pytest.raises(ValueError, match="H x W mask"):
        refiner(image, np.zeros((H, W, 2), np.uint8))
    with pytest.raises(ValueError, match="0/1"):
        refiner(image, (mask + 1).astype(np.uint8))
    with pytest.raises(ValueError, match="numpy"):
        refiner(torch.zeros(H, W, 3), mask)
    with pytest.raises(ValueError, match="float"):
        refiner.refine_tensor(torch.zeros(1, 3, H, W, dtype=torch.uint8), torch.zeros(1, 1, H, W))
    with pytest.raises(ValueError, match="differ"):
        refiner.refine_tensor(torch.zeros(1, 3, H, W), torch.zeros(1, 1, H, W + 2))
