"""SAM-SR v3's cached training scheme: crop tokens sampled from whole-image SAM embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from samsr.data.io import DataError, write_image, write_mask
from samsr.data.layouts import Pair
from samsr.data.sam_tokens import EMBEDDINGS_FORMAT, SamTokenLoader, crop_frame
from samsr.data.synthetic import render_sample
from samsr.data.transforms import CropFlip
from samsr.guidance import image_encoder
from samsr.models.components.sam_frame import valid_grid
from samsr.models.sam_crm import build_sam_crm, sam_embedding

IMG = 128  # tiny SAM input side: an 8 x 8 token grid
PATCH = 16


def _model(injection: str = "window") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_sam_crm(
        image_encoder(tiny=True, tiny_img_size=IMG, seed=0),
        injection,
        local_width=8,
        token_channels=8,
        heads=4,
        window=3,
        decoder_hidden=(8,),
        dropout=0.0,
    )


def _cache(tmp_path: Path, root: Path, embeddings: dict[str, np.ndarray], **manifest) -> Path:
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    for name, emb in embeddings.items():
        path = cache / root.name / f"{name}_emb.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, emb.astype(np.float16))
    values = {"format": EMBEDDINGS_FORMAT, "version": 1, "sam_type": "tiny", "img_size": IMG}
    values.update({"patch": PATCH, "channels": 32, **manifest})
    (cache / "manifest.json").write_text(json.dumps(values))
    return cache


def _geometry(h: int, w: int, top: int, left: int, size: int, flip: bool) -> CropFlip:
    return CropFlip(h, w, 0, 0, top, left, size, size, flip)


def test_whole_image_crop_gives_the_per_crop_tokens(tmp_path) -> None:
    # a crop that is the whole (square) image: its cached tokens are SAM's tokens of the crop
    model = _model().eval()
    root = tmp_path / "data"
    image = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    emb = sam_embedding(model.sam_encoder, image)[0].numpy()
    cache = _cache(tmp_path, root, {"a": emb})
    loader = SamTokenLoader(cache, [root], "tiny", IMG, PATCH)
    pair = Pair(image=root / "a.jpg", mask=root / "a.png", name="a")
    tokens = loader(pair, _geometry(64, 64, 0, 0, 64, False))["sam_tokens"]
    assert tokens.dtype == torch.float16 and tokens.shape == emb.shape
    np.testing.assert_array_equal(tokens.numpy(), emb.astype(np.float16))
    flipped = loader(pair, _geometry(64, 64, 0, 0, 64, True))["sam_tokens"]
    np.testing.assert_array_equal(flipped.numpy(), emb.astype(np.float16)[..., ::-1])
    # and the model given them computes what it computes with SAM on the crop
    coarse = torch.zeros(1, 1, 64, 64)
    coarse[..., 16:48, 20:50] = 1
    x = image.float() / 255
    with torch.no_grad():
        per_crop = model(x, coarse)["logits"]
        cached = model(x, coarse, sam_tokens=tokens[None])["logits"]
    torch.testing.assert_close(cached, per_crop, atol=2e-2, rtol=0)  # float16 storage


@pytest.mark.parametrize("flip", [False, True])
def test_crop_tokens_come_from_the_crop_position(tmp_path, flip) -> None:
    # a ramp embedding (value = token column) read back at the crop's cells
    h, w, size, top, left = 300, 400, 64, 40, 150
    gh, gw = valid_grid(h, w, IMG, PATCH)
    ramp = np.broadcast_to(np.arange(gw, dtype=np.float32), (2, gh, gw)).copy()
    root = tmp_path / "data"
    cache = _cache(tmp_path, root, {"b": ramp}, channels=2)
    loader = SamTokenLoader(cache, [root], "tiny", IMG, PATCH)
    pair = Pair(image=root / "b.jpg", mask=root / "b.png", name="b")
    tokens = loader(pair, _geometry(h, w, top, left, size, flip))["sam_tokens"].float()
    grid = valid_grid(size, size, IMG, PATCH)
    assert tokens.shape == (2, *grid)
    j = np.arange(grid[1])
    x_crop = (j + 0.5) * size / grid[1]  # the cells' centres in the crop
    x_image = left + (size - x_crop if flip else x_crop)
    expected = np.clip(x_image * (IMG / w) / PATCH - 0.5, 0, gw - 1)  # ramp: value = index
    np.testing.assert_allclose(tokens[0, 0].numpy(), expected, atol=1e-2)
    assert crop_frame(_geometry(h, w, top, left, size, flip)).scale_x == (-1.0 if flip else 1.0)


def test_loader_errors(tmp_path) -> None:
    root = tmp_path / "data"
    pair = Pair(image=root / "c.jpg", mask=root / "c.png", name="c")
    with pytest.raises(DataError, match="precompute_sam_embeddings.py --images"):
        SamTokenLoader(tmp_path / "none", [root], "tiny", IMG, PATCH)
    cache = _cache(tmp_path, root, {})
    with pytest.raises(DataError, match="sam_type.*vit_b"):
        SamTokenLoader(cache, [root], "vit_b", 1024, PATCH)
    loader = SamTokenLoader(cache, [root], "tiny", IMG, PATCH)
    with pytest.raises(DataError, match=r"c_emb\.npy.*precompute_sam_embeddings"):
        loader(pair, _geometry(64, 64, 0, 0, 32, False))
    (cache / "data").mkdir()
    np.save(cache / "data" / "c_emb.npy", np.zeros((4, 3, 3), np.float16))
    with pytest.raises(DataError, match="expected C x 8 x 8"):
        loader(pair, _geometry(64, 64, 0, 0, 32, False))
    with pytest.raises(DataError, match="none of the SAM token loader's dataset roots"):
        loader(Pair(image=tmp_path / "x.jpg", mask=tmp_path / "x.png", name="x"), None)


def test_dataset_samples_carry_tokens_and_training_skips_sam(tmp_path) -> None:
    from samsr.data.train_dataset import RefinementTrainDataset

    model = _model("global").train()
    root = tmp_path / "data"
    embeddings = {}
    for i, (h, w) in enumerate([(64, 80), (96, 72)]):
        image, mask = render_sample(np.random.default_rng(i), h, w)
        write_image(root / f"img{i}.jpg", image)
        write_mask(root / f"img{i}.png", mask)
        tensor = torch.from_numpy(image).permute(2, 0, 1)[None]
        embeddings[f"img{i}"] = sam_embedding(model.sam_encoder, tensor)[0].numpy()
    loader = SamTokenLoader(_cache(tmp_path, root, embeddings), [root], "tiny", IMG, PATCH)
    data = RefinementTrainDataset([root], crop_size=48, seed=0, side_loader=loader)
    batch = torch.utils.data.default_collate([data[0], data[1]])
    assert batch["sam_tokens"].shape == (2, 32, *valid_grid(48, 48, IMG, PATCH))
    calls = []
    model.sam_encoder.register_forward_hook(lambda *_: calls.append(1))
    out = model(batch["image"], batch["coarse"], sam_tokens=batch["sam_tokens"])
    out["logits"].mean().backward()
    assert not calls  # SAM did not run
    assert model.token_proj.weight.grad is not None
    with pytest.raises(ValueError, match="sam_tokens must be B x C x 8 x 8"):
        model(batch["image"], batch["coarse"], sam_tokens=batch["sam_tokens"][..., :5])
