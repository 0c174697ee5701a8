"""Benchmark-style timing and peak memory (SPEC section 2, "Efficiency").

Time only the model: synchronise the device before starting and before stopping the clock, skip
warm-up images from the mean, reset the peak-memory counter before each image. Device specifics
(CUDA vs CPU) live in :mod:`samsr.device`.

Example:
    >>> meter = EfficiencyMeter(device, dtype="float16", warmup=2)  # doctest: +SKIP
    >>> for name, image, coarse in data:  # doctest: +SKIP
    ...     with meter.measure(size=image.shape[:2]):
    ...         mask = refiner(image, coarse)
    >>> meter.compute()["time_s"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import torch

from samsr import device as devices

__all__ = ["EfficiencyMeter", "Stopwatch", "measure", "merge_efficiency"]


class Stopwatch:
    """Context manager timing a block of device work, synchronising before and after.

    Args:
        device: The device the timed work runs on.

    Attributes:
        elapsed: Seconds of the last timed block (NaN before the first one ends).
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = device if isinstance(device, torch.device) else torch.device(device)
        self.elapsed = math.nan
        self._start: float | None = None

    def __enter__(self) -> Stopwatch:
        devices.synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        devices.synchronize(self.device)
        if self._start is None:
            raise RuntimeError("Stopwatch exited without being entered.")
        self.elapsed = time.perf_counter() - self._start
        self._start = None


def measure(device: str | torch.device = "cpu") -> Stopwatch:
    """Returns a :class:`Stopwatch` for ``device``: ``with measure(dev) as sw: ...; sw.elapsed``."""
    return Stopwatch(device)


class EfficiencyMeter:
    """Accumulates per-image model time and peak memory.

    Args:
        device: The device the model runs on.
        dtype: Autocast dtype name recorded in the report (None means float32).
        warmup: Number of first images left out of the mean time (at most all but one image is
            left out, so a short run still reports a time).
        batch_size: Images per model call, recorded in the report.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        dtype: str | None = None,
        warmup: int = 1,
        batch_size: int = 1,
    ) -> None:
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}.")
        self.device = device if isinstance(device, torch.device) else torch.device(device)
        self.dtype = "float32" if dtype is None else str(dtype)
        self.warmup = warmup
        self.batch_size = batch_size
        self._rows: list[dict[str, Any]] = []

    def reset(self) -> None:
        """Forgets all images."""
        self._rows.clear()

    def __len__(self) -> int:
        return len(self._rows)

    def update(
        self,
        seconds: float,
        peak_bytes: int | None = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        """Records one image measured by the caller.

        Args:
            seconds: Model time of the image.
            peak_bytes: Peak memory during the image, if measured.
            size: Image ``(height, width)``.
        """
        self._rows.append(
            {
                "time_s": float(seconds),
                "peak_bytes": None if peak_bytes is None else int(peak_bytes),
                "size": None if size is None else (int(size[0]), int(size[1])),
            }
        )

    @contextlib.contextmanager
    def measure(self, size: tuple[int, int] | None = None) -> Iterator[Stopwatch]:
        """Times the enclosed model call and records it with its peak memory.

        Resets the peak-memory counter, synchronises, runs the block, synchronises, then reads the
        peak. Nothing is recorded if the block raises.

        Args:
            size: Image ``(height, width)``, recorded beside the time.

        Yields:
            The running :class:`Stopwatch`.
        """
        devices.reset_peak_memory(self.device)
        watch = Stopwatch(self.device)
        with watch:
            yield watch
        self.update(watch.elapsed, devices.peak_memory_bytes(self.device), size)

    def per_image(self) -> list[dict[str, Any]]:
        """Per-image rows: ``time_s``, ``peak_bytes`` (or None), ``size`` (or None)."""
        return [dict(row) for row in self._rows]

    def compute(self) -> dict[str, Any]:
        """Summarises the measurements.

        Returns:
            ``time_s`` (mean after warm-up), ``time_s_all`` (mean of all images), ``num_timed``,
            ``num_warmup``, ``num_images``, ``peak_mem_gib`` (max over images, GiB; NaN if not
            measured), ``peak_mem_kind``, ``device``, ``device_name``, ``dtype``, ``batch_size``
            and, if sizes were given, ``mean_height``, ``mean_width``, ``max_height``,
            ``max_width``.
        """
        if not self._rows:
            raise ValueError("EfficiencyMeter is empty: measure at least one image first.")
        times = [row["time_s"] for row in self._rows]
        skip = min(self.warmup, len(times) - 1)
        timed = times[skip:]
        peaks = [row["peak_bytes"] for row in self._rows if row["peak_bytes"] is not None]
        out: dict[str, Any] = {
            "time_s": sum(timed) / len(timed),
            "time_s_all": sum(times) / len(times),
            "num_timed": len(timed),
            "num_warmup": skip,
            "num_images": len(times),
            "peak_mem_gib": max(peaks) / 2**30 if peaks else math.nan,
            "peak_mem_kind": devices.peak_memory_kind(self.device),
            "device": str(self.device),
            "device_name": devices.describe(self.device),
            "dtype": self.dtype,
            "batch_size": self.batch_size,
        }
        sizes = [row["size"] for row in self._rows if row["size"] is not None]
        if sizes:
            out["mean_height"] = sum(h for h, _ in sizes) / len(sizes)
            out["mean_width"] = sum(w for _, w in sizes) / len(sizes)
            out["max_height"] = max(h for h, _ in sizes)
            out["max_width"] = max(w for _, w in sizes)
        return out


def merge_efficiency(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary of several :meth:`EfficiencyMeter.compute` results (the ranks of a
    distributed evaluation, each timing its own images on its own device).

    Means are weighted by the images behind them, counts are summed, the peak memory is the
    largest; the descriptive fields are the first part's, and ``per_rank`` keeps every part.
    """
    if not parts:
        raise ValueError("merge_efficiency needs at least one summary")
    if len(parts) == 1:
        return dict(parts[0])

    def weighted(key: str, weight: str) -> float:
        total = sum(p[weight] for p in parts)
        return sum(p[key] * p[weight] for p in parts) / total if total else math.nan

    out = dict(parts[0])
    out["time_s"] = weighted("time_s", "num_timed")
    out["time_s_all"] = weighted("time_s_all", "num_images")
    for key in ("num_timed", "num_warmup", "num_images"):
        out[key] = sum(p[key] for p in parts)
    peaks = [p["peak_mem_gib"] for p in parts if not math.isnan(p["peak_mem_gib"])]
    out["peak_mem_gib"] = max(peaks) if peaks else math.nan
    if all("mean_height" in p for p in parts):
        out["mean_height"] = weighted("mean_height", "num_images")
        out["mean_width"] = weighted("mean_width", "num_images")
        out["max_height"] = max(p["max_height"] for p in parts)
        out["max_width"] = max(p["max_width"] for p in parts)
    out["devices"] = sorted({p["device"] for p in parts})
    out["per_rank"] = [dict(p) for p in parts]
    return out
