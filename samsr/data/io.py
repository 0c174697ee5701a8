"""Reading and writing images and masks, with errors that name the file and the fix.

Images come back as ``H x W x 3`` uint8 RGB arrays, masks as ``H x W`` uint8 arrays: in {0, 255}
for scoring and training (:func:`read_mask`), soft values kept for the coarse masks a refiner is
fed (:func:`read_coarse_mask`, which also reads label maps with a ``label`` id).
Files are decoded from bytes (``np.fromfile`` + ``cv2.imdecode``) so any path works; EXIF
orientation is ignored unless asked for (``read_image(exif=True)``), as in the reference
implementations (PIL), so images and masks stay aligned.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from samsr.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "atomic_write_bytes",
    "binarize_mask",
    "check_pixel_limit",
    "check_same_size",
    "exif_orientation",
    "read_coarse_mask",
    "read_image",
    "read_mask",
    "resize_mask",
    "write_image",
    "write_mask",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
"""File suffixes (lower case) recognised as images or masks."""


def _check_exists(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{what} file not found: {path}. Check the data root / file name.")
    if not path.is_file():
        raise DataError(f"{what} path is not a file: {path}.")


def _decode(path: Path, what: str) -> np.ndarray:
    """Decodes a file as stored (no colour conversion, no EXIF rotation); PIL as a fallback."""
    _check_exists(path, what)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot read {what} file {path}: {exc}") from exc
    array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if array is None:
        try:
            with Image.open(path) as pil:
                pil.load()
                array = np.asarray(pil.convert("RGBA") if pil.mode == "P" else pil)
                if array.ndim == 3 and array.shape[2] >= 3:  # PIL is RGB(A); match cv2's BGR(A)
                    array = array[..., [2, 1, 0, *range(3, array.shape[2])]]
        except Exception as exc:  # noqa: BLE001 - any decoder failure becomes a DataError
            raise DataError(
                f"cannot decode {what} file {path} (empty, truncated or unsupported format); "
                "re-export it as PNG or JPEG."
            ) from exc
    return array


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scales 16-bit / float data to 8 bits (float data in [0, 1] is multiplied by 255)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    values = array.astype(np.float64)
    if np.issubdtype(array.dtype, np.floating) and values.size and np.nanmax(values) <= 1.0:
        values = values * 255.0
    return np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)


_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> numpy ops giving the upright image (as PIL's ImageOps.exif_transpose)
_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.swapaxes(a, 0, 1)[:, ::-1],
    7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1],
    8: lambda a: np.swapaxes(a, 0, 1)[::-1],
}


def exif_orientation(path: str | os.PathLike[str]) -> int:
    """The EXIF orientation tag of an image file (1, upright, when there is none)."""
    try:
        with Image.open(path) as pil:
            return int(pil.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - no readable EXIF: as stored
        return 1


def check_pixel_limit(path: str | os.PathLike[str], max_pixels: int) -> None:
    """Raises a DataError naming the file when its header says it has more than ``max_pixels``
    pixels (PIL's decompression-bomb guard, ``Image.MAX_IMAGE_PIXELS``, by default)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as pil:
                width, height = pil.size
    except Image.DecompressionBombError:
        width = height = None
    except Exception:  # noqa: BLE001 - unreadable header: decoding reports it
        return
    if width is None or width * height > max_pixels:
        raise _too_large(path, "image", max_pixels, None if width is None else (width, height))


def _too_large(path: Path | str, what: str, limit: int, size: tuple[int, int] | None) -> DataError:
    shown = "" if size is None else f" ({size[0]}x{size[1]} = {size[0] * size[1]:,} pixels)"
    return DataError(
        f"{what} {path}{shown} is above the safety limit of {limit:,} pixels for untrusted files "
        "(PIL's decompression-bomb limit); if you trust it, allow it (samsr refine "
        "--allow-large-images)."
    )


def read_image(
    path: str | os.PathLike[str], exif: bool = False, max_pixels: int | None = None
) -> np.ndarray:
    """Reads an image as RGB.

    Grayscale is replicated to 3 channels, an alpha channel is dropped, 16-bit and float data are
    scaled to 8 bits.

    Args:
        path: Image file (JPEG, PNG, ...).
        exif: apply the file's EXIF orientation (default: pixels as stored, as the reference
            implementations read them, so that masks made on them stay aligned).
        max_pixels: refuse images with more pixels (:func:`check_pixel_limit`); None: no limit.

    Returns:
        ``H x W x 3`` uint8 RGB array.

    Raises:
        DataError: The file is missing, cannot be decoded or is over ``max_pixels``.
    """
    path = Path(path)
    if max_pixels is not None:
        _check_exists(path, "image")
        check_pixel_limit(path, max_pixels)
    array = _decode(path, "image")
    if exif:
        turn = _ORIENT.get(exif_orientation(path))
        array = array if turn is None else np.ascontiguousarray(turn(array))
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(_to_uint8(array)[..., None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] in (3, 4):
        array = cv2.cvtColor(_to_uint8(array[..., :3]), cv2.COLOR_BGR2RGB)
    elif array.ndim == 3 and array.shape[2] == 2:  # gray + alpha
        array = np.repeat(_to_uint8(array[..., :1]), 3, axis=2)
    else:
        raise DataError(f"image file {path} has unsupported shape {array.shape}; expected RGB.")
    return np.ascontiguousarray(array)


def binarize_mask(mask: np.ndarray) -> np.ndarray:
    """Binarises an 8-bit single-channel mask to {0, 255}.

    Masks whose maximum is <= 1 (0/1 label maps) count any non-zero value as foreground; all others
    (0/255, soft/anti-aliased) use ``value > 128``, CascadePSP's threshold.

    Args:
        mask: ``H x W`` array (uint8 or bool).

    Returns:
        ``H x W`` uint8 array in {0, 255}.
    """
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        return mask.astype(np.uint8) * 255
    threshold = 0 if mask.size == 0 or mask.max() <= 1 else 128
    return np.where(mask > threshold, np.uint8(255), np.uint8(0))


def _wide_mask_to_uint8(array: np.ndarray) -> np.ndarray:
    """Maps a 16/32-bit integer or float mask to 8 bits, keeping 0/1 label maps as 0/1."""
    if np.issubdtype(array.dtype, np.floating):
        return _to_uint8(array)
    peak = int(array.max()) if array.size else 0
    if peak <= 255:  # 0/1 or 8-bit values stored in a wide type
        return np.clip(array, 0, 255).astype(np.uint8)
    return ((np.clip(array, 0, 65535).astype(np.uint32) + 128) // 257).astype(np.uint8)


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads a mask and binarises it (see :func:`binarize_mask`).

    Multi-channel masks use channel 0 (R of RGB/RGBA, the gray value of gray+alpha; alpha is
    ignored). Palette (``P``) PNGs use the palette indices, so a 0/1 indexed mask works whatever
    its colours. 16-bit masks are scaled to 8 bits (0/1 values stay 0/1), float masks in [0, 1]
    are scaled by 255.

    Args:
        path: Mask file (PNG preferred).

    Returns:
        ``H x W`` uint8 array in {0, 255}.

    Raises:
        DataError: The file is missing or cannot be decoded.
    """
    path = Path(path)
    _check_exists(path, "mask")
    try:
        with Image.open(path) as pil:  # PIL's decompression-bomb guard applies (see below)
            pil.load()
            if pil.mode == "1":
                array = np.asarray(pil, dtype=bool)
            elif pil.mode == "P":
                array = np.asarray(pil)
            elif pil.mode in ("RGB", "RGBA", "LA", "L", "CMYK", "YCbCr"):
                array = np.asarray(pil.convert("RGB") if pil.mode in ("CMYK", "YCbCr") else pil)
            else:  # I;16*, I, F: wide data, handled below
                array = np.asarray(pil)
    except Exception:  # noqa: BLE001 - fall back to OpenCV (e.g. 16-bit TIFFs PIL cannot open)
        array = _decode(path, "mask")
        if array.ndim == 3 and array.shape[2] >= 3:  # BGR(A) -> channel 0 of RGB is R
            array = array[..., 2]
    if array.ndim == 3:
        array = array[..., 0]
    if array.ndim != 2:
        raise DataError(f"mask file {path} has unsupported shape {array.shape}; expected H x W.")
    if array.dtype not in (np.uint8, np.bool_):
        array = _wide_mask_to_uint8(array)
    return binarize_mask(array)


def _open_mask(path: Path) -> tuple[np.ndarray, str]:
    """The mask file's pixels as stored, and PIL's mode (``cv2`` when only OpenCV decodes it)."""
    _check_exists(path, "mask")
    try:
        with Image.open(path) as pil:  # PIL's decompression-bomb guard applies (see below)
            pil.load()
            mode = pil.mode
            if mode in ("CMYK", "YCbCr"):
                pil, mode = pil.convert("RGB"), "RGB"
            return np.asarray(pil, dtype=bool if mode == "1" else None), mode
    except Image.DecompressionBombError as err:
        raise _too_large(path, "mask", int(Image.MAX_IMAGE_PIXELS or 0), None) from err
    except Exception:  # noqa: BLE001 - fall back to OpenCV (e.g. 16-bit TIFFs PIL cannot open)
        array = _decode(path, "mask")
        if array.ndim == 3 and array.shape[2] >= 3:  # BGR(A) -> RGB(A)
            array = array[..., [2, 1, 0, *range(3, array.shape[2])]]
        return array, "cv2"


def _label_mask(array: np.ndarray, label: int, path: Path) -> np.ndarray:
    if array.ndim != 2:
        raise DataError(
            f"--label needs a single-channel label map, but mask file {path} has shape "
            f"{array.shape}; save the label ids as a grayscale or palette PNG."
        )
    found = array == label
    if not found.any():
        ids = np.unique(array)
        shown = ", ".join(map(str, ids[:20])) + (", ..." if ids.size > 20 else "")
        raise DataError(f"label {label} does not occur in mask file {path} (ids: {shown}).")
    return np.where(found, np.uint8(255), np.uint8(0))


def read_coarse_mask(path: str | os.PathLike[str], label: int | None = None) -> np.ndarray:
    """Reads a coarse mask as people have them, soft values kept (a refiner is fed them as they
    are, as the reference's test loader does; binarising is for scoring).

    * 0/255, soft 8-bit: as stored. 0/1 (and mode ``1``): scaled to 0/255.
    * 16-bit: scaled to 8 bits (0/1 and values <= 255 are taken as 8-bit values); float in
      [0, 1]: times 255.
    * RGB: the gray value if the channels agree, else any non-black pixel is foreground (a
      colour-coded mask). An alpha channel that varies is the mask (a cut-out).
    * Label and palette maps: ``label`` selects one id (foreground = pixels equal to it).
      Without it, a palette map with more than two ids, or a map whose values are all below 128
      but not 0/1, is refused with a message listing the ids.

    Args:
        path: the mask file.
        label: the object's id in a label/palette map (compared with the stored values).

    Returns:
        ``H x W`` uint8 mask, 0..255.

    Raises:
        DataError: missing/undecodable file, unsupported shape, a label map without ``label``,
            or a ``label`` that does not occur.
    """
    path = Path(path)
    array, mode = _open_mask(path)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[2] in (2, 4):  # gray/colour + alpha
        alpha = array[..., -1]
        if label is None and alpha.size and alpha.min() != alpha.max():
            return _wide_to_coarse(alpha, path)
        array = array[..., :-1] if array.shape[2] == 4 else array[..., 0]
    if label is not None:
        return _label_mask(array, int(label), path)
    if array.ndim == 3 and array.shape[2] == 3:
        same = (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all()
        array = array[..., 0] if same else array.max(axis=2)
    if array.ndim != 2:
        raise DataError(f"mask file {path} has unsupported shape {array.shape}; expected H x W.")
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if mode == "P":
        ids = np.unique(array)
        if ids.size > 2:
            raise DataError(
                f"mask file {path} is a palette label map with ids {', '.join(map(str, ids[:20]))}"
                "; pass --label ID (label=ID) to pick the object."
            )
        return np.where(array > 0, np.uint8(255), np.uint8(0))
    return _wide_to_coarse(array, path)


def _wide_to_coarse(array: np.ndarray, path: Path) -> np.ndarray:
    mask = array if array.dtype == np.uint8 else _wide_mask_to_uint8(array)
    peak = int(mask.max()) if mask.size else 0
    if peak == 1:
        return mask * np.uint8(255)
    if 1 < peak < 128:
        ids = np.unique(mask)
        raise DataError(
            f"mask file {path} has no value above 127 (values {', '.join(map(str, ids[:20]))}): "
            "a label map? pass --label ID (label=ID), or save the mask as 0/255."
        )
    return mask if mask.flags.writeable and mask.flags.c_contiguous else mask.copy()


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``mask`` (H x W uint8) resized to ``size`` (height, width) bilinearly
    (``cv2.INTER_LINEAR``): a soft result, to be fed as it is or binarised for scoring."""
    height, width = size
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_LINEAR)


def temp_path_for(path: str | os.PathLike[str]) -> Path:
    """A unique hidden temp file name beside ``path`` (same folder, so a rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes ``data`` to a temp file beside ``path``, then renames it over ``path``.

    A crash leaves either the old file or the new one, never a partial file. Permissions follow
    the umask, like a plain ``open``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        with open(tmp, "xb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_mask(path: str | os.PathLike[str], mask: np.ndarray) -> None:
    """Writes a mask as an 8-bit grayscale PNG, atomically (temp file + rename).

    Args:
        path: Target file; should end in ``.png`` (lossless).
        mask: ``H x W`` uint8 (written as is) or bool (written as 0/255) array.

    Raises:
        DataError: The mask is not a 2-D array or the suffix is not ``.png``.
    """
    path = Path(path)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DataError(f"write_mask({path}): expected an H x W mask, got shape {mask.shape}.")
    if path.suffix.lower() != ".png":
        raise DataError(f"write_mask({path}): masks must be written as .png (lossless).")
    mask = mask.astype(np.uint8) * 255 if mask.dtype == np.bool_ else _to_uint8(mask)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(mask))
    if not ok:
        raise DataError(f"write_mask({path}): PNG encoding failed.")
    atomic_write_bytes(path, buf.tobytes())


def write_image(path: str | os.PathLike[str], image: np.ndarray, jpeg_quality: int = 95) -> None:
    """Writes an RGB image atomically; the format follows the suffix (``.jpg``, ``.png``, ...).

    Args:
        path: Target file.
        image: ``H x W x 3`` uint8 RGB array.
        jpeg_quality: JPEG quality (0-100), used for ``.jpg``/``.jpeg``.

    Raises:
        DataError: Bad shape/dtype or unknown suffix.
    """
    path = Path(path)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(
            f"write_image({path}): expected H x W x 3 uint8 RGB, got {image.shape} {image.dtype}."
        )
    suffix = path.suffix.lower()
    if suffix not in IMAGE_EXTENSIONS:
        raise DataError(f"write_image({path}): unknown image suffix {suffix!r}.")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if suffix in (".jpg", ".jpeg") else []
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(suffix, bgr, params)
    if not ok:
        raise DataError(f"write_image({path}): encoding failed.")
    atomic_write_bytes(path, buf.tobytes())


def check_same_size(
    mask: np.ndarray,
    mask_path: str | os.PathLike[str],
    image_hw: tuple[int, int],
    image_path: str | os.PathLike[str],
    what: str = "mask",
) -> None:
    """Raises a DataError naming both files unless ``mask`` (H x W) is ``image_hw`` in size."""
    if mask.shape != tuple(image_hw):
        raise DataError(
            f"{what} {mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but image {image_path} "
            f"is {image_hw[1]}x{image_hw[0]}; they must have the same size."
        )
