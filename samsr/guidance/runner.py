"""SAM one image at a time: encode once, then automatic masks and point prompts from that embedding.

Frames: ``set_image(image, max_side=m)`` encodes the *working image*: the input downscaled
(INTER_AREA) so that its long side is at most ``m`` (the image itself when ``m`` is None or not
smaller).
``scale = m / max(H, W)`` (1.0 without downscaling) is working pixels per original pixel.
AMG records (masks, ``bbox``, ``point_coords``, ``crop_box``) are in the working frame; each record
also carries ``scale`` and ``orig_size`` ([H, W]): divide coordinates by ``scale`` and resize masks
to ``orig_size`` (nearest) to map them back. ``predict_points`` works in the original frame: points
in original pixels in, an H x W mask out.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

__all__ = ["OUTPUT_MODES", "AmgConfig", "SamRunner"]

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


@dataclass(frozen=True)
class AmgConfig:
    """Settings of ``SamAutomaticMaskGenerator`` (same names and defaults) plus ``max_side``.

    Differences from the library: ``output_mode`` defaults to ``uncompressed_rle`` (the ~900 boolean
    full-resolution masks of a 6000 x 4000 image would take ~20 GB), and ``max_side`` (None: full
    resolution, as the thesis) runs AMG on the image downscaled to that long side; masks then come
    at the downscaled size with the scale recorded (see the module docstring).
    ``point_grids`` (N x 2 arrays in [0, 1], one per crop layer) is exclusive with
    ``points_per_side``.
    """

    points_per_side: int | None = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    point_grids: Any = None
    min_mask_region_area: int = 0
    output_mode: str = "uncompressed_rle"
    max_side: int | None = None

    def __post_init__(self) -> None:
        def integer(name: str, low: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"AmgConfig.{name} must be an integer >= {low}, got {v!r}.")

        def real(name: str, low: float, high: float, high_open: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)
            if not ok or v < low or v > high or (high_open and v == high):
                end = ")" if high_open else "]"
                raise ValueError(f"AmgConfig.{name} must be in [{low}, {high}{end}, got {v!r}.")

        integer("points_per_side", 1, optional=True)
        integer("points_per_batch", 1)
        integer("crop_n_layers", 0)
        integer("crop_n_points_downscale_factor", 1)
        integer("min_mask_region_area", 0)
        integer("max_side", 1, optional=True)
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh"):
            real(name, 0.0, 1.0)
        real("crop_nms_thresh", 0.0, 1.0)
        real("crop_overlap_ratio", 0.0, 1.0, high_open=True)
        real("stability_score_offset", 0.0, float("inf"))
        if self.output_mode not in OUTPUT_MODES:
            raise ValueError(
                f"AmgConfig.output_mode must be one of {OUTPUT_MODES}, got {self.output_mode!r}."
            )
        if (self.points_per_side is None) == (self.point_grids is None):
            raise ValueError(
                "AmgConfig.points_per_side: set exactly one of points_per_side and point_grids, "
                f"got points_per_side={self.points_per_side!r}."
            )
        if self.point_grids is not None:
            grids = self._grids()
            if len(grids) < self.crop_n_layers + 1:
                raise ValueError(
                    "AmgConfig.point_grids needs one grid per crop layer "
                    f"({self.crop_n_layers + 1}), got {len(grids)}."
                )

    def _grids(self) -> list[np.ndarray]:
        try:
            grids = [np.asarray([[float(c) for c in p] for p in g]) for g in self.point_grids]
        except (TypeError, ValueError) as err:
            raise ValueError(f"AmgConfig.point_grids must be lists of (x, y): {err}") from err
        for g in grids:
            if g.ndim != 2 or g.shape[1] != 2 or len(g) == 0 or g.min() < 0 or g.max() > 1:
                raise ValueError("AmgConfig.point_grids: each grid must be N x 2 within [0, 1].")
        return grids

    def generator_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``SamAutomaticMaskGenerator`` (all fields but ``max_side``)."""
        kwargs = asdict(self)
        del kwargs["max_side"]
        kwargs["point_grids"] = None if self.point_grids is None else self._grids()
        return kwargs


_Pin = tuple[np.ndarray, torch.Tensor, tuple[int, ...], tuple[int, ...]]
"""(image, its 1 x C x h x w embedding, original size, input size): one encoded image."""


class _PinnedPredictor(SamPredictor):
    """SamPredictor that keeps the embedding of one pinned image.

    ``set_image`` on the pinned array (the same buffer, shape and strides, as the full-image crop
    that ``SamAutomaticMaskGenerator._process_crop`` passes) restores the stored embedding instead
    of running the encoder; any other image is encoded as usual and leaves the pin alone.
    """

    def __init__(self, sam_model: Sam) -> None:
        super().__init__(sam_model)
        self._pin: _Pin | None = None

    def pin(self, image: np.ndarray) -> None:
        """Encodes ``image`` (H x W x 3 uint8 RGB) and keeps its embedding."""
        self._pin = None
        super().set_image(image)
        assert self.features is not None
        self._pin = (image, self.features, self.original_size, self.input_size)

    def unpin(self) -> None:
        """Forgets the pinned image and frees its embedding."""
        self._pin = None
        self.reset_image()

    def restore(self) -> None:
        """Makes the pinned image the current one (no encoder call)."""
        if self._pin is None:
            raise RuntimeError("No image is set: call SamRunner.set_image(...) first.")
        _, self.features, self.original_size, self.input_size = self._pin
        self.is_image_set = True

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Library ``set_image``, skipping the encoder for the pinned array."""
        if self._pin is not None and image_format == self.model.image_format:
            pinned = self._pin[0]
            if (
                image.shape == pinned.shape
                and image.strides == pinned.strides
                and image.dtype == pinned.dtype
                and image.__array_interface__["data"][0] == pinned.__array_interface__["data"][0]
            ):
                self.restore()
                return
        super().set_image(image, image_format)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SamRunner:
    """One image at a time through SAM: encode once, then automatic masks and point prompts.

    Attributes:
        sam: The model.
        predictor: The one ``SamPredictor`` (a subclass keeping the embedding) every call uses.
        timings: Seconds accumulated in ``"encode"`` (``set_image``), ``"amg"`` (``generate``,
            including crop encodes when ``crop_n_layers > 0``) and ``"prompt"``
            (``predict_points``); CUDA is synchronised around each.
    """

    def __init__(self, sam: Sam) -> None:
        self.sam = sam
        self.predictor = _PinnedPredictor(sam)
        self.timings: dict[str, float] = {"encode": 0.0, "amg": 0.0, "prompt": 0.0}
        self._image: np.ndarray | None = None  # original frame, H x W x 3
        self._work: np.ndarray | None = None  # working frame (what is encoded)
        self._ident: tuple[Any, ...] | None = None
        self._max_side: int | None = None
        self._scale = 1.0

    def set_image(
        self, image: np.ndarray, key: str | None = None, *, max_side: int | None = None
    ) -> None:
        """Encodes ``image`` once; setting the same image again (same key, or same content when
        ``key`` is None) with the same ``max_side`` does nothing.

        Args:
            image: H x W x 3 uint8 RGB. Kept by reference: do not edit it in place afterwards.
            key: A name for the image (e.g. its path); when given, it alone identifies the image.
            max_side: Encode the image downscaled to this long side (None: full resolution).
        """
        if not (
            isinstance(image, np.ndarray)
            and image.ndim == 3
            and image.shape[2] == 3
            and image.dtype == np.uint8
            and min(image.shape[:2]) > 0
        ):
            got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image)
            raise ValueError(
                f"SamRunner.set_image needs an H x W x 3 uint8 RGB array, got {got}; "
                "convert with np.asarray(PIL.Image.open(path).convert('RGB'))."
            )
        if max_side is not None and (isinstance(max_side, bool) or max_side < 1):
            raise ValueError(f"max_side must be a positive integer or None, got {max_side!r}.")
        if key is not None:
            ident: tuple[Any, ...] = ("key", key, image.shape)
        else:
            digest = hashlib.blake2b(np.ascontiguousarray(image), digest_size=16).hexdigest()
            ident = ("content", digest, image.shape)
        if ident == self._ident and max_side == self._max_side:
            return
        self.reset()
        self._image, self._ident = image, ident
        self._encode(max_side)

    def _encode(self, max_side: int | None) -> None:
        assert self._image is not None
        h, w = self._image.shape[:2]
        work, self._scale = self._image, 1.0
        if max_side is not None and max(h, w) > max_side:
            import cv2

            nh, nw = ResizeLongestSide.get_preprocess_shape(h, w, max_side)
            work = cv2.resize(self._image, (nw, nh), interpolation=cv2.INTER_AREA)
            self._scale = max_side / max(h, w)
        self._work = np.ascontiguousarray(work)
        self._max_side = max_side
        _sync(self.sam.device)
        t0 = time.perf_counter()
        self.predictor.pin(self._work)
        _sync(self.sam.device)
        self.timings["encode"] += time.perf_counter() - t0

    def encode_batch(self, images: Sequence[np.ndarray]) -> list[_Pin]:
        """Encodes several same-size images in one image-encoder call (training batches).

        Each image goes through exactly ``set_image``'s preprocessing (resize to SAM's side,
        normalise, pad); only the encoder runs batched. Make one current with :meth:`select`.

        Args:
            images: H x W x 3 uint8 RGB arrays, all of one size, at full resolution.

        Returns:
            One embedding per image, for :meth:`select`.
        """
        if not images:
            return []
        shapes = {im.shape for im in images}
        if len(shapes) != 1 or any(im.dtype != np.uint8 or im.ndim != 3 for im in images):
            raise ValueError(f"encode_batch needs same-size H x W x 3 uint8 images, got {shapes}.")
        transform = self.predictor.transform
        device = self.sam.device
        batch = []
        for im in images:
            x = torch.as_tensor(transform.apply_image(im), device=device)
            batch.append(self.sam.preprocess(x.permute(2, 0, 1).contiguous()[None]))
        resized = transform.get_preprocess_shape(*images[0].shape[:2], transform.target_length)
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            features = self.sam.image_encoder(torch.cat(batch))
        _sync(device)
        self.timings["encode"] += time.perf_counter() - t0
        size = tuple(images[0].shape[:2])
        return [(im, features[i : i + 1], size, tuple(resized)) for i, im in enumerate(images)]

    def select(self, pin: _Pin) -> None:
        """Makes an image of :meth:`encode_batch` the current one (no encoder call)."""
        image = pin[0]
        self.reset()
        self.predictor._pin = pin
        self.predictor.restore()
        self._image = self._work = image
        self._ident = ("batch", id(pin), image.shape)
        self._max_side, self._scale = None, 1.0

    def reset(self) -> None:
        """Forgets the current image and frees its embedding."""
        self.predictor.unpin()
        self._image = self._work = None
        self._ident = self._max_side = None

    def _require(self) -> tuple[np.ndarray, np.ndarray]:
        if self._image is None or self._work is None:
            raise RuntimeError("No image is set: call SamRunner.set_image(image) first.")
        return self._image, self._work

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the image given to ``set_image``."""
        return tuple(self._require()[0].shape[:2])  # type: ignore[return-value]

    @property
    def working_size(self) -> tuple[int, int]:
        """(h, w) of the image actually encoded (the AMG mask size)."""
        return tuple(self._require()[1].shape[:2])  # type: ignore[return-value]

    @property
    def scale(self) -> float:
        """Working pixels per original pixel (``max_side / max(H, W)``, 1.0 if not downscaled)."""
        self._require()
        return self._scale

    @property
    def embedding(self) -> torch.Tensor:
        """Image embedding, 1 x C x h x w (1 x 256 x 64 x 64 for the official models)."""
        self._require()
        self.predictor.restore()
        return self.predictor.get_image_embedding()

    def generate(self, amg: AmgConfig) -> list[dict[str, Any]]:
        """Runs the library's automatic mask generator on the current image.

        The embedding of ``set_image`` is reused (no encoder call when ``crop_n_layers == 0``);
        if ``amg.max_side`` differs from the ``max_side`` given to ``set_image``, the image is
        encoded again at ``amg.max_side`` first.

        Returns:
            The library's records (``segmentation`` in ``amg.output_mode``, ``area``, ``bbox`` XYWH,
            ``predicted_iou``, ``point_coords``, ``stability_score``, ``crop_box``), in the working
            frame, each with ``scale`` (float) and ``orig_size`` ([H, W]) added.
        """
        image, _ = self._require()
        if amg.output_mode == "coco_rle":
            try:
                import pycocotools  # noqa: F401
            except ImportError as err:
                raise ImportError(
                    "AmgConfig.output_mode='coco_rle' needs pycocotools: pip install pycocotools, "
                    "or use output_mode='uncompressed_rle'."
                ) from err
        if amg.max_side != self._max_side:
            self._encode(amg.max_side)
        generator = SamAutomaticMaskGenerator(self.sam, **amg.generator_kwargs())
        generator.predictor = self.predictor
        _sync(self.sam.device)
        t0 = time.perf_counter()
        try:
            anns = generator.generate(self._work)
        finally:
            self.predictor.restore()
        _sync(self.sam.device)
        self.timings["amg"] += time.perf_counter() - t0
        scale, orig_size = self.scale, [int(s) for s in image.shape[:2]]
        for ann in anns:
            ann["scale"] = scale
            ann["orig_size"] = orig_size
        return anns

    def predict_points(self, points: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
        """One mask from point prompts (``multimask_output=False``) with the cached embedding.

        Args:
            points: N x 2 (x, y) in pixels of the original image.
            labels: N, 1 foreground / 0 background.

        Returns:
            H x W bool mask at the original image size, and SAM's predicted IoU.
        """
        image, work = self._require()
        pts = np.asarray(points, dtype=np.float64)
        lab = np.asarray(labels)
        if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0 or lab.shape != (len(pts),):
            raise ValueError(
                f"points must be N x 2 (x, y) and labels N, got {pts.shape} and {lab.shape}."
            )
        if not np.isin(lab, (0, 1)).all():
            raise ValueError(f"labels must be 0 (background) or 1 (foreground), got {lab}.")
        (h, w), (wh, ww) = image.shape[:2], work.shape[:2]
        _sync(self.sam.device)
        t0 = time.perf_counter()
        self.predictor.restore()
        pts_work = pts * np.array([ww / w, wh / h])
        if (wh, ww) == (h, w):
            masks, iou, _ = self.predictor.predict(pts_work, lab, multimask_output=False)
            mask = masks[0]
        else:  # upsample SAM's low-res logits straight to the original size
            _, iou, low_res = self.predictor.predict(
                pts_work, lab, multimask_output=False, return_logits=True
            )
            logits = torch.as_tensor(low_res[None], device=self.sam.device)
            up = self.sam.postprocess_masks(logits, self.predictor.input_size, (h, w))
            mask = (up[0, 0] > self.sam.mask_threshold).cpu().numpy()
        _sync(self.sam.device)
        self.timings["prompt"] += time.perf_counter() - t0
        return mask.astype(bool), float(iou[0])
