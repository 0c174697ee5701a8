"""Precompute SAM image embeddings of whole training images (SAM-SR v3 training).

``python scripts/precompute_sam_embeddings.py --images data/train/DUTS-TR data/train/fss
--out data/sam_embeddings/vit_h --sam-type vit_h --sam-checkpoint checkpoints/sam_vit_h_4b8939.pth``

SAM-SR v3 samples a training crop's tokens from the embedding of the whole image instead of
running SAM on every crop. Each image's embedding is :func:`samsr.models.sam_crm.sam_embedding`
(exactly what the model computes at inference: the valid token grid of the image resized to the
encoder's input side), stored as float16.

Cache layout (the training loader relies on it):

* ``<out>/<name>_emb.npy``: a ``C x gh x gw`` float16 ``.npy`` array, where ``name`` is
  :attr:`~samsr.engine.image_runs.ImageItem.name` (``<root folder name>/<rel>/<stem>``, POSIX).
  Written atomically (temp file in the same folder, then rename).
* ``<out>/manifest.json``: ``{"format": "samsr-sam-embeddings", "version": 1, "sam_type": ...,
  "img_size": ..., "patch": ..., "channels": ...}``. Written (or checked) before any embedding: a
  run with another SAM into the same folder fails unless ``--overwrite``, which replaces the
  manifest and recomputes every embedding of the run.

An embedding already on disk (complete ``.npy``, float16, ``C`` channels) is skipped, so an
interrupted run is resumed by running it again; a truncated or corrupt file is recomputed. A failing
image is reported and the run goes on; the exit status is 1 if any failed (2: bad input).

Several GPUs split the work under ``torchrun`` (rank ``r`` of ``N`` takes every N-th image from
the r-th, on GPU ``LOCAL_RANK``: ``torchrun --standalone --nproc_per_node=4
scripts/precompute_sam_embeddings.py ...``), or with ``--shard I/N`` in plain processes::

    for k in 0 1 2 3; do
        CUDA_VISIBLE_DEVICES=$k python scripts/precompute_sam_embeddings.py --shard $k/4 ... &
    done; wait
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from samsr.data import sam_cache
from samsr.data.io import DataError, atomic_write_bytes, read_image
from samsr.data.sam_cache import MANIFEST_NAME
from samsr.data.sam_tokens import EMBEDDING_SUFFIX, EMBEDDINGS_FORMAT
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

__all__ = [
    "EMBEDDINGS_FORMAT",
    "EMBEDDINGS_VERSION",
    "EMBEDDING_SUFFIX",
    "MANIFEST_NAME",
    "EmbeddingSummary",
    "build_parser",
    "check_embeddings_manifest",
    "embedding_is_complete",
    "embedding_path",
    "embeddings_manifest",
    "main",
    "make_sam_embeddings",
    "precompute_embeddings",
    "prepare_embeddings_cache",
    "read_embeddings_manifest",
]

EMBEDDINGS_VERSION = 1
MANIFEST_KEYS = ("format", "version", "sam_type", "img_size", "patch", "channels")
_SCRIPT = "scripts/precompute_sam_embeddings.py"


@dataclass
class EmbeddingSummary(Summary):
    """A :class:`~samsr.engine.image_runs.Summary` plus encode time and bytes written."""

    encode_seconds: float = 0.0
    bytes_written: int = 0

    def line(self) -> str:
        """``done 2, ... (of 3 images, 4.2 s), encode 0.510 s/image, wrote 2.10 MB``."""
        mean = self.encode_seconds / self.done if self.done else 0.0
        return (
            f"{super().line()}, encode {mean:.3f} s/image, wrote {self.bytes_written / 1e6:.2f} MB"
        )


# --------------------------------------------------------------------------- cache layout


def embedding_path(cache_dir: str | os.PathLike[str], name: str) -> Path:
    """``<cache_dir>/<name>_emb.npy`` for an image's cache ``name`` (``ImageItem.name``)."""
    return Path(cache_dir) / f"{name}{EMBEDDING_SUFFIX}"


def _encoder_channels(encoder: nn.Module) -> int:
    """Output channels of a SAM ``ImageEncoderViT`` (its neck's first conv)."""
    try:
        return int(encoder.neck[0].out_channels)
    except (AttributeError, IndexError, TypeError):
        param = next(encoder.parameters())
        x = torch.zeros(1, 3, encoder.img_size, encoder.img_size, device=param.device)
        with torch.no_grad():
            return int(encoder(x.to(param.dtype)).shape[1])


def embeddings_manifest(sam_type: str, encoder: nn.Module) -> dict[str, Any]:
    """The manifest of a cache of ``encoder``'s embeddings (see the module docstring)."""
    return {
        "format": EMBEDDINGS_FORMAT,
        "version": EMBEDDINGS_VERSION,
        "sam_type": str(sam_type),
        "img_size": int(encoder.img_size),
        "patch": int(encoder.patch_embed.proj.kernel_size[0]),
        "channels": _encoder_channels(encoder),
    }


def read_embeddings_manifest(cache_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The cache's ``manifest.json``, or None if there is none.

    Raises:
        DataError: The manifest exists but is not a JSON object.
    """
    fix = f"Rerun {_SCRIPT} with --overwrite, or use another --out folder."
    return sam_cache.read_manifest(cache_dir, "SAM embedding cache", fix)


def check_embeddings_manifest(
    cache_dir: str | os.PathLike[str], expected: Mapping[str, Any]
) -> dict[str, Any]:
    """Checks the cache's manifest against ``expected`` (any subset of its fields).

    Returns:
        The manifest on disk.

    Raises:
        DataError: No manifest, or one whose fields differ (each difference is named).
    """
    manifest = read_embeddings_manifest(cache_dir)
    if manifest is None:
        raise DataError(
            f"no SAM embedding cache manifest in {cache_dir} ({MANIFEST_NAME}). Run {_SCRIPT} "
            "first (or let training precompute the embeddings)."
        )
    diffs = sam_cache.manifest_diffs(manifest, expected)
    if diffs:
        foreign = "format" in expected and manifest.get("format") != expected["format"]
        what = "is not a SAM embedding cache" if foreign else "was made with other settings"
        raise DataError(
            f"SAM embedding cache {cache_dir} {what}: " + "; ".join(diffs) + ". Use another "
            "--out folder for these settings, or --overwrite to replace the manifest and "
            "recompute every embedding."
        )
    return manifest


def prepare_embeddings_cache(
    cache_dir: str | os.PathLike[str],
    manifest: Mapping[str, Any],
    overwrite: bool = False,
    write: bool = True,
) -> None:
    """Writes the manifest of a new cache, or checks an existing one.

    Args:
        cache_dir: Cache folder (created if needed).
        manifest: The settings in use; with ``write=False`` any subset of the fields.
        overwrite: Replace a manifest made with other settings (or an unreadable one).
        write: False only checks (nothing is written).

    Raises:
        DataError: The cache was made with other settings and ``overwrite`` is False.
    """
    try:
        existing = read_embeddings_manifest(cache_dir)
    except DataError:
        if not overwrite:
            raise
        existing = None
    if existing is not None and not overwrite:
        check_embeddings_manifest(cache_dir, manifest)
        return
    if write and (existing is None or any(existing.get(k) != v for k, v in manifest.items())):
        sam_cache.write_manifest(cache_dir, manifest)


def embedding_is_complete(path: str | os.PathLike[str], channels: int) -> bool:
    """True if ``path`` is a complete float16 ``C x gh x gw`` ``.npy`` with ``channels`` channels.

    Reads only the header (the data size is checked against the file size), so a truncated file
    is detected without loading it.
    """
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                return False
            offset = handle.tell()
        size = os.path.getsize(path)
    except (OSError, ValueError):
        return False
    if dtype != np.dtype(np.float16) or len(shape) != 3 or shape[0] != channels:
        return False
    return size == offset + int(np.prod(shape)) * dtype.itemsize


# --------------------------------------------------------------------------- the run


def _encode(encoder: nn.Module, image: np.ndarray, device: torch.device) -> np.ndarray:
    """``C x gh x gw`` float16 embedding of an H x W x 3 uint8 RGB image."""
    from samsr.device import synchronize
    from samsr.models.sam_crm import sam_embedding

    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(device)
    emb = sam_embedding(encoder, x)[0].to(torch.float16).cpu().numpy()
    synchronize(device)
    if not np.isfinite(emb).all():
        raise ValueError("the embedding has non-finite values in float16")
    return emb


def precompute_embeddings(
    items: Sequence[ImageItem],
    out: str | os.PathLike[str],
    encoder: nn.Module,
    device: str | torch.device,
    overwrite: bool = False,
    progress: bool = True,
) -> EmbeddingSummary:
    """Computes and writes the embeddings of ``items`` that are not on disk yet.

    The manifest is not touched here: :func:`prepare_embeddings_cache` (what :func:`main` does)
    writes or checks it first.

    Args:
        items: Images (one shard of :func:`~samsr.engine.image_runs.collect_images`).
        out: Cache folder.
        encoder: SAM's ``ImageEncoderViT`` (moved to ``device`` and set to eval mode).
        device: Where to encode.
        overwrite: Recompute every embedding, complete or not.
        progress: Show a tqdm bar.

    Returns:
        The :class:`EmbeddingSummary`; failures carry the image file and the error.
    """
    device = torch.device(device)
    encoder = encoder.to(device).eval()
    channels = _encoder_channels(encoder)
    summary = EmbeddingSummary(total=len(items))

    def is_current(item: ImageItem) -> bool:
        return embedding_is_complete(embedding_path(out, item.name), channels)

    def compute(item: ImageItem) -> None:
        image = read_image(item.image)
        t0 = time.perf_counter()
        emb = _encode(encoder, image, device)
        summary.encode_seconds += time.perf_counter() - t0
        buffer = io.BytesIO()
        np.save(buffer, emb)
        data = buffer.getvalue()
        atomic_write_bytes(embedding_path(out, item.name), data)
        summary.bytes_written += len(data)

    return run_per_image(items, summary, "SAM embeddings", is_current, compute, overwrite, progress)


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The ``scripts/precompute_sam_embeddings.py`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="precompute_sam_embeddings.py",
        description="Precompute SAM image embeddings of whole images (SAM-SR v3 training).",
        epilog="Several GPUs: torchrun --nproc_per_node=4 scripts/precompute_sam_embeddings.py "
        "..., or CUDA_VISIBLE_DEVICES=k python scripts/precompute_sam_embeddings.py --shard k/4 "
        "... for k = 0..3. Rerun the same command to resume.",
    )
    add_input_arguments(parser)
    add_run_arguments(parser, "embedding")
    return parser


def make_sam_embeddings(
    images: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    sam: SamSettings,
    device: str = "auto",
    layout: str = "auto",
    shard: tuple[int, int] = (0, 1),
    overwrite: bool = False,
    progress: bool = True,
) -> EmbeddingSummary:
    """Precomputes SAM's whole-image embeddings (SAM-SR v3, cached training tokens) into ``out``.

    Resumable, shardable and guarded like :func:`samsr.engine.precompute.make_sam_maps`; called by
    ``scripts/precompute_sam_embeddings.py`` and by ``scripts/train.py``
    (``model.train_tokens.precompute``).

    Raises:
        DataError: bad folders, a cache of another SAM, a missing SAM checkpoint.
    """
    from samsr.device import resolve_device
    from samsr.guidance.build import build_from_settings

    shard_index, shard_count = shard
    items = collect_images(images, layout)[shard_index::shard_count]
    if not sam.tiny:
        checkpoint = Path(str(sam.checkpoint or "")).expanduser()
        if not sam.checkpoint or not checkpoint.is_file():
            raise DataError(
                f"SAM checkpoint not found: {checkpoint if sam.checkpoint else '(not set)'}. "
                f"Pass the official {sam.type} .pth file (--sam-checkpoint PATH, or "
                "model.sam.checkpoint)."
            )
    # fail fast, before loading SAM: the fields known without building it
    known: dict[str, Any] = {
        "format": EMBEDDINGS_FORMAT,
        "version": EMBEDDINGS_VERSION,
        "sam_type": sam.kind,
    }
    if sam.tiny:
        known["img_size"] = sam.tiny_img_size
    prepare_embeddings_cache(out, known, overwrite=overwrite, write=False)
    torch_device = resolve_device(device)
    sam_model = build_from_settings(sam, torch_device)
    encoder = sam_model.image_encoder.eval().requires_grad_(False)
    del sam_model  # the prompt encoder and mask decoder are not needed
    manifest = embeddings_manifest(sam.kind, encoder)
    prepare_embeddings_cache(out, manifest, overwrite=overwrite)
    where = f" (shard {shard_index}/{shard_count})" if shard_count > 1 else ""
    print(f"SAM embeddings{where}: {len(items)} images -> {out} ({torch_device})", file=sys.stderr)
    return precompute_embeddings(
        items, out, encoder, torch_device, overwrite=overwrite, progress=progress
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 1 some images failed, 2 bad input)."""
    args = resolve_run_arguments(build_parser().parse_args(argv))
    try:
        summary = make_sam_embeddings(
            args.images, args.out, sam_from_args(args), args.device, args.layout, args.shard,
            args.overwrite, not args.no_progress,
        )  # fmt: skip
    except (DataError, FileNotFoundError, ValueError) as exc:
        return report_error(exc)
    return report_summary("SAM embeddings", summary, args.shard)
