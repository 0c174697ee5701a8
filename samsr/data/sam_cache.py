"""The on-disk side shared by SAM's training caches (v2.1 maps, v3 embeddings): naming, manifests.

Both caches hold one file per training image, named after the image's place in its dataset root
(:func:`map_name`: ``<root folder name>/<rel>/<stem>``), plus a ``manifest.json`` that records what
made them; every use compares the manifest with the settings at hand (:func:`manifest_diffs`) and
refuses a mismatch with the fix. :mod:`samsr.data.sam_maps` and :mod:`samsr.data.sam_tokens` (and
the precompute commands that write them) build on these helpers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from samsr.data.io import DataError, atomic_write_bytes

__all__ = [
    "MANIFEST_NAME",
    "absolute",
    "dataset_root_of",
    "flatten_keys",
    "manifest_diffs",
    "map_name",
    "read_manifest",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"


def absolute(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute without resolving links (how roots and images are compared)."""
    return Path(os.path.abspath(path))


def map_name(dataset_root: str | os.PathLike[str], image_path: str | os.PathLike[str]) -> str:
    """The cache name of an image: ``<root folder name>/<rel>/<stem>`` (POSIX separators).

    Raises:
        DataError: The image is not inside ``dataset_root``.
    """
    root, image = absolute(dataset_root), absolute(image_path)
    if not root.name:
        raise DataError(f"dataset root {dataset_root} has no folder name; use a sub-folder.")
    try:
        rel = image.relative_to(root)
    except ValueError:
        try:
            rel = image.resolve().relative_to(root.resolve())
        except ValueError:
            raise DataError(
                f"image {image_path} is not inside dataset root {dataset_root}."
            ) from None
    return (Path(root.name) / rel.with_suffix("")).as_posix()


def dataset_root_of(
    roots: Sequence[Path], image_path: str | os.PathLike[str], who: str = "loader"
) -> Path:
    """The root among ``roots`` (absolute, deepest first) that holds ``image_path``.

    Raises:
        DataError: No root holds it (``who`` names the caller in the message).
    """
    image = absolute(image_path)
    for root in roots:
        if image.is_relative_to(root):
            return root
    resolved = image.resolve()
    for root in roots:
        if resolved.is_relative_to(root.resolve()):
            return root
    raise DataError(
        f"image {image_path} is under none of the {who}'s dataset roots "
        f"{[str(r) for r in roots]}; add its root to dataset_roots."
    )


def read_manifest(cache_dir: str | os.PathLike[str], what: str, fix: str) -> dict[str, Any] | None:
    """A cache's ``manifest.json``, or None if there is none.

    Args:
        cache_dir: the cache folder.
        what: the cache's name in messages (``SAM cache``, ``SAM embedding cache``).
        fix: what to do about an unreadable manifest (appended to the message).

    Raises:
        DataError: the manifest exists but is not a JSON object.
    """
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {what} manifest {path}: {exc}. {fix}") from exc
    if not isinstance(data, dict):
        raise DataError(f"{what} manifest {path} is not a JSON object. {fix}")
    return data


def write_manifest(cache_dir: str | os.PathLike[str], manifest: Mapping[str, Any]) -> Path:
    """Writes ``<cache_dir>/manifest.json`` atomically (sorted keys); returns its path."""
    path = Path(cache_dir) / MANIFEST_NAME
    text = json.dumps(dict(manifest), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def flatten_keys(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf of nested mappings (an empty mapping is a leaf)."""
    if isinstance(data, Mapping) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten_keys(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


_MISSING = object()


def manifest_diffs(
    manifest: Mapping[str, Any],
    expected: Mapping[str, Any],
    exact: bool = False,
    ignore: Sequence[str] = (),
) -> list[str]:
    """The fields where ``manifest`` differs from ``expected`` (nested dicts key by key, e.g.
    ``amg.points_per_side``), each as ``key: cache <value>, expected <value>``.

    Args:
        manifest: what the cache's manifest says.
        expected: the settings in use (any subset of the fields).
        exact: also list fields the manifest has and ``expected`` lacks.
        ignore: top-level sections never compared (e.g. ``info``).
    """
    have = flatten_keys(manifest)
    wanted = flatten_keys({k: v for k, v in expected.items() if k not in ignore})
    diffs = []
    for key, value in wanted.items():
        got = have.get(key, _MISSING)
        if got != value:
            got_text = "(missing)" if got is _MISSING else json.dumps(got)
            diffs.append(f"{key}: cache {got_text}, expected {json.dumps(value)}")
    if exact:
        for key, got in have.items():
            if key not in wanted and key.split(".")[0] not in ignore:
                diffs.append(f"{key}: cache {json.dumps(got)}, expected (missing)")
    return diffs
