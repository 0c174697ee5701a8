"""SAM tokens of training crops from cached whole-image embeddings (SAM-SR v3, ``cached`` scheme).

``scripts/precompute_sam_embeddings.py`` stores, once per training image, SAM's embedding of the
whole image (``<cache>/<root folder name>/<rel>/<stem>_emb.npy``: float16, C x gh x gw, the
valid token grid; ``<cache>/manifest.json`` names the SAM). For each crop, :class:`SamTokenLoader`
samples that embedding at the token positions the crop would have if it were encoded on its own
(its own valid grid, 64 x 64 for a square crop), through the crop's geometry (offset, flip), so
the model takes them exactly where it would take its per-crop SAM tokens. The tokens then carry
the whole image's context at the image's own scale, as at inference, for one SAM pass per image
instead of one per sample.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samsr.data import sam_cache
from samsr.data.io import DataError
from samsr.data.sam_cache import dataset_root_of, map_name
from samsr.data.transforms import CropFlip
from samsr.guidance.build import PATCH, SamSettings
from samsr.models.components.sam_frame import Frame, sample_tokens, valid_grid

__all__ = ["EMBEDDING_SUFFIX", "EMBEDDINGS_FORMAT", "SamTokenLoader", "crop_frame", "token_loader"]

EMBEDDINGS_FORMAT = "samsr-sam-embeddings"
EMBEDDING_SUFFIX = "_emb.npy"
_PRECOMPUTE = "python scripts/precompute_sam_embeddings.py"


def crop_frame(geometry: CropFlip) -> Frame:
    """Where a crop lies in its source image (the flip mirrors the columns)."""
    oy = geometry.top - geometry.pad_top
    ox = geometry.left - geometry.pad_left
    h, w = geometry.height, geometry.width
    if geometry.flip:  # crop column X shows source column ox + crop_w - X
        return Frame(h, w, 1.0, float(oy), -1.0, float(ox + geometry.crop_w))
    return Frame(h, w, 1.0, float(oy), 1.0, float(ox))


class SamTokenLoader:
    """A ``side_loader`` for ``RefinementTrainDataset``: ``{"sam_tokens": C x gh x gw}`` per crop.

    Picklable (DataLoader workers). The manifest is checked once, at construction.

    Args:
        cache_dir: the embedding cache (``--out`` of ``scripts/precompute_sam_embeddings.py``).
        dataset_roots: the training roots.
        sam_type: the model's SAM (``vit_h`` ... or ``tiny``); the cache must hold its tokens.
        img_size: SAM's input side; ``patch``: its patch size (must match the cache).

    Raises:
        DataError: missing or mismatched manifest (construction); missing file (per call).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        dataset_roots: Sequence[str | os.PathLike[str]],
        sam_type: str,
        img_size: int,
        patch: int,
    ) -> None:
        if not dataset_roots:
            raise DataError("SamTokenLoader needs at least one dataset root.")
        self.cache_dir = Path(cache_dir)
        roots = (Path(os.path.abspath(r)) for r in dataset_roots)
        self.dataset_roots = sorted(roots, key=lambda p: -len(p.parts))
        self.sam_type, self.img_size, self.patch = sam_type, int(img_size), int(patch)
        self._check_manifest()

    def _command(self, root: Path | None = None) -> str:
        images = " ".join(shlex.quote(str(r)) for r in ([root] if root else self.dataset_roots))
        sam = (
            f"--tiny-sam --tiny-img-size {self.img_size}"
            if self.sam_type == "tiny"
            else f"--sam-type {self.sam_type} --sam-checkpoint <sam_{self.sam_type} .pth>"
        )
        return f"{_PRECOMPUTE} --images {images} --out {shlex.quote(str(self.cache_dir))} {sam}"

    def _check_manifest(self) -> None:
        fix = f"Remake it with {self._command()} --overwrite"
        manifest = sam_cache.read_manifest(self.cache_dir, "SAM embedding cache", fix)
        if manifest is None:
            raise DataError(
                f"no SAM embedding cache at {self.cache_dir} (no {sam_cache.MANIFEST_NAME}). "
                f"Make it with: {self._command()} (or set model.train_tokens.precompute=true)"
            )
        expected = {
            "format": EMBEDDINGS_FORMAT,
            "sam_type": self.sam_type,
            "img_size": self.img_size,
            "patch": self.patch,
        }
        diffs = sam_cache.manifest_diffs(manifest, expected)
        if diffs:
            raise DataError(
                f"the SAM embeddings in {self.cache_dir} were made with other settings than the "
                f"model needs ({'; '.join(diffs)}): use another model.train_tokens.cache_dir "
                f"or remake them with {self._command()} --overwrite"
            )

    def path_for(self, image_path: str | os.PathLike[str]) -> Path:
        """The cached embedding of ``image_path``."""
        root = dataset_root_of(self.dataset_roots, image_path, "SAM token loader")
        return self.cache_dir / f"{map_name(root, image_path)}{EMBEDDING_SUFFIX}"

    def __call__(self, pair: Any, geometry: CropFlip) -> dict[str, torch.Tensor]:
        """``{"sam_tokens": C x gh x gw float16}`` for the crop ``geometry`` of ``pair.image``."""
        path = self.path_for(pair.image)
        if not path.is_file():
            root = dataset_root_of(self.dataset_roots, pair.image, "SAM token loader")
            raise DataError(
                f"SAM embedding not found: {path} (for image {pair.image}). Make it with: "
                f"{self._command(root)}"
            )
        try:
            emb = np.load(path)
        except (OSError, ValueError) as err:
            raise DataError(f"unreadable SAM embedding {path}: {err}; delete it and rerun") from err
        expected = valid_grid(geometry.height, geometry.width, self.img_size, self.patch)
        if emb.ndim != 3 or tuple(emb.shape[1:]) != expected:
            raise DataError(
                f"SAM embedding {path} has shape {emb.shape}, expected C x {expected[0]} x "
                f"{expected[1]} for the {geometry.height}x{geometry.width} image; remake it."
            )
        size = (geometry.crop_h, geometry.crop_w)
        grid = valid_grid(*size, self.img_size, self.patch)
        tokens = sample_tokens(
            torch.from_numpy(emb).float()[None],
            crop_frame(geometry),
            self.img_size,
            self.patch,
            size,
            grid,
        )
        return {"sam_tokens": tokens[0].half()}


def token_loader(
    cache_dir: str | os.PathLike[str],
    dataset_roots: Sequence[str | os.PathLike[str]],
    sam_type: str,
    tiny: bool,
    tiny_img_size: int,
) -> SamTokenLoader:
    """The loader of a SAM-SR v3 model's cached tokens (``model/train_tokens=cached``): the cache
    must hold the embeddings of the model's SAM (``tiny`` or ``sam_type``, at its input side)."""
    settings = SamSettings(type=sam_type, tiny=tiny, tiny_img_size=int(tiny_img_size))
    return SamTokenLoader(cache_dir, dataset_roots, settings.kind, settings.input_size, PATCH)
