"""The speed levers of the cascade (BN folding, bf16 encoder, measured halo, region tiles, the
scale-aware band): each option's invariant on constructed cases, on tiny CRMs (CPU)."""

from __future__ import annotations

import math
import platform
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import disk_inputs

from samsr.device import native_bf16, resolve_dtype
from samsr.engine.boundary_shift import boundary_shift, label_distance
from samsr.inference import CascadeConfig, Refiner, refine
from samsr.inference.cascade import _tile_batches, band_width_px
from samsr.inference.context import measure_context
from samsr.inference.graph import fold_batchnorm, folded_copy
from samsr.inference.regions import contour_region
from samsr.inference.tiling import plan_region_tiles, plan_tiles, region_cells
from samsr.models import CRM, build_crm
from samsr.models.components.guided_encoder import LocalEncoder


def _random_bn(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)


def _corrector(std: float = 0.5, prior_scale: float = 5.0) -> CRM:
    """A pixel-prior residual CRM with a random correction of the mask's logit: it moves the soft
    values everywhere and, once the correction outweighs ``prior_scale``, labels near the
    boundary (a stand-in for a trained refiner)."""
    torch.manual_seed(0)
    model = build_crm(
        "resnet18", residual=True, residual_prior="pixel", dropout=0.0, prior_scale=prior_scale
    ).eval()
    _random_bn(model)
    with torch.no_grad():
        model.decoder.mlp[-1].weight.normal_(std=std)
    return model


# ------------------------------------------------------------------ BatchNorm folding


@pytest.mark.parametrize(
    "backbone, pairs", [("resnet18", 1 + 12 + 2 + 4), ("resnet50", 1 + 39 + 3 + 4)]
)
def test_folded_batchnorm_equals_unfolded(backbone: str, pairs: int) -> None:
    torch.manual_seed(0)
    model = build_crm(backbone, dropout=0.0).eval()
    _random_bn(model)
    x = torch.randn(1, 4, 72, 88)
    folded = folded_copy(model)
    remaining = sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert remaining == 3  # each fusion level's second BatchNorm follows a ReLU: kept
    assert fold_batchnorm(folded) == 0  # nothing left to fold
    with torch.inference_mode():
        ref = model.encode_normalized(x)
        for patch in (0, 16):  # the patched fusion passes the folded bias explicitly
            out = folded.encode_normalized(x, fusion_patch=patch)
            assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    counted = build_crm(backbone, dropout=0.0).eval()
    assert fold_batchnorm(counted) == pairs
    # the original keeps its BatchNorms and its function
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == pairs + 3
    image, coarse = disk_inputs(90, 70)
    for cfg in (CascadeConfig(scales=(0.5, 1.0)), CascadeConfig(scales=(0.5, 1.0), tile=32)):
        a = refine(model, image, coarse, cfg)
        b = refine(folded, image, coarse, cfg)
        assert (a - b).abs().max().item() < 1e-5


def test_fold_batchnorm_sequential_pairs_and_refuses_train_mode() -> None:
    torch.manual_seed(0)
    enc = LocalEncoder(4, 16).eval()
    _random_bn(enc)
    x = torch.randn(1, 4, 40, 36)
    with torch.inference_mode():
        ref = enc(x)
        assert fold_batchnorm(enc) == 4
        torch.testing.assert_close(enc(x), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(LocalEncoder(4, 16).train())


def test_refiner_fold_bn_leaves_the_callers_model_alone(model: CRM) -> None:
    image, coarse = disk_inputs(45, 61)
    plain = Refiner(model, cascade=CascadeConfig(scales=(0.5, 1.0)))
    folded = Refiner(model, cascade=CascadeConfig(scales=(0.5, 1.0), fold_bn=True))
    assert folded.model is not model and plain.model is model
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.encoder.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.model.encoder.modules())
    a, b = plain.refine_tensor(image, coarse), folded.refine_tensor(image, coarse)
    assert (a - b).abs().max().item() < 1e-5


# ------------------------------------------------------------------ bf16 encoder


def test_bf16_encoder_agrees_with_fp32(model: CRM) -> None:
    """Tolerance: bf16 keeps 8 significant bits, so features differ by ~1 % and probabilities
    by a few hundredths at most; labels agree except at probabilities near 0.5. (Small inputs:
    bf16 is emulated, and slow, on CPUs without AVX512-BF16.)"""
    image, coarse = disk_inputs(40, 52)
    ref = refine(model, image, coarse, CascadeConfig(scales=(1.0,)))
    for kw in ({}, {"tile": 32, "tile_halo": 16}):
        out = refine(
            model, image, coarse, CascadeConfig(scales=(1.0,), encoder_dtype="bfloat16", **kw)
        )
        assert out.dtype == torch.float32
        diff = (out - ref).abs()
        assert diff.max().item() < 0.05 and diff.mean().item() < 5e-3
        near = (ref - 0.5).abs() < 0.05
        assert torch.equal((out >= 0.5)[~near], (ref >= 0.5)[~near])


def test_auto_encoder_dtype_is_bf16_only_where_native() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == (torch.bfloat16 if native_bf16(cpu) else None)
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16 and resolve_dtype(None, cpu) is None
    with pytest.raises(ValueError, match="encoder_dtype"):
        CascadeConfig(encoder_dtype="int8")


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or not Path("/proc/cpuinfo").exists(),
    reason="reads the x86 CPU flags of Linux's /proc/cpuinfo",
)
def test_native_bf16_follows_the_cpu_flags_not_onednn_emulation() -> None:
    """bf16 is native only with AVX512-BF16 or AMX-BF16; oneDNN also 'supports' it on plain
    AVX-512 by emulation, where the bf16 encoder was 10x slower than float32 (measured)."""
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert native_bf16(torch.device("cpu")) == bool(flags & {"avx512_bf16", "amx_bf16"})


# ------------------------------------------------------------------ measured halo


def test_measured_halo_makes_tiles_match_within_its_tolerance(model: CRM) -> None:
    loose, tight = measure_context(model, tol=1e-2), measure_context(model, tol=1e-4)
    assert 0 < loose.levels["f1"] <= loose.levels["f2"] <= loose.levels["f3"]
    assert all(tight.levels[k] >= loose.levels[k] for k in loose.levels)  # monotone in tol
    # the features a tile computes with the measured halo differ from the untiled ones by about
    # tol; with no halo they differ by far more
    x = torch.randn(1, 4, 96, 320)
    with torch.inference_mode():
        full = model.encode_normalized(x)
        errors = {}
        for halo in (0, tight.halo):
            x0 = 160 - halo
            part, (_, fx) = model.encode_window(x[..., x0:], (0, x0), (96, 320))
            core = part[..., 80 - fx :]
            errors[halo] = ((core - full[..., 80:]).abs().max() / full.std()).item()
    assert errors[tight.halo] < 10 * tight.tol < errors[0]


def test_auto_halo_is_resolved_once_by_the_refiner(model: CRM) -> None:
    refiner = Refiner(model, cascade=CascadeConfig(scales=(0.5, 1.0), tile=64, tile_halo="auto"))
    halo = refiner.cascade.tile_halo
    assert isinstance(halo, int) and halo % 8 == 0 and halo == measure_context(model).halo
    image, coarse = disk_inputs(70, 150)
    assert refiner.refine_tensor(image, coarse).shape == coarse.shape
    with pytest.raises(ValueError, match="tile_halo"):
        CascadeConfig(tile_halo="big")


# ------------------------------------------------------------------ region tiles


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_region_tiles_hold_every_region_query_once(scale: float) -> None:
    hq, wq = 203, 317
    size = (round(hq * scale), round(wq * scale))
    region = torch.zeros(hq, wq, dtype=torch.bool)
    region[20:40, 10:300] = True  # a thin stripe
    region[150:190, 250:290] = True  # a blob far from it
    tiles = plan_region_tiles((hq, wq), size, 128, 40, region, 32)
    owner = torch.zeros(hq, wq, dtype=torch.int32)
    for t in tiles:
        y0, y1, x0, x1 = t.q
        owner[y0:y1, x0:x1] += 1
        assert bool(region[y0:y1, x0:x1].any())  # no tile without work
        assert t.x[0] % 8 == 0 and t.x[2] % 8 == 0
        assert t.x[1] - t.x[0] <= 128 + 2 * 40 + 16 and t.x[3] - t.x[2] <= 128 + 2 * 40 + 16
    assert int(owner.max()) == 1  # cores are disjoint
    assert bool((owner[region] == 1).all())  # and hold every region query
    # never more than the regular grid's tiles holding region pixels; at full scale (a thin
    # stripe and a small blob) far less
    grid = [
        t
        for t in plan_tiles((hq, wq), size, 128, 40)
        if bool(region[t.q[0] : t.q[1], t.q[2] : t.q[3]].any())
    ]
    encoded = sum((t.x[1] - t.x[0]) * (t.x[3] - t.x[2]) for t in tiles)
    grid_cost = sum((t.x[1] - t.x[0]) * (t.x[3] - t.x[2]) for t in grid)
    assert encoded <= grid_cost
    if scale == 1.0:  # at 0.5 the input (102 x 158) is too small for cutting to pay
        assert encoded < 0.8 * grid_cost


def test_region_cells_match_the_query_to_cell_map() -> None:
    region = torch.zeros(50, 70, dtype=torch.bool)
    region[7, 33] = True
    occ = region_cells(region, (25, 35))  # scale 0.5: 13 x 18 cells
    cy, cx = math.floor((2 * 7 + 1) * 13 / 100), math.floor((2 * 33 + 1) * 18 / 140)
    assert occ.shape == (13, 18) and int(occ.sum()) == 1 and bool(occ[cy, cx])


# ------------------------------------------------------------------ the scale-aware band


def test_band_is_exactly_the_pixels_near_the_boundary() -> None:
    rng = np.random.default_rng(0)
    blob = cv2.GaussianBlur(rng.standard_normal((90, 120)), (0, 0), 6) > 0
    dist = label_distance(blob)
    for width in (1, 3, 8):
        band = contour_region(torch.from_numpy(blob), width).numpy()
        assert np.array_equal(band, dist <= width)
    assert band_width_px(16, 0.5) == 32 and band_width_px(16, 1.0) == 16


def test_band_holds_every_pixel_faithful_changes() -> None:
    """The band of the measured width decodes every pixel faithful changes: with a band at the
    last scale only, the labels are faithful's exactly."""
    model = _corrector(std=1.0, prior_scale=1.0)
    image, coarse = disk_inputs(96, 120)
    cfg = CascadeConfig(scales=(0.5, 1.0))
    shifts = boundary_shift(model, image, coarse, cfg)
    last = shifts[-1]
    assert 0 < last.changed < coarse.numel() // 2  # some labels move, not all
    assert last.max_px < 40  # within some distance of the boundary: a band, not the image
    width = math.ceil(last.max_px)
    faithful = refine(model, image, coarse, cfg)
    for extra in ({}, {"tile": 32, "tile_min": 16, "tile_halo": 64}):
        band = refine(
            model,
            image,
            coarse,
            CascadeConfig(scales=(0.5, 1.0), band_width=width, band_from=1.0, **extra),
        )
        assert torch.equal(band >= 0.5, faithful >= 0.5)


@pytest.mark.parametrize("tiled", [False, True])
def test_pixels_outside_the_band_keep_the_previous_scale_bit_for_bit(tiled: bool) -> None:
    model = _corrector(std=0.5)
    image, coarse = disk_inputs(96, 130)
    tiles = {"tile": 32, "tile_min": 16, "tile_halo": 40} if tiled else {}
    first = refine(model, image, coarse, CascadeConfig(scales=(0.5,), **tiles))
    both = refine(
        model, image, coarse, CascadeConfig(scales=(0.5, 1.0), band_width=6, band_from=1.0, **tiles)
    )
    band = contour_region(first[0, 0] >= 0.5, band_width_px(6, 1.0))
    assert torch.equal(both[0, 0][~band], first[0, 0][~band])  # skipped: untouched
    assert bool((both[0, 0][band] != first[0, 0][band]).any())  # decoded: moved


def test_band_stride_decodes_every_band_pixel_of_the_last_scale() -> None:
    model = _corrector()
    image, coarse = disk_inputs(80, 96)
    head: dict[str, float] = {}
    refine(model, image, coarse, CascadeConfig(scales=(0.5,), stride=4), timings=head)
    counts, inputs = {}, {}
    for band_stride in (0, 1):
        cfg = CascadeConfig(
            scales=(0.5, 1.0), stride=4, band_width=6, band_from=1.0, band_stride=band_stride
        )
        timings: dict[str, float] = {}

        def keep(scale: float, prob: torch.Tensor) -> None:
            inputs.setdefault(scale, prob[0, 0].clone())

        refine(model, image, coarse, cfg, timings=timings, on_scale=keep)
        counts[band_stride] = timings["decoded_px"] - head["decoded_px"]
    band = contour_region(inputs[0.5] >= 0.5, band_width_px(6, 1.0))  # on the padded grid
    assert counts[1] == int(band.sum()) > counts[0]


# ------------------------------------------------------------------ batched tiles


def test_tile_batches_group_equal_windows_and_keep_every_tile_once() -> None:
    tiles = plan_tiles((403, 317), (403, 317), 64, 16)
    batches = _tile_batches(tiles, 4)
    flat = [t for b in batches for t in b]
    assert sorted(flat, key=lambda t: t.q) == sorted(tiles, key=lambda t: t.q)
    for b in batches:
        assert 1 <= len(b) <= 4
        assert len({(t.x[1] - t.x[0], t.x[3] - t.x[2]) for t in b}) == 1
    assert max(len(b) for b in batches) == 4  # the interior tiles share a window size
    assert [len(b) for b in _tile_batches(tiles, 1)] == [1] * len(tiles)
    with pytest.raises(ValueError, match="tile_batch"):
        CascadeConfig(tile_batch=0)


def test_encode_windows_equals_one_window_at_a_time(model: CRM) -> None:
    x = torch.randn(1, 4, 96, 160)
    offsets = [(0, 0), (0, 64), (32, 32)]
    batch = torch.cat([x[..., y : y + 64, c : c + 96] for y, c in offsets])
    with torch.inference_mode():
        together = model.encode_windows(batch, offsets, (96, 160), fusion_patch=16)
        for (y, c), (feat, origin) in zip(offsets, together):
            ref, ref_origin = model.encode_window(x[..., y : y + 64, c : c + 96], (y, c), (96, 160))
            assert origin == ref_origin and feat.shape == ref.shape
            torch.testing.assert_close(feat, ref, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="offsets"):
            model.encode_windows(batch, offsets[:2], (96, 160))


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fusing_only_the_read_cells_equals_the_whole_window(
    residual: bool, channels_last: bool
) -> None:
    """A tile's fused features are read only at its ``cells``: fusing just those (the halo skipped)
    gives the whole window's values there, clipped to the window, with the right origin."""
    torch.manual_seed(0)
    model = build_crm("resnet18", dropout=0.0, residual=residual).eval()
    _random_bn(model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    full = (101, 163)  # odd: the last cell of the map is half a pixel pair
    x = torch.randn(1, 4, *full)
    cases = [  # (window offset, window size, wanted cells of the full 51 x 82 map)
        ((16, 24), (72, 96), (14, 30, 18, 50)),  # inside the window
        ((16, 24), (72, 96), (0, 30, 40, 90)),  # beyond the window: clipped to it
        ((40, 64), (61, 99), (30, 51, 60, 82)),  # the map's last row and column
    ]
    with torch.inference_mode():
        for (oy, ox), (h, w), cells in cases:
            win = x[..., oy : oy + h, ox : ox + w].contiguous(memory_format=fmt)
            whole, (wy, wx) = model.encode_window(win, (oy, ox), full, fusion_patch=8)
            [(part, (fy, fx))] = model.encode_windows(
                win, [(oy, ox)], full, fusion_patch=8, cells=[cells]
            )
            y0, x0 = max(cells[0], wy), max(cells[2], wx)
            y1, x1 = min(cells[1], wy + whole.shape[-2]), min(cells[3], wx + whole.shape[-1])
            assert (fy, fx) == (y0, x0) and part.shape[-2:] == (y1 - y0, x1 - x0)
            ref = whole[..., y0 - wy : y1 - wy, x0 - wx : x1 - wx]
            torch.testing.assert_close(part, ref, atol=1e-5, rtol=0)
            assert part.shape[1] == 256 + residual  # the cell prior travels along


def test_resize_window_equals_the_axis_resizes() -> None:
    """The matrix form of the window resize equals the gather-and-lerp one along each axis,
    window edges (clamped) included."""
    from samsr.models.components.fusion import resize_window, resize_window_axis

    torch.manual_seed(0)
    for full_in, full_out, off_in, off_out, n, out in [
        ((26, 41), (51, 82), (3, 5), (4, 8), (12, 20), (20, 36)),
        ((13, 21), (51, 82), (0, 0), (0, 0), (13, 21), (51, 82)),
        ((26, 41), (51, 82), (10, 20), (18, 38), (16, 21), (33, 44)),  # past the window's end
    ]:
        x = torch.randn(2, 5, *n)
        ref = resize_window_axis(x, 3, full_in[1], full_out[1], off_in[1], off_out[1], out[1])
        ref = resize_window_axis(ref, 2, full_in[0], full_out[0], off_in[0], off_out[0], out[0])
        got = resize_window(x, full_in, full_out, off_in, off_out, out)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "extra", [{}, {"region": "contour", "tile_min": 32}, {"channels_last": True}]
)
def test_batched_tiles_give_the_one_at_a_time_output(model: CRM, extra: dict) -> None:
    """Same tiles, same pixels encoded and decoded, the same probabilities up to the batched
    kernels' rounding (the decoding order does not matter: each tile writes only its core)."""
    image, coarse = disk_inputs(100, 150)
    base = dict(scales=(1.0,), tile=64, tile_halo=16, stride=2, **extra)
    counts, outs = [], []
    for n in (1, 8):
        timings: dict[str, float] = {}
        outs.append(
            refine(model, image, coarse, CascadeConfig(tile_batch=n, **base), timings=timings)
        )
        counts.append({k: timings[k] for k in ("tiles", "encoded_px", "decoded_px")})
    assert counts[0] == counts[1] and counts[0]["tiles"] > 8
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5


# ------------------------------------------------------------------ compiled decoder


@pytest.mark.slow
def test_compiled_decoder_equals_eager(model: CRM) -> None:
    """torch.compile of the decoder's query computation (inductor; about a minute of compilation
    on a 2-core CPU): the same probabilities within float rounding, untiled and tiled, and the
    same error when a tile's queries read cells outside its features."""
    image, coarse = disk_inputs(100, 150)
    for kw in ({}, {"decoder_factorized": True, "stride": 2, "tile": 64, "tile_halo": 16}):
        ref = refine(model, image, coarse, CascadeConfig(scales=(0.5, 1.0), **kw))
        out = refine(
            model, image, coarse, CascadeConfig(scales=(0.5, 1.0), compile_decoder=True, **kw)
        )
        assert (out - ref).abs().max().item() < 1e-5
    assert model.decoder.compiled is False  # an option of the call, not of the model
    feat = torch.randn(1, 256, 8, 8)
    coords = torch.tensor([[[0.99, 0.99]]])  # the full map's last cell: outside a window at 0
    cell = torch.full((1, 1, 2), 0.1)
    model.decoder.compiled = True
    try:
        with pytest.raises(ValueError, match="outside the window"):
            model.decoder(feat, coords, cell, window=(0, 0, 16, 16))
    finally:
        model.decoder.compiled = False
    with pytest.raises(ValueError, match="outside the window"):
        model.decoder(feat, coords, cell, window=(0, 0, 16, 16))
