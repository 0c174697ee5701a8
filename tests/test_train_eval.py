"""End to end through the real configs: train, resume exactly, evaluate, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from samsr.engine.builders import (
    ConfigError,
    build_eval_datasets,
    build_loss,
    build_model,
    to_container,
)
from samsr.engine.checkpoint import (
    CheckpointError,
    LoadedCheckpoint,
    atomic_torch_save,
    load_checkpoint,
    training_state,
)
from samsr.engine.configs import CONFIG_DIR
from samsr.engine.loading import checkpoint_model_config
from samsr.engine.run import run_eval, run_train


def _segmentation(group: str, name: str) -> bool:
    """Whether config ``group/name`` is of the segmentation task (the patch baseline)."""
    if group != "experiment":
        return "task: segmentation" in (CONFIG_DIR / group / f"{name}.yaml").read_text()
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={name}"])
    return cfg.model.get("task") == "segmentation"


def _configs(group: str, segmentation: bool = False) -> list[str]:
    names = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
    return [n for n in names if _segmentation(group, n) == segmentation]


# refiners here; the segmentation configs (model=pspnet, data=voc, ...) in tests/test_pspnet.py
MODEL_CONFIGS = _configs("model")
DATA_CONFIGS = _configs("data")


@pytest.mark.parametrize("model", MODEL_CONFIGS)
def test_every_model_config_builds_and_trains_a_step(tiny_cfg, tmp_path, model):
    cfg = tiny_cfg("train", [f"model={model}"])
    net = build_model(cfg.model)
    loss_fn = build_loss(cfg.model)
    image, coarse = torch.rand(2, 3, 41, 57), (torch.rand(2, 1, 41, 57) > 0.5).float()
    extra = torch.rand(2, net.in_channels - 4, 41, 57) if net.in_channels > 4 else None
    out = net(image, coarse, extra)
    assert out["logits"].shape == (2, 1, 41, 57)
    losses = loss_fn(out["logits"], coarse)
    losses["total"].backward()
    assert all(torch.isfinite(v) for v in losses.values())
    # a checkpoint describes itself: its stored config alone rebuilds the network (no overrides)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    state = training_state(net, opt, sched, torch.amp.GradScaler("cpu", enabled=False), 1,
                           to_container(cfg), str(cfg.model.name))  # fmt: skip
    path = atomic_torch_save(state, tmp_path / "last.pt")
    stored = checkpoint_model_config(path)
    assert stored.name == model
    assert OmegaConf.to_container(stored.net) == OmegaConf.to_container(cfg.model.net, resolve=True)
    rebuilt = build_model(stored, weights=LoadedCheckpoint.read(path))
    again = rebuilt.state_dict()
    for key, value in net.state_dict().items():
        same = torch.equal(again[key], value) if torch.is_tensor(value) else again[key] == value
        assert same, key


@pytest.mark.parametrize("data", DATA_CONFIGS)
@pytest.mark.parametrize("name", ["train", "eval"])
def test_every_config_composes_and_resolves(tmp_path, data, name):
    from conftest import compose_config

    extra = ["ckpt_path=x.pt"] if name == "eval" else []
    extra += [f"data.root={tmp_path}"] if data == "folder" else []  # a folder of the user's
    cfg = compose_config(name, [f"data={data}", *extra], tmp_path)
    OmegaConf.resolve(cfg)  # no dangling interpolation
    # data=folder finds its coarse sources in the folder (test_eval_discovers_coarse_sources)
    assert cfg.data.test.coarse_dirs or data == "folder", f"data={data}: no coarse sources"


def test_quickstart_experiment_composes(tmp_path):
    from conftest import compose_config

    cfg = compose_config("train", ["experiment=quickstart"], tmp_path)
    assert cfg.model.net.backbone == "resnet18"
    assert cfg.data.name == "synthetic"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


@pytest.mark.parametrize("window", [0, 24])
def test_train_two_steps_then_resume_matches_uninterrupted(tiny_cfg, tmp_path, window):
    common = ["trainer.ckpt_every=2", "trainer.val_every=0", "test_after_training=false"]
    common.append(f"trainer.decode_window={window}")  # 24: random decode windows, also resumed
    straight = run_train(tiny_cfg("train", [*common, "trainer.max_steps=4"]))
    assert straight["checkpoint"].is_file()

    part = run_train(
        tiny_cfg("train", [*common, "trainer.max_steps=2", f"paths.output_dir={tmp_path}/b"])
    )
    ckpt2 = part["run_dir"] / "checkpoints" / "step_0000002.pt"
    assert load_checkpoint(ckpt2)["step"] == 2
    resumed = run_train(tiny_cfg("train", [*common, "trainer.max_steps=4", f"resume={ckpt2}"]))
    assert resumed["run_dir"] == part["run_dir"]

    a, b = _weights(straight["checkpoint"]), _weights(resumed["checkpoint"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and training did move the weights
    init = build_model(tiny_cfg("train").model).state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a if a[k].is_floating_point())
    assert list((part["run_dir"] / "tensorboard").iterdir())


def test_decode_window_trains_on_windows_and_refuses_one_larger_than_the_crops(tiny_cfg, tmp_path):
    common = ["trainer.max_steps=1", "trainer.val_every=0", "test_after_training=false"]
    runs = {
        w: run_train(
            tiny_cfg(
                "train", [*common, f"trainer.decode_window={w}", f"paths.output_dir={tmp_path}/{w}"]
            )
        )
        for w in (0, 24)
    }
    a, b = _weights(runs[0]["checkpoint"]), _weights(runs[24]["checkpoint"])
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    with pytest.raises(ValueError, match="decode_window=64 exceeds the 48x48"):
        run_train(tiny_cfg("train", [*common, "trainer.decode_window=64"]))


def test_train_then_eval_writes_reports_for_each_source(tiny_cfg, tmp_path):
    res = run_train(
        tiny_cfg("train", ["trainer.max_steps=2", "trainer.val_every=1", "trainer.ckpt_every=1"])
    )
    assert set(res["test"]) == {"down8", "down16"}
    assert list((res["run_dir"] / "val").iterdir()), "validation wrote nothing"

    cfg = tiny_cfg(
        "eval",
        [
            f"ckpt_path={res['checkpoint']}",
            "eval.save_masks=true",
            f"paths.output_dir={tmp_path}/e",
        ],
    )
    results = run_eval(cfg)
    out = tmp_path / "e"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"down8", "down16"}
    for source, m in metrics.items():
        assert m["num_images"] == 2
        for key in ("iou", "miou", "mba", "iou_coarse", "mba_coarse", "iou_delta", "time_s"):
            assert key in m, key
        assert m["iou_delta"] == pytest.approx(m["iou"] - m["iou_coarse"])
        assert m["cudnn_benchmark"] is False and m["tf32"] is False  # inference=faithful
        assert results[source]["mba"] == pytest.approx(m["mba"])
        assert len(list((out / "masks" / source).glob("*_mask.png"))) == 2
    table = (out / "results.md").read_text()
    assert "| down8 |" in table and "| down16 |" in table and "avg. gain" in table


def test_eval_errors_are_clear(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="ckpt_path"):
        run_eval(tiny_cfg("eval"))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        run_eval(tiny_cfg("eval", [f"ckpt_path={tmp_path}/missing.pt"]))
    with pytest.raises(ConfigError, match="no 'train' split|use val or test"):
        build_eval_datasets(tiny_cfg("eval").data, "train")


@pytest.mark.parametrize("split", ["val", "test"])
def test_missing_evaluation_data_fails_before_step_0(tiny_cfg, tmp_path, split):
    from samsr.data.io import DataError

    missing = tmp_path / "no_such_source"
    extra = [
        f"data.{split}.coarse_dirs.down8={missing}",
        "trainer.max_steps=3",
        "trainer.ckpt_every=1",
        f"trainer.val_every={2 if split == 'val' else 0}",
        "test_after_training=true",
    ]
    with pytest.raises(DataError, match="no_such_source"):
        run_train(tiny_cfg("train", extra))
    assert not (tmp_path / "run" / "checkpoints").exists()  # no training step ran


def test_training_reads_losses_from_the_device_only_on_log_steps(tiny_cfg, monkeypatch):
    # Every host read of a tensor made by the trainer's own code (float(), .item(), .tolist())
    # waits for the device; between log steps there must be none.
    import sys

    reads: list[str] = []
    for name in ("__float__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            if sys._getframe(1).f_globals.get("__name__") == "samsr.engine.trainer":
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    common = ["trainer.val_every=0", "trainer.image_every=0", "test_after_training=false"]
    run_train(tiny_cfg("train", [*common, "trainer.max_steps=4", "trainer.log_every=0"]))
    assert reads == ["tolist"]  # the last step's log: all terms in one transfer


def test_training_autotunes_and_validation_uses_the_inference_flags(tiny_cfg, monkeypatch):
    from samsr.engine import run, trainer

    seen: dict[str, list] = {"train": [], "val": []}

    def flags():
        b = torch.backends
        return b.cudnn.benchmark, b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32

    train_step, evaluate = trainer.Trainer.train_step, run.evaluate

    def spy_step(self, batch):
        seen["train"].append(flags())
        return train_step(self, batch)

    def spy_eval(*args, **kwargs):
        seen["val"].append(flags())
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer.Trainer, "train_step", spy_step)
    monkeypatch.setattr(run, "evaluate", spy_eval)
    outside = flags()
    extra = ["trainer.max_steps=2", "trainer.val_every=1", "test_after_training=false"]
    run_train(tiny_cfg("train", [*extra, "trainer.val_max_images=1"]))
    assert seen["train"] == [(True, True, True)] * 2  # trainer defaults: autotune, TF32
    assert seen["val"] == [(False, False, False)] * 2  # inference=faithful
    assert flags() == outside


def test_logger_config_makes_the_writer(tiny_cfg, tmp_path):
    common = ["trainer.max_steps=1", "trainer.val_every=0", "test_after_training=false"]
    res = run_train(tiny_cfg("train", [*common, "logger.flush_secs=7", "+logger.max_queue=3"]))
    events = list((res["run_dir"] / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    with pytest.raises(Exception, match="no_such_argument"):
        run_train(tiny_cfg("train", [*common, "+logger.no_such_argument=1"]))


EXPERIMENTS = _configs("experiment")
DEBUGS = sorted(p.stem for p in (CONFIG_DIR / "debug").glob("*.yaml"))


@pytest.mark.parametrize("model", MODEL_CONFIGS)
@pytest.mark.parametrize("experiment", [None, *EXPERIMENTS])
@pytest.mark.parametrize("debug", [None, *DEBUGS])
def test_every_experiment_debug_and_model_builds_or_names_the_key(
    tiny_cfg, tmp_path, model, experiment, debug
):
    # composing is not enough: the model and the training data must build, or a ConfigError
    # must name the key that does not fit (e.g. the CRM quickstart's backbone under SAM-SR v3)
    from samsr.data.io import DataError
    from samsr.engine.builders import build_train_dataset, prepare_data

    extra = [f"model={model}"]
    extra += [f"experiment={experiment}"] if experiment else []
    extra += [f"debug={debug}"] if debug else []
    tiny = ["model.sam.tiny=true"] if model in ("samsr_v1", "samsr_v2_1", "samsr_v2_2") else []
    if experiment == "duts_cpu":  # real-data layout: a tiny DUTS folder instead of ../shared
        from conftest import compose_config, tiny_overrides
        from test_duts_recipe import fake_duts

        root = fake_duts(tmp_path / "duts", n=12)
        over = tiny_overrides("train", extra) + extra + tiny + [f"data.root={root}"]
        cfg = compose_config("train", over, tmp_path)
    else:
        cfg = tiny_cfg("train", extra + tiny)
    try:
        net = build_model(cfg.model)
    except ConfigError as err:
        assert experiment in ("quickstart", "quickstart_r50", "duts_cpu"), err
        assert model.startswith("samsr_v3"), err
        assert "backbone" in str(err)
        return
    assert isinstance(net, torch.nn.Module)
    prepare_data(cfg.data)
    if model == "samsr_v2_1":  # trains on precomputed maps: the error names the command
        with pytest.raises(DataError, match="precompute_sam"):
            build_train_dataset(cfg.data, cfg.model)
        return
    assert len(build_train_dataset(cfg.data, cfg.model)) > 0


def test_every_config_target_resolves_in_a_fresh_process():
    # a _target_ must resolve without relying on modules other tests imported first (e.g. a
    # package attribute shadowing a submodule of the same name)
    import re
    import subprocess
    import sys

    targets = sorted(
        {
            m.group(1)
            for path in CONFIG_DIR.rglob("*.yaml")
            for m in re.finditer(r"_target_:\s*([\w.]+)", path.read_text())
        }
    )
    assert "samsr.guidance.build.image_encoder" in targets
    code = "import sys\nfrom hydra.utils import get_method\nfor t in sys.argv[1:]: get_method(t)"
    out = subprocess.run([sys.executable, "-c", code, *targets], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
