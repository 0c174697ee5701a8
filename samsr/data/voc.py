"""PASCAL VOC 2012 (+ SBD) semantic segmentation, sampled as the thesis trains its patch baseline.

Layouts, as released:

* VOC 2012 (``voc_root`` = ``VOCdevkit/VOC2012``, or a folder holding it):
  ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette PNG: the pixel values are the
  class indices 0-20, 255 = unlabelled object border), ``ImageSets/Segmentation/<split>.txt``;
* SBD, the augmented set (``sbd_root`` = ``benchmark_RELEASE/dataset``, or a folder holding it):
  ``img/<id>.jpg``, ``cls/<id>.mat`` (MATLAB ``GTcls.Segmentation``, class indices 0-20; read with
  SciPy), ``train.txt`` and ``val.txt``. With ``sbd_root``, the training list is VOC's list plus
  every SBD image (train and val) that is not in VOC 2012 ``val``: the usual 10,582-image
  "train_aug" set. VOC's own label wins where both have one.

Sampling (thesis section 4.1, :class:`UpscaleCropDataset`): each image is upscaled to a random
long side in ``long_side`` (2k-6k), a random ``crop_size`` x ``crop_size`` window of the upscaled
image is taken, then a horizontal flip and optional colour jitter. Only the window is resampled
(one ``cv2.warpAffine`` per array, bilinear image, nearest labels): the upscaled image is never
built. Where the window leaves the image (a short side below ``crop_size``) the image is the mean
colour and the label ``ignore_index``.

Samples (the segmentation batch contract): ``image`` 3 x S x S float32 RGB in [0, 1], ``label``
S x S int64 class indices (``ignore_index`` for unlabelled pixels), ``meta`` as for refinement.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from samsr.data.io import DataError, check_same_size, read_image
from samsr.data.transforms import image_to_tensor, photometric
from samsr.models.crm import IMAGENET_MEAN

__all__ = [
    "SegItem",
    "UpscaleCropDataset",
    "find_sbd",
    "find_voc",
    "read_label",
    "upscale_crop",
    "upscaled_size",
    "voc_items",
    "voc_palette",
]

IGNORE_INDEX = 255


def voc_palette() -> list[int]:
    """VOC's 256-colour label palette as a flat RGB list (class ``i``'s colour spreads the bits
    of ``i`` over the high bits of R, G and B; 255 is (224, 224, 192))."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


@dataclass(frozen=True)
class SegItem:
    """One image and its class-index label file (``.png`` or SBD ``.mat``)."""

    name: str
    image: Path
    label: Path


def _find(root: str | os.PathLike[str], marker: str, nested: tuple[str, ...], what: str) -> Path:
    """``root`` or the first of ``root/<nested>`` that holds ``marker``."""
    root = Path(root).expanduser()
    for candidate in (root, *(root / n for n in nested)):
        if (candidate / marker).exists():
            return candidate
    raise DataError(
        f"{what} not found under {root}: expected {marker} in it or in "
        f"{', '.join(str(root / n) for n in nested)}. Point the config at the release folder."
    )


def find_voc(root: str | os.PathLike[str]) -> Path:
    """The ``VOC2012`` folder of a VOC 2012 release at or below ``root``."""
    return _find(root, "JPEGImages", ("VOC2012", "VOCdevkit/VOC2012"), "PASCAL VOC 2012")


def find_sbd(root: str | os.PathLike[str]) -> Path:
    """The ``dataset`` folder of an SBD release at or below ``root``."""
    return _find(root, "cls", ("dataset", "benchmark_RELEASE/dataset"), "SBD")


def _ids(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"image list not found: {path}. Check the split name and the release.")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"image list {path} is empty.")
    return ids


def voc_items(
    voc_root: str | os.PathLike[str],
    split: str = "train",
    sbd_root: str | os.PathLike[str] | None = None,
) -> list[SegItem]:
    """The images of VOC 2012 ``split`` (``train``, ``val``, ``trainval``), plus with
    ``sbd_root`` every SBD image outside VOC ``val`` (see the module docstring); sorted by name.

    Raises:
        DataError: a missing folder, list, image or label file.
    """
    voc = find_voc(voc_root)
    lists = voc / "ImageSets" / "Segmentation"
    items = {
        i: SegItem(i, voc / "JPEGImages" / f"{i}.jpg", voc / "SegmentationClass" / f"{i}.png")
        for i in _ids(lists / f"{split}.txt")
    }
    if sbd_root is not None:
        sbd = find_sbd(sbd_root)
        held = set(_ids(lists / "val.txt"))
        for i in _ids(sbd / "train.txt") + _ids(sbd / "val.txt"):
            if i not in held and i not in items:
                items[i] = SegItem(i, sbd / "img" / f"{i}.jpg", sbd / "cls" / f"{i}.mat")
    for item in items.values():
        for path in (item.image, item.label):
            if not path.is_file():
                raise DataError(f"{path} is listed for {item.name} but missing; re-extract it.")
    return [items[i] for i in sorted(items)]


def read_label(path: str | os.PathLike[str]) -> np.ndarray:
    """H x W uint8 class indices from a VOC palette PNG (its indices, not its colours) or an
    SBD ``.mat`` (``GTcls.Segmentation``)."""
    path = Path(path)
    if path.suffix.lower() == ".mat":
        try:
            from scipy.io import loadmat
        except ImportError as err:
            raise DataError(f"reading SBD labels ({path}) needs SciPy: pip install scipy") from err
        try:
            label = loadmat(str(path), squeeze_me=True, struct_as_record=False)["GTcls"]
            return np.asarray(label.Segmentation, dtype=np.uint8)
        except (OSError, KeyError, ValueError, AttributeError) as err:
            raise DataError(f"{path} is not an SBD cls file (GTcls.Segmentation): {err}") from err
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DataError(
                    f"{path} is a {im.mode} image; a class label must be a palette (P) or "
                    "grey (L) PNG whose values are class indices."
                )
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read the label {path}: {err}") from err


def upscaled_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(H, W) of a ``height`` x ``width`` image upscaled to ``long_side`` (aspect kept)."""
    scale = long_side / max(height, width)
    return round(height * scale), round(width * scale)


def upscale_crop(
    image: np.ndarray,
    label: np.ndarray,
    long_side: int,
    crop: int,
    top: int,
    left: int,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``crop`` x ``crop`` window at (``top``, ``left``) of the image and label upscaled to
    ``long_side``, resampled alone (pixel centres aligned: ``cv2.resize``'s convention).

    Returns:
        crop x crop x 3 uint8 image (mean colour outside the image), crop x crop uint8 label
        (``ignore_index`` outside).
    """
    height, width = label.shape
    scale = long_side / max(height, width)
    # window pixel (x, y) samples source ((x + left + 0.5) / scale - 0.5, (y + top + ...)), the
    # resize convention; outside the source, borders are replicated, as cv2.resize does
    inverse = np.array(
        [[1 / scale, 0.0, (left + 0.5) / scale - 0.5], [0.0, 1 / scale, (top + 0.5) / scale - 0.5]]
    )
    size = (crop, crop)
    warp = cv2.WARP_INVERSE_MAP
    img = cv2.warpAffine(image, inverse, size, flags=cv2.INTER_LINEAR | warp,
                         borderMode=cv2.BORDER_REPLICATE)  # fmt: skip
    lab = cv2.warpAffine(label, inverse, size, flags=cv2.INTER_NEAREST | warp,
                         borderMode=cv2.BORDER_REPLICATE)  # fmt: skip
    # pixels of the window beyond the upscaled image's extent are padding
    out_h, out_w = upscaled_size(height, width, long_side)
    rows = np.arange(crop) + top
    cols = np.arange(crop) + left
    outside = (rows[:, None] >= out_h) | (cols[None, :] >= out_w)
    if outside.any():
        img[outside] = np.round(np.array(IMAGENET_MEAN) * 255).astype(np.uint8)
        lab[outside] = ignore_index
    return img, lab


class UpscaleCropDataset(Dataset):
    """Training crops of class-labelled images upscaled to 2k-6k (thesis section 4.1).

    Args:
        items: the images and labels (:func:`voc_items`, or a synthetic set's).
        crop_size: the crop side (512).
        long_side: (min, max) long side the image is upscaled to, drawn uniformly.
        flip_prob: horizontal flip probability.
        color_jitter: apply the project's colour jitter and random grayscale (off by default:
            the PSPNet authors jitter scale, rotation and blur instead; here the upscaling is the
            scale jitter).
        ignore_index: the label of unlabelled pixels.
        num_classes: labels >= this (other than ``ignore_index``) raise.

    Randomness: a generator seeded from torch's global RNG per sample (seeded per stream position
    by the trainer), so runs resume exactly.
    """

    def __init__(
        self,
        items: list[SegItem],
        crop_size: int = 512,
        long_side: tuple[int, int] = (2000, 6000),
        flip_prob: float = 0.5,
        color_jitter: bool = False,
        ignore_index: int = IGNORE_INDEX,
        num_classes: int = 21,
    ) -> None:
        if not items:
            raise DataError("the segmentation training set is empty (no images listed).")
        lo, hi = (int(v) for v in long_side)
        if not 0 < lo <= hi:
            raise DataError(f"long_side must be 0 < min <= max, got {long_side}.")
        if crop_size <= 0:
            raise DataError(f"crop_size must be > 0, got {crop_size}.")
        self.items = list(items)
        self.crop = int(crop_size)
        self.long_side = (lo, hi)
        self.flip_prob = float(flip_prob)
        self.color_jitter = bool(color_jitter)
        self.ignore_index = int(ignore_index)
        self.num_classes = int(num_classes)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        rng = np.random.default_rng(int(torch.randint(2**62, (1,))))
        image = read_image(item.image)
        label = read_label(item.label)
        check_same_size(label, item.label, image.shape[:2], item.image, "label")
        bad = (label >= self.num_classes) & (label != self.ignore_index)
        if bad.any():
            raise DataError(
                f"{item.label} has class {int(label[bad].max())} but the model has "
                f"{self.num_classes} classes (model.net.num_classes)."
            )
        long_side = int(rng.integers(self.long_side[0], self.long_side[1] + 1))
        out_h, out_w = upscaled_size(*image.shape[:2], long_side)
        top = int(rng.integers(0, max(0, out_h - self.crop) + 1))
        left = int(rng.integers(0, max(0, out_w - self.crop) + 1))
        img, lab = upscale_crop(image, label, long_side, self.crop, top, left, self.ignore_index)
        if rng.random() < self.flip_prob:
            img, lab = img[:, ::-1], lab[:, ::-1]
        pixels = img.astype(np.float32) / 255.0
        if self.color_jitter:
            pixels = photometric(pixels, rng)
        return {
            "image": image_to_tensor(pixels),
            "label": torch.from_numpy(np.ascontiguousarray(lab)).long(),
            "meta": {"name": item.name, "index": index},
        }
