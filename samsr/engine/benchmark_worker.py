"""Benchmark workers: one inference variant on one image group, each in its own process.

Parent side: :func:`measure_variant` writes a job file, :func:`launch` starts
``python -m samsr.engine.benchmark_cli --worker JOB.json`` and waits for it (optional timeout),
copying its output to a log file and to our stderr as it comes; a worker that fails (non-zero exit,
killed, timed out) becomes a ``failed (...)`` row with the end of its log, never an exception.

Worker side: :func:`run_job` builds the model and refiner from the job (model config, weights,
resolved inference config, device), runs one untimed warm-up call on a crop of the first image,
then times each image like a benchmark (peak memory reset, device synchronised, only the refiner
call timed) and writes the refined masks and a result JSON, rewritten after every image so that a
worker killed half-way still leaves its finished images.
"""

from __future__ import annotations

import codecs
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from tqdm import tqdm

from samsr import device as devices
from samsr.data.io import atomic_write_bytes, read_coarse_mask, read_image, write_mask
from samsr.engine.builders import build_model, build_refiner
from samsr.metrics.efficiency import Stopwatch

__all__ = ["failure_reason", "launch", "measure_variant", "run_job", "worker_main"]

_TAIL_CHARS = 4000
_REPO_ROOT = str(Path(__file__).resolve().parents[2])


def _write_json(path: str | Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


def warmup_crop(image: np.ndarray, coarse: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A ``size`` x ``size`` crop (or smaller) centred on the coarse mask's centroid.

    Centring on the object makes the warm-up take the same code path as the real call (an empty
    crop could skip the decoder in region-restricted variants).
    """
    h, w = coarse.shape
    ys, xs = np.nonzero(coarse)
    cy, cx = (int(ys.mean()), int(xs.mean())) if len(ys) else (h // 2, w // 2)
    top = min(max(0, cy - size // 2), max(0, h - size))
    left = min(max(0, cx - size // 2), max(0, w - size))
    box = (slice(top, top + size), slice(left, left + size))
    return np.ascontiguousarray(image[box]), np.ascontiguousarray(coarse[box])


def _baseline_bytes(device: torch.device) -> int:
    """Memory held after the model is loaded: CUDA allocated bytes, else the current RSS."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    devices.reset_peak_memory(device)  # VmHWM := current RSS where /proc/self/clear_refs exists
    return devices.peak_memory_bytes(device)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Runs one benchmark job (see the module docstring) and returns its result dict."""
    device = devices.resolve_device(job["device"])
    torch.manual_seed(int(job.get("seed", 0)))  # identical random weights in every worker
    model = build_model(OmegaConf.create(job["model"]), weights=job.get("weights"))
    refiner = build_refiner(model, OmegaConf.create(job["inference"]), device)
    cuda = device.type == "cuda"
    result: dict[str, Any] = {
        "variant": job["variant"],
        "group": job["group"],
        "device": str(device),
        "device_description": devices.describe(device),
        "peak_memory_kind": devices.peak_memory_kind(device),
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "baseline_bytes": _baseline_bytes(device),
        "complete": False,
        "images": [],
    }
    items = job["items"]
    first = items[0]
    crop = warmup_crop(
        read_image(first["image"]), read_coarse_mask(first["coarse"]), job["warmup_size"]
    )
    refiner(*crop)  # untimed warm-up: lazy init, allocator, kernels
    mask_dir = Path(job["mask_dir"])
    bar = tqdm(items, desc=f"{job['variant']} @ {job['group']}", disable=not job.get("progress"))
    for item in bar:
        image, coarse = read_image(item["image"]), read_coarse_mask(item["coarse"])
        devices.reset_peak_memory(device)
        if cuda:
            devices.reset_peak_memory("cpu")
        refiner.timings = {}  # decoded-pixel / tile counts (see cascade.refine)
        refiner.profile = bool(job.get("profile"))  # + encode/decode seconds (syncs per stage)
        with Stopwatch(device) as watch:
            mask = refiner(image, coarse)
        row = {
            "name": item["name"],
            "height": int(image.shape[0]),
            "width": int(image.shape[1]),
            "time_s": watch.elapsed,
            "peak_bytes": devices.peak_memory_bytes(device),
            "cascade": dict(refiner.timings),
        }
        if cuda:
            row["host_peak_bytes"] = devices.peak_memory_bytes("cpu")
        write_mask(mask_dir / f"{item['name']}.png", mask)
        result["images"].append(row)
        _write_json(job["result"], result)
    result["complete"] = True
    _write_json(job["result"], result)
    return result


def worker_main(argv: list[str]) -> int:
    """``--worker JOB.json``: runs the job; on error prints ``error: <type>: <message>`` last."""
    if len(argv) != 1:
        print("usage: python -m samsr.engine.benchmark_cli --worker JOB.json", file=sys.stderr)
        return 2
    try:
        run_job(json.loads(Path(argv[0]).read_text()))
    except Exception as err:  # noqa: BLE001 - reported to the parent through stderr and the rc
        traceback.print_exc()
        message = " ".join(str(err).split())
        print(f"error: {type(err).__name__}: {message}", file=sys.stderr, flush=True)
        return 1
    return 0


# --------------------------------------------------------------------------- parent side


def _tee(stream: IO[bytes], log: IO[bytes]) -> None:
    """Copies a worker's output to its log file and to our stderr as it comes."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for chunk in iter(lambda: stream.read1(65536), b""):  # type: ignore[attr-defined]
        log.write(chunk)
        log.flush()
        sys.stderr.write(decoder.decode(chunk))
        sys.stderr.flush()


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker's own session, nothing else
    except (ProcessLookupError, PermissionError):
        proc.kill()


def launch(
    job: dict[str, Any],
    job_path: Path,
    log_path: Path,
    timeout: float | None = None,
    pythonpath: str | None = None,
) -> dict[str, Any]:
    """Runs one job in a fresh worker process and waits for it.

    Args:
        job: The job (written to ``job_path`` as JSON for the worker).
        job_path: Where the job file goes.
        log_path: The worker's stdout and stderr.
        timeout: Seconds before the worker is killed; None waits for ever.
        pythonpath: Prepended to ``PYTHONPATH`` so the worker imports this samsr.

    Returns:
        ``returncode``, ``timed_out``, ``wall_s`` and ``tail`` (the end of the log).
    """
    atomic_write_bytes(job_path, (json.dumps(job, indent=2) + "\n").encode())
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "samsr.engine.benchmark_cli", "--worker", str(job_path)]
    start, timed_out = time.perf_counter(), False
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        tee = threading.Thread(target=_tee, args=(proc.stdout, log), daemon=True)
        tee.start()
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill(proc)
            returncode = proc.wait()
        except BaseException:  # e.g. Ctrl-C: never leave a worker behind
            _kill(proc)
            proc.wait()
            raise
        tee.join()
    tail = log_path.read_bytes()[-_TAIL_CHARS:].decode("utf-8", errors="replace")
    wall = time.perf_counter() - start
    return {"returncode": returncode, "timed_out": timed_out, "wall_s": wall, "tail": tail}


def failure_reason(returncode: int, timed_out: bool, timeout: float | None, tail: str) -> str:
    """A short reason for a failed worker, e.g. ``exit -9: out of memory?``."""
    if timed_out:
        return f"timeout after {timeout:g} s"
    if returncode == -signal.SIGKILL:
        return f"exit {returncode}: out of memory?"
    if returncode < 0:
        try:
            return f"exit {returncode}: {signal.Signals(-returncode).name}"
        except ValueError:
            return f"exit {returncode}"
    if returncode == 0:
        return "exit 0 without a complete result"
    errors = [line[len("error: ") :] for line in tail.splitlines() if line.startswith("error: ")]
    detail = errors[-1] if errors else (tail.strip().splitlines() or ["no output"])[-1]
    return f"exit {returncode}: {detail if len(detail) <= 160 else detail[:157] + '...'}"


def _read_grey(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


def measure_variant(
    job: dict[str, Any],
    timeout: float | None,
    truth: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
    reference: dict[str, np.ndarray] | None,
    reference_name: str = "faithful",
) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """Runs one worker and scores its masks; returns its row and masks (None if it failed).

    Args:
        job: The worker's job (see :func:`run_job`); ``result`` names its JSON, beside which go
            ``<stem>.job.json`` and ``<stem>.log``.
        timeout: Seconds before the worker is killed (None: no limit).
        truth: ``(gts, coarses)``: name -> GT mask and coarse mask.
        reference: name -> the faithful masks (None if faithful failed). Faithful itself is
            scored against its own masks: 100 % agreement by construction.
    """
    from samsr.engine.benchmark_report import score_variant

    stem = str(job["result"]).removesuffix(".json")
    outcome = launch(job, Path(f"{stem}.job.json"), Path(f"{stem}.log"), timeout, _REPO_ROOT)
    result_path = Path(job["result"])
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    images = result.pop("images", [])
    row: dict[str, Any] = {"status": "ok", "returncode": outcome["returncode"]}
    row.update(wall_s=outcome["wall_s"], log=f"{stem}.log")
    row.update({k: v for k, v in result.items() if k not in ("variant", "group")})
    if outcome["returncode"] != 0 or not result.get("complete"):
        args = (outcome["returncode"], outcome["timed_out"], timeout, outcome["tail"])
        reason = failure_reason(*args)
        row.update(status=f"failed ({reason})", error=reason, stderr_tail=outcome["tail"])
        row["per_image"] = images
        return row, None
    masks = {im["name"]: _read_grey(Path(job["mask_dir"]) / f"{im['name']}.png") for im in images}
    scores = score_variant(*truth, masks, masks if job["variant"] == reference_name else reference)
    for timing, metrics in zip(images, scores.pop("per_image")):
        timing.update(metrics)
    peak = max(im["peak_bytes"] for im in images)
    row.update(scores, num_images=len(images), per_image=images)
    row.update(time_s=sum(im["time_s"] for im in images) / len(images))
    row.update(peak_mem_bytes=peak, peak_mem_gib=peak / 2**30)
    row.update(baseline_gib=result["baseline_bytes"] / 2**30)
    return row, masks
