"""Checkpoint writing/loading and the resumable sample stream (no model needed)."""

import random

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from samsr.engine.checkpoint import (
    CheckpointError,
    atomic_torch_save,
    load_checkpoint,
    model_state_from_file,
    rng_state,
    set_rng_state,
)
from samsr.engine.data_stream import SampleStream, StreamSampler


class _RandomDataset(Dataset):
    """Each item draws from every global RNG, like augmentation does."""

    def __len__(self) -> int:
        return 5

    def __getitem__(self, i: int) -> tuple[int, float, float, float]:
        return i, random.random(), float(np.random.rand()), float(torch.rand(()))


def test_atomic_save_roundtrip_and_no_temp_left(tmp_path):
    path = atomic_torch_save({"a": torch.arange(3)}, tmp_path / "sub" / "x.pt")
    assert torch.equal(load_checkpoint(path)["a"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == ["x.pt"]


def test_atomic_save_failure_keeps_old_file(tmp_path):
    path = atomic_torch_save({"v": 1}, tmp_path / "x.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"v": Unpicklable()}, path)
    assert load_checkpoint(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_missing_and_corrupt_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt is not a PyTorch checkpoint: it is a text"):
        load_checkpoint(bad)


def _truncated_zip(path):
    torch.save({"w": torch.zeros(64)}, path)
    path.write_bytes(path.read_bytes()[:300])  # an interrupted copy or download


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (
            lambda p: p.write_text("model: crm\nsteps: 10\n"),
            "it is a text file starting 'model: crm'",
        ),
        (lambda p: p.write_bytes(b""), "the file is empty"),
        (_truncated_zip, "is a damaged or truncated PyTorch checkpoint"),
        (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64)), "it is an image"),
        (lambda p: p.write_bytes(bytes(range(256)) * 4), "could not unpickle it: "),
    ],
    ids=["text", "empty", "truncated-zip", "image", "binary"],
)
def test_not_a_checkpoint_is_said_in_plain_words(tmp_path, recwarn, make, says):
    path = tmp_path / "weights.pt"
    make(path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path} ") and says in message
    assert "scripts/train.py" in message and "model_45705" in message
    assert "\n" not in message and len(message) < 400  # one line, not torch's essay
    assert not recwarn.list  # nor torch's warnings about the "pickle" it tried
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)


def test_checkpoint_of_other_variant_refused(tmp_path):
    path = atomic_torch_save(
        {"format": "samsr", "model_name": "samsr_v2_1", "model": {}}, tmp_path / "v.pt"
    )
    with pytest.raises(CheckpointError, match="holds a 'samsr_v2_1' model .* builds 'crm'"):
        model_state_from_file(path, "crm")


def test_rng_state_roundtrip_survives_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    path = atomic_torch_save({"rng": rng_state()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    set_rng_state(load_checkpoint(path)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected


def test_stream_is_a_function_of_seed_and_position():
    stream = SampleStream(_RandomDataset(), seed=3)
    first = [stream[k] for k in range(12)]
    again = SampleStream(_RandomDataset(), seed=3)
    assert [again[k] for k in (11, 4, 7)] == [first[11], first[4], first[7]]
    # each epoch is a permutation of the dataset, and epochs differ in order
    assert sorted(s[0] for s in first[:5]) == list(range(5))
    assert sorted(s[0] for s in first[5:10]) == list(range(5))
    other = SampleStream(_RandomDataset(), seed=4)
    assert [other[k] for k in range(12)] != first


def test_stream_sampler_resumes_at_position():
    assert list(StreamSampler(6, 10)) == [6, 7, 8, 9]
    assert len(StreamSampler(10, 10)) == 0


def test_empty_dataset_rejected():
    class Empty(Dataset):
        def __len__(self) -> int:
            return 0

    with pytest.raises(ValueError, match="empty"):
        SampleStream(Empty(), seed=0)


def test_official_crm_file_loads_through_the_engine(tmp_path):
    from samsr.engine.checkpoint import load_model_weights
    from samsr.models.crm import build_crm
    from samsr.models.crm_official import official_key

    torch.manual_seed(0)
    source = build_crm("resnet18")
    official = {official_key(k): v.clone() for k, v in source.state_dict().items()}
    official["module.feats.layer4.0.conv1.weight"] = torch.zeros(1)  # dropped, as layer4 is
    path = tmp_path / "model_45705"
    torch.save(official, path)
    target = build_crm("resnet18")
    load_model_weights(target, path, model_name="crm")
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model_weights(build_crm("resnet34"), path, model_name="crm")


def test_crm_weights_initialise_a_wider_input_model(tmp_path):
    """CRM (4 channels) -> SAM-SR v2.1 (7): extra input weights zero, same function."""
    from samsr.engine.checkpoint import CKPT_FORMAT, load_model_weights
    from samsr.models.crm import build_crm

    torch.manual_seed(0)
    crm = build_crm("resnet18", dropout=0.0).eval()
    path = tmp_path / "crm.pt"
    torch.save({"format": CKPT_FORMAT, "model_name": "crm", "model": crm.state_dict()}, path)
    wide = build_crm("resnet18", in_channels=7, dropout=0.0).eval()
    with pytest.raises(CheckpointError, match="holds a 'crm' model"):
        load_model_weights(wide, path, model_name="samsr_v2_1")  # evaluation: refused
    load_model_weights(wide, path, model_name="samsr_v2_1", init=True)
    w = wide.encoder.conv1.weight
    assert torch.equal(w[:, :4], crm.encoder.conv1.weight) and not w[:, 4:].any()
    image, coarse = torch.rand(1, 3, 40, 48), (torch.rand(1, 1, 40, 48) > 0.5).float()
    extra = torch.rand(1, 3, 40, 48)
    with torch.no_grad():
        expected = crm(image, coarse)["logits"]
        got = wide(image, coarse, extra)["logits"]
    torch.testing.assert_close(got, expected)


def test_v1_accepts_crm_and_its_own_checkpoints(tmp_path):
    from samsr.engine.checkpoint import CKPT_FORMAT, model_state_from_file

    for saved in ("crm", "samsr_v1", "samsr_v2_1"):
        torch.save({"format": CKPT_FORMAT, "model_name": saved, "model": {}}, tmp_path / saved)
    for saved in ("crm", "samsr_v1"):
        assert model_state_from_file(tmp_path / saved, "samsr_v1", also=("crm",)) == {}
    with pytest.raises(CheckpointError, match="holds a 'samsr_v2_1' model"):
        model_state_from_file(tmp_path / "samsr_v2_1", "samsr_v1", also=("crm",))
