"""A resumable, shardable run over the images of dataset folders, shared by the SAM precomputes
(:mod:`samsr.engine.precompute` maps, :mod:`samsr.engine.precompute_embeddings` embeddings): the
images to process (:func:`collect_images`), the loop that skips current outputs and reports
failures without stopping (:func:`run_per_image`), its counts (:class:`Summary`) and the command
line options both share."""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from samsr.data.io import DataError
from samsr.data.layouts import LAYOUTS, find_big_split, find_pairs
from samsr.data.sam_maps import map_name
from samsr.distributed import env_context, rank_device
from samsr.guidance.build import SamSettings

__all__ = [
    "ImageItem",
    "SAM_TYPES",
    "Summary",
    "add_input_arguments",
    "add_run_arguments",
    "collect_images",
    "parse_shard",
    "report_summary",
    "resolve_run_arguments",
    "run_per_image",
    "sam_from_args",
]

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
        "--shard", type=parse_shard, default=None, metavar="I/N",
        help=f"{what} every N-th image starting at the I-th (0-based), e.g. 1/4 (default: "
        "all images; under torchrun, RANK/WORLD_SIZE, each rank on GPU LOCAL_RANK)",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true",
        help=f"replace a cache made with other settings and recompute every {what} of this run",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve_run_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """Fills ``--shard`` and ``--device`` in for the process: under ``torchrun`` a missing
    ``--shard`` is ``RANK/WORLD_SIZE`` and a CUDA device (or ``auto`` with CUDA) is
    ``cuda:LOCAL_RANK``."""
    ctx = env_context()
    if args.shard is None:
        args.shard = (ctx.rank, ctx.world_size)
    args.device = rank_device(args.device)
    return args


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
