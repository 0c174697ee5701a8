"""A deterministic synthetic multi-class set in the PASCAL VOC and BIG layouts (for the patch
baseline's tests and CPU smoke runs; no real data needed).

Each image holds one object drawn like :mod:`samsr.data.synthetic`'s, of class ``c`` in
``1 .. num_classes - 1``; its class is its colour (hue ``c`` of ``num_classes - 1`` evenly spaced
hues, saturated) on a grey-ish textured background, so a small network can learn it. Labels carry
VOC's 255 band (3 px) on the object's outline. Written::

    <out>/VOC2012/JPEGImages/<id>.jpg, SegmentationClass/<id>.png (palette PNG),
    <out>/VOC2012/ImageSets/Segmentation/{train,val}.txt     long side ``train_long_side``
    <out>/big/test/<id>_<c>_im.jpg + <id>_<c>_gt.png          BIG layout, long side in
                                                              ``test_long_side``; the last
                                                              integer of the name is the class
    <out>/manifest.json                                       the arguments, written last

Every sample has its own seed; files are written atomically and existing ones are skipped.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from samsr.data.io import atomic_write_bytes, write_image, write_mask
from samsr.data.synthetic import (
    _claim_folder,
    _draw_shape,
    _finish_folder,
    _image_size,
    _texture,
)
from samsr.data.voc import IGNORE_INDEX, voc_palette

__all__ = ["make_synthetic_classes", "render_class_sample"]

_VERSION = 1


def render_class_sample(
    rng: np.random.Generator, height: int, width: int, cls: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """One image and its object mask (object of class ``cls``).

    Returns:
        (H x W x 3 uint8 RGB, H x W uint8 {0, 255} object mask).
    """
    thin = max(2, round(max(height, width) / 160))
    mask = _draw_shape(rng, height, width, (thin, 3 * thin))
    scale = 6.0 * (max(height, width) / 320.0) ** 0.5
    bg = _texture(rng, height, width, float(rng.uniform(0, 180)), 25.0,
                  float(rng.uniform(90, 170)), scale * 1.5)  # fmt: skip
    hue = (cls - 1) * 180.0 / (num_classes - 1)
    fg = _texture(rng, height, width, hue, 220.0, float(rng.uniform(150, 220)), scale)
    image = np.where(mask[..., None] > 0, fg, bg)
    return cv2.GaussianBlur(image, (0, 0), 0.7), mask


def _label(mask: np.ndarray, cls: int) -> np.ndarray:
    """H x W uint8: ``cls`` inside, 0 outside, ``IGNORE_INDEX`` on a 3 px band on the outline."""
    label = np.where(mask > 0, cls, 0).astype(np.uint8)
    band = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    label[band] = IGNORE_INDEX
    return label


def _write_palette_png(path: Path, label: np.ndarray) -> None:
    im = Image.fromarray(label, mode="P")
    im.putpalette(voc_palette())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def make_synthetic_classes(
    out_dir: str | os.PathLike[str],
    num_classes: int = 4,
    num_train: int = 48,
    num_val: int = 8,
    num_test: int = 4,
    train_long_side: int = 320,
    test_long_side: tuple[int, int] = (1024, 2048),
    seed: int = 0,
) -> Path:
    """Writes the set (see the module docstring); returns ``out_dir``. Idempotent."""
    out = Path(out_dir)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
    record = {
        "kind": "synthetic_classes",
        "version": _VERSION,
        "num_classes": int(num_classes),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "num_test": int(num_test),
        "train_long_side": int(train_long_side),
        "test_long_side": [int(v) for v in test_long_side],
        "seed": int(seed),
    }
    out.mkdir(parents=True, exist_ok=True)
    _claim_folder(out, record, f"Delete {out} or choose another folder.")
    if (out / "manifest.json").is_file():
        return out
    voc = out / "VOC2012"
    lists = voc / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True, exist_ok=True)
    for split, count, code in (("train", num_train, 0), ("val", num_val, 1)):
        ids = []
        for i in range(count):
            name = f"{split}_{i:05d}"
            ids.append(name)
            image_path = voc / "JPEGImages" / f"{name}.jpg"
            label_path = voc / "SegmentationClass" / f"{name}.png"
            if image_path.is_file() and label_path.is_file():
                continue
            rng = np.random.default_rng([seed, code, i])
            cls = int(rng.integers(1, num_classes))
            h, w = _image_size(rng, train_long_side)
            image, mask = render_class_sample(rng, h, w, cls, num_classes)
            write_image(image_path, image)
            _write_palette_png(label_path, _label(mask, cls))
        atomic_write_bytes(lists / f"{split}.txt", ("\n".join(ids) + "\n").encode())
    big = out / "big" / "test"
    for i in range(num_test):
        rng = np.random.default_rng([seed, 2, i])
        cls = int(rng.integers(1, num_classes))
        name = f"test_{i:05d}_{cls}"
        if (big / f"{name}_im.jpg").is_file() and (big / f"{name}_gt.png").is_file():
            continue
        h, w = _image_size(rng, int(rng.integers(test_long_side[0], test_long_side[1] + 1)))
        image, mask = render_class_sample(rng, h, w, cls, num_classes)
        write_image(big / f"{name}_im.jpg", image)
        write_mask(big / f"{name}_gt.png", mask)
    _finish_folder(out, record)
    return out
