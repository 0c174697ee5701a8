"""Deterministic synthetic data, and export of any image/mask pairs to the BIG evaluation layout.

:func:`make_synthetic` draws textured objects (a wobbly body with holes, 2-6 px legs, antennae and
handles) on textured backgrounds of a contrasting hue and brightness, so a small CNN can learn the
boundaries, and writes::

    <out>/train/<stem>.jpg + <stem>.png                 flat layout, long side ~320
    <out>/val/<name>_im.jpg + <name>_gt.png             BIG layout, long side 1536-3072
    <out>/test/<name>_im.jpg + <name>_gt.png
    <out>/val_coarse/down<f>/<name>_seg.png             BIG-style coarse masks, one folder per
    <out>/test_coarse/down<f>/<name>_seg.png            factor f (see big_style_coarse)
    <out>/manifest.json                                 the arguments, written last

Every sample has its own seed (``seed``, split, index), so the bytes depend only on the arguments.
Files are written atomically and existing ones are skipped: an interrupted run resumes.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from samsr.data.coarse_synthesis import big_style_coarse
from samsr.data.io import (
    DataError,
    atomic_write_bytes,
    check_same_size,
    read_image,
    read_mask,
    temp_path_for,
    write_image,
    write_mask,
)
from samsr.data.layouts import Pair, find_pairs, holdout_split

__all__ = [
    "coarse_source_name",
    "export_big_layout",
    "make_synthetic",
    "render_sample",
]

_MANIFEST = "manifest.json"
_PENDING = ".manifest.pending.json"
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_VERSION = 1


def coarse_source_name(factor: int) -> str:
    """Name of the coarse-mask source made with :func:`big_style_coarse` (``8 -> "down8"``)."""
    return f"down{int(factor)}"


# --------------------------------------------------------------------------- rendering


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a random grid of ``cell`` px cells, upsampled."""
    gh, gw = max(2, round(h / cell) + 2), max(2, round(w / cell) + 2)
    grid = rng.standard_normal((gh, gw)).astype(np.float32) * 0.5
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _pattern(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """A random periodic pattern in [-1, 1]: stripes, checks or a wavy grid (period ~ ``scale``)."""
    kind = int(rng.integers(3))
    period = float(rng.uniform(0.6, 1.6)) * scale
    angle = float(rng.uniform(0, np.pi))
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    u = (xs * np.cos(angle) + ys * np.sin(angle)) * (2 * np.pi / period)
    if kind == 0:
        return np.sin(u)
    v = (-xs * np.sin(angle) + ys * np.cos(angle)) * (2 * np.pi / period)
    if kind == 1:
        return np.sign(np.sin(u) * np.sin(v)).astype(np.float32)
    return np.sin(u + 1.5 * np.sin(v * 0.5))


def _texture(
    rng: np.random.Generator, h: int, w: int, hue: float, sat: float, val: float, scale: float
) -> np.ndarray:
    """``H x W x 3`` uint8 RGB texture around one HSV colour (OpenCV hue units, 0-180).

    Large textures are drawn at half resolution (their patterns are >= ~9 px there) and upsampled;
    per-pixel grain is then added at full resolution.
    """
    step = 2 if max(h, w) > 1200 else 1
    sh, sw, s_scale = -(-h // step), -(-w // step), scale / step
    low = _smooth_noise(rng, sh, sw, cell=s_scale * 4)
    pattern = _pattern(rng, sh, sw, s_scale)
    value = val + 22 * low + float(rng.uniform(10, 25)) * pattern
    hsv = np.empty((sh, sw, 3), np.uint8)
    hsv[..., 0] = np.mod(hue + 6 * low, 180).astype(np.uint8)
    hsv[..., 1] = np.clip(sat + 25 * low, 0, 255).astype(np.uint8)
    hsv[..., 2] = np.clip(value, 0, 255).astype(np.uint8)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if step > 1:
        rgb = cv2.resize(rgb, (sw * step, sh * step), interpolation=cv2.INTER_LINEAR)[:h, :w]
    grain = rng.integers(-10, 11, size=(h, w, 1), dtype=np.int16)
    return np.clip(rgb.astype(np.int16) + grain, 0, 255).astype(np.uint8)


def _body_polygon(rng: np.random.Generator, cx: float, cy: float, radius: float) -> np.ndarray:
    """A star-shaped wobbly outline with a serrated edge: ``N x 2`` int32 (x, y).

    Low harmonics give the overall shape; a few high harmonics (12-48 teeth around the outline,
    a few percent of the radius) give boundary detail that an 8x-downsampled mask loses, as
    real objects' fur, leaves or spokes are lost by a low-resolution segmentor.
    """
    theta = np.linspace(0, 2 * np.pi, 960, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 6):
        r += float(rng.uniform(0.0, 0.22 / k * 2)) * np.cos(k * theta + float(rng.uniform(0, 6.3)))
    for k in rng.choice(np.arange(12, 49), size=int(rng.integers(2, 5)), replace=False):
        r += float(rng.uniform(0.01, 0.035)) * np.cos(int(k) * theta + float(rng.uniform(0, 6.3)))
    aspect = float(rng.uniform(0.6, 1.0))
    pts = np.stack([cx + radius * r * np.cos(theta), cy + aspect * radius * r * np.sin(theta)], 1)
    return np.round(pts).astype(np.int32)


def _draw_shape(rng: np.random.Generator, h: int, w: int, thin_px: tuple[int, int]) -> np.ndarray:
    """``H x W`` uint8 {0, 255}: body + blobs, holes, legs, antennae, handles."""
    mask = np.zeros((h, w), np.uint8)
    side = min(h, w)
    radius = float(rng.uniform(0.14, 0.26)) * side
    cx = float(rng.uniform(0.38, 0.62)) * w
    cy = float(rng.uniform(0.4, 0.6)) * h
    body = _body_polygon(rng, cx, cy, radius)
    cv2.fillPoly(mask, [body], 255)
    for _ in range(int(rng.integers(0, 3))):  # extra blobs (head, tail) on the outline
        px, py = body[int(rng.integers(len(body)))]
        axes = (int(radius * rng.uniform(0.2, 0.45)), int(radius * rng.uniform(0.2, 0.45)))
        cv2.ellipse(mask, (int(px), int(py)), axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    for _ in range(int(rng.integers(1, 4))):  # holes well inside the body
        hx = cx + radius * float(rng.uniform(-0.35, 0.35))
        hy = cy + radius * float(rng.uniform(-0.25, 0.25))
        axes = (int(radius * rng.uniform(0.06, 0.2)), int(radius * rng.uniform(0.06, 0.2)))
        cv2.ellipse(mask, (int(hx), int(hy)), axes, float(rng.uniform(0, 180)), 0, 360, 0, -1)
    lo, hi = thin_px
    for _ in range(int(rng.integers(2, 7))):  # legs: bent polylines from the outline outwards
        angle = float(rng.uniform(0, 2 * np.pi))
        length = radius * float(rng.uniform(0.4, 0.9))
        start = np.array([cx, cy]) + 0.8 * radius * np.array([np.cos(angle), np.sin(angle)])
        points = [start]
        direction = angle
        for _ in range(int(rng.integers(2, 4))):
            direction += float(rng.uniform(-0.7, 0.7))
            step = length / 3 * np.array([np.cos(direction), np.sin(direction)])
            points.append(points[-1] + step)
        line = np.round(np.array(points)).astype(np.int32)
        cv2.polylines(mask, [line], False, 255, int(rng.integers(lo, hi + 1)), cv2.LINE_8)
    for _ in range(int(rng.integers(1, 3))):  # antennae: thin curves (quadratic Bezier)
        angle = float(rng.uniform(-np.pi, 0))  # upwards
        p0 = np.array([cx, cy]) + 0.7 * radius * np.array([np.cos(angle), np.sin(angle)])
        p2 = p0 + radius * float(rng.uniform(0.5, 1.0)) * np.array([np.cos(angle), np.sin(angle)])
        p1 = (p0 + p2) / 2 + radius * 0.3 * rng.standard_normal(2)
        t = np.linspace(0, 1, 40)[:, None]
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        width = int(rng.integers(lo, min(hi, lo + 2) + 1))
        cv2.polylines(mask, [np.round(curve).astype(np.int32)], False, 255, width, cv2.LINE_8)
    if rng.random() < 0.7:  # a handle: an open arc attached to the outline (encloses a hole)
        px, py = body[int(rng.integers(len(body)))]
        axes = (int(radius * rng.uniform(0.3, 0.55)), int(radius * rng.uniform(0.2, 0.45)))
        start_angle = float(rng.uniform(0, 360))
        sweep = float(rng.uniform(180, 300))
        width = int(rng.integers(lo, hi + 1))
        center = (int(px), int(py))
        cv2.ellipse(mask, center, axes, 0, start_angle, start_angle + sweep, 255, width)
    return mask


def render_sample(
    rng: np.random.Generator, height: int, width: int, thin_px: tuple[int, int] = (2, 6)
) -> tuple[np.ndarray, np.ndarray]:
    """Draws one synthetic image and its mask.

    Args:
        rng: Random generator (the only source of randomness).
        height: Image height.
        width: Image width.
        thin_px: Range of the thin parts' widths in pixels (inclusive).

    Returns:
        ``(H x W x 3 uint8 RGB image, H x W uint8 {0, 255} mask)``.
    """
    mask = _draw_shape(rng, height, width, thin_px)
    bg_hue = float(rng.uniform(0, 180))
    fg_hue = (bg_hue + float(rng.uniform(45, 135))) % 180
    bg_val = float(rng.uniform(70, 200))
    gap = float(rng.uniform(60, 110))  # brightness contrast between object and background
    fg_val = min(235.0, bg_val + gap) if bg_val < 135 else max(35.0, bg_val - gap)
    # texture scale grows slowly with the resolution so high-res images stay textured
    scale = 6.0 * (max(height, width) / 320.0) ** 0.5
    image = _texture(rng, height, width, bg_hue, float(rng.uniform(40, 150)), bg_val, scale * 1.5)
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    fg_sat = float(rng.uniform(110, 230))
    if len(ys):  # the object's texture, drawn over its bounding box only
        box = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
        box_h, box_w = int(ys[-1] - ys[0] + 1), int(xs[-1] - xs[0] + 1)
        fg = _texture(rng, box_h, box_w, fg_hue, fg_sat, fg_val, scale)
        image[box] = np.where(mask[box][..., None] > 0, fg, image[box])
    image = cv2.GaussianBlur(image, (0, 0), 0.7)  # soft, realistic edges
    return image, mask


# --------------------------------------------------------------------------- writing


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def _claim_folder(out_dir: Path, record: dict[str, Any], fix: str) -> None:
    """Raises if ``out_dir`` holds (or was started with) output of different arguments."""
    for name in (_MANIFEST, _PENDING):
        path = out_dir / name
        if path.is_file():
            try:
                existing = json.loads(path.read_text())
            except (OSError, ValueError):
                existing = None
            if existing != record:
                raise DataError(
                    f"{out_dir} already holds data made with different arguments ({path}: "
                    f"{existing}); requested {record}. {fix}"
                )
    if not (out_dir / _MANIFEST).is_file():
        _atomic_json(out_dir / _PENDING, record)


def _finish_folder(out_dir: Path, record: dict[str, Any]) -> None:
    _atomic_json(out_dir / _MANIFEST, record)
    (out_dir / _PENDING).unlink(missing_ok=True)


def _image_size(rng: np.random.Generator, long_side: int) -> tuple[int, int]:
    """(height, width) with the given long side and a random aspect ratio in [0.66, 1]."""
    short = max(8, round(long_side * float(rng.uniform(0.66, 1.0))))
    return (short, long_side) if rng.random() < 0.6 else (long_side, short)


def make_synthetic(
    out_dir: str | os.PathLike[str],
    num_train: int = 400,
    train_long_side: int = 320,
    num_val: int = 4,
    num_test: int = 8,
    test_long_side: tuple[int, int] = (1536, 3072),
    coarse_factors: Sequence[int] = (8, 16),
    seed: int = 0,
    thin_px: tuple[int, int] = (2, 6),
    jpeg_quality: int = 95,
) -> dict[str, Path]:
    """Generates (or completes) the synthetic dataset described in the module docstring.

    Args:
        out_dir: Output folder (created).
        num_train: Training pairs (flat layout).
        train_long_side: Long side of training images.
        num_val: Validation objects (BIG layout).
        num_test: Test objects (BIG layout).
        test_long_side: Range (inclusive) of the val/test images' long side.
        coarse_factors: One coarse-mask source ``down<f>`` per factor.
        seed: Base seed.
        thin_px: Width range of thin parts, in pixels at every resolution.
        jpeg_quality: JPEG quality of the images.

    Returns:
        Paths: ``root``, ``train``, ``val``, ``test``, ``val_coarse``, ``test_coarse``,
        ``manifest`` and one ``<split>_coarse/down<f>`` per split and factor.

    Raises:
        DataError: ``out_dir`` holds data made with different arguments.
    """
    out = Path(out_dir)
    args = {
        "num_train": int(num_train),
        "train_long_side": int(train_long_side),
        "num_val": int(num_val),
        "num_test": int(num_test),
        "test_long_side": [int(v) for v in test_long_side],
        "coarse_factors": [int(f) for f in coarse_factors],
        "seed": int(seed),
        "thin_px": [int(v) for v in thin_px],
        "jpeg_quality": int(jpeg_quality),
    }
    record = {"generator": "samsr.data.synthetic.make_synthetic", "version": _VERSION, "args": args}
    _claim_folder(out, record, "Use another out_dir (or delete this one).")
    sources = [coarse_source_name(f) for f in args["coarse_factors"]]
    paths: dict[str, Path] = {"root": out, "manifest": out / _MANIFEST}
    for split in ("train", "val", "test"):
        paths[split] = out / split
        paths[split].mkdir(parents=True, exist_ok=True)
    for split in ("val", "test"):
        paths[f"{split}_coarse"] = out / f"{split}_coarse"
        for source in sources:
            paths[f"{split}_coarse/{source}"] = out / f"{split}_coarse" / source
            paths[f"{split}_coarse/{source}"].mkdir(parents=True, exist_ok=True)

    for index in range(args["num_train"]):
        stem = f"syn_{index:05d}"
        image_path, mask_path = out / "train" / f"{stem}.jpg", out / "train" / f"{stem}.png"
        if image_path.is_file() and mask_path.is_file():
            continue
        rng = np.random.default_rng([args["seed"], _SPLIT_CODES["train"], index])
        image, mask = render_sample(rng, *_image_size(rng, args["train_long_side"]), thin_px)
        write_mask(mask_path, mask)
        write_image(image_path, image, jpeg_quality)

    lo, hi = args["test_long_side"]
    for split, count in (("val", args["num_val"]), ("test", args["num_test"])):
        for index in range(count):
            name = f"syn_{split}_{index:03d}"
            image_path = out / split / f"{name}_im.jpg"
            gt_path = out / split / f"{name}_gt.png"
            seg_paths = [out / f"{split}_coarse" / s / f"{name}_seg.png" for s in sources]
            if all(p.is_file() for p in (image_path, gt_path, *seg_paths)):
                continue
            rng = np.random.default_rng([args["seed"], _SPLIT_CODES[split], index])
            long_side = int(rng.integers(lo, hi + 1))
            image, mask = render_sample(rng, *_image_size(rng, long_side), thin_px)
            for factor, seg_path in zip(args["coarse_factors"], seg_paths, strict=True):
                write_mask(seg_path, big_style_coarse(mask, factor))
            write_mask(gt_path, mask)
            write_image(image_path, image, jpeg_quality)

    _finish_folder(out, record)
    return paths


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = temp_path_for(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export_big_layout(
    pairs: Sequence[Pair] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    coarse_factors: Sequence[int] = (8, 16),
    *,
    source_root: str | os.PathLike[str] | None = None,
    layout: str = "auto",
    split: str = "test",
    strict: bool = True,
    max_items: int | None = None,
    holdout_every: int = 0,
) -> dict[str, Path]:
    """Turns image/mask pairs (e.g. DUTS-TE) into a BIG-layout evaluation folder.

    Writes ``<out_dir>/<split>/<name>_im.jpg`` (JPEG sources are copied byte for byte, others
    written as ``_im.png``), ``<name>_gt.png`` (binarised 0/255 with
    :func:`~samsr.data.io.read_mask`) and ``<out_dir>/<split>_coarse/down<f>/<name>_seg.png`` made
    with :func:`~samsr.data.coarse_synthesis.big_style_coarse`. ``/`` in pair names becomes ``__``.
    Idempotent: existing files are skipped; a different request into the same folder raises.

    Args:
        pairs: Pairs to export; or None to list ``source_root`` with :func:`find_pairs`.
        out_dir: Output folder (required).
        coarse_factors: One coarse-mask source ``down<f>`` per factor.
        source_root: Dataset folder used when ``pairs`` is None.
        layout: Layout of ``source_root``.
        split: Split folder name.
        strict: Passed to :func:`find_pairs`.
        max_items: Export only the first ``max_items`` pairs (sorted by name).
        holdout_every: > 0 exports only the pairs a training set with the same
            ``holdout_every`` leaves out (:func:`~samsr.data.layouts.holdout_split`).

    Returns:
        Paths: ``root``, ``<split>``, ``<split>_coarse``, ``<split>_coarse/down<f>``, ``manifest``.

    Raises:
        DataError: No pairs, a GT whose size differs from its image, or a conflicting folder.
    """
    if out_dir is None:
        raise DataError("export_big_layout needs out_dir.")
    if pairs is None:
        if source_root is None:
            raise DataError("export_big_layout needs pairs or source_root.")
        pairs = find_pairs(source_root, layout=layout, strict=strict)
    pairs = sorted(pairs, key=lambda p: p.name)
    if holdout_every:
        _, pairs = holdout_split(pairs, int(holdout_every))
    if max_items is not None:
        pairs = pairs[: int(max_items)]
    if not pairs:
        raise DataError(f"export_big_layout: no pairs to export into {out_dir}.")
    out = Path(out_dir)
    factors = [int(f) for f in coarse_factors]
    names = [p.name.replace("/", "__") for p in pairs]
    if len(set(names)) != len(names):
        raise DataError("export_big_layout: pair names are not unique after replacing '/'.")
    record = {
        "generator": "samsr.data.synthetic.export_big_layout",
        "version": _VERSION,
        "args": {"split": split, "coarse_factors": factors, "names": names},
    }
    _claim_folder(out, record, "Use another out_dir (or delete this one).")
    split_dir = out / split
    split_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"root": out, split: split_dir, "manifest": out / _MANIFEST}
    paths[f"{split}_coarse"] = out / f"{split}_coarse"
    seg_dirs = []
    for factor in factors:
        seg_dir = out / f"{split}_coarse" / coarse_source_name(factor)
        seg_dir.mkdir(parents=True, exist_ok=True)
        paths[f"{split}_coarse/{coarse_source_name(factor)}"] = seg_dir
        seg_dirs.append(seg_dir)
    for pair, name in zip(pairs, names, strict=True):
        is_jpeg = pair.image.suffix.lower() in (".jpg", ".jpeg")
        image_path = split_dir / f"{name}_im.{'jpg' if is_jpeg else 'png'}"
        gt_path = split_dir / f"{name}_gt.png"
        seg_paths = [d / f"{name}_seg.png" for d in seg_dirs]
        if all(p.is_file() for p in (image_path, gt_path, *seg_paths)):
            continue
        gt = read_mask(pair.mask)
        try:
            with Image.open(pair.image) as pil:
                width, height = pil.size
        except Exception as exc:  # noqa: BLE001 - any decoder failure becomes a DataError
            raise DataError(f"cannot read image file {pair.image}: {exc}") from exc
        check_same_size(gt, pair.mask, (height, width), pair.image)
        for factor, seg_path in zip(factors, seg_paths, strict=True):
            write_mask(seg_path, big_style_coarse(gt, factor))
        write_mask(gt_path, gt)
        if is_jpeg:
            _copy_atomic(pair.image, image_path)
        else:
            write_image(image_path, read_image(pair.image))
    _finish_folder(out, record)
    return paths
