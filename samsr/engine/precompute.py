"""Precompute the SAM colour maps of SAM-SR v2.1 into a cache (``scripts/precompute_sam.py``).

``python scripts/precompute_sam.py --images data/train/DUTS-TR data/train/fss data/BIG/test
--out data/sam_maps/vit_h --sam-type vit_h --sam-checkpoint checkpoints/sam_vit_h_4b8939.pth``

Each image gets SAM's automatic mask generation (AMG) and its masks painted into a colour map
(:func:`samsr.guidance.maps.paint_sam_map`), written atomically to the cache layout of
:mod:`samsr.data.sam_maps`. The manifest is written (or checked) before any map: a rerun with other
settings into the same cache fails unless ``--overwrite``. Maps already made with the current
settings are skipped, so an interrupted run is resumed by running it again. A failing image is
reported and the run goes on; the exit status is 1 if any failed.

Several GPUs split the work with ``--shard I/N`` (every N-th image from the I-th)::

    for k in 0 1 2 3; do
        CUDA_VISIBLE_DEVICES=$k python scripts/precompute_sam.py --shard $k/4 ... &
    done; wait
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from samsr.data.io import DataError, read_image
from samsr.data.layouts import LAYOUTS, find_big_split, find_pairs
from samsr.data.sam_maps import (
    check_manifest,
    make_manifest,
    manifest_key,
    map_is_current,
    map_name,
    map_path,
    read_manifest,
    write_manifest,
    write_map,
)
from samsr.errors import report_error
from samsr.guidance.build import SamSettings
from samsr.guidance.maps import map_seed, paint_sam_map
from samsr.guidance.runner import AmgConfig

__all__ = [
    "ImageItem",
    "Summary",
    "build_parser",
    "collect_images",
    "main",
    "make_sam_maps",
    "report_summary",
    "parse_shard",
    "precompute_maps",
    "prepare_cache",
]

Generate = Callable[[np.ndarray, str], list[dict[str, Any]]]
"""``(H x W x 3 uint8 RGB image, map name) -> AMG annotation dicts``."""

_BIG_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SAM_TYPES = ("vit_h", "vit_l", "vit_b")


@dataclass(frozen=True)
class ImageItem:
    """One image to map: its dataset ``root``, ``image`` file and cache ``name``."""

    root: Path
    image: Path
    name: str


@dataclass
class Summary:
    """Counts of one run: maps computed, skipped (already current) and failed (with reasons)."""

    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # seconds per SAM stage, all images

    def line(self) -> str:
        """``done 2, skipped 1, failed 0 (of 3 images)``."""
        return (
            f"done {self.done}, skipped {self.skipped}, failed {len(self.failed)} "
            f"(of {self.total} images, {self.seconds:.1f} s)"
        )


# --------------------------------------------------------------------------- inputs


def parse_shard(text: str) -> tuple[int, int]:
    """``"1/4"`` -> ``(1, 4)``: this process maps images ``1, 5, 9, ...`` (0-based)."""
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not sep or n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(
            f"bad --shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4 (first of 4 processes)"
        )
    return i, n


def _is_big(folder: Path) -> bool:
    return any(
        p.is_file() and p.stem.endswith("_im") and p.suffix.lower() in _BIG_IMAGE_SUFFIXES
        for p in folder.iterdir()
    )


def collect_images(
    roots: Sequence[str | os.PathLike[str]], layout: str = "auto"
) -> list[ImageItem]:
    """Lists the images of dataset roots in a fixed order (roots as given, names sorted).

    Args:
        roots: Training roots (:func:`~samsr.data.layouts.find_pairs`) or BIG split folders
            (:func:`~samsr.data.layouts.find_big_split`; GT and coarse masks not needed).
        layout: ``"big"``, ``"pairs"`` (any training layout, detected), ``"auto"`` (``big`` if
            the folder holds ``<name>_im.jpg`` files, else ``pairs``) or a training layout
            (``flat``, ``duts``, ``fss``).

    Raises:
        DataError: Missing roots, no images, two roots with the same folder name.
    """
    if layout not in ("auto", "big", "pairs", *LAYOUTS):
        raise DataError(f"unknown layout {layout!r}; use auto, big, pairs, {', '.join(LAYOUTS)}.")
    items: list[ImageItem] = []
    names: dict[str, Path] = {}
    for root in map(Path, roots):
        if not root.is_dir():
            raise DataError(f"image folder not found: {root}. Check --images.")
        key = Path(os.path.abspath(root)).name
        if key in names:
            raise DataError(
                f"two image folders share the name {key!r}: {names[key]} and {root}; their maps "
                "would collide in the cache. Use separate --out folders for them."
            )
        names[key] = root
        kind = layout
        if kind == "auto":
            kind = "big" if _is_big(root) else "pairs"
        if kind == "big":
            images = [i.image for i in find_big_split(root, require_gt=False, require_coarse=False)]
        else:
            pairs = find_pairs(root, layout="auto" if kind == "pairs" else kind, strict=False)
            images = [p.image for p in pairs]
        items += [ImageItem(root, image, map_name(root, image)) for image in images]
    if not items:
        raise DataError(f"no images found in {[str(r) for r in roots]}.")
    return items


# --------------------------------------------------------------------------- the run


def prepare_cache(
    cache_root: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    overwrite: bool = False,
    info: Mapping[str, Any] | None = None,
    write: bool = True,
) -> str:
    """Writes the manifest of a new cache, or checks an existing one.

    Args:
        cache_root: Cache folder (created if needed).
        manifest: :func:`~samsr.data.sam_maps.make_manifest` of the settings in use.
        overwrite: Replace a manifest made with other settings (its maps become stale and are
            recomputed) instead of failing.
        info: Extra ``info`` recorded in a new manifest (never compared).
        write: False only checks (nothing is written).

    Returns:
        The manifest key that maps of this cache must carry.

    Raises:
        DataError: The cache was made with other settings and ``overwrite`` is False.
    """
    identity = {k: v for k, v in manifest.items() if k != "info"}
    key = manifest_key(identity)
    existing = read_manifest(cache_root)
    if existing is not None and manifest_key(existing) == key:
        return key
    if existing is not None and not overwrite:
        check_manifest(cache_root, identity, exact=True)  # raises, naming the fields
        raise DataError(f"SAM cache {cache_root} has another manifest; rerun with --overwrite.")
    if write:
        write_manifest(cache_root, {**identity, "info": dict(info or {})})
    return key


def precompute_maps(
    items: Sequence[ImageItem],
    cache_root: str | os.PathLike[str],
    key: str,
    generate: Generate,
    overwrite: bool = False,
    progress: bool = True,
) -> Summary:
    """Computes and writes the maps of ``items`` that are not current yet.

    Args:
        items: Images (one shard of :func:`collect_images`).
        cache_root: Cache folder whose manifest :func:`prepare_cache` wrote.
        key: Manifest key the maps carry; a map with this key is skipped (unless ``overwrite``).
        generate: ``(image, name) -> AMG dicts`` (any output mode ``paint_sam_map`` decodes).
        overwrite: Recompute every map, current or not.
        progress: Show a tqdm bar.

    Returns:
        The :class:`Summary`; failures carry the image file and the error.
    """

    def is_current(item: ImageItem) -> bool:
        return map_is_current(map_path(cache_root, item.root, item.image), key)

    def compute(item: ImageItem) -> None:
        image = read_image(item.image)
        anns = generate(image, item.name)
        sam_map = paint_sam_map(anns, image.shape[:2], map_seed(item.name))
        del anns
        write_map(map_path(cache_root, item.root, item.image), sam_map, key)

    return run_per_image(
        items, Summary(total=len(items)), "SAM maps", is_current, compute, overwrite, progress
    )


S = TypeVar("S", bound=Summary)


def run_per_image(
    items: Sequence[ImageItem],
    summary: S,
    desc: str,
    is_current: Callable[[ImageItem], bool],
    compute: Callable[[ImageItem], None],
    overwrite: bool = False,
    progress: bool = True,
) -> S:
    """The precompute loop: skip current outputs, compute the others, report failures, go on.

    Args:
        items: Images to process.
        summary: Counts to fill (``total`` set by the caller).
        desc: Progress bar label.
        is_current: Whether an item's output is already done (skipped unless ``overwrite``).
        compute: Computes and writes one item's output; any exception marks it failed.
        overwrite: Recompute every item.
        progress: Show a tqdm bar.

    Returns:
        ``summary``, with ``done``, ``skipped``, ``failed`` and ``seconds`` filled.
    """
    start = time.perf_counter()
    bar = tqdm(items, desc=desc, unit="img", dynamic_ncols=True, disable=not progress)
    for item in bar:
        if not overwrite and is_current(item):
            summary.skipped += 1
        else:
            try:
                compute(item)
                summary.done += 1
            except Exception as exc:  # noqa: BLE001 - one bad image must not stop the run
                reason = f"{type(exc).__name__}: {exc}"
                summary.failed.append((str(item.image), reason))
                tqdm.write(f"FAILED {item.image}: {reason}", file=sys.stderr)
                if not isinstance(exc, DataError):
                    tqdm.write(traceback.format_exc(limit=-3), file=sys.stderr)
        bar.set_postfix(done=summary.done, skipped=summary.skipped, failed=len(summary.failed))
    bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


# --------------------------------------------------------------------------- command line


def _amg_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"bad --amg {text!r}: expected key=value")
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        parsed = value.strip()
    return key.strip().replace("-", "_"), parsed


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """Images, cache folder and SAM options shared by the precompute command lines."""
    parser.add_argument(
        "--images", nargs="+", required=True, metavar="DIR",
        help="dataset roots (training layouts) and/or BIG-layout split folders",
    )  # fmt: skip
    parser.add_argument(
        "--layout", default="auto", choices=("auto", "big", "pairs", *LAYOUTS),
        help="folder layout of every --images folder (default: auto-detect)",
    )  # fmt: skip
    parser.add_argument("--out", required=True, metavar="DIR", help="cache folder")
    sam = parser.add_mutually_exclusive_group(required=True)
    sam.add_argument("--sam-checkpoint", metavar="PATH", help="official SAM checkpoint (.pth)")
    sam.add_argument("--tiny-sam", action="store_true", help="random tiny SAM (tests only)")
    parser.add_argument("--sam-type", default="vit_h", choices=SAM_TYPES, help="SAM backbone")
    parser.add_argument("--tiny-seed", type=int, default=0, help="tiny SAM weight seed")
    parser.add_argument(
        "--tiny-img-size", type=int, default=64, help="tiny SAM input side (multiple of 16)"
    )


def sam_from_args(args: argparse.Namespace) -> SamSettings:
    """The SAM the precompute flags name (``--sam-type/--sam-checkpoint`` or ``--tiny-sam``)."""
    return SamSettings(
        type=args.sam_type,
        checkpoint=args.sam_checkpoint,
        tiny=bool(args.tiny_sam),
        seed=args.tiny_seed,
        tiny_img_size=args.tiny_img_size,
    )


def add_run_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """Device, sharding, overwrite and progress options shared by the precompute command lines."""
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument(
        "--shard", type=parse_shard, default=(0, 1), metavar="I/N",
        help=f"{what} every N-th image starting at the I-th (0-based), e.g. 1/4",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true",
        help=f"replace a cache made with other settings and recompute every {what} of this run",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The ``scripts/precompute_sam.py`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="precompute_sam.py",
        description="Precompute SAM colour maps (SAM-SR v2.1) into a cache folder.",
        epilog="Several GPUs: CUDA_VISIBLE_DEVICES=k python scripts/precompute_sam.py "
        "--shard k/4 ... for k = 0..3. Rerun the same command to resume.",
    )
    add_input_arguments(parser)
    amg = parser.add_argument_group("AMG settings (default: SAM's)")
    amg.add_argument("--points-per-side", type=int)
    amg.add_argument("--points-per-batch", type=int)
    amg.add_argument("--pred-iou-thresh", type=float)
    amg.add_argument("--stability-score-thresh", type=float)
    amg.add_argument("--box-nms-thresh", type=float)
    amg.add_argument("--crop-n-layers", type=int)
    amg.add_argument("--min-mask-region-area", type=int)
    amg.add_argument("--max-side", type=int, help="downscale images to this long side for AMG")
    amg.add_argument(
        "--amg", action="append", type=_amg_override, default=[], metavar="KEY=VALUE",
        help="any other AmgConfig field, e.g. --amg crop_overlap_ratio=0.5 (repeatable)",
    )  # fmt: skip
    add_run_arguments(parser, "map")
    return parser


_AMG_FLAGS = (
    "points_per_side",
    "points_per_batch",
    "pred_iou_thresh",
    "stability_score_thresh",
    "box_nms_thresh",
    "crop_n_layers",
    "min_mask_region_area",
    "max_side",
)


def _amg_config(args: argparse.Namespace) -> AmgConfig:
    """An ``AmgConfig`` from the flags and ``--amg`` overrides (unknown keys -> DataError)."""
    overrides = dict(args.amg)
    overrides.update({k: getattr(args, k) for k in _AMG_FLAGS if getattr(args, k) is not None})
    valid = {f.name for f in dataclasses.fields(AmgConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise DataError(f"unknown AMG setting(s) {unknown}; valid: {', '.join(sorted(valid))}.")
    try:
        return AmgConfig(**overrides)
    except (TypeError, ValueError) as exc:
        raise DataError(f"bad AMG settings {overrides}: {exc}") from exc


def make_sam_maps(
    images: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    sam: SamSettings,
    amg: AmgConfig,
    device: str = "auto",
    layout: str = "auto",
    shard: tuple[int, int] = (0, 1),
    overwrite: bool = False,
    progress: bool = True,
    command: str = "",
) -> Summary:
    """Precomputes the SAM-SR v2.1 maps of every image under ``images`` into the cache ``out``.

    Resumable (current maps are skipped), shardable (``shard=(k, n)``: images k, k+n, ...), and
    refuses a cache made with other settings unless ``overwrite``. Called by
    ``scripts/precompute_sam.py`` and by ``scripts/train.py`` (``model.sam_maps.precompute``).

    Args:
        images: dataset roots (training layouts) and/or BIG-layout split folders.
        out: the cache folder.
        sam: which SAM; ``amg``: its automatic-mask settings.
        device: where SAM runs.
        layout: the folder layout of every ``images`` folder (``auto`` detects it).
        shard: this process's share of the images.
        overwrite: replace a cache made with other settings.
        progress: show a progress bar.
        command: recorded in the manifest's ``info``.

    Returns:
        The run's counts (failed images with their reasons; they do not stop the run).

    Raises:
        DataError: bad folders, a cache of other settings, a missing SAM checkpoint.
    """
    shard_index, shard_count = shard
    items = collect_images(images, layout)[shard_index::shard_count]
    manifest = make_manifest(sam.kind, sam.checkpoint if not sam.tiny else None, asdict(amg))
    prepare_cache(out, manifest, overwrite=overwrite, write=False)  # fail fast, before SAM
    generate, timings = _make_generator(sam, amg, device)
    info = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if command:
        info["command"] = command
    key = prepare_cache(out, manifest, overwrite=overwrite, info=info)
    where = f" (shard {shard_index}/{shard_count})" if shard_count > 1 else ""
    print(f"SAM maps{where}: {len(items)} images -> {out}", file=sys.stderr)
    summary = precompute_maps(items, out, key, generate, overwrite=overwrite, progress=progress)
    summary.timings = dict(timings)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 1 some images failed, 2 bad input)."""
    args = build_parser().parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        summary = make_sam_maps(
            args.images, args.out, sam_from_args(args), _amg_config(args), args.device,
            args.layout, args.shard, args.overwrite, not args.no_progress,
            shlex.join(["scripts/precompute_sam.py", *argv]),
        )  # fmt: skip
    except (DataError, FileNotFoundError, ValueError) as exc:
        return report_error(exc)
    return report_summary("SAM maps", summary, args.shard)


def report_summary(what: str, summary: Summary, shard: tuple[int, int]) -> int:
    """Prints a run's summary (and its failures); returns the exit status (1 if any failed)."""
    where = f" (shard {shard[0]}/{shard[1]})" if shard[1] > 1 else ""
    per_image = ""
    if summary.done and summary.timings:
        per_image = ", per image: " + ", ".join(
            f"{name} {seconds / summary.done:.2f} s"
            for name, seconds in summary.timings.items()
            if seconds
        )
    print(f"{what}{where}: {summary.line()}{per_image}")
    for image, reason in summary.failed:
        print(f"  failed: {image}: {reason}")
    return 1 if summary.failed else 0


def _make_generator(
    sam: SamSettings, amg: AmgConfig, device: str
) -> tuple[Generate, dict[str, float]]:
    """Builds SAM once; returns ``(image, name) -> AMG dicts`` and the runner's timings."""
    from samsr.device import resolve_device
    from samsr.guidance.build import build_from_settings
    from samsr.guidance.runner import SamRunner

    runner = SamRunner(build_from_settings(sam, resolve_device(device)))

    def generate(image: np.ndarray, name: str) -> list[dict[str, Any]]:
        runner.set_image(image, key=name, max_side=amg.max_side)
        return runner.generate(amg)

    return generate, runner.timings
