"""The inference benchmark: agreement by hand, one tiny end-to-end run, failures reported.

Everything runs on the CPU with a random-init ResNet-18 CRM on tiny synthetic images: no network,
GPU, data or checkpoints.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from samsr.engine.benchmark import BenchmarkError, select_variants
from samsr.engine.benchmark_cli import main, parse_override, parse_size
from samsr.engine.benchmark_report import add_reference_columns, mask_agreement, score_variant

# Fast CPU settings shared by the runs below (workers are fresh processes: ~3 s of imports each).
TINY = ["--random-weights", "--device", "cpu", "--num-images", "1"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """Workers inherit one intra-op thread: robust timing on a busy CI box, numbers unaffected."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _run(tmp_path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "out"
    rc = main([*TINY, "--cache-dir", str(tmp_path / "cache"), "--out", str(out), *extra])
    bench = json.loads((out / "benchmark.json").read_text()) if rc in (0, 1) else {}
    return rc, bench


def test_mask_agreement_counts_by_hand():
    reference = np.array([[0, 200], [255, 129]], dtype=np.uint8)
    mask = np.array([[0, 128], [255, 130]], dtype=np.uint8)
    # binarised (> 128): reference F T T T, mask F F T T -> 3 of 4 agree; equal values: 0 and 255
    assert mask_agreement(mask, reference) == {"pixels": 4, "agree": 3, "equal": 2}
    assert mask_agreement(reference, reference) == {"pixels": 4, "agree": 4, "equal": 4}
    with pytest.raises(ValueError, match="shape"):
        mask_agreement(mask, reference[:1])


def test_score_variant_and_reference_columns():
    gt = np.zeros((40, 40), np.uint8)
    gt[10:30, 10:30] = 255
    half = gt.copy()
    half[10:20, 10:30] = 0  # half of the object missing: IoU 50 %
    scores = score_variant({"a": gt}, {"a": gt}, {"a": half}, reference={"a": gt})
    assert scores["iou_pct"] == pytest.approx(50.0)
    assert scores["agreement_pct"] == pytest.approx(100.0 * (1600 - 200) / 1600)
    assert scores["exact_pct"] == scores["agreement_pct"]
    rows = {
        "faithful": {"status": "ok", "time_s": 2.0, "peak_mem_gib": 4.0, "iou_pct": 90.0},
        "fast": {"status": "ok", "time_s": 1.0, "peak_mem_gib": 1.0, "iou_pct": 89.5},
        "oom": {"status": "failed (exit -9: out of memory?)"},
    }
    add_reference_columns(rows)
    assert rows["faithful"]["time_ratio"] == 1.0 and rows["faithful"]["mem_ratio"] == 1.0
    assert rows["fast"]["time_ratio"] == 0.5 and rows["fast"]["mem_ratio"] == 0.25
    assert rows["fast"]["iou_delta_pct"] == pytest.approx(-0.5)
    assert rows["oom"]["time_ratio"] is None and rows["fast"]["mba_delta_pct"] is None


def test_variant_selection():
    available = ["bbox", "faithful", "fast", "strided4"]
    assert select_variants(["fast", "bbox", "fast"], available) == ["faithful", "fast", "bbox"]
    assert select_variants(None, available)[0] == "faithful"
    assert select_variants(["fast"], available, with_reference=False) == ["fast"]
    with pytest.raises(BenchmarkError, match="unknown variant"):
        select_variants(["fastest"], available)
    with pytest.raises(BenchmarkError, match="--variants"):
        select_variants(None, available, with_reference=False)


def test_argument_parsing():
    assert parse_size("2048x1536") == (2048, 1536)
    assert parse_override("chunk_size=65536") == "inference.chunk_size=65536"
    assert parse_override("+inference.tile=64") == "+inference.tile=64"
    for bad in ("2048", "axb", "10x10"):
        with pytest.raises(Exception, match="bad size"):
            parse_size(bad)


def test_bad_input_gets_a_clear_message(tmp_path, capsys, monkeypatch):
    assert main([*TINY, "--variants", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown variant(s) ['nope']" in err and "faithful" in err
    missing = str(tmp_path / "missing")
    assert main([*TINY, "--variants", "faithful", "--data", missing, "--out", str(tmp_path)]) == 2
    assert f"data folder not found: {missing}" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # no outputs/quickstart here
    assert main(["--device", "cpu", "--variants", "faithful", "--out", str(tmp_path / "o")]) == 2
    assert "experiment=quickstart" in capsys.readouterr().err


def test_benchmark_end_to_end_tiny(tmp_path):
    scales = "inference.scales=[0.5,1.0]"  # a shorter cascade, for speed
    rc, bench = _run(
        tmp_path, "--sizes", "96x80", "128x96", "--variants", "bbox", "--inference-override", scales
    )
    assert rc == 0
    assert bench["variants"] == ["faithful", "bbox"]
    assert bench["variant_configs"]["faithful"]["scales"] == [0.5, 1.0]
    assert set(bench["groups"]) == {"96x80", "128x96"}
    assert bench["variant_configs"]["bbox"]["region"] == "bbox"
    for name, group in bench["groups"].items():
        assert group["coarse"]["iou_pct"] is not None
        faithful, bbox = group["variants"]["faithful"], group["variants"]["bbox"]
        assert faithful["status"] == "ok" and bbox["status"] == "ok", bbox.get("stderr_tail")
        assert faithful["agreement_pct"] == 100.0 and faithful["exact_pct"] == 100.0
        assert faithful["time_ratio"] == 1.0 and faithful["mem_ratio"] == 1.0
        assert faithful["iou_delta_pct"] == 0.0
        assert 0.0 <= bbox["agreement_pct"] <= 100.0 and bbox["time_ratio"] > 0
        assert bbox["peak_mem_gib"] > 0 and bbox["per_image"][0]["time_s"] > 0
        for variant in ("faithful", "bbox"):
            assert (tmp_path / "out" / "masks" / variant / name / "img0.png").is_file()
    report = (tmp_path / "out" / "benchmark.md").read_text()
    assert "RANDOM WEIGHTS" in report and "| bbox |" in report and "Agreement (%)" in report


def test_failing_worker_is_reported_not_raised(tmp_path):
    # stride=0 composes but the worker's build_refiner raises a ConfigError
    rc, bench = _run(
        tmp_path, "--sizes", "64x48", "--variants", "faithful",
        "--inference-override", "inference.stride=0", "--no-keep-masks",
    )  # fmt: skip
    assert rc == 1  # every worker failed, the report is written all the same
    row = bench["groups"]["64x48"]["variants"]["faithful"]
    assert row["status"].startswith("failed (exit 1: ConfigError"), row["status"]
    assert "stride" in row["stderr_tail"] and row["time_ratio"] is None
    assert "failed (exit 1" in (tmp_path / "out" / "benchmark.md").read_text()
    assert not (tmp_path / "out" / "masks").exists()


def test_work_table_means_the_cascade_counters():
    from samsr.engine.benchmark_report import format_group

    def row(cascades):
        return {"status": "ok", "time_s": 1.0, "per_image": [{"cascade": c} for c in cascades]}

    group = {
        "images": [{"width": 64, "height": 48}] * 2,
        "coarse": {"iou_pct": 90.0, "mba_pct": 80.0},
        "variants": {
            "faithful": row([{"encoded_px": 2e6, "decoded_px": 4e6}] * 2),
            "fast": row(
                [
                    {
                        "tiles": 4,
                        "encoded_px": 3e6,
                        "decoded_px": 1e6,
                        "encode": 5.0,
                        "trunk": 3.0,
                        "decode": 1.0,
                    },
                    {
                        "tiles": 6,
                        "encoded_px": 5e6,
                        "decoded_px": 3e6,
                        "encode": 7.0,
                        "trunk": 4.0,
                        "decode": 3.0,
                    },
                ]
            ),  # fmt: skip
            "broken": {"status": "failed (exit 1)"},
        },
    }
    text = format_group("64x48", group)
    assert "| faithful | – | 2.00 | 4.00 | – | – | – |" in text
    assert "| fast | 5 | 4.00 | 2.00 | 3.50 | 2.50 | 2.00 |" in text
    assert "| broken | " not in text.split("Work per image")[1]
