"""Tests for samsr.device: resolution, synchronisation, peak memory, autocast, description."""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import pytest
import torch

from samsr import device as devices

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_resolve_device_cpu_and_auto():
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert devices.resolve_device(" CPU ") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert devices.resolve_device().type == expected
    assert devices.resolve_device("auto").type == expected


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "", "tpu:0"])
def test_resolve_device_rejects_bad_names(name):
    with pytest.raises(ValueError, match="device"):
        devices.resolve_device(name)


def test_resolve_device_rejects_non_string():
    with pytest.raises(ValueError, match="device name"):
        devices.resolve_device(3)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_resolve_device_rejects_unavailable_cuda():
    with pytest.raises(ValueError, match="CUDA is not available"):
        devices.resolve_device("cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        devices.resolve_device("cuda:1")


def test_synchronize_is_a_noop_on_cpu():
    assert devices.synchronize("cpu") is None
    assert devices.synchronize(torch.device("cpu")) is None


def test_autocast_none_and_float32_are_noops():
    for dtype in (None, "float32", "fp32", torch.float32):
        ctx = devices.autocast("cpu", dtype)
        assert isinstance(ctx, contextlib.nullcontext)
        with ctx:
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_autocast_bfloat16_on_cpu():
    with devices.autocast(torch.device("cpu"), "bfloat16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert devices.parse_dtype("fp16") == torch.float16
    assert devices.parse_dtype("torch.bfloat16") == torch.bfloat16


@pytest.mark.parametrize("dtype", ["int8", "float64", torch.int32])
def test_autocast_rejects_bad_dtype(dtype):
    with pytest.raises(ValueError, match="dtype"):
        devices.autocast("cpu", dtype)


def test_cpu_peak_memory_rises_after_big_allocation():
    size = 256 * 2**20
    reset = devices.reset_peak_memory("cpu")
    before = devices.peak_memory_bytes("cpu")
    assert before > 0
    buf = np.ones(size, dtype=np.uint8)  # touched, so resident
    after = devices.peak_memory_bytes("cpu")
    assert after >= before + size * 0.9
    del buf
    if reset:  # Linux: the counter can be reset, so the old peak is forgotten
        assert devices.peak_memory_kind("cpu") == "rss_peak"
        assert devices.reset_peak_memory("cpu")
        assert devices.peak_memory_bytes("cpu") < after - size * 0.5
    elif sys.platform.startswith("linux"):
        pytest.fail("/proc/self/clear_refs should be writable on Linux")


def test_describe_cpu():
    text = devices.describe("cpu")
    assert text.startswith("cpu (") and "threads" in text


@cuda_only
@pytest.mark.gpu
def test_cuda_device_peak_memory_and_autocast():
    device = devices.resolve_device("cuda")
    assert device.index is not None
    assert devices.resolve_device("auto") == device
    devices.synchronize(device)
    devices.reset_peak_memory(device)
    base = devices.peak_memory_bytes(device)
    x = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
    devices.synchronize(device)
    assert devices.peak_memory_bytes(device) >= base + 64 * 2**20
    del x
    assert devices.reset_peak_memory(device)
    assert devices.peak_memory_kind(device) == "cuda_max_allocated"
    with devices.autocast(device, "float16"):
        y = torch.ones(8, 8, device=device) @ torch.ones(8, 8, device=device)
    assert y.dtype == torch.float16
    assert "cuda:" in devices.describe(device)
    with pytest.raises(ValueError, match="CUDA device"):
        devices.resolve_device(f"cuda:{torch.cuda.device_count()}")


def _flags() -> tuple[bool, bool, bool]:
    b = torch.backends
    return b.cudnn.benchmark, b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32


def test_backend_flags_set_and_restore():
    before = _flags()
    with devices.backend_flags(cudnn_benchmark=True, tf32=False) as facts:
        assert _flags() == (True, False, False)
        assert facts == {"cudnn_benchmark": True, "tf32": False}
        with devices.backend_flags(cudnn_benchmark=False, tf32=True):
            assert _flags() == (False, True, True)
        assert _flags() == (True, False, False)
    assert _flags() == before


def test_refiner_runs_under_its_presets_flags(model, monkeypatch):
    # faithful: no autotuning, no TF32 (the reference's fp32); fast allows TF32
    from samsr.inference import CascadeConfig, Refiner, refiner

    seen = []
    real = refiner.refine

    def spy(*args, **kwargs):
        seen.append(_flags())
        return real(*args, **kwargs)

    monkeypatch.setattr(refiner, "refine", spy)
    image = np.zeros((40, 48, 3), np.uint8)
    coarse = np.zeros((40, 48), np.uint8)
    coarse[10:30, 10:30] = 255
    outside = _flags()
    Refiner(model, cascade=CascadeConfig(scales=(1.0,)))(image, coarse)
    Refiner(model, cascade=CascadeConfig.recommended())(image, coarse)
    assert seen == [(False, False, False), (False, True, True)]
    assert _flags() == outside
