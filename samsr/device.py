"""The one device abstraction: resolution, synchronisation, peak memory, autocast, description.

Everything that depends on the device kind (CUDA vs CPU) lives here so that timing and memory are
measured the same way everywhere (SPEC section 2, "Efficiency"):

* CUDA: ``torch.cuda.synchronize``; peak memory is ``torch.cuda.max_memory_allocated`` after
  ``torch.cuda.reset_peak_memory_stats`` (tensor allocations only, not the caching allocator's
  reserve nor the CUDA context).
* CPU (and any other device kind): no synchronisation is needed; peak memory is the *process* peak
  resident set size. On Linux the peak (``VmHWM``) is reset by writing ``5`` to
  ``/proc/self/clear_refs`` and read from ``/proc/self/status``. Elsewhere the fallback is
  ``resource.getrusage(...).ru_maxrss``, which cannot be reset: it is the peak over the whole
  process lifetime (:func:`reset_peak_memory` returns ``False`` to say so).

Note that CPU peak RSS counts everything the process holds (weights, data, the Python runtime), not
only what one forward pass allocates.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Iterator

import torch

__all__ = [
    "autocast",
    "backend_flags",
    "describe",
    "native_bf16",
    "parse_dtype",
    "peak_memory_bytes",
    "peak_memory_kind",
    "reset_peak_memory",
    "resolve_dtype",
    "resolve_device",
    "synchronize",
]

DeviceLike = str | torch.device

_CLEAR_REFS = "/proc/self/clear_refs"
_PROC_STATUS = "/proc/self/status"

_DTYPES: dict[str, torch.dtype | None] = {
    "float32": None,
    "fp32": None,
    "32": None,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(name: DeviceLike = "auto") -> torch.device:
    """Turns a device name into a usable ``torch.device``.

    Args:
        name: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``,
            ``"mps"``, or a ``torch.device``.

    Returns:
        The device. A bare ``"cuda"`` becomes ``cuda:<current device>`` so that reports name it.

    Raises:
        ValueError: If the name is not a device, or names a device this machine does not have.
    """
    if isinstance(name, str):
        text = name.strip().lower()
        if text == "auto":
            return resolve_device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(text)
        except (RuntimeError, ValueError) as err:
            raise ValueError(
                f"Unknown device {name!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'."
            ) from err
    elif isinstance(name, torch.device):
        device = name
    else:
        raise ValueError(f"Expected a device name or torch.device, got {type(name).__name__}.")

    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"Device {str(device)!r} requested but CUDA is not available on this machine "
                "(use device=cpu or device=auto)."
            )
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if device.index is None else device.index
        if not 0 <= index < count:
            raise ValueError(
                f"Device {str(device)!r} requested but this machine has {count} CUDA device(s)."
            )
        return torch.device("cuda", index)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("Device 'mps' requested but MPS is not available on this machine.")
        return device
    raise ValueError(f"Unsupported device type {device.type!r} (supported: cpu, cuda, mps).")


def _as_device(device: DeviceLike) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def synchronize(device: DeviceLike) -> None:
    """Waits for all queued work on ``device`` (CUDA synchronize; MPS synchronize; no-op on CPU)."""
    device = _as_device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _read_vm_hwm() -> int | None:
    """Returns the process peak RSS (``VmHWM``) in bytes from /proc, or None if unavailable."""
    try:
        with open(_PROC_STATUS, encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    value, unit = line.split()[1:3]
                    scale = {"kB": 1024, "mB": 1024**2, "gB": 1024**3}.get(unit, 1)
                    return int(value) * scale
    except (OSError, ValueError, IndexError):
        return None
    return None


def _maxrss_bytes() -> int:
    """Returns the lifetime peak RSS from ``getrusage`` (0 where the resource module is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


def _clear_refs() -> bool:
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def reset_peak_memory(device: DeviceLike) -> bool:
    """Resets the peak-memory counter that :func:`peak_memory_bytes` reads.

    Args:
        device: The device whose peak is measured (CPU: the process peak RSS).

    Returns:
        True if the counter was reset; False if it cannot be (CPU without /proc/self/clear_refs:
        the peak then covers the whole process lifetime).
    """
    device = _as_device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    if device.type == "mps":
        return False
    return _read_vm_hwm() is not None and _clear_refs()


def peak_memory_bytes(device: DeviceLike) -> int:
    """Returns the peak memory since the last :func:`reset_peak_memory`, in bytes.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the process peak RSS (``VmHWM``, or
    ``ru_maxrss`` where /proc is missing). MPS: currently allocated memory (no peak counter).
    """
    device = _as_device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.current_allocated_memory())
    hwm = _read_vm_hwm()
    return hwm if hwm is not None else _maxrss_bytes()


def peak_memory_kind(device: DeviceLike) -> str:
    """Names what :func:`peak_memory_bytes` measures on ``device``, for reports.

    Returns:
        ``"cuda_max_allocated"``, ``"rss_peak"`` (resettable), ``"rss_peak_lifetime"`` or
        ``"mps_current_allocated"``.
    """
    device = _as_device(device)
    if device.type == "cuda":
        return "cuda_max_allocated"
    if device.type == "mps":
        return "mps_current_allocated"
    resettable = _read_vm_hwm() is not None and os.access(_CLEAR_REFS, os.W_OK)
    return "rss_peak" if resettable else "rss_peak_lifetime"


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Maps an autocast dtype name to a torch dtype.

    Args:
        dtype: None, ``"float32"``/``"fp32"`` (no autocast), ``"float16"``/``"fp16"``/``"half"``,
            ``"bfloat16"``/``"bf16"``, or a torch dtype.

    Returns:
        ``torch.float16``/``torch.bfloat16``, or None for full precision.

    Raises:
        ValueError: For any other name.
    """
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype == torch.float32:
            return None
        if dtype in (torch.float16, torch.bfloat16):
            return dtype
        raise ValueError(f"Unsupported autocast dtype {dtype} (float32, float16 or bfloat16).")
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(
            f"Unknown dtype {dtype!r}: expected None, 'float32', 'float16' or 'bfloat16'."
        )
    return _DTYPES[key]


def autocast(
    device: DeviceLike, dtype: str | torch.dtype | None = None
) -> contextlib.AbstractContextManager:
    """Returns a mixed-precision context for ``device``.

    Args:
        device: The device the model runs on.
        dtype: None or ``"float32"`` -> a no-op context; ``"float16"``/``"bfloat16"`` ->
            ``torch.autocast(device.type, dtype=...)``.

    Returns:
        A context manager.
    """
    torch_dtype = parse_dtype(dtype)
    if torch_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(_as_device(device).type, dtype=torch_dtype)


def native_bf16(device: DeviceLike) -> bool:
    """Whether ``device`` computes bfloat16 natively (CUDA with bf16 support; x86 CPUs with
    AVX512-BF16 or AMX, Arm CPUs with BF16 as oneDNN reports): elsewhere bf16 is emulated and
    slower than float32."""
    device = _as_device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        if platform.machine().lower() in ("x86_64", "amd64"):
            # oneDNN's own check (torch.ops.mkldnn._is_mkldnn_bf16_supported) also says yes on
            # plain AVX-512, where bf16 is emulated: 10x slower than float32 for CRM's encoder
            return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # Arm: its BF16 extension
    return False


def resolve_dtype(name: str | None, device: DeviceLike) -> torch.dtype | None:
    """:func:`parse_dtype`, and ``"auto"``: bfloat16 where :func:`native_bf16`, else None."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    return parse_dtype(name)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe(device: DeviceLike) -> str:
    """Describes ``device`` for reports.

    Returns:
        E.g. ``"cuda:0 (NVIDIA H100 80GB HBM3, 79.1 GiB, CUDA 13.0)"`` or
        ``"cpu (Intel(R) Xeon(R) Processor, 16 threads)"``.
    """
    device = _as_device(device)
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        props = torch.cuda.get_device_properties(index)
        gib = props.total_memory / 2**30
        return f"cuda:{index} ({props.name}, {gib:.1f} GiB, CUDA {torch.version.cuda})"
    if device.type == "mps":
        return f"mps ({platform.machine()})"
    return f"cpu ({_cpu_model()}, {torch.get_num_threads()} threads)"


@contextlib.contextmanager
def backend_flags(cudnn_benchmark: bool, tf32: bool) -> Iterator[dict[str, bool]]:
    """Sets cuDNN autotuning and TF32 for a block of CUDA work, restoring the previous values.

    Args:
        cudnn_benchmark: ``torch.backends.cudnn.benchmark``: autotune convolution kernels per
            input shape (worth it for fixed training crops; a loss when every image and scale is
            a new shape, as in evaluation).
        tf32: TF32 tensor cores for fp32 matmuls and cuDNN convolutions (Ampere+); off gives
            full fp32 (torch's own default leaves cuDNN convolutions on TF32).

    Yields:
        The settings in force (``cudnn_benchmark``, ``tf32``), to record beside device and dtype.
        CPU work ignores both.
    """
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32)
    cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32 = cudnn_benchmark, tf32, tf32
    try:
        yield {"cudnn_benchmark": bool(cudnn_benchmark), "tf32": bool(tf32)}
    finally:
        cudnn.benchmark, matmul.allow_tf32, cudnn.allow_tf32 = saved
