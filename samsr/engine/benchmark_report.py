"""Benchmark scoring and report: accuracy vs GT, agreement with the reference, ratios, tables.

Inputs are plain arrays and dicts (no files, no processes), so every number here can be checked by
hand. IoU, mBA and agreement are reported in percent, as in the thesis's tables 4.1 and 4.2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from samsr.metrics.segmentation import RefinementMeter, binarize

__all__ = [
    "MEMORY_KINDS",
    "add_reference_columns",
    "format_group",
    "format_report",
    "mask_agreement",
    "score_coarse",
    "score_variant",
]

MEMORY_KINDS = {
    "cuda_max_allocated": "torch.cuda.max_memory_allocated (tensors only), reset before each image",
    "rss_peak": "process peak RSS (VmHWM), reset before each image; includes the weights, the "
    "decoded image and the Python runtime",
    "rss_peak_lifetime": "process peak RSS over the worker's lifetime (cannot be reset here)",
    "mps_current_allocated": "MPS memory allocated after the call (no peak counter on MPS)",
}

_DASH = "–"


def mask_agreement(mask: np.ndarray, reference: np.ndarray) -> dict[str, int]:
    """Counts the pixels where two refined masks agree.

    Binarisation is the metrics' own (:func:`samsr.metrics.segmentation.binarize`, ``> 128``), so
    binary agreement is 100 % exactly when both masks score the same against any GT.

    Args:
        mask: ``H x W`` uint8 refined mask (0..255).
        reference: ``H x W`` uint8 mask of the reference variant.

    Returns:
        ``pixels`` (total), ``agree`` (same binarised value) and ``equal`` (same uint8 value).

    Raises:
        ValueError: If the shapes differ.
    """
    mask, reference = np.asarray(mask), np.asarray(reference)
    if mask.shape != reference.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the reference's {reference.shape}")
    return {
        "pixels": int(mask.size),
        "agree": int(np.count_nonzero(binarize(mask) == binarize(reference))),
        "equal": int(np.count_nonzero(mask == reference)),
    }


def _pct(part: float, whole: float) -> float | None:
    return 100.0 * part / whole if whole else None


def _meter_pct(metrics: Mapping[str, Any], suffix: str = "") -> dict[str, float | None]:
    def pct(key: str) -> float | None:
        value = metrics.get(key)
        return None if value is None or math.isnan(value) else 100.0 * float(value)

    return {
        "iou_pct": pct("iou" + suffix),
        "miou_pct": pct("miou" + suffix),
        "mba_pct": pct("mba" + suffix),
    }


def score_coarse(gts: Mapping[str, np.ndarray], coarses: Mapping[str, np.ndarray]) -> dict:
    """IoU/mBA (percent) of the coarse input masks: the "coarse input" row."""
    meter = RefinementMeter()
    for name, gt in gts.items():
        meter.update(name, gt, coarses[name])
    return _meter_pct(meter.compute())


def score_variant(
    gts: Mapping[str, np.ndarray],
    coarses: Mapping[str, np.ndarray],
    masks: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Scores one variant's refined masks against the GT and the reference's masks.

    Args:
        gts: name -> ``H x W`` GT mask (0/255).
        coarses: name -> ``H x W`` coarse input mask (CascadePSP's small-object rule uses it).
        masks: name -> ``H x W`` uint8 refined mask of the variant.
        reference: name -> the reference variant's mask, or None when it has none (failed).

    Returns:
        ``iou_pct`` (pooled), ``miou_pct``, ``mba_pct``, ``agreement_pct`` and ``exact_pct``
        (pooled over pixels; None without a reference) and ``per_image`` rows.
    """
    meter = RefinementMeter()
    totals = {"pixels": 0, "agree": 0, "equal": 0}
    per_image = []
    for name, gt in gts.items():
        row = meter.update(name, gt, masks[name], coarses[name])
        entry: dict[str, Any] = {"name": name, "iou_pct": 100.0 * row["iou"]}
        entry["mba_pct"] = None if math.isnan(row["mba"]) else 100.0 * row["mba"]
        if reference is not None:
            counts = mask_agreement(masks[name], reference[name])
            entry["agreement_pct"] = _pct(counts["agree"], counts["pixels"])
            entry["exact_pct"] = _pct(counts["equal"], counts["pixels"])
            totals = {k: totals[k] + counts[k] for k in totals}
        per_image.append(entry)
    out: dict[str, Any] = _meter_pct(meter.compute())
    out["agreement_pct"] = _pct(totals["agree"], totals["pixels"]) if reference else None
    out["exact_pct"] = _pct(totals["equal"], totals["pixels"]) if reference else None
    out["per_image"] = per_image
    return out


def _ratio(value: Any, ref: Any) -> float | None:
    if value is None or ref is None or not ref:
        return None
    return float(value) / float(ref)


def _diff(value: Any, ref: Any) -> float | None:
    return None if value is None or ref is None else float(value) - float(ref)


def add_reference_columns(rows: dict[str, dict[str, Any]], reference: str = "faithful") -> None:
    """Adds ``time_ratio``, ``mem_ratio``, ``iou_delta_pct`` and ``mba_delta_pct`` in place.

    Every value is relative to the ``reference`` row; None where either side has no number.
    """
    ref = rows.get(reference, {})
    ref = ref if ref.get("status") == "ok" else {}
    for row in rows.values():
        ok = row.get("status") == "ok"
        row["time_ratio"] = _ratio(row.get("time_s"), ref.get("time_s")) if ok else None
        row["mem_ratio"] = _ratio(row.get("peak_mem_gib"), ref.get("peak_mem_gib")) if ok else None
        for key in ("iou", "mba"):
            delta = _diff(row.get(f"{key}_pct"), ref.get(f"{key}_pct")) if ok else None
            row[f"{key}_delta_pct"] = delta


def _num(value: Any, digits: int, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _DASH
    return f"{float(value):{'+' if sign else ''}.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _cells(row: Mapping[str, Any], columns: Sequence[tuple[str, int, bool]]) -> list[str]:
    if row.get("status") != "ok":
        return [f"{row.get('status', 'failed')}"] + [_DASH] * (len(columns) - 1)
    return [_num(row.get(key), digits, sign) for key, digits, sign in columns]


_MEMORY = [("peak_mem_gib", 3, False), ("mem_ratio", 2, False), ("iou_pct", 2, False),
           ("mba_pct", 2, False)]  # fmt: skip
_SPEED = [("time_s", 3, False), ("time_ratio", 2, False), ("iou_pct", 2, False),
          ("mba_pct", 2, False), ("agreement_pct", 3, False)]  # fmt: skip
_FULL = [("time_s", 3, False), ("time_ratio", 2, False), ("peak_mem_gib", 3, False),
         ("mem_ratio", 2, False), ("baseline_gib", 3, False), ("iou_pct", 2, False),
         ("iou_delta_pct", 2, True), ("mba_pct", 2, False), ("mba_delta_pct", 2, True),
         ("agreement_pct", 3, False), ("exact_pct", 3, False)]  # fmt: skip


def _work_cells(row: Mapping[str, Any]) -> list[str] | None:
    """Per-image means of the cascade's counters (and of its stage seconds in a profiling run:
    the encoder trunk, the rest of encoding, decoding); None for a failed row."""
    per = [im.get("cascade") or {} for im in row.get("per_image") or []]
    if row.get("status") != "ok" or not per:
        return None

    def mean(key: str, unit: float = 1.0) -> float | None:
        values = [c[key] for c in per if key in c]
        return sum(values) / len(values) / unit if values else None

    trunk, encode = mean("trunk"), mean("encode")
    rest = None if trunk is None or encode is None else encode - trunk
    return [
        _num(mean("tiles"), 0),
        _num(mean("encoded_px", 1e6), 2),
        _num(mean("decoded_px", 1e6), 2),
        _num(trunk, 2),
        _num(rest, 2),
        _num(mean("decode"), 2),
    ]


def format_group(name: str, group: Mapping[str, Any], reference: str = "faithful") -> str:
    """Markdown for one image group: the memory table (thesis 4.1), the speed table (4.2), all.

    Args:
        name: Group name (image size or data folder).
        group: ``{"images": [...], "coarse": score_coarse(...), "variants": {name: row}}``.
        reference: The variant every ratio and delta is relative to.

    Returns:
        A Markdown section.
    """
    rows = group["variants"]
    coarse = group["coarse"]
    sizes = sorted({f"{im['width']}x{im['height']}" for im in group["images"]})
    header = f"## {name}: {len(group['images'])} image(s), {', '.join(sizes)}"
    coarse_iou, coarse_mba = _num(coarse.get("iou_pct"), 2), _num(coarse.get("mba_pct"), 2)
    ref = f"× {reference}"

    memory = [["coarse input", _DASH, _DASH, coarse_iou, coarse_mba]]
    speed = [["coarse input", _DASH, _DASH, coarse_iou, coarse_mba, _DASH]]
    full = [["coarse input", "input", *[_DASH] * 5, coarse_iou, _DASH, coarse_mba, *[_DASH] * 3]]
    for variant, row in rows.items():
        memory.append([variant, *_cells(row, _MEMORY)])
        speed.append([variant, *_cells(row, _SPEED)])
        cells = _cells(row, _FULL)
        status = "ok" if row.get("status") == "ok" else cells[0]
        full.append([variant, status, *(cells if status == "ok" else [_DASH] * len(_FULL))])
    parts = [
        header,
        "Peak memory (thesis table 4.1):",
        _table(["Method", "Peak memory (GiB)", ref, "IoU", "mBA"], memory),
        "Speed (thesis table 4.2); agreement = % of pixels whose binarised mask equals "
        f"{reference}'s:",
        _table(["Method", "Time (s)", ref, "IoU", "mBA", "Agreement (%)"], speed),
        "All columns (after load = memory held once the model is loaded; exact = % of pixels "
        f"with the same uint8 value as {reference}):",
        _table(
            [
                "Method",
                "Status",
                "Time (s)",
                f"time {ref}",
                "Peak mem (GiB)",
                f"mem {ref}",
                "After load (GiB)",
                "IoU",
                "ΔIoU",
                "mBA",
                "ΔmBA",
                "Agreement (%)",
                "Exact (%)",
            ],
            full,
        ),  # fmt: skip
    ]
    work = [[variant, *cells] for variant, row in rows.items() if (cells := _work_cells(row))]
    if work:
        parts += [
            "Work per image (mean; encoded px: the encoder's input pixels over all scales, tile "
            "halos included; seconds only in --profile runs: the encoder trunk, the rest of "
            "encoding (fusion, input resizing), decoding):",
            _table(
                [
                    "Method",
                    "Tiles",
                    "Encoded px (M)",
                    "Decoded px (M)",
                    "Trunk (s)",
                    "Fusion etc. (s)",
                    "Decode (s)",
                ],
                work,
            ),  # fmt: skip
        ]
    return "\n\n".join(parts)


def format_report(bench: Mapping[str, Any]) -> str:
    """The whole ``benchmark.md``: the run's facts, then the three tables of every group."""
    kind = bench.get("peak_memory_kind") or "n/a"
    ckpt, net = bench["checkpoint"], bench["model"]["net"]
    facts = [
        f"- device: {bench.get('device_description') or bench['device']}",
        f"- peak memory: {MEMORY_KINDS.get(kind, kind)}",
        f"- time: the refiner call per image (mean), device synchronised, after one untimed "
        f"warm-up call on a {bench['warmup_size']} px crop; every variant in a fresh process",
        f"- weights: {ckpt.get('path') or 'random init'} ({ckpt['kind']}, {net.get('backbone')})",
        f"- data: {bench['data']}",
        f"- torch {bench['torch_version']}, samsr {bench['samsr_version']} "
        f"(git {bench.get('git_commit') or 'n/a'})",
        f"- command: `{bench['command']}`",
    ]
    if bench.get("inference_overrides"):
        facts.append(f"- overrides for every variant: `{' '.join(bench['inference_overrides'])}`")
    if bench.get("profile"):
        facts.insert(
            0,
            "- **PROFILING RUN (--profile): the device is synchronised around every encode and "
            "decode stage of every scale and tile, so times are inflated (tiled variants most); "
            "per-stage seconds are in benchmark.json (`cascade`).**",
        )
    if ckpt["kind"] == "random":
        facts.insert(
            0,
            "- **RANDOM WEIGHTS (smoke test): IoU, mBA and their deltas are meaningless; time, "
            "memory and agreement still compare the variants.**",
        )
    reference = bench.get("reference", "faithful")
    sections = [f"# CRM inference benchmark ({bench['started']})", "\n".join(facts)]
    sections += [format_group(name, g, reference) for name, g in bench["groups"].items()]
    return "\n\n".join(sections) + "\n"
