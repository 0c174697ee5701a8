"""The thesis's figures from the masks that the reproduce evaluations saved.

* 2.6, CRM's failure cases: image | coarse | CRM | GT on the images where CRM loses the most
  IoU against its coarse input.
* 4.2 and 4.3, CRM vs SAM-SR v2.1: image | coarse | CRM | SAM-SR v2.1 | GT on the images where
  v2.1 gains the most over CRM, in IoU (4.2: the object) and in mBA (4.3: the boundary).

The thesis picks its images by hand; samsr picks them by these rules (``names=`` picks by hand).
Each figure has a first row of whole images, downsized, with each mask's boundary drawn, and a
second row at full resolution in the window where the two masks compared disagree most (2.6:
CRM and GT, 4.2/4.3: CRM and v2.1); each panel's title gives its IoU and mBA. Drawn with
matplotlib (the Agg canvas, no display needed); one PNG per image and a contact sheet.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from samsr.data.io import read_mask
from samsr.errors import DataError
from samsr.reproduce.tables import LABELS
from samsr.visualize import disagreement_window

__all__ = [
    "SPECS",
    "FigureSpec",
    "Panel",
    "contact_sheet",
    "draw_figure",
    "load_rows",
    "read_saved_mask",
    "render",
    "select_images",
]


@dataclasses.dataclass(frozen=True)
class FigureSpec:
    """What one figure shows and how it picks its images.

    Attributes:
        models: the refiners drawn, in their columns' order (their faithful evaluations).
        score: ``(rows per model of one image) -> number``; the images with the highest come first.
        zoom: the two columns whose disagreement places the zoom window.
        rule: the rule in words (printed and in the README).
    """

    models: tuple[str, ...]
    score: Callable[[Mapping[str, Mapping[str, Any]]], float]
    zoom: tuple[str, str]
    rule: str


def _get(row: Mapping[str, Any], key: str) -> float:
    value = row.get(key)
    return math.nan if value is None else float(value)


SPECS: dict[str, FigureSpec] = {
    "2.6": FigureSpec(
        ("crm",),
        lambda r: _get(r["crm"], "iou_coarse") - _get(r["crm"], "iou"),
        ("crm", "gt"),
        "largest IoU loss of CRM against its coarse input",
    ),
    "4.2": FigureSpec(
        ("crm", "samsr_v2_1"),
        lambda r: _get(r["samsr_v2_1"], "iou") - _get(r["crm"], "iou"),
        ("crm", "samsr_v2_1"),
        "largest IoU gain of SAM-SR v2.1 over CRM",
    ),
    "4.3": FigureSpec(
        ("crm", "samsr_v2_1"),
        lambda r: _get(r["samsr_v2_1"], "mba") - _get(r["crm"], "mba"),
        ("crm", "samsr_v2_1"),
        "largest mBA gain of SAM-SR v2.1 over CRM",
    ),
}


def load_rows(metrics_json: Path, source: str) -> dict[str, dict[str, Any]]:
    """name -> per-image row (``iou``, ``mba``, ``iou_coarse``, ...) of ``source`` in an
    evaluation's ``metrics.json``."""
    if not metrics_json.is_file():
        raise DataError(f"{metrics_json}: no such file; run the evaluation first")
    results = json.loads(metrics_json.read_text())
    if source not in results:
        raise DataError(
            f"{metrics_json} has no coarse source '{source}' (it has {sorted(results)}); "
            "pass source=<one of them>"
        )
    return {row["name"]: row for row in results[source]["per_image"]}


def select_images(
    spec: FigureSpec, rows: Mapping[str, Mapping[str, Mapping[str, Any]]], num: int
) -> list[str]:
    """The ``num`` names with the highest score (ties by name), among the images every model
    of ``spec`` scored with a finite score.

    Args:
        spec: the figure.
        rows: model -> name -> per-image row.
        num: how many.
    """
    names = set.intersection(*(set(rows[m]) for m in spec.models))
    scored = []
    for name in sorted(names):
        score = spec.score({m: rows[m][name] for m in spec.models})
        if math.isfinite(score):
            scored.append((-score, name))
    return [name for _, name in sorted(scored)[:num]]


@dataclasses.dataclass(frozen=True)
class Panel:
    """One column: its title, its mask (H x W, nonzero = foreground; None: the plain image) and
    the boundary colour (matplotlib colour name)."""

    title: str
    mask: np.ndarray | None
    colour: str = "red"


def _small(array: np.ndarray, width: int) -> np.ndarray:
    h, w = array.shape[:2]
    if w <= width:
        return array
    return cv2.resize(array, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)


def render(
    image: np.ndarray,
    panels: Sequence[Panel],
    zoom: tuple[int, int] | None,
    panel_px: int = 480,
    dpi: int = 100,
) -> np.ndarray:
    """The figure of one image as an RGB array (H' x W' x 3 uint8).

    Args:
        image: H x W x 3 uint8 RGB, any size (shown downsized to ``panel_px`` wide; the zoom
            row reads it at full resolution).
        panels: the columns, left to right.
        zoom: indices of the two panels whose masks' disagreement places the zoom window
            (a fifth of the short side, at least 64 px); None: no zoom row.
        panel_px: each panel's width in pixels.
        dpi: the figure's dots per inch (fonts are sized in points).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h, w = image.shape[:2]
    for p in panels:
        if p.mask is not None and p.mask.shape != (h, w):
            raise ValueError(f"panel '{p.title}': mask {p.mask.shape} does not match {(h, w)}")
    window = None
    if zoom is not None:
        a, b = (panels[i].mask for i in zoom)
        if a is not None and b is not None:
            window = disagreement_window(a, b, max(64, min(h, w) // 5))
    shown = _small(image, panel_px)
    scale = shown.shape[1] / w
    rows = 1 + (window is not None)
    crop_h = panel_px if window is None else panel_px * window[2] / window[3]
    fig_h = (shown.shape[0] + (crop_h if window else 0)) / dpi + 0.45 * rows
    fig = Figure(figsize=(panel_px * len(panels) / dpi, fig_h), dpi=dpi)
    axes = fig.subplots(rows, len(panels), squeeze=False)
    for col, panel in enumerate(panels):
        ax = axes[0, col]
        ax.imshow(shown)
        if panel.mask is not None:
            small = _small((panel.mask > 0).astype(np.float32), shown.shape[1])
            ax.contour(small, levels=[0.5], colors=panel.colour, linewidths=1.2)
        if window is not None:
            y0, x0, wh, ww = window
            box = (x0 * scale, y0 * scale)
            ax.add_patch(_rectangle(box, ww * scale, wh * scale))
        ax.set_title(panel.title, fontsize=9)
        if window is not None:
            y0, x0, wh, ww = window
            crop = (slice(y0, y0 + wh), slice(x0, x0 + ww))
            zax = axes[1, col]
            zax.imshow(image[crop])
            if panel.mask is not None:
                crop_mask = (panel.mask[crop] > 0).astype(np.float32)
                zax.contour(crop_mask, levels=[0.5], colors=panel.colour, linewidths=1.5)
            zax.set_title(f"zoom {ww}x{wh} px at ({x0}, {y0})" if col == 0 else "", fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.subplots_adjust(left=0.005, right=0.995, bottom=0.005, top=0.95, wspace=0.02, hspace=0.12)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])


def _rectangle(xy: tuple[float, float], width: float, height: float) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle(xy, width, height, fill=False, edgecolor="gold", linewidth=1.2)


def contact_sheet(figures: Sequence[np.ndarray]) -> np.ndarray:
    """The figures one under the other, each downsized to the narrowest's width (H x W x 3)."""
    if not figures:
        raise ValueError("no figures to put on a contact sheet")
    width = min(f.shape[1] for f in figures)
    return np.vstack([_small(f, width) for f in figures])


def read_saved_mask(eval_dir: Path, source: str, name: str) -> np.ndarray:
    """The mask an evaluation saved for ``name`` (``<eval_dir>/masks/<source>/<name>_mask.png``)."""
    path = eval_dir / "masks" / source / f"{name}_mask.png"
    if not path.is_file():
        raise DataError(
            f"{path}: no such mask; the evaluation in {eval_dir} did not save its masks "
            f"(delete {eval_dir / 'metrics.json'} and rerun: the plan evaluates with "
            "eval.save_masks=true)"
        )
    return read_mask(path)


def _stats(row: Mapping[str, Any], suffix: str = "") -> str:
    iou, mba = _get(row, "iou" + suffix), _get(row, "mba" + suffix)
    return f"IoU {100 * iou:.2f}  mBA {100 * mba:.2f}"


def draw_figure(
    figure: str,
    sample: Mapping[str, Any],
    masks: Mapping[str, np.ndarray],
    rows: Mapping[str, Mapping[str, Any]],
    panel_px: int = 480,
) -> np.ndarray:
    """One image's panels of ``figure`` (an RGB array).

    Args:
        figure: a key of :data:`SPECS`.
        sample: an evaluation item (``image``, ``gt``, ``coarse``, ``source``).
        masks: model -> its refined mask of this image (H x W).
        rows: model -> its per-image row of this image (the titles' IoU / mBA).
        panel_px: each panel's width in pixels.
    """
    spec = SPECS[figure]
    first = rows[spec.models[0]]
    panels = [
        Panel(f"image {sample['name']}", None),
        Panel(
            f"coarse ({sample['source']})\n{_stats(first, '_coarse')}",
            sample["coarse"] > 128,
            "orange",
        ),
        *(Panel(f"{LABELS[m]}\n{_stats(rows[m])}", masks[m], "red") for m in spec.models),
        Panel("GT", sample["gt"], "lime"),
    ]
    column = {m: i + 2 for i, m in enumerate(spec.models)} | {"gt": len(panels) - 1}
    zoom = (column[spec.zoom[0]], column[spec.zoom[1]])
    return render(sample["image"], panels, zoom, panel_px)
