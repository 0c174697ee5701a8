"""CRM network: encoder, fusion, implicit decoder, full model (tiny resnet18, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from samsr.models import CRM, build_crm
from samsr.models.components import Fusion, ImplicitDecoder, ResNetEncoder, make_coord, query_grid


@pytest.fixture(scope="module")
def tiny_crm() -> CRM:
    torch.manual_seed(0)
    return build_crm("resnet18")


def _mask(kind: str, b: int, h: int, w: int) -> torch.Tensor:
    if kind == "empty":
        return torch.zeros(b, 1, h, w)
    if kind == "full":
        return torch.ones(b, 1, h, w)
    m = torch.zeros(b, 1, h, w)
    m[..., h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] = 1
    return m


# ----------------------------------------------------------------------------------- encoder


@pytest.mark.parametrize("arch", ["resnet18", "resnet34"])
def test_encoder_strides_and_channels(arch: str) -> None:
    enc = ResNetEncoder(arch, in_channels=4).eval()
    assert enc.out_channels == (64, 64, 256)
    assert not hasattr(enc, "layer4") and not hasattr(enc, "fc")
    with torch.no_grad():
        f1, f2, f3 = enc(torch.randn(1, 4, 67, 93))
    assert f1.shape == (1, 64, 34, 47)  # conv1 7x7/2 pad 3: ceil(H / 2)
    assert f2.shape == (1, 64, 17, 24)  # max pool /2
    assert f3.shape == (1, 256, 9, 12)  # layer2 /2, layer3 dilated (no stride)
    first, second = enc.layer3[0], enc.layer3[1]
    assert first.conv1.stride == (1, 1) and first.downsample[0].stride == (1, 1)
    assert first.conv1.dilation == (1, 1)  # reference: the first block is not dilated
    assert second.conv1.dilation == (2, 2) and second.conv2.padding == (2, 2)


def test_encoder_bottleneck_dilation_rule() -> None:
    enc = ResNetEncoder("resnet50", in_channels=5)
    assert enc.out_channels == (64, 256, 1024)
    assert enc.conv1.weight.shape == (64, 5, 7, 7)
    assert enc.layer3[0].conv2.dilation == (1, 1) and enc.layer3[0].conv2.stride == (1, 1)
    assert all(b.conv2.dilation == (2, 2) for b in list(enc.layer3)[1:])
    assert enc.layer3[0].downsample[0].stride == (1, 1)


def test_encoder_loads_rgb_weights_with_zero_extra_channels(tmp_path) -> None:
    from torchvision.models import resnet18

    torch.manual_seed(1)
    tv_state = resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(tv_state, path)
    enc = ResNetEncoder("resnet18", in_channels=4, pretrained=str(path))
    assert torch.equal(enc.conv1.weight[:, :3], tv_state["conv1.weight"])
    assert torch.count_nonzero(enc.conv1.weight[:, 3:]) == 0
    assert torch.equal(enc.layer3[1].conv2.weight, tv_state["layer3.1.conv2.weight"])
    assert torch.equal(enc.bn1.running_var, tv_state["bn1.running_var"])


def test_encoder_pretrained_errors(tmp_path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ResNetEncoder("resnet18", pretrained=str(missing))
    from torchvision.models import resnet34

    wrong = tmp_path / "resnet34.pth"
    torch.save(resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(ValueError, match="resnet18"):
        ResNetEncoder("resnet18", pretrained=str(wrong))
    with pytest.raises(ValueError, match="arch"):
        ResNetEncoder("resnet152")


# ------------------------------------------------------------------------------------ fusion


def test_fusion_shapes_and_fuse_split() -> None:
    torch.manual_seed(0)
    fusion = Fusion(in_channels=(64, 64, 256)).eval()
    feats = (torch.randn(2, 64, 34, 47), torch.randn(2, 64, 17, 24), torch.randn(2, 256, 9, 12))
    with torch.no_grad():
        out = fusion(feats)
        concat = fusion.concat(feats)
        assert concat.shape == (2, 256, 34, 47)
        assert torch.equal(out, fusion.fuse(concat))
        # level 2/3 are upsampled with align_corners=True: corners are copied exactly
        proj3 = fusion.branches[2](feats[2])
        assert torch.equal(concat[:, 128:, 0, 0], proj3[:, :, 0, 0])
        assert torch.equal(concat[:, 128:, -1, -1], proj3[:, :, -1, -1])
    assert out.shape == (2, 256, 34, 47)


# ----------------------------------------------------------------------------------- decoder


def test_make_coord_centres_y_first() -> None:
    c = make_coord((3, 4), flatten=False)
    assert c.shape == (3, 4, 2)
    assert torch.allclose(c[:, 0, 0], torch.tensor([-2 / 3, 0.0, 2 / 3]))
    assert torch.allclose(c[0, :, 1], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    flat = make_coord((3, 4))
    assert torch.equal(flat[5], c[1, 1])  # row-major
    coords, cell = query_grid(3, 4, batch=2)
    assert coords.shape == cell.shape == (2, 12, 2)
    assert torch.allclose(cell[0, 0], torch.tensor([2 / 3, 0.5]))


def _reference_liif(dec: ImplicitDecoder, feat, coords, cell):
    """The reference algorithm spelt out with grid_sample on the feature map (test oracle)."""
    b, _, h, w = feat.shape
    fc = make_coord((h, w), flatten=False).permute(2, 0, 1).unsqueeze(0).expand(b, 2, h, w)
    preds, areas = [], []
    for sy in (-1, 1):
        for sx in (-1, 1):
            q = coords.clone()
            q[:, :, 0] += sy * (2 / h / 2) + 1e-6
            q[:, :, 1] += sx * (2 / w / 2) + 1e-6
            q.clamp_(-1 + 1e-6, 1 - 1e-6)
            grid = q.flip(-1).unsqueeze(1)
            qf = F.grid_sample(feat, grid, mode="nearest", align_corners=False)[:, :, 0]
            qc = F.grid_sample(fc, grid, mode="nearest", align_corners=False)[:, :, 0]
            rel = coords - qc.permute(0, 2, 1)
            rel[:, :, 0] *= h
            rel[:, :, 1] *= w
            rc = cell.clone()
            rc[:, :, 0] *= h
            rc[:, :, 1] *= w
            x = torch.cat([qf.permute(0, 2, 1), rel, coords, rc], dim=-1)
            preds.append(dec.mlp(x.view(-1, x.shape[-1])).view(b, -1, 1))
            areas.append(torch.abs(rel[:, :, 0] * rel[:, :, 1]) + 1e-9)
    tot = torch.stack(areas).sum(dim=0)
    areas = [areas[3], areas[2], areas[1], areas[0]]
    ret = 0
    for p, a in zip(preds, areas):
        ret = ret + p * (a / tot).unsqueeze(-1)
    return ret[..., 0]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("batch", [1, 2])
def test_decoder_matches_reference_algorithm_bitwise(layout: str, batch: int) -> None:
    torch.manual_seed(0)
    dec = ImplicitDecoder(feat_dim=16, hidden=(8, 8))
    feat = torch.randn(batch, 16, 7, 9)
    if layout == "channels_last":
        feat = feat.contiguous(memory_format=torch.channels_last)
    coords, cell = query_grid(15, 19, batch)  # odd query grid, not aligned with the features
    with torch.no_grad():
        ours = dec(feat, coords, cell)
        ref = _reference_liif(dec, feat, coords.contiguous(), cell.contiguous())
    assert ours.shape == (batch, 15 * 19)
    assert torch.equal(ours, ref)


def _own_cell_logit(dec, feat, i, j, coord, cell_hw):
    h, w = feat.shape[-2:]
    centre = make_coord((h, w), flatten=False)[i, j]
    rel = (coord - centre) * torch.tensor([h, w])
    x = torch.cat([feat[0, :, i, j], rel, coord, cell_hw * torch.tensor([h, w])])
    return dec.mlp(x)[0]


def test_decoder_constant_features_and_ensemble_weights_sum_to_one() -> None:
    torch.manual_seed(0)
    dec = ImplicitDecoder(feat_dim=8, hidden=(16,))
    with torch.no_grad():
        dec.mlp[0].weight[:, 8:] = 0  # ignore the 6 coordinate inputs
        feat = torch.randn(1, 8, 1, 1).expand(1, 8, 5, 6).contiguous()
        coords, cell = query_grid(11, 13)
        out = dec(feat, coords, cell)
        expected = dec.mlp(torch.cat([feat[0, :, 0, 0], torch.zeros(6)]))[0]
    assert torch.allclose(out, expected.expand_as(out), atol=1e-6, rtol=0)


def test_decoder_on_cell_centres_uses_the_own_cell() -> None:
    torch.manual_seed(0)
    dec = ImplicitDecoder(feat_dim=8, hidden=(16, 16))
    feat = torch.randn(1, 8, 4, 5)
    coords, cell = query_grid(4, 5)  # query centres == feature-cell centres
    with torch.no_grad():
        out = dec(feat, coords, cell)[0].view(4, 5)
        for i, j in [(0, 0), (1, 2), (3, 4), (2, 0)]:
            coord = make_coord((4, 5), flatten=False)[i, j]
            own = _own_cell_logit(dec, feat, i, j, coord, cell[0, 0])
            assert torch.allclose(out[i, j], own, atol=1e-6)


def test_decoder_between_cells_averages_four_neighbours() -> None:
    torch.manual_seed(0)
    dec = ImplicitDecoder(feat_dim=8, hidden=(16, 16))
    feat = torch.randn(1, 8, 4, 5)
    i, j = 1, 2  # the corner shared by cells (1, 2), (1, 3), (2, 2), (2, 3)
    coord = torch.tensor([-1 + 2 * (i + 1) / 4, -1 + 2 * (j + 1) / 5])
    cell = torch.tensor([0.1, 0.1])
    with torch.no_grad():
        out = dec(feat, coord.view(1, 1, 2), cell.view(1, 1, 2))[0, 0]
        four = [
            _own_cell_logit(dec, feat, a, c, coord, cell) for a in (i, i + 1) for c in (j, j + 1)
        ]
    assert torch.allclose(out, torch.stack(four).mean(), atol=1e-6)


# ------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("kind", ["empty", "full", "box"])
def test_crm_forward_backward_odd_size(tiny_crm: CRM, kind: str) -> None:
    tiny_crm.train()
    tiny_crm.zero_grad()
    image = torch.rand(2, 3, 67, 93)
    out = tiny_crm(image, _mask(kind, 2, 67, 93))
    assert set(out) == {"logits"}
    assert out["logits"].shape == (2, 1, 67, 93)
    assert torch.isfinite(out["logits"]).all()
    out["logits"].mean().backward()
    grads = [p.grad for p in tiny_crm.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert tiny_crm.encoder.conv1.weight.grad[:, 3].abs().sum() > 0  # the mask channel learns


def test_crm_encode_decode_matches_forward(tiny_crm: CRM) -> None:
    tiny_crm.eval()
    image, coarse = torch.rand(1, 3, 35, 50), _mask("box", 1, 35, 50)
    with torch.no_grad():
        feat = tiny_crm.encode(image, coarse)
        assert feat.shape == (1, 256, 18, 25)
        coords, cell = query_grid(35, 50)
        logits = tiny_crm.decode(feat, coords, cell)
        assert torch.equal(logits.view(1, 1, 35, 50), tiny_crm(image, coarse)["logits"])


@pytest.mark.parametrize("residual,prior", [(False, "cell"), (True, "cell"), (True, "pixel")])
def test_windowed_training_forward_equals_those_pixels_of_the_full_one(
    residual: bool, prior: str
) -> None:
    torch.manual_seed(0)
    model = build_crm(
        "resnet18", residual=residual, residual_prior=prior, decoder_factorized=True
    ).eval()
    if residual:
        with torch.no_grad():
            model.decoder.mlp[-1].weight.normal_(std=0.1)
    image, coarse = torch.rand(3, 3, 40, 56), _mask("box", 3, 40, 56)
    corners = torch.tensor([[0, 0], [7, 30], [16, 13]])
    with torch.no_grad():
        full = model(image, coarse)["logits"]
        part = model(image, coarse, windows=corners, window_size=(24, 26))["logits"]
    assert part.shape == (3, 1, 24, 26)
    for i, (y, x) in enumerate(corners.tolist()):
        torch.testing.assert_close(part[i], full[i, :, y : y + 24, x : x + 26], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        model(image, coarse, windows=torch.tensor([[17, 0]] * 3), window_size=(24, 26))


def test_normalize_inputs_reference_convention(tiny_crm: CRM) -> None:
    image = torch.full((1, 3, 2, 2), 0.5)
    coarse = torch.tensor([[[[0.0, 1.0], [0.5, 1.0]]]])
    x = tiny_crm.normalize_inputs(image, coarse)
    assert x.shape == (1, 4, 2, 2)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    for c in range(3):
        assert torch.allclose(x[0, c], torch.full((2, 2), (0.5 - mean[c]) / std[c]))
    assert torch.equal(x[0, 3], torch.tensor([[-1.0, 1.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="input channels"):
        tiny_crm.normalize_inputs(image, coarse, extra=torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match="does not match"):
        tiny_crm.normalize_inputs(image, torch.zeros(1, 1, 3, 2))


def test_extra_channels_model() -> None:
    torch.manual_seed(0)
    model = build_crm("resnet18", in_channels=7).eval()
    image, coarse, extra = (
        torch.rand(1, 3, 33, 41),
        _mask("box", 1, 33, 41),
        torch.rand(1, 3, 33, 41),
    )
    with torch.no_grad():
        assert model(image, coarse, extra)["logits"].shape == (1, 1, 33, 41)


def test_build_crm_param_count_resnet50() -> None:
    model = build_crm("resnet50")
    n = sum(p.numel() for p in model.parameters())
    # ResNet-50 up to layer3 (8.5M) + fusion (0.65M) + MLP (12k); no layer4
    assert 9.0e6 < n < 9.6e6
    assert model.decoder.mlp[0].in_features == 262
    assert math.isclose(model.fusion.dropout.p, 0.5)


@pytest.mark.parametrize("batch", [1, 2])
def test_factorized_decoder_is_the_same_function(batch: int) -> None:
    torch.manual_seed(0)
    exact = ImplicitDecoder(feat_dim=16, hidden=(8, 8))
    fast = ImplicitDecoder(feat_dim=16, hidden=(8, 8), factorized=True)
    fast.load_state_dict(exact.state_dict())  # same parameters: a computation mode only
    feat = torch.randn(batch, 16, 5, 7)
    coords, cell = query_grid(13, 17, batch)
    want = exact(feat, coords, cell)
    got = fast(feat, coords, cell)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # preparing once and decoding chunks gives the same logits as decoding in one go
    prepared = fast.prepare(feat)
    assert prepared.shape == (batch, 8, 5, 7)
    parts = [fast(prepared, coords[:, i : i + 50], cell[:, i : i + 50], prepared=True) for i in
             range(0, coords.shape[1], 50)]  # fmt: skip
    torch.testing.assert_close(torch.cat(parts, dim=1), got)
    assert exact.prepare(feat) is feat
    # gradients reach the features and the first layer through the factorized path
    feat.requires_grad_(True)
    fast(feat, coords, cell).sum().backward()
    assert feat.grad is not None and fast.mlp[0].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------- residual


def test_residual_crm_starts_as_the_pooled_input_mask() -> None:
    torch.manual_seed(0)
    model = build_crm("resnet18", residual=True).eval()
    image = torch.rand(2, 3, 48, 40)
    coarse = _mask("box", 2, 48, 40)
    with torch.no_grad():
        logits = model(image, coarse)["logits"]
    prior = F.avg_pool2d(coarse * 2 - 1, 2)  # the mask in [-1, 1] on the stride-2 grid
    expected = 5.0 * F.interpolate(prior, size=(48, 40), mode="bilinear", align_corners=False)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # borders: clamped ensemble
    torch.testing.assert_close(logits[inner], expected[inner], atol=1e-4, rtol=0)
    # identity start: inside/outside the box the refined mask is the coarse one
    assert bool(((torch.sigmoid(logits) > 0.5) == (coarse > 0.5))[inner].float().mean() > 0.97)


def test_pixel_prior_crm_starts_as_exactly_the_input_mask() -> None:
    torch.manual_seed(0)
    model = build_crm("resnet18", residual=True, residual_prior="pixel").eval()
    assert model.decoder.in_channels == 256  # no prior channel in the feature map
    image = torch.rand(2, 3, 48, 40)
    coarse = _mask("box", 2, 48, 40)
    coarse[0, 0, 5, 7] = 0.3  # soft values pass through too
    with torch.no_grad():
        logits = model(image, coarse)["logits"]
    torch.testing.assert_close(logits, 5.0 * (coarse * 2 - 1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="needs prior="):
        feat = model.encode(image, coarse)
        model.decode(feat, *query_grid(48, 40, 2))


def test_residual_crm_learns_a_correction_and_keeps_the_reference_default() -> None:
    torch.manual_seed(0)
    plain = build_crm("resnet18")
    assert not plain.decoder.residual and not hasattr(plain.decoder, "prior_scale")
    model = build_crm("resnet18", residual=True, decoder_factorized=True)
    image, coarse = torch.rand(2, 3, 32, 32), _mask("box", 2, 32, 32)
    out = model(image, coarse)["logits"]
    out.mean().backward()
    last = model.decoder.mlp[-1]
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0
    assert model.decoder.prior_scale.grad is not None
    # the factorized decoder reads the same prior: same function as the reference decoder
    ref = build_crm("resnet18", residual=True).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        ref.decoder.mlp[-1].weight.normal_()
        model.load_state_dict(ref.state_dict())
        model.eval()
        torch.testing.assert_close(
            model(image, coarse)["logits"], ref(image, coarse)["logits"], atol=1e-4, rtol=0
        )
