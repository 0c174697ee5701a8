"""The thesis figures: which images each one picks, what a panel shows, and the saved masks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from samsr.errors import DataError
from samsr.reproduce.figures import (
    SPECS,
    Panel,
    contact_sheet,
    load_rows,
    read_saved_mask,
    render,
    select_images,
)
from samsr.reproduce.plan import SAVE_MASKS, build_plan
from samsr.reproduce.runner import status


def _row(iou: float, mba: float, iou_coarse: float = 0.9) -> dict:
    return {"iou": iou, "mba": mba, "iou_coarse": iou_coarse, "mba_coarse": 0.5}


def test_each_figure_picks_by_its_rule() -> None:
    crm = {"a": _row(0.80, 0.70), "b": _row(0.95, 0.60, 0.97), "c": _row(0.70, 0.65),
           "d": _row(0.5, math.nan, 0.99)}  # fmt: skip
    v21 = {"a": _row(0.85, 0.70), "b": _row(0.96, 0.80), "c": _row(0.90, 0.66)}
    rows = {"crm": crm, "samsr_v2_1": v21}
    assert select_images(SPECS["4.2"], rows, 2) == ["c", "a"]  # IoU gains 0.20, 0.05, 0.01
    assert select_images(SPECS["4.3"], rows, 5) == ["b", "c", "a"]  # d: not evaluated by v2.1
    # CRM's failures: d loses 0.49 IoU, c 0.20, a 0.10, b 0.02
    assert select_images(SPECS["2.6"], {"crm": crm}, 3) == ["d", "c", "a"]
    crm["c"]["iou"] = None  # a missing score is skipped, not ranked
    assert select_images(SPECS["2.6"], {"crm": crm}, 3) == ["d", "a", "b"]


def _is_red(pixels: np.ndarray) -> np.ndarray:
    p = pixels.astype(int)
    return (p[..., 0] > 180) & (p[..., 1] < 90) & (p[..., 2] < 90)


def test_render_draws_each_mask_in_its_panel_and_zooms_where_they_differ() -> None:
    h, w = 300, 400
    image = np.full((h, w, 3), 128, np.uint8)
    a = np.zeros((h, w), np.uint8)
    a[100:200, 100:200] = 255
    b = a.copy()
    b[100:200, 200:260] = 255  # the masks differ right of x = 200
    panels = [Panel("image", None), Panel("a", a), Panel("b", b, "lime")]
    fig = render(image, panels, zoom=(1, 2), panel_px=200)
    assert fig.dtype == np.uint8 and fig.shape[2] == 3 and fig.shape[1] == 600
    thirds = np.array_split(fig, 3, axis=1)
    assert not _is_red(thirds[0]).any() and not _is_red(thirds[2]).any()
    assert _is_red(thirds[1]).sum() > 100
    flat = render(image, panels, zoom=None, panel_px=200)
    assert flat.shape[0] < fig.shape[0]  # no zoom row
    with pytest.raises(ValueError, match="panel 'a'"):
        render(image, [Panel("a", a[:-1])], zoom=None)
    sheet = contact_sheet([fig, flat[:, :300]])
    assert sheet.shape == (round(fig.shape[0] / 2) + flat.shape[0], 300, 3)  # at the least width


def test_saved_masks_and_rows_are_read_or_named(tmp_path: Path) -> None:
    from samsr.data.io import write_mask

    with pytest.raises(DataError, match="eval.save_masks=true"):
        read_saved_mask(tmp_path, "pspnet", "dog")
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 255
    write_mask(tmp_path / "masks" / "pspnet" / "dog_mask.png", mask)
    assert np.array_equal(read_saved_mask(tmp_path, "pspnet", "dog") > 0, mask > 0)
    (tmp_path / "metrics.json").write_text(json.dumps({"pspnet": {"per_image": [
        {"name": "dog", **_row(0.9, 0.8)}]}}))  # fmt: skip
    assert load_rows(tmp_path / "metrics.json", "pspnet")["dog"]["iou"] == 0.9
    with pytest.raises(DataError, match="no coarse source 'fcn8s'.*source="):
        load_rows(tmp_path / "metrics.json", "fcn8s")


def test_an_evaluation_without_its_masks_is_not_done(tmp_path: Path) -> None:
    plan = build_plan([], tmp_path, figures=["2.6"], models={"crm": ["model=crm"]})
    run = next(r for r in plan.runs if r.key == "eval/crm/faithful")
    assert SAVE_MASKS in run.overrides
    folder = plan.folder(run)
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text("{}")
    assert status(plan, run) == "todo"  # evaluated before masks were saved: evaluate again
    (folder / "masks").mkdir()
    assert status(plan, run) == "done"


def test_figures_dry_run_plans_the_evaluations_they_draw(tmp_path: Path, capsys) -> None:
    from samsr.errors import ConfigError
    from samsr.reproduce.cli import figures_main

    assert figures_main(["figure=all", f"out_dir={tmp_path}", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "plan: 4 runs" in text and "[todo  ] eval/samsr_v2_1/faithful" in text
    assert text.count(SAVE_MASKS) == 2 and not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match=r"figure=\['4.4'\]: pick from"):
        figures_main(["figure=4.4", "--dry-run"])
    with pytest.raises(ConfigError, match="which figure"):
        figures_main(["--dry-run"])
