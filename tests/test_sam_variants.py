"""SAM-SR v1, v2.x and v3.x end to end through the real configs, with a tiny random SAM (CPU)."""

from __future__ import annotations

import json

import pytest
from conftest import SAM_TINY

from samsr.data.io import DataError
from samsr.engine.checkpoint import CheckpointError, load_checkpoint
from samsr.engine.run import run_eval, run_train


def _train_crm(tiny_cfg) -> str:
    res = run_train(tiny_cfg("train", ["trainer.max_steps=1", "trainer.val_every=0"]))
    return str(res["checkpoint"])


def test_v1_runs_a_crm_checkpoint_and_reports_sam_apart(tiny_cfg, tmp_path):
    ckpt = _train_crm(tiny_cfg)
    cfg = tiny_cfg(
        "eval", ["model=samsr_v1", *SAM_TINY, f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path}/e"]
    )
    results = run_eval(cfg)
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    for source, m in results.items():
        assert m["num_images"] == 2
        assert m["sam_ms"] > 0 and m["refine_ms"] > 0
        stats = m["sam_v1"]
        assert stats["images"] == 2 and stats["used"] + stats["skipped"] == 2, stats
        assert metrics[source]["sam_ms"] == pytest.approx(m["sam_ms"])
    assert "SAM (ms/image)" in (tmp_path / "e" / "results.md").read_text()


def test_v2_1_trains_from_crm_weights_on_precomputed_maps(tiny_cfg, tmp_path):
    ckpt = _train_crm(tiny_cfg)
    cache = tmp_path / "maps"
    overrides = [
        "model=samsr_v2_1",
        *SAM_TINY,
        f"model.sam_maps.cache_dir={cache}",
        f"model.init_weights={ckpt}",
        "trainer.max_steps=2",
        "trainer.val_every=0",
    ]
    cfg = tiny_cfg("train", overrides)
    # without maps: a clear error naming the command that makes them
    with pytest.raises(DataError, match="precompute_sam"):
        run_train(cfg)
    # one command: the missing maps are made first with the model's SAM settings
    res = run_train(tiny_cfg("train", [*overrides, "model.precompute=true"]))
    assert (cache / "manifest.json").is_file()
    for m in res["test"].values():  # evaluated with SAM on the fly
        assert m["num_images"] == 2 and m["sam_ms"] > 0


def test_v2_2_trains_with_per_sample_prompts_and_evaluates(tiny_cfg, tmp_path):
    ckpt = _train_crm(tiny_cfg)
    overrides = ["model=samsr_v2_2", *SAM_TINY, f"model.init_weights={ckpt}"]
    res = run_train(tiny_cfg("train", [*overrides, "trainer.max_steps=2", "trainer.val_every=0"]))
    for m in res["test"].values():  # evaluated with SAM's point prompts on the fly
        assert m["num_images"] == 2 and m["sam_ms"] > 0 and m["refine_ms"] > 0


def test_v2_2_batches_get_prompt_maps_on_the_training_device(tiny_cfg):
    import torch
    from torch.utils.data import default_collate

    from samsr.engine.builders import build_train_dataset, build_train_guidance, prepare_data

    cfg = tiny_cfg("train", ["model=samsr_v2_2", *SAM_TINY])
    prepare_data(cfg.data)
    data = build_train_dataset(cfg.data, cfg.model)
    guidance = build_train_guidance(cfg.model, torch.device("cpu"))
    batch = default_collate([data[0], data[1]])
    assert "extra" not in batch  # no SAM in the data workers
    extra = guidance(batch["image"], batch["coarse"])
    assert extra.shape == (2, 2, *batch["image"].shape[2:])
    assert float(extra.min()) >= 0 and float(extra.max()) <= 1
    assert extra.amax() > 0  # prompts inside the coarse masks gave SAM masks
    again = guidance(batch["image"], batch["coarse"])
    assert bool((again == extra).all())  # same samples, same prompts
    alone = guidance(batch["image"][1:], batch["coarse"][1:])  # batching changes nothing
    torch.testing.assert_close(alone, extra[1:], atol=1 / 255 + 1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["samsr_v3_1", "samsr_v3_2", "samsr_v3_3", "samsr_v3_4"])
def test_v3_trains_and_evaluates_from_one_command(tiny_cfg, tmp_path, variant):
    # train.py's one command: a few steps, then the test set through the cascade (tiled preset)
    cfg = tiny_cfg(
        "train",
        [f"model={variant}", "trainer.max_steps=2", "trainer.val_every=0", "inference=fast"],
    )
    res = run_train(cfg)
    ckpt = load_checkpoint(res["checkpoint"])
    assert ckpt["model_name"] == variant
    assert not any(k.startswith("sam_encoder.") for k in ckpt["model"])  # SAM is not saved
    for m in res["test"].values():
        assert m["num_images"] == 2 and 0 <= m["iou"] <= 100
        assert m["sam_ms"] > 0 and m["refine_ms"] > 0
    # the checkpoint evaluates on its own; another variant's config refuses it
    other = "samsr_v3_2" if variant != "samsr_v3_2" else "samsr_v3_3"
    bad = tiny_cfg("eval", [f"model={other}", f"ckpt_path={res['checkpoint']}"])
    with pytest.raises(CheckpointError, match=variant):
        run_eval(bad)


def test_v3_trains_on_cached_sam_embeddings_from_one_command(tiny_cfg, tmp_path):
    cache = tmp_path / "emb"
    overrides = [
        "model=samsr_v3_3",
        "model/train_tokens=cached",
        f"model.train_tokens.cache_dir={cache}",
        "trainer.max_steps=2",
        "trainer.val_every=0",
        "test_after_training=false",
    ]
    # without embeddings: a clear error naming the command that makes them
    with pytest.raises(DataError, match="precompute_sam_embeddings"):
        run_train(tiny_cfg("train", overrides))
    res = run_train(tiny_cfg("train", [*overrides, "model.precompute=true"]))
    assert load_checkpoint(res["checkpoint"])["step"] == 2
    assert len(list(cache.rglob("*_emb.npy"))) == 4  # every training image, once
    assert (cache / "manifest.json").is_file()


def test_a_v3_config_of_the_old_sam_schema_still_builds_with_a_warning(tiny_cfg, caplog):
    # checkpoints written before samsr.guidance store model.net.sam as plain SAM settings (no
    # _target_, no model.sam): the stored config is migrated, with a warning, and builds
    import logging

    from omegaconf import OmegaConf

    from samsr.engine.builders import build_model

    cfg = tiny_cfg("train", ["model=samsr_v3_2"])
    stored = OmegaConf.to_container(cfg.model, resolve=True)
    del stored["net"]["sam"]["_target_"], stored["sam"]
    with caplog.at_level(logging.WARNING, logger="samsr.engine.builders"):
        model = build_model(OmegaConf.create(stored))
    assert model.sam_type == "tiny"
    assert "written before samsr.guidance" in caplog.text


@pytest.mark.parametrize(
    ("model", "strategy", "override"),
    [
        ("samsr_v1", "V1Guidance", "model.v1.coverage_threshold=0.6"),
        ("samsr_v2_1", "MapGuidance", "model.sam.amg.points_per_side=7"),
        ("samsr_v2_2", "PromptGuidance", "model.prompts.spacing=9"),
    ],
)
def test_each_variant_selects_its_guidance_strategy_by_target(tiny_cfg, model, strategy, override):
    # the predictor eval and users call is SAM + the model config's strategy + the refiner;
    # the settings reach the strategy through its config node
    from hydra.utils import instantiate

    cfg = tiny_cfg("eval", [f"model={model}", *SAM_TINY, override, "ckpt_path=x"])
    guidance = instantiate(cfg.model.guidance)
    assert type(guidance).__name__ == strategy
    key, value = override.split("=")
    settings = {"v1": "gates", "amg": "amg", "prompts": "prompts"}[key.split(".")[-2]]
    assert getattr(getattr(guidance, settings), key.split(".")[-1]) == float(value)
    assert guidance.max_side is None


def test_validation_builds_sam_once_per_run(tiny_cfg, monkeypatch):
    # SAM-SR v2.2: one SAM for the training batches, one for every validation (built at the
    # first, reused after); not a ViT load per validation
    from samsr.guidance import build as sam_build

    builds = []
    real = sam_build.build_from_settings

    def counting(*args, **kwargs):
        builds.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(sam_build, "build_from_settings", counting)
    extra = ["trainer.max_steps=2", "trainer.val_every=1", "trainer.val_max_images=1"]
    run_train(
        tiny_cfg("train", ["model=samsr_v2_2", *SAM_TINY, *extra, "test_after_training=false"])
    )
    assert len(builds) == 2
