"""torchrun on the CPU (gloo, 2 processes): the same training as one process, exact resume,
the same evaluation, a precompute that makes each file once; and the pieces they rest on."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, TINY_SYNTHETIC

from samsr.distributed import DistContext, DistributedError, hydra_rank_overrides, rank_device
from samsr.engine.checkpoint import load_checkpoint
from samsr.engine.data_stream import StreamSampler
from samsr.engine.trainer import micro_batch_size
from samsr.metrics import RefinementMeter, merge_efficiency

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------- pieces


def test_rank_slices_of_each_step_make_the_single_process_sequence():
    one = list(StreamSampler(24, 72))
    parts = [list(StreamSampler(24, 72, period=12, shard=r, shards=2)) for r in (0, 1)]
    assert [len(p) for p in parts] == [24, 24]
    # step by step: rank 0 reads the first 6 positions of each step, rank 1 the next 6
    merged = [x for step in range(4) for r in (0, 1) for x in parts[r][6 * step : 6 * step + 6]]
    assert merged == one
    with pytest.raises(ValueError, match="multiple"):
        StreamSampler(0, 12, period=10, shard=0, shards=4)


def test_global_batch_must_split_over_ranks_and_accumulation():
    assert micro_batch_size(12, 2, 1) == 6
    assert micro_batch_size(12, 1, 2) == 6
    with pytest.raises(ValueError, match=r"batch_size \(12.*2 x 4 = 8"):
        micro_batch_size(12, 2, 4)


def test_sync_batchnorm_is_refused_on_the_cpu(tmp_path):
    from samsr.engine.trainer import Trainer, TrainSettings

    with pytest.raises(DistributedError, match="sync_batchnorm=false"):
        Trainer(
            torch.nn.Conv2d(4, 1, 1), torch.nn.Identity(), torch.optim.SGD, lambda o: o,
            [0], TrainSettings(batch_size=2, sync_batchnorm=True), tmp_path,
            torch.device("cpu"), dist=DistContext(rank=0, world_size=2),
        )  # fmt: skip


def test_merged_meters_and_timings_equal_one_meter():
    import numpy as np

    rng = np.random.default_rng(0)
    masks = [(rng.random((3, 40, 50)) > 0.5).astype(np.uint8) * 255 for _ in range(5)]
    whole, parts = RefinementMeter(), [RefinementMeter(), RefinementMeter()]
    for i, (gt, ref, coarse) in enumerate(masks):
        whole.update(f"im{i}", gt, ref, coarse)
        parts[i % 2].update(f"im{i}", gt, ref, coarse)
    merged = RefinementMeter()
    rows = {r["name"]: r for p in parts for r in p.per_image()}
    merged.add_rows([rows[f"im{i}"] for i in range(5)])
    assert merged.compute() == whole.compute()
    with pytest.raises(ValueError, match="already"):
        merged.add_rows([rows["im0"]])

    a = {"time_s": 1.0, "time_s_all": 1.5, "num_timed": 2, "num_warmup": 1, "num_images": 3,
         "peak_mem_gib": 1.0, "device": "cuda:0", "mean_height": 10.0, "mean_width": 20.0,
         "max_height": 10, "max_width": 20}  # fmt: skip
    b = {**a, "time_s": 4.0, "time_s_all": 4.0, "num_timed": 1, "num_warmup": 0,
         "num_images": 1, "peak_mem_gib": 3.0, "device": "cuda:1", "mean_height": 30.0,
         "max_height": 30}  # fmt: skip
    m = merge_efficiency([a, b])
    assert m["time_s"] == pytest.approx(2.0) and m["time_s_all"] == pytest.approx(2.125)
    assert (m["num_images"], m["peak_mem_gib"], m["max_height"]) == (4, 3.0, 30)
    assert m["mean_height"] == pytest.approx(15.0) and len(m["per_rank"]) == 2


def test_torchrun_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert hydra_rank_overrides([]) == [] and rank_device("auto") == "auto"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert hydra_rank_overrides(["x=1"])[0].endswith("/torchrun/rank1")
    assert hydra_rank_overrides(["hydra.run.dir=here"]) == []
    assert rank_device("cpu") == "cpu" and rank_device("cuda") == "cuda:1"
    monkeypatch.setenv("RANK", "2")
    from samsr.distributed import env_context

    with pytest.raises(DistributedError, match="RANK=2, WORLD_SIZE=2"):
        env_context()


# ------------------------------------------------------------------------- torchrun runs


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _run(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd = [*launch, f"--nproc_per_node={nproc}", *args] if nproc > 1 else [sys.executable, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder shared by the runs below, with the tiny synthetic set of ``TINY_SYNTHETIC``."""
    from samsr.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("ddp")
    sizes = dict(o.removeprefix("data.prepare.").split("=") for o in TINY_SYNTHETIC)
    make_synthetic(
        out_dir=root / "data" / "synthetic", num_train=int(sizes["num_train"]),
        train_long_side=int(sizes["train_long_side"]), num_val=int(sizes["num_val"]),
        num_test=int(sizes["num_test"]), test_long_side=json.loads(sizes["test_long_side"]),
        coarse_factors=[8, 16], seed=0,
    )  # fmt: skip
    return root


def _train_args(workdir: Path, name: str, extra: list[str]) -> list[str]:
    paths = [f"paths.root_dir={workdir}", f"paths.data_dir={workdir / 'data'}",
             f"hydra.run.dir={workdir / name}"]  # fmt: skip
    return [
        "scripts/train.py", *TINY, *TINY_SYNTHETIC, *paths, "trainer.batch_size=12",
        "trainer.image_every=0", "trainer.val_every=0", "test_after_training=false", *extra,
    ]  # fmt: skip


def _train(workdir: Path, name: str, nproc: int, extra: list[str]) -> Path:
    """Trains in ``<workdir>/<name>``; returns the run's checkpoint folder (a resumed run's is
    the folder of the checkpoint it resumed)."""
    _run(_train_args(workdir, name, extra), nproc)
    resume = [e.removeprefix("resume=") for e in extra if e.startswith("resume=")]
    return Path(resume[0]).parent if resume else workdir / name / "checkpoints"


def _max_param_diff(a: Path, b: Path) -> float:
    sa, sb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    params = [k for k in sa if "running_" not in k and "num_batches" not in k]
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in params)


def test_two_ranks_train_as_one_rank_with_two_accumulation_steps(workdir):
    common = ["trainer.max_steps=3", "trainer.ckpt_every=3", "model.net.dropout=0.0"]
    # the 2-rank run also validates and tests after training (the evaluator split over ranks)
    evals = ["trainer.val_every=3", "test_after_training=true", "eval.max_images=2"]
    two = _train(workdir, "two_ranks", 2, [*common, *evals])
    one = _train(workdir, "one_rank_acc2", 1, [*common, "trainer.accumulate=2"])
    diff = _max_param_diff(two / "last.pt", one / "last.pt")
    print(f"max parameter difference, 2 ranks x 6 vs 1 rank x 2 x 6: {diff:.2e}")
    assert diff <= 1e-5
    ckpt = load_checkpoint(two / "last.pt")
    assert ckpt["layout"] == {"world_size": 2, "batch_size": 12, "per_rank_batch": 6,
                              "micro_batch": 6, "accumulate": 1}  # fmt: skip
    assert len(ckpt["rng_ranks"]) == 2
    assert not torch.equal(ckpt["rng_ranks"][0]["torch"], ckpt["rng_ranks"][1]["torch"])
    # rank 1 made no second run folder, only its Hydra log
    assert not any((workdir / "outputs").glob("*/*/checkpoints"))
    for report in ("val/step_0000003/metrics.json", "test/metrics.json"):
        metrics = json.loads((two.parent / report).read_text())
        for source in metrics.values():
            assert source["num_images"] == len(source["per_image"]) >= 1


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux ``/proc``), children first."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [d for c in map(int, children) for d in [*_descendants(c), c]]


def test_two_rank_resume_after_kill_9_equals_the_uninterrupted_run(workdir):
    common = ["trainer.ckpt_every=2", "trainer.keep_checkpoints=0", "model.net.dropout=0.5"]
    straight = _train(workdir, "straight", 2, [*common, "trainer.max_steps=4"])
    # a long run, killed (SIGKILL, every process of the job) once step 2 is on disk
    name = "killed"
    args = _train_args(workdir, name, [*common, "trainer.max_steps=100000"])
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen(
        [*launch, *args], cwd=ROOT, env=_env(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    step2 = workdir / name / "checkpoints" / "step_0000002.pt"
    try:
        deadline = time.monotonic() + 240
        while not step2.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:  # torchrun starts each rank in its own session: kill them by pid, then it
        for pid in [*_descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    assert step2.is_file(), "the run to kill never wrote step 2"
    resumed = _train(workdir, "resumed", 2, [*common, "trainer.max_steps=4", f"resume={step2}"])
    assert resumed == step2.parent  # resuming continues in the killed run's folder
    a, b = (
        load_checkpoint(straight / "step_0000004.pt"),
        load_checkpoint(step2.parent / "step_0000004.pt"),
    )
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for r in (0, 1):
        assert torch.equal(a["rng_ranks"][r]["torch"], b["rng_ranks"][r]["torch"])


def _accuracy(metrics: dict) -> dict:
    timing = ("time", "peak_mem", "device", "per_rank", "num_timed", "num_warmup", "mean_",
              "max_", "batch_size", "dtype", "cudnn", "tf32")  # fmt: skip
    return {
        src: {k: v for k, v in m.items() if not k.startswith(timing)} for src, m in metrics.items()
    }


def test_two_rank_eval_equals_one_rank_eval(workdir):
    ckpt = workdir / "one_rank_acc2" / "checkpoints" / "last.pt"
    if not ckpt.is_file():  # run alone: make a checkpoint first
        ckpt = _train(workdir, "one_rank_acc2", 1, ["trainer.max_steps=1"]) / "last.pt"
    tiny = [o for o in TINY if not o.startswith("trainer.")]
    out = {}
    for nproc in (1, 2):
        run = workdir / f"eval{nproc}"
        _run(["scripts/eval.py", *tiny, *TINY_SYNTHETIC, f"ckpt_path={ckpt}",
              f"paths.root_dir={workdir}", f"paths.data_dir={workdir / 'data'}",
              f"hydra.run.dir={run}", "eval.max_images=3"], nproc)  # fmt: skip
        out[nproc] = json.loads((run / "metrics.json").read_text())
    assert out[1].keys() == out[2].keys() and out[1]
    assert _accuracy(out[2]) == _accuracy(out[1])
    first = next(iter(out[2].values()))
    assert len(first["per_rank"]) == 2 and first["num_images"] == first["per_image"].__len__()


def test_two_rank_precompute_makes_each_file_once(workdir):
    from samsr.engine.image_runs import collect_images

    images = workdir / "data" / "synthetic" / "train"
    cache = workdir / "sam_maps"
    args = [
        "scripts/precompute_sam.py",
        "--images",
        str(images),
        "--out",
        str(cache),
        "--tiny-sam",
        "--device",
        "cpu",
        "--no-progress",
        "--points-per-side",
        "4",
        "--pred-iou-thresh",
        "0",
        "--stability-score-thresh",
        "0",
    ]
    # fmt: skip
    proc = _run(args, 2)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SAM maps (shard")]
    assert sorted(ln.split(":")[0] for ln in lines) == [
        "SAM maps (shard 0/2)",
        "SAM maps (shard 1/2)",
    ]
    done = sum(int(ln.split("done ")[1].split(",")[0]) for ln in lines)
    total = len(collect_images([images]))
    assert done == total, proc.stdout
    files = [p for p in cache.rglob("*") if p.is_file() and p.name != "manifest.json"]
    assert len(files) == total and len(list(cache.glob("manifest.json"))) == 1
    again = _run(args, 2)
    assert "done 0" in again.stdout and "failed 0" in again.stdout
