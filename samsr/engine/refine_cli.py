"""``samsr refine IMAGE|DIR --mask MASK|DIR --ckpt CKPT``: refined masks from one command.

The model loads once; each image is refined at full resolution with the inference preset
(``fast`` by default) and its outputs are written atomically to ``--out``:

* ``mask``: ``<name>_refined.png``, the refined mask (0..255, the probability as the reference
  saves it);
* ``binary``: ``<name>_binary.png``, that mask thresholded (0/255);
* ``overlay``: ``<name>_overlay.jpg``, the refined mask tinted over the image;
* ``side_by_side``: ``<name>_side_by_side.jpg``, image | coarse | refined with the boundaries
  drawn, plus a full-resolution zoom where they differ most (:func:`samsr.visualize.side_by_side`).

``<out>/refine.json`` records each image's size, time and peak memory (rewritten after every
image). A rerun skips images whose outputs exist; an image that fails is reported and the others
go on; the exit status is the number of images that failed (at most 125; 2 also for an error
before any image, e.g. a missing checkpoint, reported on one ``error:`` line).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from samsr.data.io import (
    DataError,
    atomic_write_bytes,
    read_coarse_mask,
    read_image,
    resize_mask,
    write_image,
    write_mask,
)
from samsr.data.layouts import RefineJob, pair_for_refinement
from samsr.device import describe, peak_memory_bytes, peak_memory_kind, reset_peak_memory
from samsr.errors import SamsrError, report_error
from samsr.metrics.efficiency import Stopwatch

__all__ = ["OUTPUTS", "add_arguments", "build_parser", "main"]

log = logging.getLogger(__name__)

OUTPUTS: dict[str, str] = {
    "mask": "{}_refined.png",
    "binary": "{}_binary.png",
    "overlay": "{}_overlay.jpg",
    "side_by_side": "{}_side_by_side.jpg",
}
"""``--save`` choice -> output file name (``{}``: the image's name)."""

MAX_EXIT = 125  # exit statuses above are the shell's
_WARMUP = (np.full((256, 256, 3), 128, np.uint8), np.pad(np.full((128, 128), 255, np.uint8), 64))
"""A small image and mask the model runs on once before the first timed image."""
_ASPECT_TOLERANCE = 0.02  # a smaller mask is resized if its aspect ratio is this close


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``refine`` options."""
    p.add_argument("image", help="an image file, or a folder of images")
    p.add_argument(
        "--mask",
        required=True,
        help="its coarse mask, or a folder of masks paired by name (<name>_seg.png for "
        "<name>_im.jpg, or the image's stem); may be the image folder",
    )
    p.add_argument("--ckpt", required=True, help="samsr checkpoint (last.pt) or official CRM file")
    p.add_argument(
        "--preset", default="fast", help="inference preset of samsr/configs/inference/ (fast)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (auto)")
    p.add_argument("--out", default="outputs/refine", help="output folder (outputs/refine)")
    p.add_argument(
        "--save",
        default="mask",
        help=f"comma-separated outputs: {', '.join(OUTPUTS)} (mask)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="binary output: refined > threshold x 256 (0.5: > 128, the metrics' rule)",
    )
    p.add_argument("--label", type=int, help="the object's id in label/palette mask maps")
    p.add_argument("--exif", action="store_true", help="apply the images' EXIF orientation")
    p.add_argument(
        "--allow-large-images",
        action="store_true",
        help="accept images above PIL's decompression-bomb limit (about 89 Mpx)",
    )
    p.add_argument("--overwrite", action="store_true", help="redo images whose outputs exist")
    p.add_argument("--model", help="model config to run, e.g. samsr_v1 (default: the checkpoint's)")
    p.add_argument("--sam-checkpoint", help="SAM checkpoint file for SAM-SR models")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any Hydra override, e.g. inference.tile=1024 or model.sam.type=vit_b (repeatable)",
    )
    p.add_argument("--width", type=int, default=2400, help="side-by-side picture width (px)")


def build_parser(prog: str = "samsr refine") -> argparse.ArgumentParser:
    """The ``samsr refine`` command line."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Refine coarse masks at full resolution with a checkpoint; writes the "
        "outputs of --save and refine.json (size, time, peak memory per image) to --out.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  samsr refine photo.jpg --mask photo.png --ckpt last.pt --save mask,side_by_side\n"
        "  samsr refine photos/ --mask masks/ --ckpt last.pt --out refined/ --device cuda\n"
        "  samsr refine photos/ --mask masks/ --ckpt crm.pth --model samsr_v1 "
        "--sam-checkpoint sam_vit_h_4b8939.pth",
    )
    add_arguments(p)
    return p


def _saves(text: str) -> list[str]:
    saves = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in saves if s not in OUTPUTS]
    if unknown or not saves:
        raise DataError(f"--save {text!r}: choose from {', '.join(OUTPUTS)} (comma-separated)")
    return saves


def _overrides(args: argparse.Namespace) -> list[str]:
    out = [f"model={args.model}"] if args.model else []
    if args.sam_checkpoint:
        out.append(f"model.sam.checkpoint={args.sam_checkpoint}")
    bad = [s for s in args.set if "=" not in s]
    if bad:
        raise DataError(f"--set {bad[0]!r}: expected KEY=VALUE, e.g. inference.tile=1024")
    return out + list(args.set)


class _Inputs:
    """Reads one job's image and coarse mask, fitting the mask to the image."""

    def __init__(self, args: argparse.Namespace) -> None:
        from PIL import Image

        self.exif = bool(args.exif)
        self.label = args.label
        self.max_pixels = None if args.allow_large_images else Image.MAX_IMAGE_PIXELS
        self._resize_said = False

    def __call__(self, job: RefineJob) -> tuple[np.ndarray, np.ndarray]:
        assert job.mask is not None
        image = read_image(job.image, exif=self.exif, max_pixels=self.max_pixels)
        coarse = read_coarse_mask(job.mask, self.label)
        return image, self._fit(coarse, job, image.shape[:2])

    def _fit(self, coarse: np.ndarray, job: RefineJob, hw: tuple[int, int]) -> np.ndarray:
        (mh, mw), (h, w) = coarse.shape, hw
        if (mh, mw) == (h, w):
            return coarse
        size = f"mask {job.mask} is {mw}x{mh} but image {job.image} is {w}x{h} (WxH)"
        close = abs(mw / mh - w / h) <= _ASPECT_TOLERANCE * (w / h)
        if not (mh <= h and mw <= w and close):
            turned = abs(mh / mw - w / h) <= _ASPECT_TOLERANCE * (w / h)
            hint = " (rotated: try --exif)" if turned and not self.exif else ""
            raise DataError(f"{size}{hint}; a mask must match its image or be a smaller copy.")
        if not self._resize_said:
            self._resize_said = True
            log.warning("%s: masks smaller than their images are resized (bilinear)", size)
        return resize_mask(coarse, (h, w))


def _write(kind: str, path: Path, image, coarse, refined, binary, width: int) -> None:
    from samsr.visualize import overlay, side_by_side

    if kind == "mask":
        write_mask(path, refined)
    elif kind == "binary":
        write_mask(path, binary)
    elif kind == "overlay":
        write_image(path, overlay(image, binary))
    else:
        write_image(path, side_by_side(image, coarse, refined, width))


def _load_records(path: Path) -> dict[str, Any]:
    try:
        records = json.loads(path.read_text())
        return records.get("images", {}) if isinstance(records, dict) else {}
    except (OSError, ValueError):
        return {}


def main(argv: Sequence[str] | None = None, prog: str = "samsr refine") -> int:
    """Runs the command line; returns the exit status (the number of failed images, or 2)."""
    args = build_parser(prog).parse_args(argv)
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if args.allow_large_images:  # lifted for PIL's reading of masks too, for this run only
        Image.MAX_IMAGE_PIXELS = None
    try:
        return _run(args, prog)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _run(args: argparse.Namespace, prog: str) -> int:
    try:
        saves = _saves(args.save)
        if not 0.0 <= args.threshold < 1.0:
            raise DataError(f"--threshold {args.threshold}: choose a value in [0, 1)")
        if not Path(args.ckpt).is_file():  # said now, even when every output exists
            raise DataError(f"checkpoint not found: {args.ckpt} (--ckpt: a last.pt of "
                            "scripts/train.py or the official CRM file)")  # fmt: skip
        jobs = pair_for_refinement(args.image, args.mask)
        inputs = _Inputs(args)
        out = Path(args.out)
        todo = [j for j in jobs if args.overwrite or not _done(j, saves, out)]
        refiner = _load(args, todo)
    except (SamsrError, OSError, ValueError) as err:
        return report_error(err, prog)
    record_file = out / "refine.json"
    records = _load_records(record_file)
    facts: dict[str, Any] = {"ckpt": str(args.ckpt), "preset": args.preset, "saves": saves}
    failed = 0
    skipped = len(jobs) - len(todo)
    if skipped:
        print(f"{skipped} of {len(jobs)} image(s) already done in {out} (--overwrite redoes them)")
    if refiner is not None:
        facts.update(_device_facts(refiner))
        cut = round(args.threshold * 256)
        from tqdm import tqdm

        for job in tqdm(todo, desc="refine", unit="image", disable=len(todo) < 2):
            try:
                records[job.name] = _refine_one(job, refiner, inputs, saves, out, cut, args.width)
            except (SamsrError, OSError, ValueError, RuntimeError, MemoryError) as err:
                failed += 1
                why = str(err) if isinstance(err, SamsrError) else f"{type(err).__name__}: {err}"
                print(f"{prog}: failed: {job.image}: {why}", file=sys.stderr, flush=True)
                records[job.name] = {"image": str(job.image), "status": "failed", "error": why}
            body = json.dumps({**facts, "images": records}, indent=2, sort_keys=True) + "\n"
            atomic_write_bytes(record_file, body.encode())
    done = len(todo) - failed
    print(f"refined {done}, skipped {skipped}, failed {failed}: {out}")
    return min(failed, MAX_EXIT)


def _done(job: RefineJob, saves: list[str], out: Path) -> bool:
    return all((out / OUTPUTS[s].format(job.name)).is_file() for s in saves)


def _load(args: argparse.Namespace, todo: list[RefineJob]) -> Any:
    """The predictor, run once on a small input (lazy init, kernels: the first image's time is
    its own); None when there is nothing to do (no model is loaded)."""
    if not todo:
        return None
    from samsr.engine.loading import load_refiner

    refiner = load_refiner(args.ckpt, args.preset, args.device, _overrides(args))
    refiner(*_WARMUP)
    return refiner


def _device_of(refiner: Any) -> Any:
    return refiner.device if hasattr(refiner, "device") else refiner.refiner.device


def _device_facts(refiner: Any) -> dict[str, Any]:
    device = _device_of(refiner)
    return {"device": describe(device), "peak_memory_kind": peak_memory_kind(device)}


def _refine_one(
    job: RefineJob,
    refiner: Any,
    inputs: _Inputs,
    saves: list[str],
    out: Path,
    cut: int,
    width: int,
) -> dict[str, Any]:
    """Refines one job, writes its outputs, returns its record."""
    if job.problem is not None:
        raise DataError(job.problem)
    image, coarse = inputs(job)
    device = _device_of(refiner)
    reset_peak_memory(device)
    with Stopwatch(device) as watch:
        refined = refiner(image, coarse)
    peak = peak_memory_bytes(device) / 2**30
    outputs = {}
    binary = np.where(refined > cut, np.uint8(255), np.uint8(0))
    for kind in saves:
        path = out / OUTPUTS[kind].format(job.name)
        _write(kind, path, image, coarse, refined, binary, width)
        outputs[kind] = str(path)
    return {
        "image": str(job.image),
        "mask": str(job.mask),
        "status": "ok",
        "size": f"{image.shape[1]}x{image.shape[0]}",
        "time_s": round(watch.elapsed, 3),
        "peak_memory_gib": round(peak, 3),
        "outputs": outputs,
    }


if __name__ == "__main__":
    sys.exit(main())
