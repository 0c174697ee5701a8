"""The SAM embedding precompute (SAM-SR v3 training cache), with a tiny random SAM on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from samsr.data.io import DataError, write_image, write_mask
from samsr.data.synthetic import render_sample
from samsr.engine.image_runs import collect_images
from samsr.engine.precompute_embeddings import (
    EMBEDDINGS_FORMAT,
    check_embeddings_manifest,
    embedding_is_complete,
    embedding_path,
    main,
    make_sam_embeddings,
    precompute_embeddings,
    read_embeddings_manifest,
)
from samsr.guidance import SamSettings, build_tiny_sam
from samsr.models.sam_crm import sam_embedding

SIZES = [(64, 80), (96, 72), (70, 90), (48, 120)]
TINY = ["--tiny-sam", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A flat dataset of 4 tiny synthetic images (``img<i>.jpg`` + mask ``img<i>.png``)."""
    root = tmp_path_factory.mktemp("data") / "tiny"
    for i, (h, w) in enumerate(SIZES):
        image, mask = render_sample(np.random.default_rng(i), h, w)
        write_image(root / f"img{i}.jpg", image)
        write_mask(root / f"img{i}.png", mask)
    return root


def _paths(cache: Path) -> list[Path]:
    return [embedding_path(cache, f"tiny/img{i}") for i in range(len(SIZES))]


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def _expected(image_path: Path, img_size: int = 64, seed: int = 0) -> np.ndarray:
    from samsr.data.io import read_image

    encoder = build_tiny_sam(seed=seed, img_size=img_size).image_encoder
    x = torch.from_numpy(read_image(image_path)).permute(2, 0, 1)[None]
    return sam_embedding(encoder, x)[0].half().numpy()


def test_layout_and_manifest_helpers(tmp_path):
    assert embedding_path(tmp_path, "DUTS-TR/a/x") == tmp_path / "DUTS-TR" / "a" / "x_emb.npy"
    assert read_embeddings_manifest(tmp_path) is None
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read SAM embedding cache manifest"):
        read_embeddings_manifest(tmp_path)


def test_writes_resumes_and_recomputes_truncated(dataset, tmp_path, capsys):
    cache = tmp_path / "cache"
    base = ["--images", str(dataset), "--out", str(cache), *TINY]
    paths = _paths(cache)

    assert main(base) == 0
    out = capsys.readouterr().out
    assert "done 4, skipped 0, failed 0" in out and "s/image" in out and "MB" in out
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest == {
        "format": EMBEDDINGS_FORMAT,
        "version": 1,
        "sam_type": "tiny",
        "img_size": 64,
        "patch": 16,
        "channels": 32,
    }
    assert read_embeddings_manifest(cache) == manifest
    for i, path in enumerate(paths):
        emb = np.load(path)
        expected = _expected(dataset / f"img{i}.jpg")
        assert emb.dtype == np.float16 and emb.ndim == 3 and emb.shape[0] == 32
        assert emb.shape == expected.shape
        assert np.array_equal(emb, expected)
    # the valid token grid: 80x64 -> 64x51 at img_size 64 -> 4 x 4; 120x48 -> 64x26 -> 2 x 4
    assert np.load(paths[0]).shape == (32, 4, 4) and np.load(paths[3]).shape == (32, 2, 4)
    assert not list(cache.rglob("*.tmp"))

    before = [_stat(p) for p in paths]
    assert main(base) == 0  # rerun: nothing to do
    assert "done 0, skipped 4, failed 0" in capsys.readouterr().out
    assert [_stat(p) for p in paths] == before

    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 7])  # truncated by a crash
    assert not embedding_is_complete(paths[1], 32)
    assert main(base) == 0
    assert "done 1, skipped 3, failed 0" in capsys.readouterr().out
    assert paths[1].read_bytes() == data
    assert [_stat(p) for i, p in enumerate(paths) if i != 1] == before[:1] + before[2:]

    assert main([*base, "--overwrite"]) == 0
    assert "done 4, skipped 0" in capsys.readouterr().out


def test_skip_check_reads_channels_and_dtype(tmp_path):
    path = tmp_path / "x_emb.npy"
    np.save(path, np.zeros((32, 3, 4), np.float16))
    assert embedding_is_complete(path, 32)
    assert not embedding_is_complete(path, 256)
    np.save(path, np.zeros((32, 3, 4), np.float32))
    assert not embedding_is_complete(path, 32)
    path.write_bytes(b"garbage")
    assert not embedding_is_complete(path, 32)
    assert not embedding_is_complete(tmp_path / "missing_emb.npy", 32)


def test_shards_cover_all_images_once(dataset, tmp_path, capsys):
    cache = tmp_path / "cache"
    base = ["--images", str(dataset), "--out", str(cache), *TINY]
    paths = _paths(cache)
    assert main([*base, "--shard", "0/2"]) == 0
    assert "done 2, skipped 0, failed 0" in capsys.readouterr().out
    first = {p for p in paths if p.exists()}
    assert first == {paths[0], paths[2]}
    assert main([*base, "--shard", "1/2"]) == 0
    assert "done 2, skipped 0, failed 0" in capsys.readouterr().out
    assert all(p.is_file() for p in paths)
    assert main(base) == 0
    assert "done 0, skipped 4" in capsys.readouterr().out


def test_manifest_mismatch_and_overwrite(dataset, tmp_path, capsys):
    cache = tmp_path / "cache"
    base = ["--images", str(dataset), "--out", str(cache), *TINY]
    assert main([*base, "--shard", "0/4"]) == 0
    capsys.readouterr()
    before = _stat(_paths(cache)[0])

    assert main([*base, "--tiny-img-size", "32"]) == 2
    err = capsys.readouterr().err
    assert "img_size: cache 64, expected 32" in err
    assert "--out" in err and "--overwrite" in err
    assert _stat(_paths(cache)[0]) == before

    assert main([*base, "--tiny-img-size", "32", "--overwrite"]) == 0
    assert "done 4, skipped 0" in capsys.readouterr().out
    assert read_embeddings_manifest(cache)["img_size"] == 32
    assert np.array_equal(np.load(_paths(cache)[0]), _expected(dataset / "img0.jpg", 32))
    with pytest.raises(ValueError, match="img_size: cache 32, expected 64"):
        check_embeddings_manifest(cache, {"img_size": 64})

    foreign = tmp_path / "maps"
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps({"format_version": 1, "sam_type": "tiny"}))
    assert main(["--images", str(dataset), "--out", str(foreign), *TINY]) == 2
    assert "is not a SAM embedding cache" in capsys.readouterr().err


def test_missing_checkpoint_exits_2(dataset, tmp_path, capsys):
    missing = tmp_path / "sam_vit_b_01ec64.pth"
    args = ["--images", str(dataset), "--out", str(tmp_path / "c"), "--no-progress"]
    assert main([*args, "--sam-type", "vit_b", "--sam-checkpoint", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "SAM checkpoint not found" in err and str(missing) in err
    assert not (tmp_path / "c").exists()


def test_unreadable_image_reported_and_others_written(dataset, tmp_path, capsys):
    root = tmp_path / "mixed"
    root.mkdir()
    for name in ("img0.jpg", "img0.png"):
        (root / name).write_bytes((dataset / name).read_bytes())
    (root / "bad.jpg").write_bytes(b"not an image")
    (root / "bad.png").write_bytes((dataset / "img0.png").read_bytes())
    cache = tmp_path / "cache"
    assert main(["--images", str(root), "--out", str(cache), *TINY]) == 1
    captured = capsys.readouterr()
    assert "done 1, skipped 0, failed 1" in captured.out
    assert str(root / "bad.jpg") in captured.out and "bad.jpg" in captured.err
    assert embedding_path(cache, "mixed/img0").is_file()
    assert not embedding_path(cache, "mixed/bad").exists()


def test_function_api_and_for_model(dataset, tmp_path, capsys):
    encoder = build_tiny_sam(seed=3, img_size=48).image_encoder
    items = collect_images([dataset])
    summary = precompute_embeddings(items[:2], tmp_path / "api", encoder, "cpu", progress=False)
    assert (summary.done, summary.skipped, summary.total) == (2, 0, 2)
    assert summary.bytes_written > 0 and summary.encode_seconds > 0
    assert not (tmp_path / "api" / "manifest.json").exists()  # the CLI writes the manifest

    cache = tmp_path / "model"
    sam = SamSettings.from_mapping(
        {"type": "vit_h", "checkpoint": None, "tiny": True, "seed": 3, "tiny_img_size": 48}
    )
    summary = make_sam_embeddings([str(dataset)], str(cache), sam, "cpu", progress=False)
    assert (summary.done, summary.skipped) == (4, 0)
    assert read_embeddings_manifest(cache)["img_size"] == 48
    api = np.load(embedding_path(tmp_path / "api", "tiny/img1"))
    assert np.array_equal(np.load(embedding_path(cache, "tiny/img1")), api)
    assert np.array_equal(api, _expected(dataset / "img1.jpg", 48, seed=3))
    again = make_sam_embeddings([str(dataset)], str(cache), sam, "cpu", progress=False)
    assert (again.done, again.skipped) == (0, 4)

    real = SamSettings(type="vit_b", checkpoint=str(tmp_path / "nope.pth"))
    with pytest.raises(DataError, match="nope.pth"):
        make_sam_embeddings([str(dataset)], str(cache), real, "cpu")
    with pytest.raises(DataError, match="not set"):
        make_sam_embeddings([str(dataset)], str(cache), SamSettings(type="vit_b"))
