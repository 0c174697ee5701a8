"""Benchmark inputs: BIG-layout folders, or deterministic synthetic images cached on disk.

Synthetic groups are written as BIG-layout folders ``<cache>/<W>x<H>/img<i>_im.png``, ``_gt.png``
and ``_seg.png`` (coarse mask: the GT downsampled ``coarse_factor`` times, see
:func:`samsr.data.coarse_synthesis.big_style_coarse`). Sample ``i`` is drawn from
``np.random.default_rng((seed, W, H, i))``, so the bytes depend only on the arguments; files are
written atomically and reused by later runs. ``benchmark_data.json`` in the folder records the
arguments; a folder made with other arguments is emptied and regenerated.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samsr.data.coarse_synthesis import big_style_coarse
from samsr.data.io import DataError, atomic_write_bytes, write_image, write_mask
from samsr.data.layouts import BigItem, find_big_split
from samsr.data.synthetic import render_sample

__all__ = ["Group", "data_groups", "data_items", "synthetic_groups", "synthetic_items"]

_RECORD = "benchmark_data.json"
_VERSION = 1
_SUFFIXES = ("_im.png", "_gt.png", "_seg.png")


def data_items(
    split_dir: str | os.PathLike[str],
    coarse_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> list[BigItem]:
    """The BIG-layout items of ``split_dir`` (coarse masks there or in ``coarse_dir``).

    Args:
        split_dir: Folder with ``<name>_im.jpg`` + ``<name>_gt.png`` (+ ``<name>_seg.png``).
        coarse_dir: Folder with the ``<name>_seg.png`` coarse masks; default ``split_dir``.
        limit: Keep only the first ``limit`` items (by name); None keeps all.

    Raises:
        DataError: Missing folder, no images, or an image without GT or coarse mask.
    """
    for folder, what in ((split_dir, "data"), (coarse_dir, "coarse mask")):
        if folder is not None and not Path(folder).is_dir():
            raise DataError(f"{what} folder not found: {folder}")
    items = find_big_split(split_dir, coarse_dir)
    return items[:limit] if limit else items


def _record_matches(folder: Path, record: dict) -> bool:
    try:
        return json.loads((folder / _RECORD).read_text()) == record
    except (OSError, ValueError):
        return False


def synthetic_items(
    cache_dir: str | os.PathLike[str],
    width: int,
    height: int,
    num_images: int,
    seed: int = 0,
    coarse_factor: float = 16,
) -> list[BigItem]:
    """Generates (or reuses) ``num_images`` synthetic samples of ``width`` x ``height``.

    Args:
        cache_dir: Root of the cache; the samples go to ``<cache_dir>/<W>x<H>/``.
        width: Image width in pixels.
        height: Image height in pixels.
        num_images: Samples ``img0`` .. ``img<n-1>``.
        seed: First element of every sample's seed tuple.
        coarse_factor: Downsampling factor of the coarse masks.

    Returns:
        The samples as BIG items, sorted by name.
    """
    folder = Path(cache_dir) / f"{width}x{height}"
    record = {"version": _VERSION, "seed": int(seed), "coarse_factor": float(coarse_factor)}
    if not _record_matches(folder, record):  # unknown or other arguments: start afresh
        (folder / _RECORD).unlink(missing_ok=True)
        if folder.is_dir():
            for path in folder.glob("img*_*.png"):
                if path.name.endswith(_SUFFIXES):
                    path.unlink()
        atomic_write_bytes(folder / _RECORD, (json.dumps(record) + "\n").encode())
    names = [f"img{i}" for i in range(num_images)]
    for i, name in enumerate(names):
        im, gt_path, seg = (folder / f"{name}{suffix}" for suffix in _SUFFIXES)
        if im.is_file() and gt_path.is_file() and seg.is_file():
            continue
        print(f"benchmark: generating {folder / name} ...", file=sys.stderr, flush=True)
        image, gt = render_sample(np.random.default_rng((seed, width, height, i)), height, width)
        write_image(im, image)
        write_mask(gt_path, gt)
        write_mask(seg, big_style_coarse(gt, factor=coarse_factor))
    wanted = set(names)
    return [item for item in find_big_split(folder) if item.name in wanted]


@dataclass
class Group:
    """Images measured together: one synthetic size or one data folder.

    Attributes:
        name: ``<W>x<H>`` or the folder's name (made unique).
        items: The images, with their GT and coarse masks.
        source: ``"synthetic"`` or the data folder.
    """

    name: str
    items: list[BigItem]
    source: str


def synthetic_groups(
    cache_dir: str | os.PathLike[str],
    sizes: Sequence[tuple[int, int]],
    num_images: int,
    seed: int = 0,
    coarse_factor: float = 16,
) -> list[Group]:
    """One group of :func:`synthetic_items` per ``(width, height)`` in ``sizes``."""
    return [
        Group(
            f"{w}x{h}",
            synthetic_items(cache_dir, w, h, num_images, seed, coarse_factor),
            "synthetic",
        )
        for w, h in sizes
    ]


def data_groups(
    split_dirs: Sequence[str],
    coarse_dirs: Sequence[str] | None = None,
    limit: int | None = None,
) -> list[Group]:
    """One group per BIG-layout folder; ``coarse_dirs``: none, one for all, or one per folder."""
    coarse: list[str | None] = list(coarse_dirs or [None])
    if len(coarse) not in (1, len(split_dirs)):
        raise DataError(
            f"give one coarse mask folder or one per data folder ({len(split_dirs)}), "
            f"got {len(coarse)}: {coarse}"
        )
    coarse = coarse * len(split_dirs) if len(coarse) == 1 else coarse
    groups: list[Group] = []
    for split_dir, coarse_dir in zip(split_dirs, coarse):
        name = base = Path(split_dir).resolve().name or "data"
        suffix = 2
        while name in {g.name for g in groups}:
            name, suffix = f"{base}_{suffix}", suffix + 1
        groups.append(Group(name, data_items(split_dir, coarse_dir, limit), str(split_dir)))
    return groups
