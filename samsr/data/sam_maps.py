"""SAM colour maps (SAM-SR v2.1, SPEC section 6) on disk: the cache of precomputed maps, loading.

The maps themselves are painted by :func:`samsr.guidance.maps.paint_sam_map` (the painting rule,
its colours and its one resize rule live there).

Cache layout (made by ``python scripts/precompute_sam.py``)::

    <cache_root>/manifest.json                       what made the maps (compared on every use)
    <cache_root>/<root>/<rel>/<stem>_sam.png         one RGB PNG per image, the image's size

``<root>`` is the folder name of the dataset root the image was found in (``DUTS-TR``, ``fss``, a
BIG split such as ``test``) and ``<rel>/<stem>`` the image path relative to that root without its
suffix: ``data/train/DUTS-TR/x.jpg`` -> ``<cache_root>/DUTS-TR/x_sam.png``,
``data/train/fss/cat/1.jpg`` -> ``<cache_root>/fss/cat/1_sam.png``, ``data/BIG/test/a_im.jpg``
-> ``<cache_root>/test/a_im_sam.png``. ``<root>/<rel>/<stem>`` is also the name that seeds the
colours. Dataset roots sharing a folder name therefore need separate cache roots.

``manifest.json`` holds ``format_version`` (of the map format), ``sam_type`` (``vit_h``, ``vit_l``,
``vit_b`` or ``tiny``), ``checkpoint`` (file ``name`` and ``size`` in bytes; null for the random
tiny SAM), ``amg`` (every AMG setting, ``max_side`` included) and an ``info`` section (date,
command; never compared). Each PNG also carries the manifest's hash in a ``samsr_sam_map`` text
chunk, so a cache switched to other settings (``--overwrite``) and interrupted never mixes maps
of both: maps with another hash are recomputed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, PngImagePlugin

from samsr.data import sam_cache
from samsr.data.io import DataError, atomic_write_bytes, read_image
from samsr.data.sam_cache import MANIFEST_NAME, absolute, dataset_root_of, map_name

if TYPE_CHECKING:
    from samsr.guidance.runner import AmgConfig

__all__ = [
    "dataset_root_of",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "MAP_SUFFIX",
    "SamMapLoader",
    "check_manifest",
    "load_map",
    "make_manifest",
    "manifest_key",
    "map_identity",
    "map_is_current",
    "map_loader",
    "map_name",
    "map_path",
    "read_manifest",
    "write_manifest",
    "write_map",
]

FORMAT_VERSION = 1
"""Version of the map format (painting rule + file layout); bump it when either changes."""
MAP_SUFFIX = "_sam.png"
_KEY_CHUNK = "samsr_sam_map"
_INFO = "info"
_PRECOMPUTE = "python scripts/precompute_sam.py"

# --------------------------------------------------------------------------- cache layout


def map_path(
    cache_root: str | os.PathLike[str],
    dataset_root: str | os.PathLike[str],
    image_path: str | os.PathLike[str],
) -> Path:
    """``<cache_root>/<root folder name>/<rel>/<stem>_sam.png`` (see the module docstring)."""
    return Path(cache_root) / f"{map_name(dataset_root, image_path)}{MAP_SUFFIX}"


def make_manifest(
    sam_type: str, checkpoint: str | os.PathLike[str] | None, amg: Mapping[str, Any]
) -> dict[str, Any]:
    """The identity of a cache: what :func:`check_manifest` compares.

    Args:
        sam_type: ``vit_h``, ``vit_l``, ``vit_b`` or ``tiny``.
        checkpoint: SAM checkpoint file (its name and size are recorded); None for no checkpoint.
        amg: Every AMG setting (``dataclasses.asdict(AmgConfig)``), ``max_side`` included.

    Returns:
        JSON-ready dict with ``format_version``, ``sam_type``, ``checkpoint``, ``amg``.
    """
    ckpt = None
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise DataError(f"SAM checkpoint not found: {path}. Pass --sam-checkpoint PATH.")
        ckpt = {"name": path.name, "size": path.stat().st_size}
    manifest = {
        "format_version": FORMAT_VERSION,
        "sam_type": str(sam_type),
        "checkpoint": ckpt,
        "amg": dict(amg),
    }
    return json.loads(json.dumps(manifest, default=_jsonable))  # tuples -> lists, as on disk


def _jsonable(value: Any) -> Any:
    """JSON form of numpy values (e.g. AMG ``point_grids`` arrays)."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def manifest_key(manifest: Mapping[str, Any]) -> str:
    """A 16-hex-digit hash of a manifest's identity (everything but ``info``)."""
    identity = {k: v for k, v in manifest.items() if k != _INFO}
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=_jsonable)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def read_manifest(cache_root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The cache's manifest, or None if there is none.

    Raises:
        DataError: The manifest exists but is not a valid JSON object.
    """
    fix = f"Rerun {_PRECOMPUTE} with --overwrite."
    return sam_cache.read_manifest(cache_root, "SAM cache", fix)


def write_manifest(cache_root: str | os.PathLike[str], manifest: Mapping[str, Any]) -> Path:
    """Writes ``<cache_root>/manifest.json`` atomically; returns its path."""
    return sam_cache.write_manifest(cache_root, manifest)


def check_manifest(
    cache_root: str | os.PathLike[str], expected: Mapping[str, Any], exact: bool = False
) -> dict[str, Any]:
    """Checks that a cache was made with the expected settings.

    Every key of ``expected`` (nested dicts key by key, e.g. ``amg.points_per_side``) must equal
    the manifest's; the ``info`` section is never compared.

    Args:
        cache_root: Cache folder.
        expected: Usually :func:`make_manifest`'s result for the settings in use.
        exact: Also fail on keys the manifest has and ``expected`` lacks (False: ignore them,
            so a caller may check only some fields).

    Returns:
        The manifest.

    Raises:
        DataError: No manifest, or fields that differ (each named, with both values).
    """
    manifest = read_manifest(cache_root)
    if manifest is None:
        raise DataError(
            f"no SAM cache manifest {Path(cache_root) / MANIFEST_NAME}: the cache is missing or "
            f"was not made by {_PRECOMPUTE}. Run it with --out {cache_root}."
        )
    identity = {k: v for k, v in expected.items() if k != _INFO}
    wanted = json.loads(json.dumps(identity, default=_jsonable))
    diffs = sam_cache.manifest_diffs(manifest, wanted, exact=exact, ignore=(_INFO,))
    if diffs:
        raise DataError(
            f"SAM cache {cache_root} was made with other settings ({'; '.join(diffs)}). Use "
            f"another cache folder, or rerun {_PRECOMPUTE} --out {cache_root} --overwrite "
            "with the new settings to replace it."
        )
    return manifest


def write_map(path: str | os.PathLike[str], sam_map: np.ndarray, key: str) -> None:
    """Writes a map as an RGB PNG carrying the manifest ``key``, atomically.

    Args:
        path: Target ``..._sam.png``.
        sam_map: ``H x W x 3`` uint8 RGB map.
        key: :func:`manifest_key` of the cache's manifest.
    """
    sam_map = np.asarray(sam_map)
    if sam_map.ndim != 3 or sam_map.shape[2] != 3 or sam_map.dtype != np.uint8:
        raise DataError(f"write_map({path}): expected H x W x 3 uint8, got {sam_map.shape}.")
    info = PngImagePlugin.PngInfo()
    info.add_text(_KEY_CHUNK, key)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(sam_map)).save(
        buffer, format="PNG", pnginfo=info, compress_level=3
    )
    atomic_write_bytes(path, buffer.getvalue())


def map_is_current(path: str | os.PathLike[str], key: str) -> bool:
    """True if ``path`` is a readable map written with manifest ``key`` (reads the header only)."""
    try:
        with Image.open(path) as pil:
            return pil.format == "PNG" and pil.info.get(_KEY_CHUNK) == key
    except (OSError, ValueError, SyntaxError):
        return False


def _size_text(hw: tuple[int, ...]) -> str:
    return f"{hw[1]}x{hw[0]} (WxH)"


def load_map(
    path: str | os.PathLike[str],
    expected_hw: tuple[int, int] | None = None,
    hint: str = f"run {_PRECOMPUTE} --images <dataset roots> --out <cache root> ...",
) -> np.ndarray:
    """Reads a precomputed SAM map.

    Args:
        path: ``..._sam.png`` (see :func:`map_path`).
        expected_hw: ``(H, W)`` it must have (the image size); None skips the check.
        hint: How to make a missing map, appended to the error.

    Returns:
        ``H x W x 3`` uint8 RGB map.

    Raises:
        DataError: Missing/unreadable map (with ``hint``), or a size other than ``expected_hw``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"SAM map not found: {path}. To make it, {hint}")
    sam_map = read_image(path)
    if expected_hw is not None and sam_map.shape[:2] != tuple(expected_hw):
        raise DataError(
            f"SAM map {path} is {_size_text(sam_map.shape[:2])} but the image is "
            f"{_size_text(tuple(expected_hw))}; the cache was made from other images. "
            f"Rerun {_PRECOMPUTE} --overwrite into this cache, or use another one."
        )
    return sam_map


class SamMapLoader:
    """Reads cached SAM maps; an ``extra_loader`` for ``RefinementTrainDataset``.

    Called as ``loader(pair, (H, W))`` with a :class:`~samsr.data.layouts.Pair`; finds the dataset
    root holding ``pair.image`` (the deepest one) and reads :func:`map_path`. Picklable, so it
    works in DataLoader workers.

    Args:
        cache_root: Cache folder (``--out`` of ``scripts/precompute_sam.py``).
        dataset_roots: Dataset roots (the training ``roots``, BIG split folders).
        expected_manifest: If given, checked once here with :func:`check_manifest`.

    Raises:
        DataError: Manifest mismatch (at construction); missing map or size mismatch (per call).
    """

    def __init__(
        self,
        cache_root: str | os.PathLike[str],
        dataset_roots: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
        expected_manifest: Mapping[str, Any] | None = None,
    ) -> None:
        if isinstance(dataset_roots, (str, os.PathLike)):
            dataset_roots = [dataset_roots]
        if not dataset_roots:
            raise DataError("SamMapLoader needs at least one dataset root.")
        self.cache_root = Path(cache_root)
        self.dataset_roots = sorted(
            (absolute(r) for r in dataset_roots), key=lambda p: -len(p.parts)
        )
        self.manifest = (
            check_manifest(self.cache_root, expected_manifest)
            if expected_manifest is not None
            else None
        )

    def root_of(self, image_path: str | os.PathLike[str]) -> Path:
        """The dataset root holding ``image_path`` (the deepest one)."""
        return dataset_root_of(self.dataset_roots, image_path, "SAM map loader")

    def path_for(self, image_path: str | os.PathLike[str]) -> Path:
        """The cached map of ``image_path``."""
        return map_path(self.cache_root, self.root_of(image_path), image_path)

    def _hint(self, root: Path) -> str:
        manifest = self.manifest or _read_manifest_quietly(self.cache_root)
        sam = "--sam-type vit_h --sam-checkpoint <sam_vit_h.pth>"
        if manifest and manifest.get("sam_type") == "tiny":
            sam = "--tiny-sam"
        elif manifest and manifest.get("sam_type"):
            ckpt = (manifest.get("checkpoint") or {}).get("name", "<checkpoint>")
            sam = f"--sam-type {manifest['sam_type']} --sam-checkpoint <path to {ckpt}>"
        return (
            f"run: {_PRECOMPUTE} --images {shlex.quote(str(root))} "
            f"--out {shlex.quote(str(self.cache_root))} {sam} (same AMG settings as the cache)"
        )

    def __call__(self, pair: Any, hw: tuple[int, int]) -> np.ndarray:
        """Returns the ``H x W x 3`` uint8 map of ``pair.image``; ``hw`` is the image's (H, W)."""
        root = self.root_of(pair.image)
        path = map_path(self.cache_root, root, pair.image)
        if not path.is_file():
            raise DataError(
                f"SAM map not found: {path} (for image {pair.image}). To make it, "
                f"{self._hint(root)}"
            )
        return load_map(path, hw)


def map_identity(sam_kind: str, amg: AmgConfig) -> dict[str, Any]:
    """What cached maps must have been made with: SAM's kind and the AMG settings (its
    ``points_per_batch`` aside: batching does not change the masks; nor the checkpoint file:
    training needs only the maps, not SAM itself)."""
    amg_values = json.loads(json.dumps(dataclasses.asdict(amg), default=_jsonable))
    amg_values.pop("points_per_batch", None)
    return {"sam_type": sam_kind, "amg": amg_values}


def map_loader(
    cache_dir: str | os.PathLike[str],
    dataset_roots: Sequence[str | os.PathLike[str]],
    sam_type: str,
    tiny: bool,
    amg: AmgConfig,
) -> SamMapLoader:
    """The loader of a model's cached maps (``model.train_inputs.extra_loader.loader``), with
    the cache's manifest checked against the model's SAM (``tiny`` or ``sam_type``) and AMG."""
    identity = map_identity("tiny" if tiny else sam_type, amg)
    return SamMapLoader(cache_dir, dataset_roots, expected_manifest=identity)


def _read_manifest_quietly(cache_root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """:func:`read_manifest`, but None instead of an error (for hints in messages)."""
    try:
        return read_manifest(cache_root)
    except DataError:
        return None
