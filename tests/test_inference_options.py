"""Inference options (patched fusion, bbox/contour/strided decoding, tiling) on a tiny CRM (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import disk_inputs

from samsr.engine.builders import ConfigError, cascade_config
from samsr.engine.configs import CONFIG_DIR
from samsr.inference import CascadeConfig, Refiner, refine
from samsr.inference.cascade import _padded_inputs, pad_reflect
from samsr.inference.regions import bbox_region, contour_region, strided_fill
from samsr.inference.tiling import plan_tiles, scaled_window
from samsr.models import CRM
from samsr.models.components.fusion import Fusion

CONFIGS = CONFIG_DIR


# ------------------------------------------------------------------ patched fusion


def test_patched_fusion_equals_unpatched_bit_for_bit() -> None:
    torch.manual_seed(0)
    fusion = Fusion((64, 64, 256), dropout=0.0).eval()
    for m in fusion.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    h, w = 51, 37
    feats = [torch.randn(1, 64, h, w), torch.randn(1, 64, 26, 19), torch.randn(1, 256, 13, 10)]
    with torch.inference_mode():
        ref = fusion(feats)
        for rows in (1, 7, 50, 51):
            out = fusion.forward_patched(list(feats), rows)
            assert torch.equal(out, ref), rows


def test_patched_fusion_empties_the_list_and_rejects_bad_patch() -> None:
    fusion = Fusion((64, 64, 256), dropout=0.0).eval()
    feats = [torch.randn(1, 64, 8, 8), torch.randn(1, 64, 4, 4), torch.randn(1, 256, 2, 2)]
    with torch.inference_mode():
        fusion.forward_patched(feats, 4)
        assert feats == []  # the encoder levels can be freed while fusing
        with pytest.raises(ValueError, match="patch_rows"):
            fusion.forward_patched([torch.zeros(1)] * 3, 0)


def test_patched_cascade_output_identical(model: CRM) -> None:
    """Bit-equal where the conv library picks the same kernel for patch and map (large maps);
    on tiny maps (first scales here) it may pick another, which changes rounding only."""
    image, coarse = disk_inputs(75, 58)
    ref = refine(model, image, coarse, CascadeConfig())
    out = refine(model, image, coarse, CascadeConfig(fusion_patch=5))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ tiling


def test_tiles_partition_the_query_grid() -> None:
    for query, inp, tile in [((4064, 3064), (4064, 3064), 1024), ((365, 321), (46, 40), 64)]:
        tiles = plan_tiles(query, inp, tile, 128)
        cover = torch.zeros(query, dtype=torch.int32)
        for t in tiles:
            y0, y1, x0, x1 = t.q
            cover[y0:y1, x0:x1] += 1
            assert t.x[0] % 8 == 0 and t.x[2] % 8 == 0
            assert 0 <= t.x[0] < t.x[1] <= inp[0] and 0 <= t.x[2] < t.x[3] <= inp[1]
        assert bool((cover == 1).all())


def test_scaled_window_matches_full_resize() -> None:
    src = torch.rand(1, 3, 97, 83)
    size = (41, 36)
    full = F.interpolate(src, size=size, mode="bilinear", align_corners=True)
    win = scaled_window(src, size, (8, 30, 5, 36))
    torch.testing.assert_close(win, full[..., 8:30, 5:36], atol=1e-6, rtol=0)
    assert torch.equal(scaled_window(src, (97, 83), (3, 9, 4, 8)), src[..., 3:9, 4:8])


def test_tiled_encoding_equals_untiled_within_tolerance(model: CRM) -> None:
    """With a halo beyond ResNet-18's receptive field (~100 px) tiles only differ by rounding."""
    image, coarse = disk_inputs(150, 131)
    ref = refine(model, image, coarse, CascadeConfig())
    out = refine(model, image, coarse, CascadeConfig(tile=64, tile_halo=128))
    assert (out - ref).abs().max().item() < 1e-5
    # a small halo is an approximation: the difference is measurable, not a bug
    small = refine(model, image, coarse, CascadeConfig(tile=64, tile_halo=16))
    assert (small - ref).abs().max().item() > 1e-5


def test_encode_window_core_matches_full_features(model: CRM) -> None:
    x = torch.randn(1, 4, 200, 176)
    with torch.inference_mode():
        full = model.encode_normalized(x)
        feat, (fy, fx) = model.encode_window(x[..., 0:200, 16:176], (0, 16), (200, 176))
    assert (fy, fx) == (0, 8)
    core = feat[..., :, 60:]  # columns far from the window's cut edge (col 16 -> feature 8)
    torch.testing.assert_close(core, full[..., :, 8 + 60 :], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ strided decoding


class CountingDecoder:
    """Decodes a known field and records every queried pixel."""

    def __init__(self, field: torch.Tensor) -> None:
        self.field = field
        self.seen = torch.zeros(field.shape, dtype=torch.int32)

    def __call__(self, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        self.seen[ys, xs] += 1
        return self.field[ys, xs]


def _side(p: float, margin: float) -> int:
    return 0 if p < 0.5 - margin else 2 if p >= 0.5 + margin else 1  # 1: uncertain


def _expected_strided(field: np.ndarray, stride: int, margin: float = 0.0) -> np.ndarray:
    """The rule spelt out with loops: grid + pixels of cells whose four corners disagree (or,
    with a margin, any of them is uncertain)."""
    h, w = field.shape
    rows = list(range(0, h, stride)) + ([h - 1] if (h - 1) % stride else [])
    cols = list(range(0, w, stride)) + ([w - 1] if (w - 1) % stride else [])
    decoded = np.zeros((h, w), bool)
    for r in rows:
        for c in cols:
            decoded[r, c] = True
    for i in range(len(rows) - 1):
        for j in range(len(cols) - 1):
            corners = [
                _side(field[rows[i + a], cols[j + b]], margin) for a in (0, 1) for b in (0, 1)
            ]
            if len(set(corners)) > 1 or 1 in corners:
                # pixels of this cell: rows [r0, r1) (the last cell also holds row r1), same cols
                r_end = rows[i + 1] + 1 if i == len(rows) - 2 else rows[i + 1]
                c_end = cols[j + 1] + 1 if j == len(cols) - 2 else cols[j + 1]
                decoded[rows[i] : r_end, cols[j] : c_end] = True
    return decoded


@pytest.mark.parametrize("margin", [0.0, 0.4])
@pytest.mark.parametrize("stride", [2, 3, 4, 8])
def test_strided_decodes_exactly_the_disagreeing_cells(stride: int, margin: float) -> None:
    h, w = 37, 50
    yy, xx = np.mgrid[0:h, 0:w]
    field = 1 / (1 + np.exp(-(((yy - 17) ** 2 + (xx - 21) ** 2) ** 0.5 - 11)))  # a ring edge
    field[3:5, 40:42] = 1.0  # a blob smaller than a cell: found only if a corner hits it
    decoder = CountingDecoder(torch.from_numpy(field).float())
    prob = torch.full((h, w), 0.25)
    n = strided_fill(decoder, prob, None, stride, margin=margin)
    expected = _expected_strided(field, stride, margin)
    assert bool((decoder.seen <= 1).all())  # nothing decoded twice
    assert np.array_equal(decoder.seen.numpy() == 1, expected)
    assert n == int(expected.sum())
    # decoded pixels hold the decoded value; the others the interpolation of agreeing corners
    got = prob.numpy()
    assert np.array_equal(got[expected], field[expected].astype(np.float32))
    assert bool(((got[~expected] >= 0.5) == (field[~expected] >= 0.5)).mean() > 0.99)


def test_strided_with_region_leaves_outside_untouched() -> None:
    h, w = 30, 41
    field = torch.rand(h, w)
    decoder = CountingDecoder(field)
    prev = torch.full((h, w), 0.3)
    region = torch.zeros(h, w, dtype=torch.bool)
    region[5:20, 10:33] = True
    prob = prev.clone()
    strided_fill(decoder, prob, region, 4)
    assert bool((decoder.seen[~region] == 0).all())
    assert torch.equal(prob[~region], prev[~region])


# ------------------------------------------------------------------ regions


def test_bbox_and_contour_regions() -> None:
    label = torch.zeros(40, 50, dtype=torch.bool)
    label[10:20, 15:30] = True
    box = bbox_region(label, 3)
    expected = torch.zeros_like(label)
    expected[7:23, 12:33] = True
    assert torch.equal(box, expected)
    band = contour_region(label, 2)
    dist_fg = torch.ones_like(label)  # brute force: within 2 px (Chebyshev) of fg and of bg
    lab = label.numpy()
    for y in range(40):
        for x in range(50):
            win = lab[max(y - 2, 0) : y + 3, max(x - 2, 0) : x + 3]
            dist_fg[y, x] = bool(win.any() and not win.all())
    assert torch.equal(band, dist_fg)
    assert not bbox_region(torch.zeros(5, 5, dtype=torch.bool), 2).any()


@pytest.mark.parametrize("region", ["bbox", "contour"])
def test_regions_leave_every_outside_pixel_untouched(model: CRM, region: str) -> None:
    h, w = 97, 83
    image, coarse = disk_inputs(h, w)
    coarse = coarse * 0.9 + 0.05  # soft values: "untouched" must mean bit-equal
    pad = 32
    label = pad_reflect(coarse, pad)[0, 0] >= 0.5
    inside = bbox_region(label, 5) if region == "bbox" else contour_region(label, 4)
    inside = inside[pad : pad + h, pad : pad + w]
    cfg = CascadeConfig(region=region, bbox_margin=5, contour_width=4)
    out = refine(model, image, coarse, cfg)
    assert torch.equal(out[0, 0][~inside], coarse[0, 0][~inside])
    assert not torch.equal(out[0, 0][inside], coarse[0, 0][inside])


# ------------------------------------------------------------------ combinations


COMBOS = [
    {"fusion_patch": 3},
    {"decoder_factorized": True},
    {"region": "bbox", "stride": 2},
    {"region": "contour", "stride": 4, "region_source": "current"},
    {"stride": 8, "fusion_patch": 4, "channels_last": True},
    {"tile": 32, "tile_halo": 24},
    {"tile": 48, "tile_halo": 40, "region": "bbox", "stride": 4, "decoder_factorized": True},
    {"tile": 32, "tile_halo": 8, "region": "contour", "stride": 3, "fusion_patch": 2},
]


@pytest.mark.parametrize("size", [(67, 45), (41, 90)])
@pytest.mark.parametrize("kw", COMBOS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_options_combine_at_odd_sizes(model: CRM, kw: dict, size: tuple[int, int]) -> None:
    image, coarse = disk_inputs(*size)
    ref = refine(model, image, coarse, CascadeConfig(scales=(0.5, 1.0)))
    timings: dict[str, float] = {}
    out = refine(model, image, coarse, CascadeConfig(scales=(0.5, 1.0), **kw), timings=timings)
    assert out.shape == ref.shape and bool(torch.isfinite(out).all())
    assert timings["decoded_px"] > 0
    agree = ((out >= 0.5) == (ref >= 0.5)).float().mean().item()
    assert agree > 0.8  # same model and protocol: mostly the same mask


def test_refiner_uint8_path_matches_float_path(model: CRM) -> None:
    image, coarse = disk_inputs(53, 47)
    img8 = (image[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy()
    coarse8 = (coarse[0, 0] * 255).to(torch.uint8).numpy()
    refiner = Refiner(model, cascade=CascadeConfig(scales=(0.5, 1.0)))
    out8 = refiner(img8, coarse8)
    img_f = torch.from_numpy(img8).permute(2, 0, 1)[None].float().div(255)
    coarse_f = torch.from_numpy(coarse8)[None, None].float().div(255)
    prob = refiner.refine_tensor(img_f, coarse_f)
    assert np.array_equal(out8, (prob[0, 0] * 255).to(torch.uint8).numpy())


def test_padded_inputs_equal_pad_of_normalized(model: CRM) -> None:
    image, coarse = disk_inputs(70, 45)
    static, mask, prob = _padded_inputs(model, image, coarse, None, 32, True, band_rows=16)
    x = pad_reflect(model.normalize_inputs(image, coarse), 32)
    assert torch.equal(static, x[:, :3]) and torch.equal(mask, x[:, 3:4])
    assert torch.equal(prob, pad_reflect(coarse, 32))


# ------------------------------------------------------------------ configs


def test_every_inference_config_builds() -> None:
    from omegaconf import OmegaConf

    names = sorted(p.stem for p in (CONFIGS / "inference").glob("*.yaml"))
    assert {"faithful", "patched", "bbox", "contour", "strided4", "tiled", "fast"} <= set(names)
    faithful = OmegaConf.load(CONFIGS / "inference" / "faithful.yaml")
    for name in names:
        cfg = OmegaConf.load(CONFIGS / "inference" / f"{name}.yaml")
        merged = OmegaConf.merge(faithful, {k: v for k, v in cfg.items() if k != "defaults"})
        cascade_config(merged)
    assert cascade_config(faithful) == CascadeConfig(decoder_factorized=False)
    fast = OmegaConf.merge(
        faithful,
        {
            k: v
            for k, v in OmegaConf.load(CONFIGS / "inference" / "fast.yaml").items()
            if k != "defaults"
        },
    )
    assert cascade_config(fast) == CascadeConfig.recommended()  # the Refiner's default


def test_bad_inference_values_are_clear() -> None:
    from omegaconf import OmegaConf

    with pytest.raises(ConfigError, match="unknown inference option"):
        cascade_config(OmegaConf.create({"scales": [1.0], "strid": 4}))
    with pytest.raises(ConfigError, match="stride"):
        cascade_config(OmegaConf.create({"stride": 0}))
    with pytest.raises(ConfigError, match="region"):
        cascade_config(OmegaConf.create({"region": "box"}))


def test_timed_runs_never_synchronise_per_stage(model: CRM, monkeypatch) -> None:
    # Stage times need a device synchronisation around every encode/decode of every scale and
    # tile; only an opt-in profiling run pays for them (timed runs time whole images).
    from samsr.inference import cascade

    syncs: list[object] = []
    monkeypatch.setattr(cascade, "synchronize", lambda device: syncs.append(device))
    image, coarse = disk_inputs(67, 45)
    cfg = CascadeConfig(scales=(0.5, 1.0), tile=32, tile_halo=8)
    counts: dict[str, float] = {}
    plain = refine(model, image, coarse, cfg, timings=counts)
    assert syncs == [] and "encode" not in counts and "trunk" not in counts and counts["tiles"] > 2
    profiled: dict[str, float] = {}
    again = refine(model, image, coarse, cfg, timings=profiled, profile=True)
    assert len(syncs) >= 2 * profiled["tiles"] and profiled["encode"] > 0 < profiled["decode"]
    assert 0 < profiled["trunk"] < profiled["encode"]  # the encoder's share of encoding
    assert not model.encoder._forward_hooks and not model.encoder._forward_pre_hooks
    torch.testing.assert_close(again, plain, atol=0, rtol=0)  # the same computation


@pytest.mark.parametrize("prior", ["cell", "pixel"])
def test_residual_model_tiles_and_decodes_regions_like_untiled(prior: str) -> None:
    from samsr.models import build_crm

    torch.manual_seed(0)
    model = build_crm("resnet18", residual=True, residual_prior=prior).eval()
    with torch.no_grad():
        model.decoder.mlp[-1].weight.normal_(std=0.1)  # a trained-looking correction
    image, coarse = disk_inputs(150, 131)
    ref = refine(model, image, coarse, CascadeConfig())
    tiled = refine(model, image, coarse, CascadeConfig(tile=64, tile_halo=128))
    assert (tiled - ref).abs().max().item() < 1e-5
    bbox = refine(model, image, coarse, CascadeConfig(region="bbox"))
    assert bbox.shape == ref.shape and bool(torch.isfinite(bbox).all())
    strided = refine(model, image, coarse, CascadeConfig(stride=4))
    assert strided.shape == ref.shape and bool(torch.isfinite(strided).all())


@pytest.mark.parametrize(
    "cfg",
    [CascadeConfig(), CascadeConfig(tile=64, tile_halo=128), CascadeConfig(region="bbox")],
    ids=["faithful", "tiled", "bbox"],
)
def test_untrained_pixel_prior_model_returns_the_coarse_mask_through_the_cascade(cfg) -> None:
    from samsr.models import build_crm

    torch.manual_seed(0)
    model = build_crm("resnet18", residual=True, residual_prior="pixel").eval()
    image, coarse = disk_inputs(150, 131)
    out = refine(model, image, coarse, cfg)
    assert torch.equal(out >= 0.5, coarse >= 0.5)


# ------------------------------------------------------------------ flip (test-time augmentation)


def test_flip_averages_the_mirrored_answer(model: CRM) -> None:
    image, coarse = disk_inputs(45, 61)
    cascade = CascadeConfig(scales=(0.5, 1.0))
    plain = Refiner(model, cascade=cascade).refine_tensor(image, coarse)
    with torch.inference_mode():
        mirrored = refine(model, image.flip(-1), coarse.flip(-1), cascade).flip(-1)
    both = Refiner(model, cascade=CascadeConfig(scales=(0.5, 1.0), flip=True))
    out = both.refine_tensor(image, coarse)
    torch.testing.assert_close(out, (plain + mirrored) / 2)
    assert not torch.allclose(plain, mirrored)  # the network is not mirror-symmetric itself
    # a mirror-symmetric input: flip changes nothing but rounding
    sym_image = torch.cat([image, image.flip(-1)], dim=-1)
    sym_coarse = torch.cat([coarse, coarse.flip(-1)], dim=-1)
    sym = both.refine_tensor(sym_image, sym_coarse)
    torch.testing.assert_close(sym, sym.flip(-1), atol=1e-5, rtol=0)
