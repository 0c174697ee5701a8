"""Official CRM checkpoint (DataParallel, reference module names) -> samsr CRM."""

from __future__ import annotations

import pytest
import torch

from samsr.models import build_crm, convert_official_crm, load_official_crm
from samsr.models.crm_official import official_key, samsr_key


def _bump(v: torch.Tensor) -> torch.Tensor:
    return v + (0.5 if v.is_floating_point() else 3)


def _fake_official(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict renamed to the official names, plus the layer4 the reference saves."""
    state = {official_key(k): _bump(v) for k, v in model.state_dict().items()}
    state["module.feats.layer4.0.conv1.weight"] = torch.zeros(512, 1024, 1, 1)
    state["module.feats.layer4.2.bn3.running_var"] = torch.ones(2048)
    return state


def test_key_map_examples() -> None:
    assert samsr_key("module.feats.layer3.5.conv2.weight") == "encoder.layer3.5.conv2.weight"
    assert samsr_key("feats.conv1.weight") == "encoder.conv1.weight"  # prefix optional
    assert samsr_key("module.feats.layer4.1.bn2.bias") is None
    assert samsr_key("module.aspp_.aspp1_256.atrous_conv.weight") == "fusion.branches.1.conv.weight"
    assert samsr_key("module.aspp_.aspp1_1024.bn.running_mean") == (
        "fusion.branches.2.bn1.running_mean"
    )
    assert samsr_key("module.aspp_.bn1_128.weight") == "fusion.branches.0.bn2.weight"
    assert samsr_key("module.aspp_.last_conv.1.bias") == "fusion.fuse_bn.bias"
    assert samsr_key("module.imnet.layers.8.weight") == "decoder.mlp.8.weight"
    with pytest.raises(KeyError):
        samsr_key("module.fc.weight")


def test_round_trip_loads_strict(tmp_path) -> None:
    torch.manual_seed(0)
    source = build_crm("resnet18")
    official = _fake_official(source)
    converted = convert_official_crm(official)
    target = build_crm("resnet18")
    target.load_state_dict(converted, strict=True)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], _bump(value)), key

    path = tmp_path / "model_45705"
    torch.save(official, path)
    again = build_crm("resnet18")
    load_official_crm(path, again)
    assert torch.equal(again.encoder.conv1.weight, target.encoder.conv1.weight)


def test_unmapped_keys_are_listed() -> None:
    official = _fake_official(build_crm("resnet18"))
    official["module.feats.fc.weight"] = torch.zeros(3)
    official["module.extra_head.bias"] = torch.zeros(3)
    with pytest.raises(KeyError, match="feats.fc.weight.*extra_head.bias|2 key"):
        convert_official_crm(official)


def test_missing_num_batches_tracked_is_filled() -> None:
    official = {
        k: v for k, v in _fake_official(build_crm("resnet18")).items() if "num_batches" not in k
    }
    converted = convert_official_crm(official)
    assert converted["encoder.bn1.num_batches_tracked"].item() == 0
    build_crm("resnet18").load_state_dict(converted, strict=True)


def test_load_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="model_45705"):
        load_official_crm(tmp_path / "missing", build_crm("resnet18"))
    path = tmp_path / "r18"
    torch.save(_fake_official(build_crm("resnet18")), path)
    with pytest.raises(ValueError, match="resnet50"):
        load_official_crm(path, build_crm("resnet34"))
