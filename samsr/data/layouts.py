"""Finding image/mask pairs in the folder layouts the reference datasets use.

Training layouts (:func:`find_pairs`):

* ``flat``: image and mask share a stem in one folder, ``x.jpg`` + ``x.png`` (the reference's
  DUTS-TR, DUTS-TE, ecssd, MSRA_10K folders). Images are non-PNG image files; masks are PNGs.
* ``duts``: the DUTS release layout, ``<root>/<NAME>-Image/x.jpg`` + ``<root>/<NAME>-Mask/x.png``
  (case-insensitive), also one image folder + one mask folder with common names (``images``/
  ``masks``, the genuine DUT-OMRON release's ``DUT-OMRON-image`` + ``pixelwiseGT-new-PNG``).
* ``fss``: FSS-1000, ``<root>/<class>/<n>.jpg`` + ``<n>.png``; names are ``<class>/<n>``.
* ``auto``: ``duts`` if such sub-folders exist, else ``flat`` if the root holds images, else
  ``fss``.

Refinement input (:func:`pair_for_refinement`, ``samsr refine``): images and their coarse masks
in one folder or two, paired by name (BIG's ``<name>_im.*`` + ``<name>_seg.png``, or same-stem
files).

Evaluation layout (:func:`find_big_split`), BIG: ``<name>_im.jpg`` and ``<name>_gt.png`` in a split
folder; coarse masks ``<name>_seg.png`` in a separate folder per segmentor,
``<split>_coarse/<segmentor>/`` beside the split folder (:func:`find_coarse_sources`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from samsr.data.io import IMAGE_EXTENSIONS, DataError

__all__ = [
    "LAYOUTS",
    "BigItem",
    "Pair",
    "RefineJob",
    "detect_layout",
    "find_big_split",
    "find_coarse_sources",
    "pair_for_refinement",
    "find_pairs",
    "holdout_split",
]

LAYOUTS: tuple[str, ...] = ("flat", "duts", "fss")
"""Training folder layouts :func:`find_pairs` understands (plus ``"auto"``)."""

_MASK_SUFFIX = ".png"
_IMAGE_SUFFIXES = tuple(s for s in IMAGE_EXTENSIONS if s != _MASK_SUFFIX)
_IMAGE_DIR_NAMES = ("images", "image", "imgs", "img")
_MASK_DIR_NAMES = ("masks", "mask", "gt", "gts", "groundtruth", "pixelwisegt-new-png")
_TRIED = (
    "duts (<root>/<NAME>-Image/*.jpg + <root>/<NAME>-Mask/*.png), "
    "flat (<root>/x.jpg + <root>/x.png), fss (<root>/<class>/<n>.jpg + <n>.png)"
)


@dataclass(frozen=True)
class Pair:
    """One training image and its ground-truth mask.

    Attributes:
        image: Image file.
        mask: Ground-truth mask file.
        name: Name unique within the root (the stem; ``<class>/<n>`` for FSS).
    """

    image: Path
    mask: Path
    name: str


@dataclass(frozen=True)
class BigItem:
    """One BIG-layout evaluation object.

    Attributes:
        name: ``<name>`` of ``<name>_im.jpg``.
        image: Image file.
        gt: Ground-truth file (None only when ``require_gt=False`` and it is absent).
        coarse: Coarse mask file (None only when ``require_coarse=False`` and it is absent).
    """

    name: str
    image: Path
    gt: Path | None
    coarse: Path | None


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in _IMAGE_SUFFIXES


def _check_root(root: Path) -> None:
    if not root.exists():
        raise DataError(f"data root not found: {root}. Check the path (data.root / roots).")
    if not root.is_dir():
        raise DataError(f"data root is not a folder: {root}.")


def _complain(message: str, strict: bool) -> None:
    if strict:
        raise DataError(f"{message} Fix the folder, or pass strict=False to skip such files.")
    warnings.warn(f"{message} Skipped.", stacklevel=3)


def _match_stems(
    images: list[Path], masks: list[Path], dirs: tuple[Path, Path], prefix: str, strict: bool
) -> list[Pair]:
    """Pairs images with masks by stem; unmatched files raise (strict) or warn and are skipped."""
    by_stem: dict[str, Path] = {}
    for mask in masks:
        by_stem.setdefault(mask.stem, mask)
    pairs: list[Pair] = []
    used: set[str] = set()
    seen: dict[str, Path] = {}
    for image in images:
        if image.stem in seen:
            other = seen[image.stem]
            _complain(f"two images share the stem {image.stem!r}: {other}, {image}.", strict)
            continue
        seen[image.stem] = image
        mask = by_stem.get(image.stem)
        if mask is None:
            expected = dirs[1] / f"{image.stem}{_MASK_SUFFIX}"
            _complain(f"image {image} has no mask (expected {expected}).", strict)
            continue
        used.add(image.stem)
        pairs.append(Pair(image=image, mask=mask, name=f"{prefix}{image.stem}"))
    for stem, mask in sorted(by_stem.items()):
        if stem not in used and stem not in seen:
            _complain(f"mask {mask} has no image (expected {dirs[0] / stem}.jpg).", strict)
    return pairs


def _split_dirs(root: Path) -> list[tuple[Path, Path, str]]:
    """Image/mask folder pairs of the DUTS release layout (and similar), with a name prefix."""
    subdirs = {d.name.lower(): d for d in _subdirs(root)}
    found = []
    for lname, folder in sorted(subdirs.items()):
        if lname.endswith("-image"):
            mask_dir = subdirs.get(lname[: -len("-image")] + "-mask")
            if mask_dir is not None:
                found.append((folder, mask_dir, folder.name[: -len("-image")]))
    if found:
        return found
    image_dirs = [d for n, d in subdirs.items() if n in _IMAGE_DIR_NAMES or n.endswith("-image")]
    mask_dirs = [d for n, d in subdirs.items() if n in _MASK_DIR_NAMES or n.endswith("-mask")]
    if len(image_dirs) == 1 and len(mask_dirs) == 1:
        return [(image_dirs[0], mask_dirs[0], "")]
    return []


def detect_layout(root: str | os.PathLike[str]) -> str:
    """Guesses the layout of a training folder.

    Args:
        root: Dataset folder.

    Returns:
        ``"duts"``, ``"flat"`` or ``"fss"``.

    Raises:
        DataError: The folder is missing or matches no layout.
    """
    root = Path(root)
    _check_root(root)
    if _split_dirs(root):
        return "duts"
    if any(_is_image(p) for p in _files(root)):
        return "flat"
    if any(any(_is_image(p) for p in _files(d)) for d in _subdirs(root)):
        return "fss"
    raise DataError(f"no image/mask pairs found under {root}; tried layouts: {_TRIED}.")


def find_pairs(
    root: str | os.PathLike[str], layout: str = "auto", strict: bool = True
) -> list[Pair]:
    """Lists the image/mask pairs of a training folder, sorted by name.

    Args:
        root: Dataset folder.
        layout: ``"auto"``, ``"flat"``, ``"duts"`` or ``"fss"`` (see the module docstring).
        strict: If True an image without mask (or mask without image) raises; if False it is
            skipped with a warning.

    Returns:
        Pairs sorted by name; names are unique within the root.

    Raises:
        DataError: Missing root, unknown layout, unmatched files (strict), or no pairs at all.
    """
    root = Path(root)
    _check_root(root)
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "flat":
        files = _files(root)
        pairs = _match_stems(
            [p for p in files if _is_image(p)],
            [p for p in files if p.suffix.lower() == _MASK_SUFFIX],
            (root, root),
            "",
            strict,
        )
    elif layout == "duts":
        dirs = _split_dirs(root)
        if not dirs:
            raise DataError(
                f"{root} has no <NAME>-Image/ + <NAME>-Mask/ folders (layout 'duts'); "
                f"tried layouts: {_TRIED}."
            )
        pairs = []
        for image_dir, mask_dir, name in dirs:
            files = _files(image_dir)
            masks = [p for p in _files(mask_dir) if p.suffix.lower() in IMAGE_EXTENSIONS]
            prefix = f"{name}/" if len(dirs) > 1 else ""
            images = [p for p in files if _is_image(p)]
            pairs += _match_stems(images, masks, (image_dir, mask_dir), prefix, strict)
    elif layout == "fss":
        pairs = []
        for class_dir in _subdirs(root):
            files = _files(class_dir)
            pairs += _match_stems(
                [p for p in files if _is_image(p)],
                [p for p in files if p.suffix.lower() == _MASK_SUFFIX],
                (class_dir, class_dir),
                f"{class_dir.name}/",
                strict,
            )
    else:
        raise DataError(f"unknown layout {layout!r}; use one of 'auto', {', '.join(LAYOUTS)}.")
    if not pairs:
        raise DataError(
            f"no image/mask pairs found under {root} (layout {layout!r}); tried layouts: {_TRIED}."
        )
    return sorted(pairs, key=lambda p: p.name)


def holdout_split(pairs: Sequence[Pair], every: int) -> tuple[list[Pair], list[Pair]]:
    """Splits pairs into (kept, held out): every ``every``-th pair by name (the 0th, the
    ``every``-th, ...) is held out, e.g. ``every=10`` holds out a tenth for choosing settings.
    ``every=0`` holds out nothing. Deterministic: depends on the names only."""
    if every < 0 or every == 1:
        raise DataError(f"holdout_every must be 0 (none) or >= 2, got {every}.")
    ordered = sorted(pairs, key=lambda p: p.name)
    if every == 0:
        return ordered, []
    kept = [p for i, p in enumerate(ordered) if i % every]
    held = [p for i, p in enumerate(ordered) if not i % every]
    return kept, held


def find_big_split(
    split_dir: str | os.PathLike[str],
    coarse_dir: str | os.PathLike[str] | None = None,
    require_gt: bool = True,
    require_coarse: bool = True,
) -> list[BigItem]:
    """Lists a BIG-layout split: ``<name>_im.jpg`` + ``<name>_gt.png`` (+ ``<name>_seg.png``).

    Args:
        split_dir: Folder with ``<name>_im.<jpg|jpeg|png>`` and ``<name>_gt.png`` files.
        coarse_dir: Folder with the coarse masks ``<name>_seg.png``; default ``split_dir``.
        require_gt: Raise if an image has no ``_gt.png`` (False: ``gt=None``).
        require_coarse: Raise if an image has no ``_seg.png`` (False: ``coarse=None``).

    Returns:
        Items sorted by name.

    Raises:
        DataError: Missing folders, no images, or a missing GT / coarse mask.
    """
    split_dir = Path(split_dir)
    coarse_dir = split_dir if coarse_dir is None else Path(coarse_dir)
    _check_root(split_dir)
    if coarse_dir != split_dir and not coarse_dir.is_dir():
        raise DataError(f"coarse mask folder not found: {coarse_dir}. Check data.*.coarse_dirs.")
    items: dict[str, BigItem] = {}
    for path in _files(split_dir):
        stem, suffix = path.stem, path.suffix.lower()
        if not stem.endswith("_im") or suffix not in (".jpg", ".jpeg", ".png"):
            continue
        name = stem[: -len("_im")]
        if name in items:
            raise DataError(f"two images for {name!r} in {split_dir}: {items[name].image}, {path}.")
        gt = split_dir / f"{name}_gt.png"
        coarse = coarse_dir / f"{name}_seg.png"
        if not gt.is_file():
            if require_gt:
                raise DataError(f"image {path} has no ground truth {gt}.")
            gt = None
        if not coarse.is_file():
            if require_coarse:
                raise DataError(
                    f"image {path} has no coarse mask {coarse}; every <name>_im.jpg needs a "
                    f"<name>_seg.png in {coarse_dir}."
                )
            coarse = None
        items[name] = BigItem(name=name, image=path, gt=gt, coarse=coarse)
    if not items:
        raise DataError(
            f"no BIG-layout images (<name>_im.jpg with <name>_gt.png) found in {split_dir}."
        )
    return [items[n] for n in sorted(items)]


def find_coarse_sources(split_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """The coarse-mask sources of a BIG-layout split: every folder in ``<split>_coarse/`` beside
    ``split_dir`` (``test`` -> ``test_coarse/<segmentor>/``), by name; empty when there is none
    (the coarse masks are then ``<name>_seg.png`` in ``split_dir`` itself)."""
    split_dir = Path(split_dir)
    parent = split_dir.parent / f"{split_dir.name}_coarse"
    if not parent.is_dir():
        return {}
    return {d.name: d for d in _subdirs(parent)}


@dataclass(frozen=True)
class RefineJob:
    """One image to refine and its coarse mask.

    Attributes:
        name: the output name (``<name>`` of ``<name>_im.jpg``, else the image's stem).
        image: the image file.
        mask: its coarse mask, or None when none was found (``problem`` says why).
        problem: why the image cannot be refined (None: it can).
    """

    name: str
    image: Path
    mask: Path | None
    problem: str | None = None


_NOT_IMAGES = ("_seg", "_gt", "_mask")  # stems of masks, never images to refine


def _mask_candidates(image: Path, name: str, mask_dir: Path) -> list[Path]:
    exts = (_MASK_SUFFIX, *_IMAGE_SUFFIXES)
    stems = dict.fromkeys((f"{name}_seg", image.stem, name, f"{name}_mask"))
    return [mask_dir / f"{stem}{ext}" for stem in stems for ext in exts]


def pair_for_refinement(
    images: str | os.PathLike[str], masks: str | os.PathLike[str]
) -> list[RefineJob]:
    """The images to refine and their coarse masks.

    ``images`` is a file or a folder; ``masks`` a file (``images`` must then be a file) or a
    folder, which may be the image folder itself. For each image ``<name>_im.<ext>`` or
    ``<stem>.<ext>`` the mask is the first of ``<name>_seg``, ``<stem>``, ``<name>``,
    ``<name>_mask`` (PNG first, then any image suffix) in the mask folder, other than the image
    itself. In a folder, files named ``*_seg``, ``*_gt``, ``*_mask`` are never images; where
    images and masks share one folder, only the ``*_im`` files are images if there are any, and
    ``x.png`` beside ``x.jpg`` is a mask.

    Returns:
        Jobs sorted by name; an image without a mask, or a second image of the same name, is a
        job with a ``problem`` (reported, the others go on).

    Raises:
        DataError: missing paths, a folder of images with a mask file, or no images at all.
    """
    images, masks = Path(images), Path(masks)
    for path, what in ((images, "image"), (masks, "mask")):
        if not path.exists():
            raise DataError(f"{what} path not found: {path}")
    if images.is_file():
        name = images.stem.removesuffix("_im")
        if masks.is_file():
            return [RefineJob(name, images, masks)]
        return [_job(images, name, masks)]
    if masks.is_file():
        raise DataError(
            f"{images} is a folder but --mask {masks} is one file: pass the folder of masks "
            "(paired by name) or refine one image at a time."
        )
    files = [p for p in _files(images) if p.suffix.lower() in IMAGE_EXTENSIONS]
    files = [p for p in files if not p.stem.endswith(_NOT_IMAGES)]
    if masks.resolve() == images.resolve():
        tagged = [p for p in files if p.stem.endswith("_im")]
        # x.jpg + x.png in one folder: the PNG is x.jpg's mask
        others = {p.stem for p in files if p.suffix.lower() != _MASK_SUFFIX}
        files = tagged or [
            p for p in files if p.suffix.lower() != _MASK_SUFFIX or p.stem not in others
        ]
    jobs = [_job(p, p.stem.removesuffix("_im"), masks) for p in files]
    if not jobs:
        raise DataError(
            f"no images in {images} (looked for {', '.join(IMAGE_EXTENSIONS)} files not named "
            "*_seg/*_gt/*_mask)."
        )
    out, seen = [], set()
    for job in sorted(jobs, key=lambda j: (j.name, j.image.name)):
        if job.name in seen:
            job = RefineJob(job.name, job.image, None, f"another image is also named {job.name}")
        seen.add(job.name)
        out.append(job)
    return out


def _job(image: Path, name: str, mask_dir: Path) -> RefineJob:
    for candidate in _mask_candidates(image, name, mask_dir):
        if candidate.is_file() and candidate.resolve() != image.resolve():
            return RefineJob(name, image, candidate)
    return RefineJob(
        name,
        image,
        None,
        f"no mask for {image.name} in {mask_dir} (looked for {name}_seg.png, "
        f"{image.stem}.png, {name}.png, {name}_mask.png)",
    )
