"""Assembling the thesis's tables from the evaluations' ``metrics.json``, each cell beside the
thesis's number (``thesis.yaml``) and the difference; Markdown and CSV."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from samsr.metrics import average_gain
from samsr.reproduce.plan import TABLES, Eval, Plan

__all__ = ["Cell", "Table", "assemble", "load_thesis", "write_table"]

THESIS_FILE = Path(__file__).with_name("thesis.yaml")
LABELS = {
    "crm": "CRM",
    "samsr_v1": "SAM-SR v1",
    "samsr_v2_1": "SAM-SR v2.1",
    "samsr_v2_2": "SAM-SR v2.2",
    "samsr_v3_1": "SAM-SR v3.1",
    "samsr_v3_2": "SAM-SR v3.2",
    "samsr_v3_3": "SAM-SR v3.3",
    "samsr_v3_4": "SAM-SR v3.4",
    "pspnet": "PSPNet",
}
PRESETS = {"faithful": "original", "patched": "patched fusion"}


@dataclasses.dataclass(frozen=True)
class Cell:
    """samsr's value and the thesis's (None: not measured / not in the thesis)."""

    ours: float | None
    thesis: float | None = None

    @property
    def diff(self) -> float | None:
        return None if self.ours is None or self.thesis is None else self.ours - self.thesis


@dataclasses.dataclass(frozen=True)
class Table:
    """One thesis table: rows of named cells, and notes printed under it (device, dtype)."""

    name: str
    title: str
    columns: tuple[str, ...]
    rows: tuple[tuple[str, tuple[Cell, ...]], ...]
    notes: tuple[str, ...] = ()


def load_thesis(path: str | Path = THESIS_FILE) -> dict[str, Any]:
    """The thesis's numbers (``thesis.yaml``) as plain dicts."""
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(data, dict)
    return data


def _metrics(plan: Plan, ev: Eval) -> dict[str, dict[str, Any]] | None:
    path = plan.out_dir / ev.key / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _pct(value: Any) -> float | None:
    return None if value is None else 100.0 * float(value)


def _get(d: Any, *keys: Any) -> Any:
    """``d[k0][k1]...`` through dicts and lists; None where a key is missing."""
    for k in keys:
        in_map = isinstance(d, Mapping) and k in d
        in_list = isinstance(d, list | tuple) and isinstance(k, int) and k < len(d)
        if not (in_map or in_list):
            return None
        d = d[k]
    return d


def _sources(results: list[dict[str, dict[str, Any]] | None], thesis: dict[str, Any]) -> list[str]:
    """The coarse sources of the evaluations, in the thesis's order where it has them."""
    seen: list[str] = []
    for res in results:
        seen += [s for s in (res or {}) if s not in seen]
    order = thesis["sources"]
    return sorted(seen, key=lambda s: (order.index(s) if s in order else len(order), s))


def _facts(results: list[dict[str, dict[str, Any]] | None]) -> tuple[str, ...]:
    """Device and dtype of the timings, once per distinct pair."""
    seen = []
    for res in results:
        for m in (res or {}).values():
            fact = f"{m.get('device_name') or m.get('device')}, dtype {m.get('dtype') or 'float32'}"
            if fact not in seen:
                seen.append(fact)
    return tuple(f"time and memory: {f}" for f in seen)


def _refinement(plan: Plan, name: str, thesis: dict[str, Any]) -> Table:
    """Tables 4.3-4.5: IoU/mBA per coarse source and the average gain, per method."""
    evals = plan.tables[name]
    results = [_metrics(plan, ev) for ev in evals]
    sources = _sources(results, thesis)
    ref = thesis["refinement"]
    columns = ["coarse IoU", "coarse mBA"]
    for ev in evals:
        columns += [
            f"{LABELS.get(ev.model, ev.model)} IoU",
            f"{LABELS.get(ev.model, ev.model)} mBA",
        ]
    rows = []
    for source in sources:
        first = next((r[source] for r in results if r and source in r), None)
        cells = [
            Cell(_pct(_get(first, "iou_coarse")), _get(ref, "coarse", source, 0)),
            Cell(_pct(_get(first, "mba_coarse")), _get(ref, "coarse", source, 1)),
        ]
        for ev, res in zip(evals, results):
            m = _get(res, source)
            cells.append(Cell(_pct(_get(m, "iou")), _get(ref, ev.model, source, 0)))
            cells.append(Cell(_pct(_get(m, "mba")), _get(ref, ev.model, source, 1)))
        rows.append((source, tuple(cells)))
    gains = [Cell(0.0, 0.0), Cell(0.0, 0.0)]
    for ev, res in zip(evals, results):
        gain = average_gain(res) if res else {}
        gains.append(Cell(_pct(gain.get("iou_delta")), _get(ref, ev.model, "avg_gain", 0)))
        gains.append(Cell(_pct(gain.get("mba_delta")), _get(ref, ev.model, "avg_gain", 1)))
    rows.append(("avg. gain", tuple(gains)))
    return Table(name, TABLES[name][0], tuple(columns), tuple(rows), _facts(results))


def _cascade(plan: Plan, name: str, thesis: dict[str, Any], source: str) -> Table:
    """Tables 4.1-4.2: CRM's inference variants on one coarse source."""
    keys = {"4.1": ("peak_mem_gib", "time_s", "iou", "mba"), "4.2": ("time_s", "iou", "mba")}[name]
    titles = {"peak_mem_gib": "Peak mem (GiB)", "time_s": "Time (s)", "iou": "IoU", "mba": "mBA"}
    evals = plan.tables[name]
    results = [_metrics(plan, ev) for ev in evals]
    rows = []
    for ev, res in zip(evals, results):
        m = _get(res, source)
        cells = []
        for key in keys:
            value = _get(m, key)
            ours = _pct(value) if key in ("iou", "mba") else value
            cells.append(Cell(ours, _get(thesis, "cascade", ev.preset, key)))
        rows.append((PRESETS.get(ev.preset, ev.preset), tuple(cells)))
    notes = (f"coarse source: {source}", *_facts(results))
    return Table(name, TABLES[name][0], tuple(titles[k] for k in keys), tuple(rows), notes)


def _summary(plan: Plan, name: str, thesis: dict[str, Any], source: str) -> Table:
    """Table 4.6: time and memory on the speed source, average gain over every source."""
    evals = plan.tables[name]
    results = [_metrics(plan, ev) for ev in evals]
    refs = [thesis["summary"]["crm"], thesis["summary"]["samsr_v2_1_optimised"]]
    rows = []
    for ev, res, ref in zip(evals, results, refs):
        m = _get(res, source)
        gain = average_gain(res) if res else {}
        cells = (
            Cell(_get(m, "time_s"), ref["time_s"]),
            Cell(_get(m, "peak_mem_gib"), ref["peak_mem_gib"]),
            Cell(_pct(gain.get("iou_delta")), ref["iou_gain"]),
            Cell(_pct(gain.get("mba_delta")), ref["mba_gain"]),
        )
        label = LABELS.get(ev.model, ev.model)
        rows.append((label if ev.preset == "faithful" else f"{label} ({ev.preset})", cells))
    columns = ("Time (s)", "Peak mem (GiB)", "avg. IoU gain", "avg. mBA gain")
    notes = (f"time and memory: coarse source {source}", *_facts(results))
    return Table(name, TABLES[name][0], columns, tuple(rows), notes)


def _patch(plan: Plan, name: str) -> Table:
    """The patch baseline: PSPNet's masks scored on the test images (no thesis numbers)."""
    results = [_metrics(plan, ev) for ev in plan.tables[name]]
    rows = []
    for res in results:
        for source, m in (res or {}).items():
            cells = tuple(
                Cell(v)
                for v in (_pct(m.get("iou")), _pct(m.get("mba")), m.get("time_s"),
                          m.get("peak_mem_gib"))
            )  # fmt: skip
            rows.append((source, cells))
    if not rows:
        rows.append(("pspnet", tuple(Cell(None) for _ in range(4))))
    columns = ("IoU", "mBA", "Time (s)", "Peak mem (GiB)")
    return Table(name, TABLES[name][0], columns, tuple(rows), _facts(results))


def assemble(
    plan: Plan, name: str, speed_source: str, thesis: dict[str, Any] | None = None
) -> Table:
    """Table ``name`` of ``plan`` from its evaluations' ``metrics.json`` (missing ones: empty
    cells)."""
    thesis = thesis or load_thesis()
    if name in ("4.1", "4.2"):
        return _cascade(plan, name, thesis, speed_source)
    if name == "4.6":
        return _summary(plan, name, thesis, speed_source)
    if name == "patch":
        return _patch(plan, name)
    return _refinement(plan, name, thesis)


def _fmt(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.2f}" if sign else f"{value:.2f}"


def to_markdown(table: Table) -> str:
    """``samsr / thesis (difference)`` per cell; ``–`` where a value is missing."""
    lines = [f"### Table {table.name}: {table.title}", ""]
    lines.append("| | " + " | ".join(table.columns) + " |")
    lines.append("|---" * (len(table.columns) + 1) + "|")
    for label, cells in table.rows:
        text = []
        for c in cells:
            if c.thesis is None:
                text.append(_fmt(c.ours))
            else:
                text.append(f"{_fmt(c.ours)} / {_fmt(c.thesis)} ({_fmt(c.diff, sign=True)})")
        lines.append(f"| {label} | " + " | ".join(text) + " |")
    lines += ["", "Cells: samsr / thesis (difference).", *[f"- {n}" for n in table.notes]]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """One line per cell: table, row, column, samsr, thesis, difference (empty when missing)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["table", "row", "column", "samsr", "thesis", "diff"])
    for label, cells in table.rows:
        for column, c in zip(table.columns, cells):
            values = ["" if v is None else f"{v:.4f}" for v in (c.ours, c.thesis, c.diff)]
            writer.writerow([table.name, label, column, *values])
    return buf.getvalue()


def write_table(table: Table, out_dir: str | Path) -> tuple[Path, Path]:
    """Writes ``table_<name>.md`` and ``table_<name>.csv`` into ``out_dir``; returns both."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, cv = out / f"table_{table.name}.md", out / f"table_{table.name}.csv"
    md.write_text(to_markdown(table))
    cv.write_text(to_csv(table))
    return md, cv
