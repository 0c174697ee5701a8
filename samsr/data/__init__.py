"""Data: file layouts, datasets, paired transforms, coarse-mask synthesis, synthetic data.

Batch contract (the one place it is written down)
-------------------------------------------------

Training samples (:class:`~samsr.data.train_dataset.RefinementTrainDataset`) are dicts:

* ``image``: ``3 x S x S`` float32 RGB in [0, 1], **not** normalised (the model normalises);
* ``coarse``: ``1 x S x S`` float32 in {0, 1}, the coarse input mask (synthesised from ``gt``);
* ``gt``: ``1 x S x S`` float32 in {0, 1}, the ground truth;
* ``meta``: dict with ``name`` (str, ``<root folder>/<pair name>``, unique) and ``index`` (int);
* ``extra`` (only with an ``extra_loader``): ``C x S x S`` float32 in [0, 1], an aligned map such
  as a cached SAM colour map.

PyTorch's default collate turns them into ``B x 3 x S x S``, ``B x 1 x S x S`` tensors and ``meta``
into ``{"name": list[str], "index": LongTensor[B]}``. Images smaller than S are padded with 0
(image before the colour jitter, and gt; see :mod:`samsr.data.transforms`).

Segmentation training samples (:class:`~samsr.data.voc.UpscaleCropDataset`, the patch baseline)
have ``image`` as above, ``label`` (``S x S`` int64 class indices, 255 = ignored) and ``meta``, and
no ``coarse``/``gt``: the trainer tells the two kinds apart by ``label``.

Evaluation samples (:class:`~samsr.data.train_dataset.EvalDataset`; full resolution, variable
size, not batched) are dicts:

* ``image``: ``H x W x 3`` uint8 RGB numpy array;
* ``gt``: ``H x W`` uint8 numpy array in {0, 255};
* ``coarse``: ``H x W`` uint8 numpy array in {0, 255} (resized to the image size if needed);
* ``name``: str; ``source``: str, the coarse-mask source (segmentor) name.

Masks on disk are binarised with ``value > 128`` (any non-zero value for 0/1 masks; channel 0 of
RGB masks). Bad input raises :class:`~samsr.data.io.DataError` naming the file and the fix.

Exports are resolved lazily, so importing this package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from samsr.data.coarse_synthesis import (
        big_style_coarse,
        modify_boundary,
        perturb,
        synthesize_coarse,
    )
    from samsr.data.io import (
        DataError,
        read_coarse_mask,
        read_image,
        read_mask,
        write_image,
        write_mask,
    )
    from samsr.data.layouts import BigItem, Pair, find_big_split, find_pairs
    from samsr.data.synthetic import export_big_layout, make_synthetic
    from samsr.data.train_dataset import EvalDataset, RefinementTrainDataset
    from samsr.data.transforms import CropFlip, photometric

_EXPORTS = {
    "DataError": "io",
    "read_coarse_mask": "io",
    "read_image": "io",
    "read_mask": "io",
    "write_image": "io",
    "write_mask": "io",
    "BigItem": "layouts",
    "Pair": "layouts",
    "find_big_split": "layouts",
    "find_pairs": "layouts",
    "big_style_coarse": "coarse_synthesis",
    "modify_boundary": "coarse_synthesis",
    "perturb": "coarse_synthesis",
    "synthesize_coarse": "coarse_synthesis",
    "CropFlip": "transforms",
    "photometric": "transforms",
    "EvalDataset": "train_dataset",
    "RefinementTrainDataset": "train_dataset",
    "export_big_layout": "synthetic",
    "make_synthetic": "synthetic",
}

__all__ = [
    "BigItem",
    "CropFlip",
    "DataError",
    "EvalDataset",
    "Pair",
    "RefinementTrainDataset",
    "big_style_coarse",
    "export_big_layout",
    "find_big_split",
    "find_pairs",
    "make_synthetic",
    "modify_boundary",
    "perturb",
    "photometric",
    "read_coarse_mask",
    "read_image",
    "read_mask",
    "synthesize_coarse",
    "write_image",
    "write_mask",
]
assert sorted(__all__) == sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Imports an exported name's module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'samsr.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"samsr.data.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
