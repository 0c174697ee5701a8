"""ImageNet encoder weights: loaded only when training starts from scratch, found or explained."""

from __future__ import annotations

import hashlib
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from samsr.engine.builders import build_model, load_pretrained
from samsr.engine.checkpoint import CheckpointError
from samsr.engine.run import run_eval, run_train
from samsr.models.components import resnet_encoder


def _release_file(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A torchvision ResNet-18 state dict saved under a release-style name with its hash prefix."""
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "tmp.pth"
    torch.save(state, tmp)
    prefix = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    path = tmp.rename(folder / f"resnet18-{prefix}.pth")
    return path, state


@pytest.fixture
def release(tmp_path, monkeypatch):
    """A local 'release' file, with torchvision's address for it pointing at its name."""
    path, state = _release_file(tmp_path / "checkpoints")
    monkeypatch.setattr(resnet_encoder, "imagenet_url", lambda arch: f"https://x/{path.name}")
    return path, state


def _no_network(*args, **kwargs):
    raise urllib.error.URLError("no network")


def test_imagenet_is_taken_from_the_checkpoint_dir(tiny_cfg, release):
    path, state = release
    cfg = tiny_cfg("train", ["model.net.pretrained=imagenet"])
    model = build_model(cfg.model)
    assert not torch.equal(model.encoder.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert load_pretrained(model, cfg.model, str(path.parent)) == "imagenet"
    torch.testing.assert_close(model.encoder.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    torch.testing.assert_close(model.encoder.conv1.weight[:, :3], state["conv1.weight"])
    assert not model.encoder.conv1.weight[:, 3:].any()  # the mask channel starts at zero


def test_a_corrupt_release_file_is_refused(tiny_cfg, release):
    path, _ = release
    path.write_bytes(path.read_bytes()[:-10])
    cfg = tiny_cfg("train", ["model.net.pretrained=imagenet"])
    with pytest.raises(CheckpointError, match="release hash"):
        load_pretrained(build_model(cfg.model), cfg.model, str(path.parent))


def test_no_file_and_no_network_says_where_to_put_it(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_network)
    cfg = tiny_cfg("train", ["model.net.pretrained=imagenet"])
    with pytest.raises(CheckpointError) as info:
        load_pretrained(build_model(cfg.model), cfg.model, str(tmp_path / "checkpoints"))
    msg = str(info.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path / "checkpoints") in msg
    assert "model.net.pretrained=null" in msg


def test_real_data_trains_from_imagenet_by_default(tmp_path):
    from conftest import compose_config

    for data in ("train_merged", "duts"):
        assert (
            compose_config("train", [f"data={data}"], tmp_path).model.net.pretrained == "imagenet"
        )
    for extra in (["data=synthetic"], ["experiment=quickstart"]):
        assert compose_config("train", extra, tmp_path).model.net.pretrained is None


def test_training_from_scratch_stops_at_step_0_without_the_weights(tiny_cfg, tmp_path):
    missing = tmp_path / "missing.pth"
    cfg = tiny_cfg("train", [f"model.net.pretrained={missing}", "trainer.max_steps=1"])
    with pytest.raises(CheckpointError, match="missing.pth"):
        run_train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    with pytest.raises(CheckpointError, match="notes.txt"):
        cfg = tiny_cfg("train", [f"model.net.pretrained={text}"])
        load_pretrained(build_model(cfg.model), cfg.model, str(tmp_path))


def test_checkpoint_runs_never_touch_imagenet_weights(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_network)
    common = ["trainer.val_every=0", "test_after_training=false", "trainer.max_steps=1"]
    first = run_train(tiny_cfg("train", common))
    ckpt = first["checkpoint"]
    missing = f"model.net.pretrained={tmp_path / 'missing.pth'}"
    # evaluation, init_weights and resume all hold every weight already: no ImageNet lookup
    evaluation = [
        f"ckpt_path={ckpt}",
        missing,
        "eval.max_images=1",
        f"paths.output_dir={tmp_path}/e",
    ]
    run_eval(tiny_cfg("eval", evaluation))
    init = [f"model.init_weights={ckpt}", missing, f"paths.output_dir={tmp_path}/i"]
    run_train(tiny_cfg("train", [*common, *init]))
    run_train(tiny_cfg("train", [*common[:2], "trainer.max_steps=2", f"resume={ckpt}", missing]))
    # and building a real-data config's model (benchmark, refine) loads nothing either
    from conftest import compose_config

    build_model(
        compose_config("eval", ["data=duts", "model.net.backbone=resnet18"], tmp_path).model
    )
