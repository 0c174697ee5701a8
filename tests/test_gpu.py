"""The GPU tier: training, every inference preset, peak memory and SAM on the device under test.

Run on a CUDA machine with ``python -m pytest -m gpu -q`` (``scripts/gpu_check.sh`` does that and
a short benchmark); ``SAMSR_TEST_DEVICE=cpu python -m pytest -m gpu -q`` runs the same code on the
CPU (see the ``device_under_test`` fixture in conftest.py). Everything is tiny and random: no
network, data or weights. Each device result is compared with the same computation on the CPU.

Tolerances (device vs CPU) were calibrated on the CPU by emulating CUDA's defaults, which are
what evaluation runs with: cuDNN convolutions in TF32 (PyTorch's default ``cudnn.allow_tf32=True``;
matmuls stay float32), emulated by rounding every convolution's input and weight to TF32's 10-bit
mantissa (for SAM also every linear layer's, a harsher proxy); bf16 differences between two
devices were bounded by bf16 vs fp32 on one device. Each test states its numbers.
"""

from __future__ import annotations

import copy
import gc
import math

import cv2
import numpy as np
import pytest
import torch
from conftest import SAM_TINY, TINY_SYNTHETIC, compose_config, tiny_overrides
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from samsr.device import peak_memory_bytes, reset_peak_memory, synchronize
from samsr.engine.builders import (
    build_loss,
    build_model,
    build_refiner,
    build_train_dataset,
    build_train_guidance,
    prepare_data,
)
from samsr.engine.configs import CONFIG_DIR
from samsr.engine.data_stream import StreamSampler
from samsr.engine.trainer import Trainer, TrainSettings
from samsr.guidance import AmgConfig, SamRunner, build_tiny_sam, decode_mask
from samsr.guidance.prompts import PromptConfig, sam_prompt_maps
from samsr.inference import CascadeConfig, Refiner

pytestmark = pytest.mark.gpu

CONFIGS = CONFIG_DIR
MODEL_CONFIGS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))
INFERENCE_PRESETS = sorted(p.stem for p in (CONFIGS / "inference").glob("*.yaml"))
CPU = torch.device("cpu")


# ------------------------------------------------------------------ training


def _make_train_caches(cfg, device: torch.device) -> None:
    """SAM-SR v2.1 trains on precomputed SAM maps: make them with the tiny SAM (on the device)."""
    from samsr.engine.builders import make_train_caches

    roots = [str(r) for r in cfg.data.train.roots]
    assert not any(s.failed for _, s in make_train_caches(cfg.model, roots, device))


# bf16 and fp16 autocast on every device. On CUDA, fp16 goes through the trainer's GradScaler
# (a step whose gradients overflow is skipped, so at least one of the three must go through).
# The trainer enables its scaler on CUDA only, so CPU fp16 steps are unscaled; CPU fp16 autocast
# works (torch >= 2.4) and costs a few seconds for these tiny models, so both dtypes run on both.
@pytest.mark.parametrize("amp", ["bfloat16", "float16"])
@pytest.mark.parametrize("model", MODEL_CONFIGS)
def test_three_training_steps_on_device(device_under_test, tmp_path, model, amp):
    device = device_under_test

    def compose(extra: list[str]):
        return compose_config(
            "train", tiny_overrides("train", extra) + TINY_SYNTHETIC + extra, tmp_path
        )

    extra = [f"model={model}", f"trainer.amp_dtype={amp}"]
    cfg = compose(extra)
    if cfg.model.get("sam", {}).get("amg"):  # v1/v2 run AMG; v3's SAM is tiny through TINY_V3
        cfg = compose(extra + SAM_TINY)
    prepare_data(cfg.data)
    if cfg.model.train_inputs:
        _make_train_caches(cfg, device)
    dataset = build_train_dataset(cfg.data, cfg.model)
    torch.manual_seed(0)
    net = build_model(cfg.model)
    trainable = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    settings = TrainSettings(**OmegaConf.to_container(cfg.trainer, resolve=True))
    trainer = Trainer(
        model=net,
        loss_fn=build_loss(cfg.model),
        optimizer_factory=instantiate(cfg.optim.optimizer),
        scheduler_factory=instantiate(cfg.optim.scheduler),
        dataset=dataset,
        settings=settings,
        run_dir=tmp_path / "run",
        device=device,
        model_name=str(cfg.model.name),
        guidance=build_train_guidance(cfg.model, device),  # SAM-SR v2.2: SAM on the device
    )
    scaler_on = trainer.scaler.is_enabled()
    assert scaler_on == (device.type == "cuda" and amp == "float16")
    scale0 = trainer.scaler.get_scale() if scaler_on else 1.0

    # three steps of the trainer's own sample stream (batch 2 of 48 px crops)
    loader = DataLoader(trainer.stream, batch_size=settings.batch_size, sampler=StreamSampler(0, 6))
    losses = [{k: float(v) for k, v in trainer.train_step(batch).items()} for batch in loader]
    synchronize(device)

    assert len(losses) == 3
    for step, terms in enumerate(losses):
        assert terms and all(math.isfinite(v) for v in terms.values()), (step, terms)
    if scaler_on:  # each skipped step halved the scale (it grows only after 2000 good ones)
        skipped = round(math.log2(scale0 / trainer.scaler.get_scale()))
        assert skipped < 3, f"every fp16 step overflowed (scale {scale0}, {skipped} halvings)"
    after = dict(net.named_parameters())
    assert all(p.device.type == device.type for p in after.values())
    assert all(bool(torch.isfinite(after[n]).all()) for n in trainable)
    changed = [n for n, p in trainable.items() if not torch.equal(after[n].detach().cpu(), p)]
    # Adam moves every parameter that received a gradient; allow a few that get none
    assert len(changed) >= 0.9 * len(trainable), sorted(set(trainable) - set(changed))
    for n, p in frozen.items():  # v3: SAM's encoder is frozen
        assert torch.equal(after[n].detach().cpu(), p), n


def test_training_steps_do_not_synchronise_the_device(device_under_test, tmp_path):
    # The loss terms stay on the device between log steps (Trainer.train_step returns tensors):
    # with CUDA's sync debug mode on, bf16 steps after the first raise no synchronisation warning.
    import warnings

    if device_under_test.type != "cuda":
        pytest.skip("CUDA's sync debug mode needs a CUDA device")
    extra = ["trainer.amp_dtype=bfloat16"]
    cfg = compose_config("train", tiny_overrides("train", extra) + TINY_SYNTHETIC + extra, tmp_path)
    prepare_data(cfg.data)
    trainer = Trainer(
        model=build_model(cfg.model),
        loss_fn=build_loss(cfg.model),
        optimizer_factory=instantiate(cfg.optim.optimizer),
        scheduler_factory=instantiate(cfg.optim.scheduler),
        dataset=build_train_dataset(cfg.data, cfg.model),
        settings=TrainSettings(**OmegaConf.to_container(cfg.trainer, resolve=True)),
        run_dir=tmp_path / "run",
        device=device_under_test,
    )
    loader = DataLoader(trainer.stream, batch_size=2, sampler=StreamSampler(0, 6), pin_memory=True)
    batches = list(loader)  # pinned, as the trainer's own loader on CUDA
    trainer.train_step(batches[0])  # warm-up: lazy init, cuDNN autotuning
    synchronize(device_under_test)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for batch in batches[1:]:
                trainer.train_step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device_under_test)
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert not syncs, syncs[:3]


# ------------------------------------------------------------------ inference presets


def _scene(h: int = 200, w: int = 300) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H x W x 3 uint8 image, H x W uint8 coarse mask, H x W bool object): a disc with a thin
    bar on noise; the coarse mask is the object at 1/8 resolution, upsampled and thresholded."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    obj = ((yy - h * 0.45) ** 2 + (xx - w * 0.55) ** 2) < (min(h, w) * 0.3) ** 2
    obj |= (np.abs(yy - h * 0.7) < h * 0.03) & (xx > w * 0.13) & (xx < w * 0.67)
    image[obj] = (image[obj] * 0.4 + 140).astype(np.uint8)
    small = cv2.resize(obj.astype(np.uint8) * 255, (w // 8, h // 8), interpolation=cv2.INTER_AREA)
    coarse = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return image, ((coarse > 127) * 255).astype(np.uint8), obj


def _tensors(image: np.ndarray, coarse: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    image_t = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    return image_t, torch.from_numpy(coarse)[None, None].float() / 255


@pytest.fixture(scope="module")
def probed_crm(model):
    """conftest's random ResNet-18 CRM with its last decoder layer fitted (ridge regression on the
    penultimate features) to the object of :func:`_scene`: masks that follow the object with sharp
    edges, like a trained CRM's, instead of a random net's near-constant ~0.5 (for which any
    binarised agreement would be vacuous)."""
    crm = copy.deepcopy(model).cpu().eval()
    image, coarse, obj = _scene()
    feats: list[torch.Tensor] = []
    last = crm.decoder.mlp[-1]
    width = last.in_features
    hook = last.register_forward_hook(lambda mod, inp, out: feats.append(inp[0].reshape(-1, width)))
    with torch.inference_mode():
        crm(*_tensors(image, coarse))
    hook.remove()
    assert len(feats) == 4 and all(len(f) == obj.size for f in feats)  # 4 shifts, one chunk
    x = torch.cat(feats).double()
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    y = (torch.from_numpy(obj.reshape(-1)).double() * 12 - 6).repeat(4)  # logits of +-6
    gram = x.T @ x
    ridge = 1e-2 * torch.diagonal(gram)[:-1].mean() * torch.eye(len(gram), dtype=x.dtype)
    ridge[-1, -1] = 0  # no penalty on the bias
    sol = torch.linalg.solve(gram + ridge, x.T @ y)
    with torch.no_grad():
        last.weight.copy_(sol[:-1][None].float())
        last.bias.copy_(sol[-1:].float())
    return crm


# Tolerances, device vs CPU, on the 300 x 200 scene (the probed CRM refines it to ~73 IoU):
#   fp32 presets: mean |dp| <= 0.01 and binarised (> 0.5) agreement >= 99.5 %. Emulated TF32
#     convolutions gave mean 0.0002-0.0004 and 99.965-99.998 % agreement on every case below
#     (~20x margin on both); the cascade feeds each scale's mask to the next, so noise grows
#     with the number of scales.
#   bf16 preset: mean |dp| <= 0.05 and agreement >= 97 %: two bf16 runs whose weights differ by
#     TF32 rounding gave 0.006 and 99.58 %, bf16 vs fp32 on one device 0.0095 and 99.3 %.
#   No bound on the largest difference: strided decoding interpolates a grid cell or decodes it
#     depending on whether its corners agree, so one flipped corner changes a cell by up to
#     ~0.15 (measured 0.13 for fast and strided4 under emulated TF32).
# Tiling is on in tiled/fast but 1024 px tiles do not cut a 300 x 200 image: "tiled-128" adds
# a case that does (9 tiles at full scale), with a small halo to keep the CPU reference cheap;
# "fast_batched-128" cuts it so that equal tiles share encoder calls.
PRESET_CASES = [(p, []) for p in INFERENCE_PRESETS] + [
    ("tiled", ["inference.tile=128", "inference.tile_halo=32"]),
    ("fast_batched", ["inference.tile=128"]),  # several equal tiles per encoder call
]


@pytest.mark.parametrize(
    ("preset", "overrides"),
    PRESET_CASES,
    ids=[p if not o else f"{p}-128" for p, o in PRESET_CASES],
)
def test_inference_preset_on_device_matches_cpu(
    device_under_test, probed_crm, tmp_path, preset, overrides
):
    cfg = compose_config("eval", [f"inference={preset}", *overrides], tmp_path)
    image, coarse, obj = _scene()
    image_t, coarse_t = _tensors(image, coarse)
    probs = {}
    for name, device in (("device", device_under_test), ("cpu", CPU)):
        refiner = build_refiner(copy.deepcopy(probed_crm), cfg.inference, device)
        prob = refiner.refine_tensor(image_t, coarse_t)
        assert prob.device.type == device.type and prob.dtype == torch.float32
        probs[name] = prob[0, 0].cpu()
    dev, ref = probs["device"], probs["cpu"]
    assert dev.shape == obj.shape and bool(torch.isfinite(dev).all())
    assert float(dev.min()) >= 0.0 and float(dev.max()) <= 1.0
    iou = _iou(ref.numpy() > 0.5, obj)
    assert iou > 0.5, f"the probed CRM should follow the object (IoU {iou:.2f})"
    # bf16 autocast of the network, or of the encoder (encoder_dtype; auto is bf16 on CUDA)
    bf16 = cfg.inference.get("amp_dtype") is not None or (
        cfg.inference.get("encoder_dtype") is not None and device_under_test.type == "cuda"
    )
    mean_tol, agree_tol = (0.05, 0.97) if bf16 else (0.01, 0.995)
    mean_diff = float((dev - ref).abs().mean())
    agree = float(((dev > 0.5) == (ref > 0.5)).float().mean())
    msg = f"{preset}: mean |dp| {mean_diff:.5f}, agreement {100 * agree:.3f} %"
    assert mean_diff <= mean_tol and agree >= agree_tol, msg


# ------------------------------------------------------------------ peak memory


def test_peak_memory_is_measured_and_reset(device_under_test, model):
    """``samsr.device`` peak memory: CUDA ``max_memory_allocated``, CPU peak RSS (VmHWM)."""
    device = device_under_test
    refiner = Refiner(copy.deepcopy(model), device=device, cascade=CascadeConfig())

    def peak(h: int, w: int) -> tuple[bool, int]:
        image, coarse, _ = _scene(h, w)
        gc.collect()
        synchronize(device)
        was_reset = reset_peak_memory(device)
        refiner(image, coarse)
        synchronize(device)
        return was_reset, peak_memory_bytes(device)

    # 600 x 400 (664 x 464 padded): a 262144-query decoder chunk at full scale gathers 262144 x
    # 256 fp32 features (256 MiB) and their 262-channel MLP input (262 MiB); 120 x 80 decodes a
    # tenth as many queries
    reset_big, big = peak(400, 600)
    reset_small, small = peak(80, 120)
    assert big > 0 and small > 0
    weights = sum(p.numel() * p.element_size() for p in refiner.model.parameters())
    assert big > weights + 128 * 2**20, (big, weights)  # the big call's activations are counted
    if reset_big and reset_small:
        # the counter was reset: the small call's peak does not include the big one's
        assert small < big - 64 * 2**20, (small, big)
    else:  # a lifetime peak (CPU without /proc/self/clear_refs) can only grow
        assert small >= big


# ------------------------------------------------------------------ SAM


def _sam_image() -> np.ndarray:
    """96 x 128 x 3 uint8 RGB: a bright disc and a green block on dark noise."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 80, size=(96, 128, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:96, :128]
    image[(yy - 40) ** 2 + (xx - 70) ** 2 < 25**2] = 230
    image[(yy > 60) & (xx < 40)] = (30, 200, 90)
    return image


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _matched(masks: list[np.ndarray], others: list[np.ndarray], min_iou: float) -> float:
    """Fraction of ``masks`` with a mask in ``others`` of IoU >= ``min_iou``."""
    if not masks:
        return 1.0
    return sum(any(_iou(m, o) >= min_iou for o in others) for m in masks) / len(masks)


# AMG on the device vs the CPU, with the tiny random SAM. Its masks are many near-duplicates, so
# which one survives NMS, and their order, can change with rounding; what is robust: the image
# embedding within 1 % of its largest value (emulated TF32: 0.06-0.07 %), the number of masks
# within max(1, 5 %) (emulated: equal), and >= 95 % of each side's masks having a partner of
# IoU >= 0.9 on the other (emulated: every mask, best partner IoU >= 0.994). box_nms_thresh=1.0
# keeps every mask (3 per point, 192), so that many masks are compared; 0.7 is SAM's default
# pipeline (one mask survives for this random SAM).
@pytest.mark.parametrize("nms", [0.7, 1.0])
def test_sam_amg_on_device_matches_cpu(device_under_test, nms):
    image = _sam_image()
    amg = AmgConfig(
        points_per_side=8,
        points_per_batch=64,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        box_nms_thresh=nms,
    )
    results = {}
    for name, device in (("device", device_under_test), ("cpu", CPU)):
        runner = SamRunner(build_tiny_sam(seed=0).to(device))
        runner.set_image(image)
        anns = runner.generate(amg)
        assert runner.embedding.device.type == device.type
        results[name] = (runner.embedding.cpu(), [decode_mask(a) for a in anns], anns)
    (emb_d, masks_d, anns_d), (emb_c, masks_c, _) = results["device"], results["cpu"]
    assert float((emb_d - emb_c).abs().max()) <= 0.01 * float(emb_c.abs().max())
    assert masks_c, "the permissive tiny SAM should give masks"
    assert abs(len(masks_d) - len(masks_c)) <= max(1, round(0.05 * len(masks_c)))
    if nms == 1.0:
        assert len(masks_c) == 3 * 8 * 8  # nothing filtered
    assert all(m.shape == image.shape[:2] for m in masks_d)
    assert all(math.isfinite(a["predicted_iou"]) for a in anns_d)
    assert _matched(masks_c, masks_d, 0.9) >= 0.95
    assert _matched(masks_d, masks_c, 0.9) >= 0.95


# Point prompts (SAM-SR v2.2) on the device vs the CPU: with max_side the low-res logits are
# upsampled on the device. Emulated TF32 changed the predicted IoU by <= 1.5e-4, at most one
# pixel of the ~150 px masks (IoU >= 0.99), and the prompt maps by > 8 levels on <= 0.05 % of
# their pixels (by up to 58 levels where one prompt's mask gained or lost a pixel).
def test_sam_point_prompts_on_device_match_cpu(device_under_test):
    image = _sam_image()
    yy, xx = np.mgrid[:96, :128]
    coarse = (((yy - 40) ** 2 + (xx - 70) ** 2 < 25**2) * 255).astype(np.uint8)
    prompts = PromptConfig(spacing=8, max_points=24, points_per_set=3)
    points = np.array([[70.0, 40.0], [10.0, 80.0]])
    results = {}
    for name, device in (("device", device_under_test), ("cpu", CPU)):
        sam = build_tiny_sam(seed=0).to(device)
        out = []
        for max_side in (None, 64):
            runner = SamRunner(sam)
            runner.set_image(image, max_side=max_side)
            mask, iou = runner.predict_points(points, np.array([1, 0]))
            maps, n = sam_prompt_maps(runner.predict_points, coarse, prompts, seed=0)
            out.append((mask, iou, maps, n))
        results[name] = out
    for (mask_d, iou_d, maps_d, n_d), (mask_c, iou_c, maps_c, n_c) in zip(
        results["device"], results["cpu"]
    ):
        assert mask_d.shape == mask_c.shape == image.shape[:2] and mask_d.dtype == bool
        assert (mask_d == mask_c).mean() >= 0.99
        assert _iou(mask_d, mask_c) >= 0.9
        assert abs(iou_d - iou_c) <= 0.01
        assert n_d == n_c and n_c > 0  # same prompts: they depend on the coarse mask only
        assert maps_d.shape == maps_c.shape == (*image.shape[:2], 2)
        diff = np.abs(maps_d.astype(np.int16) - maps_c.astype(np.int16))
        assert (diff > 8).mean() <= 0.01, f"{(diff > 8).mean():.4f} of map pixels differ"
