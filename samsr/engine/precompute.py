"""Precompute the SAM colour maps of SAM-SR v2.1 into a cache (``scripts/precompute_sam.py``).

``python scripts/precompute_sam.py --images data/train/DUTS-TR data/train/fss data/BIG/test
--out data/sam_maps/vit_h --sam-type vit_h --sam-checkpoint checkpoints/sam_vit_h_4b8939.pth``

Each image gets SAM's automatic mask generation (AMG) and its masks painted into a colour map
(:func:`samsr.guidance.maps.paint_sam_map`), written atomically to the cache layout of
:mod:`samsr.data.sam_maps`. The manifest is written (or checked) before any map: a rerun with other
settings into the same cache fails unless ``--overwrite``. Maps already made with the current
settings are skipped, so an interrupted run is resumed by running it again. A failing image is
reported and the run goes on; the exit status is 1 if any failed.

Several GPUs split the work under ``torchrun`` (rank ``r`` of ``N`` takes every N-th image from
the r-th, on GPU ``LOCAL_RANK``), or with ``--shard I/N`` in plain processes::

    torchrun --standalone --nproc_per_node=4 scripts/precompute_sam.py ...
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

import numpy as np

from samsr.data.io import DataError, read_image
from samsr.data.sam_maps import (
    check_manifest,
    make_manifest,
    manifest_key,
    map_is_current,
    map_path,
    read_manifest,
    write_manifest,
    write_map,
)
from samsr.engine.image_runs import (
    ImageItem,
    Summary,
    add_input_arguments,
    add_run_arguments,
    collect_images,
    report_summary,
    resolve_run_arguments,
    run_per_image,
    sam_from_args,
)
from samsr.errors import report_error
from samsr.guidance.build import SamSettings
from samsr.guidance.maps import map_seed, paint_sam_map
from samsr.guidance.runner import AmgConfig

__all__ = ["build_parser", "main", "make_sam_maps", "precompute_maps", "prepare_cache"]

Generate = Callable[[np.ndarray, str], list[dict[str, Any]]]
"""``(H x W x 3 uint8 RGB image, map name) -> AMG annotation dicts``."""


# --------------------------------------------------------------------------- inputs


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


def build_parser() -> argparse.ArgumentParser:
    """The ``scripts/precompute_sam.py`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="precompute_sam.py",
        description="Precompute SAM colour maps (SAM-SR v2.1) into a cache folder.",
        epilog="Several GPUs: torchrun --nproc_per_node=4 scripts/precompute_sam.py ..., or "
        "CUDA_VISIBLE_DEVICES=k python scripts/precompute_sam.py --shard k/4 ... for k = 0..3. "
        "Rerun the same command to resume.",
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
    args = resolve_run_arguments(build_parser().parse_args(argv))
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
