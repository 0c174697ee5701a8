"""SAM-SR v3.1-v3.4 (samsr.models.sam_crm) on a tiny random SAM (CPU): training forward, frozen
SAM, the four mask injections, windowed attention, checkpoints, token geometry and the cascade."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from samsr.engine.checkpoint import CheckpointError, atomic_torch_save, load_model_weights
from samsr.guidance import image_encoder
from samsr.inference import CascadeConfig, refine
from samsr.models.components.mask_injection import MaskAttention
from samsr.models.components.sam_frame import (
    Frame,
    mask_to_token_frame,
    resized_size,
    sample_tokens,
    valid_grid,
)
from samsr.models.sam_crm import SamCRM, build_sam_crm

INJECTIONS = ("none", "add", "global", "window")
VARIANT = {"none": "v3.1", "add": "v3.2", "global": "v3.3", "window": "v3.4"}
IMG_SIZE = 128  # tiny SAM input side: an 8 x 8 token grid (patch 16), 32 channels
WINDOW = 3  # v3.4's window: smaller than the grid, and not dividing it


def _build(injection: str, seed: int = 0, window: int = WINDOW) -> SamCRM:
    torch.manual_seed(seed)
    return build_sam_crm(
        image_encoder(tiny=True, tiny_img_size=IMG_SIZE, seed=0),
        injection,
        local_width=16,
        token_channels=8,
        heads=4,
        window=window,
        decoder_hidden=(16, 16),
        dropout=0.0,
    )


def _randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN running statistics (as conftest's ``model``), so eval mode sees the mask."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.rand(mod.running_mean.shape, generator=g) * 0.4 - 0.2)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) * 1.5 + 0.5)
    return model


def _inputs(b: int, h: int, w: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random RGB in [0, 1] and a disc mask (soft edge) per image."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, h, w, generator=g)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    d = ((yy - h * 0.45) ** 2 + (xx - w * 0.55) ** 2).sqrt() - min(h, w) * 0.3
    coarse = (0.5 - d.float() / 4).clamp(0, 1)[None, None].expand(b, 1, h, w).contiguous()
    return image, coarse


def _non_sam(model: SamCRM) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if not n.startswith("sam_encoder.")}


# ------------------------------------------------------------------ training forward / backward


@pytest.mark.parametrize("injection", INJECTIONS)
def test_forward_backward_every_variant(injection: str) -> None:
    model = _build(injection).train()
    assert model.variant == VARIANT[injection]
    params = _non_sam(model)
    prefixes = {"encoder.", "fusion.", "decoder.", "token_proj."}
    if injection != "none":
        prefixes.add("injection.mask_encoder.")
    if injection in ("global", "window"):
        prefixes.add("injection.attention.")
    # the parameters are exactly the expected modules' (v3.1 has no injection weights)
    assert {p for p in prefixes if any(n.startswith(p) for n in params)} == prefixes
    assert all(any(n.startswith(p) for p in prefixes) for n in params), sorted(params)

    # odd, non-square: SAM's grid partly padded (6 x 8, 8 x 7 tokens), windows padded
    for b, size in ((2, (45, 61)), (1, (37, 29))):
        model.zero_grad(set_to_none=True)
        image, coarse = _inputs(b, *size)
        logits = model(image, coarse)["logits"]
        assert logits.shape == (b, 1, *size)
        assert torch.isfinite(logits).all()
        loss = F.binary_cross_entropy_with_logits(logits, (coarse > 0.5).float())
        loss.backward()
        for name, p in params.items():
            assert p.grad is not None, (size, name)
            assert torch.isfinite(p.grad).all(), (size, name)
            assert p.grad.abs().sum() > 0, (size, name)


def test_forward_rejects_extra_channels_and_encoding_without_guide() -> None:
    model = _build("window").eval()
    image, coarse = _inputs(1, 32, 32)
    with pytest.raises(ValueError, match="extra"):
        model(image, coarse, torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="guide"):
        model.encode_normalized(model.normalize_inputs(image, coarse))


def test_sam_is_frozen_and_stays_in_eval_mode() -> None:
    model = _build("window")
    sam = model.sam_encoder
    sam_params = list(sam.parameters())
    assert sam_params and all(not p.requires_grad for p in sam_params)

    model.train()
    assert model.training and model.encoder.training and model.injection.training
    assert not any(m.training for m in sam.modules())  # train() leaves SAM in eval mode
    model.eval()
    model.train(True)
    assert not any(m.training for m in sam.modules())

    # what the trainer hands to the optimizer: every parameter but SAM's
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in _non_sam(model).values()}
    assert trainable.isdisjoint(id(p) for p in sam_params)

    image, coarse = _inputs(2, 40, 36)
    model(image, coarse)["logits"].sum().backward()
    assert all(p.grad is None for p in sam_params)
    assert all(p.grad is not None for p in _non_sam(model).values())


# ------------------------------------------------------------------ the four variants


def test_variants_differ_with_shared_weights() -> None:
    models = {inj: _build(inj, seed=0).eval() for inj in INJECTIONS}
    _randomize_bn(models["window"])
    # v3.4 holds every weight name; the others take the ones they have (same names, same shapes)
    source = {k: v for k, v in models["window"].state_dict().items() if k != "_extra_state"}
    for inj in ("none", "add", "global"):
        result = models[inj].load_state_dict(source, strict=False)
        assert result.missing_keys == ["_extra_state"], (inj, result.missing_keys)
    for inj, model in models.items():
        state = model.state_dict()
        assert all(torch.equal(state[k], source[k]) for k in state if k != "_extra_state"), inj
    assert models["global"].state_dict().keys() == models["window"].state_dict().keys()

    image, coarse = _inputs(1, 48, 48)  # an 8 x 8 token grid: three 3 x 3 windows per axis
    with torch.no_grad():
        out = {inj: m(image, coarse)["logits"] for inj, m in models.items()}
    for a, b in itertools.combinations(INJECTIONS, 2):
        assert (out[a] - out[b]).abs().max() > 1e-4, (a, b)

    # a window covering the whole grid turns v3.4 back into v3.3 (same weights)
    wide = _build("window", window=8).eval()
    wide.load_state_dict(models["window"].state_dict())
    with torch.no_grad():
        torch.testing.assert_close(wide(image, coarse)["logits"], out["global"])


def test_only_injecting_variants_see_the_mask_in_sam_tokens() -> None:
    image, coarse = _inputs(1, 48, 40)
    other = torch.zeros_like(coarse)
    other[..., 5:20, 10:30] = 1.0
    for inj in INJECTIONS:
        model = _build(inj).eval()
        frame = Frame.identity(48, 40)
        with torch.no_grad():
            emb = model.embed_image(image)
            assert emb.shape[-2:] == valid_grid(48, 40, IMG_SIZE, 16)
            a = model.guide(emb, coarse * 2 - 1, frame).tokens
            b = model.guide(emb, other * 2 - 1, frame).tokens
        assert a.shape == (1, 8, *emb.shape[-2:])
        if inj == "none":
            assert torch.equal(a, b)
        else:
            assert (a - b).abs().max() > 1e-4, inj


# ------------------------------------------------------------------ windowed attention


def _attention_pair(dim: int, heads: int, window: int) -> tuple[MaskAttention, MaskAttention]:
    torch.manual_seed(3)
    full = MaskAttention(dim, heads, window=None)
    windowed = MaskAttention(dim, heads, window=window)
    windowed.load_state_dict(full.state_dict())  # same parameter names
    with torch.no_grad():  # non-trivial norms, so that nothing cancels by accident
        for p in full.parameters():
            p.add_(0.1 * torch.randn_like(p))
    windowed.load_state_dict(full.state_dict())
    return full, windowed


@pytest.mark.parametrize(
    ("grid", "window"),
    [((5, 7), 8), ((5, 7), 7), ((6, 6), 6), ((6, 6), 9), ((1, 4), 4)],
)
def test_window_covering_the_grid_equals_global(grid: tuple[int, int], window: int) -> None:
    full, windowed = _attention_pair(16, 4, window)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 16, *grid, generator=g)
    mask = torch.randn(2, 16, *grid, generator=g)
    ref = full(image, mask)
    out = windowed(image, mask)
    assert out.shape == image.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (ref - image).abs().max() > 1e-2  # the block does something


@pytest.mark.parametrize(("grid", "window"), [((6, 6), 3), ((5, 7), 3), ((8, 8), 5)])
def test_small_window_is_global_attention_inside_each_window(
    grid: tuple[int, int], window: int
) -> None:
    full, windowed = _attention_pair(16, 4, window)
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 16, *grid, generator=g)
    mask = torch.randn(2, 16, *grid, generator=g)
    out = windowed(image, mask)
    assert (out - full(image, mask)).abs().max() > 1e-3  # not the global block
    # each window (clipped to the grid) is the global block run on that window alone
    for y0 in range(0, grid[0], window):
        for x0 in range(0, grid[1], window):
            ys, xs = slice(y0, y0 + window), slice(x0, x0 + window)
            ref = full(image[..., ys, xs], mask[..., ys, xs])
            torch.testing.assert_close(out[..., ys, xs], ref, atol=1e-5, rtol=0)
    # batch elements are independent
    torch.testing.assert_close(windowed(image[1:], mask[1:]), out[1:], atol=1e-6, rtol=0)


def test_window_does_not_mix_information_across_windows() -> None:
    full, windowed = _attention_pair(16, 4, 3)
    g = torch.Generator().manual_seed(2)
    image = torch.randn(1, 16, 6, 7, generator=g)
    mask = torch.randn(1, 16, 6, 7, generator=g)
    inside = torch.zeros(1, 1, 6, 7, dtype=torch.bool)
    inside[..., 3:6, 3:6] = True  # the window at (1, 1)
    for perturb_image in (False, True):  # values come from the mask, queries/keys from the image
        img2, mask2 = image.clone(), mask.clone()
        target = img2 if perturb_image else mask2
        target[..., 4, 4] += 3.0 * torch.randn(16, generator=g)  # not a shift: LayerNorm'd
        delta = (windowed(img2, mask2) - windowed(image, mask)).abs().amax(1, keepdim=True)
        assert delta[inside].min() > 1e-4  # every token of the window sees the change
        assert torch.equal(delta[~inside], torch.zeros_like(delta[~inside]))
        # the global block mixes the change into every token
        delta_full = (full(img2, mask2) - full(image, mask)).abs().amax(1)
        assert delta_full.min() > 1e-6


def test_mask_attention_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="divisible"):
        MaskAttention(30, heads=4)
    with pytest.raises(ValueError, match="window"):
        MaskAttention(16, heads=4, window=0)
    with pytest.raises(ValueError, match="injection"):
        build_sam_crm(image_encoder(tiny=True, tiny_img_size=64), "cross")


# ------------------------------------------------------------------ checkpoints


def test_checkpoint_of_one_variant_refuses_another(tmp_path) -> None:
    v33 = _randomize_bn(_build("global", seed=0)).eval()
    v34 = _build("window", seed=1).eval()
    state = v33.state_dict()
    # (d) SAM's frozen weights are not saved; the variant is
    assert not any("sam_encoder." in k for k in state)
    assert not any("sam_encoder." in k for k in torch.nn.Sequential(v33).state_dict())
    assert state["_extra_state"] == {"variant": "v3.3", "sam_type": "tiny"}
    path = atomic_torch_save(
        {"format": "samsr", "model_name": "samsr_v3_3", "model": state}, tmp_path / "v33.pt"
    )
    saved = torch.load(path, map_location="cpu", weights_only=True)
    assert not any(k.startswith("sam_encoder.") for k in saved["model"])

    # (a) the config's model name does not match the checkpoint's
    with pytest.raises(CheckpointError, match="samsr_v3_3"):
        load_model_weights(v34, path, model_name="samsr_v3_4")

    # (b) identical parameter names, but the extra state names the variant
    before = {k: v.clone() for k, v in v34.state_dict().items() if k != "_extra_state"}
    with pytest.raises(ValueError, match=r"v3\.3.*v3\.4"):
        v34.load_state_dict(state)
    after = v34.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing half-loaded

    # ... and the SAM the tokens came from
    other_sam = _build("global", seed=2)
    other_sam.sam_type = "vit_b"
    with pytest.raises(ValueError, match="vit_b"):
        other_sam.load_state_dict(state)

    # (c) into another v3.3: loads, identical outputs
    fresh = _build("global", seed=5).eval()
    image, coarse = _inputs(1, 29, 39)
    with torch.no_grad():
        ref = v33(image, coarse)["logits"]
        assert (fresh(image, coarse)["logits"] - ref).abs().max() > 1e-4  # different before
        load_model_weights(fresh, path, model_name="samsr_v3_3")
        assert torch.equal(fresh(image, coarse)["logits"], ref)
    assert fresh.variant == "v3.3"

    # through the checkpoint loader without a model name: a CheckpointError, not a bare error
    with pytest.raises(CheckpointError, match=r"v3\.3.*v3\.4"):
        load_model_weights(v34, path)
    # training initialisation (model.init_weights) accepts another variant's weights
    load_model_weights(v34, path, model_name="samsr_v3_4", init=True)
    assert v34.variant == "v3.4"
    assert all(torch.equal(v34.state_dict()[k], v) for k, v in state.items() if k != "_extra_state")


# ------------------------------------------------------------------ geometry


def test_cascade_frame_maps_pixel_centres() -> None:
    assert Frame.cascade(150, 211, 0, (150, 211)) == Frame(150, 211, 1.0, 0.0, 1.0, 0.0)
    assert Frame.identity(150, 211) == Frame(150, 211, 1.0, 0.0, 1.0, 0.0)
    # pad 32, resized to (27, 35): input pixel i samples padded pixel i * (Hp - 1) / (h - 1)
    f = Frame.cascade(150, 211, 32, (27, 35))
    for i in (0, 13, 26):
        y = f.scale_y * (i + 0.5) + f.offset_y  # input pixel centre -> image coordinate
        assert y == pytest.approx(i * (214 - 1) / 26 + 0.5 - 32)
    assert f.scale_x * 0.5 + f.offset_x == pytest.approx(-31.5)  # first padded pixel's centre
    assert f.scale_x * 34.5 + f.offset_x == pytest.approx(211 + 31.5)  # last one's


def test_valid_grid_and_resized_size() -> None:
    assert resized_size(100, 50, 64) == (64, 32)
    assert valid_grid(100, 50, 64, 16) == (4, 2)
    assert valid_grid(50, 100, 64, 16) == (2, 4)
    assert resized_size(45, 61, 128) == (94, 128)
    assert valid_grid(45, 61, 128, 16) == (6, 8)  # 94 rows: a partly padded 6th token row
    assert resized_size(150, 211, 128) == (91, 128)  # 90.99: rounded, not truncated
    assert valid_grid(1024, 1024, 1024, 16) == (64, 64)
    for h, w in ((150, 211), (37, 29), (1500, 2001), (333, 1000)):  # SAM's own rule
        assert resized_size(h, w, 1024) == ResizeLongestSide.get_preprocess_shape(h, w, 1024)
    model = _build("none")
    image = torch.randint(0, 256, (1, 3, 100, 50), dtype=torch.uint8)
    with torch.no_grad():
        emb = model.embed_image(image)
        emb_float = model.embed_image(image.float() / 255)  # uint8 and [0, 1] floats agree
    assert emb.shape == (1, 32, 8, 4)  # img_size 128: resized (128, 64); padded tokens dropped
    torch.testing.assert_close(emb_float, emb, atol=1e-4, rtol=1e-4)


def _ramp(gh: int, gw: int) -> torch.Tensor:
    """1 x 2 x gh x gw tokens: channel 0 = the token's row index, channel 1 = its column."""
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.stack([ys, xs]).float()[None]


def test_sample_tokens_on_a_ramp() -> None:
    # 100 x 50 image, SAM side 64: resized 64 x 32, grid 4 x 2; a 100 x 50 input, 50 x 25 cells.
    # Cell i is centred at pixel coordinate 2i + 1; token coordinate t = y * 64/100 / 16 = 0.04y;
    # a ramp sampled bilinearly (token k centred at k + 0.5) reads t - 0.5, clamped to the grid.
    tokens = _ramp(4, 2)
    out = sample_tokens(tokens, Frame.identity(100, 50), 64, 16, (100, 50), (50, 25))
    assert out.shape == (1, 2, 50, 25)
    rows, cols = out[0, 0, :, 0], out[0, 1, 0, :]
    assert rows[24].item() == pytest.approx(1.46, abs=1e-5)  # y = 49: t = 1.96
    assert rows[40].item() == pytest.approx(2.74, abs=1e-5)  # y = 81: t = 3.24
    assert rows[0].item() == 0.0 and rows[49].item() == 3.0  # t = 0.04, 3.96: clamped
    assert cols[9].item() == pytest.approx(0.26, abs=1e-5)  # x = 19: t = 0.76
    assert cols[12].item() == pytest.approx(0.5, abs=1e-5)  # x = 25: t = 1.0
    assert cols[20].item() == 1.0  # x = 41: t = 1.64, clamped
    # a window of the map samples the same values
    win = sample_tokens(tokens, Frame.identity(100, 50), 64, 16, (100, 50), (50, 25), (7, 3, 9, 4))
    torch.testing.assert_close(win, out[..., 7:16, 3:7], atol=1e-6, rtol=0)

    # non-square, partly padded token row: 45 x 61 image, SAM side 128 -> 94 x 128, grid 6 x 8
    gh, gw = valid_grid(45, 61, 128, 16)
    out = sample_tokens(_ramp(gh, gw), Frame.identity(45, 61), 128, 16, (45, 61), (23, 31))
    t_y = 10.5 * (45 / 23) * (94 / 45) / 16  # cell 10's centre in token units
    t_x = 17.5 * (61 / 31) * (128 / 61) / 16
    assert out[0, 0, 10, 0].item() == pytest.approx(t_y - 0.5, abs=1e-5)
    assert out[0, 1, 0, 17].item() == pytest.approx(t_x - 0.5, abs=1e-5)


def test_sample_tokens_keeps_fp32_positions_for_bf16_tokens() -> None:
    # A 3600 x 5000 image at full scale: one row of 2,500 cells over a 64-token row. bf16 grid
    # positions would collapse them onto a few hundred columns; positions must stay fp32, so bf16
    # tokens (exactly representable values) sample what fp32 tokens sample, rounded once.
    gh, gw = valid_grid(3600, 5000, 1024, 16)
    tokens = _ramp(gh, gw) / 4  # multiples of 1/4 below 64: exact in bf16
    args = (Frame.identity(3600, 5000), 1024, 16, (3600, 5000), (1800, 2500), (900, 0, 1, 2500))
    ref = sample_tokens(tokens, *args)
    assert torch.unique(ref[0, 1]).numel() > 2000
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sample_tokens(tokens.bfloat16(), *args)
    torch.testing.assert_close(out.float(), ref.bfloat16().float(), atol=0, rtol=0)
    assert out.dtype == torch.bfloat16


def test_sample_tokens_through_a_padded_cascade_frame() -> None:
    # 100 x 50 image, SAM side 256: resized 256 x 128, grid 16 x 8; t = 0.16 * y
    tokens = _ramp(16, 8)
    ident = sample_tokens(tokens, Frame.identity(100, 50), 256, 16, (100, 50), (50, 25))
    # the 32-px reflect-padded image at full size: cell 16 + j is centred where identity cell j is
    frame = Frame.cascade(100, 50, 32, (164, 114))
    out = sample_tokens(tokens, frame, 256, 16, (164, 114), (82, 57))
    torch.testing.assert_close(out[..., 16:66, 16:41], ident, atol=1e-5, rtol=0)
    # outside the image, positions reflect back into it (like the cascade's reflect padding):
    # cell 14 is at y = -3 (pixel centre -3.5 -> 3.5, y = 4), cell 67 at y = 103 (-> 96);
    # without the reflection both would read the clamped border (0 and 15)
    assert out[0, 0, 14, 0].item() == pytest.approx(0.16 * 4 - 0.5, abs=1e-5)
    assert out[0, 0, 67, 0].item() == pytest.approx(0.16 * 96 - 0.5, abs=1e-5)
    # pad 0 at the image's own size is the identity frame
    same = sample_tokens(tokens, Frame.cascade(100, 50, 0, (100, 50)), 256, 16, (100, 50), (50, 25))
    torch.testing.assert_close(same, ident, atol=1e-6, rtol=0)


def test_mask_to_token_frame_shape_and_padding() -> None:
    # 100 x 30 image, SAM side 64: resized 64 x 19 -> mask 16 x round(4.75) = 5 cells;
    # the 4 x 2 token grid wants 16 x 8 cells: 3 padded columns, background (-1)
    out = mask_to_token_frame(torch.ones(1, 1, 100, 30), valid_grid(100, 30, 64, 16), 64, 16)
    assert out.shape == (1, 1, 16, 8)
    torch.testing.assert_close(out[..., :5], torch.ones(1, 1, 16, 5))
    assert torch.equal(out[..., 5:], torch.full((1, 1, 16, 3), -1.0))
    # exactly covered grid: nothing padded; the mask is resized (its pattern kept)
    mask = torch.full((2, 1, 100, 50), -1.0)
    mask[:, :, :50] = 1.0  # top half foreground
    out = mask_to_token_frame(mask, valid_grid(100, 50, 64, 16), 64, 16)
    assert out.shape == (2, 1, 16, 8)
    torch.testing.assert_close(out[:, :, :7], torch.ones(2, 1, 7, 8))
    torch.testing.assert_close(out[:, :, 9:], torch.full((2, 1, 7, 8), -1.0))


# ------------------------------------------------------------------ cascade


@pytest.fixture(scope="module")
def v34() -> SamCRM:
    return _randomize_bn(_build("window")).eval()


def _count_sam_calls(model: SamCRM) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    return calls, model.sam_encoder.register_forward_hook(hook)


def _uint8_inputs(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    image, coarse = _inputs(1, h, w, seed=4)
    return (image * 255).to(torch.uint8), ((coarse > 0.5) * 255).to(torch.uint8)


def test_cascade_runs_sam_once_per_image_and_tiles_match(v34: SamCRM) -> None:
    image, coarse = _uint8_inputs(150, 211)
    h, w, pad = 150, 211, 16
    scales = (0.25, 0.5, 1.0)
    opts = {"scales": scales, "pad": pad, "chunk_size": 16384, "decoder_factorized": True}
    calls, handle = _count_sam_calls(v34)
    guides: list[tuple[torch.Tensor, Frame]] = []
    guide = v34.guide

    def recording_guide(embedding: torch.Tensor, mask: torch.Tensor, frame: Frame):
        guides.append((mask.clone(), frame))
        return guide(embedding, mask, frame)

    v34.guide = recording_guide  # instance attribute: shadows the method
    try:
        timings: dict[str, float] = {}
        out = refine(v34, image, coarse, CascadeConfig(**opts), timings=timings, profile=True)
        assert calls[0] == 1  # SAM once, before the three scales
        assert timings["sam"] > 0 and timings["encode"] > 0
        assert out.shape == (1, 1, h, w)
        assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
        assert out.std() > 1e-3  # not a constant

        # every scale re-injects its own input mask (unpadded) in its own frame
        assert len(guides) == 3
        hp, wp = h + 2 * pad, w + 2 * pad
        for (_, frame), s in zip(guides, scales):
            size = (max(1, round(hp * s)), max(1, round(wp * s)))
            assert frame == Frame.cascade(h, w, pad, size)
        assert torch.equal(guides[0][0], (coarse.float() / 255 - 0.5) / 0.5)
        first = refine(v34, image, coarse, CascadeConfig(**{**opts, "scales": scales[:1]}))
        assert calls[0] == 2
        torch.testing.assert_close(guides[1][0], (first - 0.5) * 2, atol=1e-6, rtol=0)
        guides.clear()

        tiled_timings: dict[str, float] = {}
        tiled_cfg = CascadeConfig(**opts, tile=64, tile_halo=64)
        tiled = refine(v34, image, coarse, tiled_cfg, timings=tiled_timings)
        assert calls[0] == 3  # once for the tiled run, not once per tile or scale
        assert len(guides) == 3  # one guide per scale, shared by its tiles
        assert tiled_timings["tiles"] > 2 * len(scales)  # several tiles per scale
        torch.testing.assert_close(tiled, out, atol=1e-5, rtol=0)

        empty_timings: dict[str, float] = {}
        empty = refine(
            v34, image, torch.zeros_like(coarse), CascadeConfig(**opts), timings=empty_timings
        )
        assert calls[0] == 3  # an empty mask never runs SAM
        assert "sam" not in empty_timings
        assert empty.shape == (1, 1, h, w) and not empty.any()
    finally:
        handle.remove()
        del v34.guide


def test_single_scale_cascade_matches_training_forward(v34: SamCRM) -> None:
    """Pad 0 at scale 1: the cascade's frame is the identity and the SAM embedding is the one the
    training forward computes, so both give the same probabilities."""
    image, coarse = _inputs(1, 53, 67, seed=6)
    out = refine(v34, image, coarse, CascadeConfig(scales=(1.0,), pad=0))
    with torch.no_grad():
        ref = torch.sigmoid(v34(image, coarse)["logits"])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("patch", [1, 3, 10])
def test_patched_fuser_equals_whole_map(patch: int) -> None:
    model = _randomize_bn(_build("window")).eval()
    image, coarse = _inputs(1, 45, 61)
    with torch.no_grad():
        x = model.normalize_inputs(image, coarse)
        guide = model.guide(model.embed_image(image), x[:, 3:4], Frame.identity(45, 61))
        whole = model.encode_normalized(x, guide=guide)
        patched = model.encode_normalized(x, fusion_patch=patch, guide=guide)
        torch.testing.assert_close(patched, whole, atol=1e-5, rtol=0)
        # a window of the input, patched, equals the same rows/cols of the whole map (interior)
        win, (fy, fx) = model.encode_window(
            x[..., 8:40, 16:56], (8, 16), (45, 61), fusion_patch=patch, guide=guide
        )
        assert (fy, fx) == (4, 8)
        ref, _ = model.encode_window(x[..., 8:40, 16:56], (8, 16), (45, 61), guide=guide)
        torch.testing.assert_close(win, ref, atol=1e-5, rtol=0)
    # the cascade with patched fusion (tiled or not) gives the reference output
    img8 = (image * 255).to(torch.uint8)
    base = refine(model, img8, coarse, CascadeConfig(scales=(0.5, 1.0)))
    for cfg in (
        CascadeConfig(scales=(0.5, 1.0), fusion_patch=patch),
        CascadeConfig(scales=(0.5, 1.0), fusion_patch=patch, tile=32, tile_halo=32),
    ):
        torch.testing.assert_close(refine(model, img8, coarse, cfg), base, atol=1e-5, rtol=0)


def test_batched_windows_equal_one_window_at_a_time() -> None:
    """SAM-SR v3 batches its local CNN over tiles of one image and fuses each with the image's
    tokens at its own cells: the same features as one window at a time, and the same cascade."""
    model = _randomize_bn(_build("window")).eval()
    image, coarse = _inputs(1, 45, 61)
    offsets = [(0, 0), (8, 16), (12, 24)]
    with torch.no_grad():
        x = model.normalize_inputs(image, coarse)
        guide = model.guide(model.embed_image(image), x[:, 3:4], Frame.identity(45, 61))
        batch = torch.cat([x[..., y : y + 32, c : c + 36] for y, c in offsets])
        together = model.encode_windows(batch, offsets, (45, 61), guide=guide)
        for (y, c), (feat, origin) in zip(offsets, together):
            ref, ref_origin = model.encode_window(
                x[..., y : y + 32, c : c + 36], (y, c), (45, 61), guide=guide
            )
            assert origin == ref_origin
            torch.testing.assert_close(feat, ref, atol=1e-5, rtol=0)
    img8 = (image * 255).to(torch.uint8)
    cfg = {"scales": (0.5, 1.0), "tile": 32, "tile_halo": 16}
    one = refine(model, img8, coarse, CascadeConfig(**cfg))
    torch.testing.assert_close(
        refine(model, img8, coarse, CascadeConfig(tile_batch=4, **cfg)), one, atol=1e-5, rtol=0
    )
