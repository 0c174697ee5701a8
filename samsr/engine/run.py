"""Entry points behind ``scripts/train.py`` and ``scripts/eval.py`` (config in, results out)."""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from samsr import distributed
from samsr.device import backend_flags
from samsr.distributed import DistContext
from samsr.engine.builders import (
    ConfigError,
    build_eval_datasets,
    build_loss,
    build_model,
    build_refiner,
    build_sam_refiner,
    build_train_dataset,
    build_train_guidance,
    cascade_config,
    load_pretrained,
    make_train_caches,
    prepare_data,
    to_container,
    train_settings,
)
from samsr.engine.checkpoint import LoadedCheckpoint
from samsr.engine.evaluator import evaluate, format_results
from samsr.engine.loading import resolve_model_config
from samsr.engine.trainer import Trainer

if TYPE_CHECKING:
    from samsr.inference import Refiner
    from samsr.inference.sam_refiner import SamGuidedRefiner
    from samsr.inference.sliding import SegmentationPredictor

log = logging.getLogger(__name__)

# Metrics logged to TensorBoard during validation.
_VAL_KEYS = ("iou", "mba", "iou_coarse", "mba_coarse", "iou_delta", "mba_delta")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _dtype_name(inference_cfg: DictConfig) -> str:
    return str(inference_cfg.get("amp_dtype") or "float32")


def build_predictor(
    model: nn.Module, cfg: DictConfig, device: torch.device
) -> Refiner | SamGuidedRefiner:
    """The full-resolution predictor of ``model``: the cascade of ``cfg.inference``, behind SAM
    and the model's guidance strategy for SAM-SR v1/v2.x."""
    return build_sam_refiner(build_refiner(model, cfg.inference, device), cfg.model, device)


def evaluate_model(
    model: nn.Module,
    cfg: DictConfig,
    device: torch.device,
    datasets: dict[str, Any],
    out_dir: str | Path | None,
    progress: bool = True,
    predictor: Refiner | SamGuidedRefiner | None = None,
    dist: DistContext | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate ``model`` with the cascade of ``cfg.inference`` on ``datasets`` (source ->
    :class:`~samsr.data.train_dataset.EvalDataset`, from :func:`build_eval_datasets`).

    ``predictor`` (from :func:`build_predictor`) is reused when given: validation builds SAM
    once per run, not once per validation. With ``dist`` (several ranks, all calling this) the
    images are split over the ranks and rank 0 gets the results (``{}`` elsewhere)."""
    refiner = predictor if predictor is not None else build_predictor(model, cfg, device)
    cascade = cascade_config(cfg.inference)
    # the inference flags for SAM too (the refiner sets them for its own calls)
    with backend_flags(cascade.cudnn_benchmark, cascade.tf32) as flags:
        return evaluate(
            refiner,
            datasets,
            device,
            out_dir=out_dir,
            method=str(cfg.model.get("name", "refined")),
            warmup=int(cfg.eval.warmup),
            save_masks=bool(cfg.eval.save_masks),
            dtype=_dtype_name(cfg.inference),
            progress=progress,
            small_coarse_rule=str(cfg.eval.get("small_coarse_rule", "cascadepsp")),
            facts=flags,
            dist=dist,
        )


def _precompute_sam_inputs(cfg: DictConfig, device: torch.device, ctx: DistContext) -> None:
    """With ``model.precompute``, first makes the missing files of every SAM cache that training
    reads (``model.train_inputs``: v2.1 maps, v3 cached embeddings). Current files are skipped,
    so this costs little once a cache is complete. Each rank makes its share of the images."""
    from samsr.data.io import DataError

    if not cfg.model.precompute:
        return
    roots = [str(r) for r in cfg.data.train.roots]
    shard = (ctx.rank, ctx.world_size)
    caches = make_train_caches(cfg.model, roots, device, shard)
    distributed.barrier()  # every share is made before any rank reads the cache
    for cache_dir, summary in caches:
        log.info("SAM cache %s: %s", cache_dir, summary.line())
        if summary.failed:
            image, reason = summary.failed[0]
            raise DataError(
                f"precomputing the SAM cache {cache_dir} failed for {len(summary.failed)} "
                f"image(s), e.g. {image}: {reason}"
            )


def run_train(cfg: DictConfig) -> dict[str, Any]:
    """Train (or resume) a refiner, then optionally evaluate it on ``data.test``; one process,
    or every rank of a ``torchrun`` job (see :mod:`samsr.distributed`).

    Returns:
        ``{"run_dir": Path, "checkpoint": Path, "test": results or None}`` (``test`` is None on
        ranks other than 0).
    """
    ctx, device = distributed.setup(cfg.device)
    try:
        return _train(cfg, ctx, device)
    finally:
        distributed.teardown()


def _run_dir(cfg: DictConfig) -> Path:
    """The run folder: Hydra's (rank 0's, under torchrun), or the one of ``resume``."""
    run_dir = Path(distributed.broadcast_object(str(cfg.paths.output_dir)))
    if cfg.get("resume"):
        resume = Path(cfg.resume)
        if not resume.is_file():
            raise ConfigError(f"resume checkpoint not found: {resume}")
        run_dir = resume.resolve().parent.parent  # <run dir>/checkpoints/<file>.pt
    return run_dir


def _prepare_data(data_cfg: DictConfig, ctx: DistContext) -> None:
    """The data config's ``prepare`` steps, on rank 0 while the other ranks wait."""
    if ctx.is_main:
        prepare_data(data_cfg)
    distributed.barrier()


def task_of(node: DictConfig) -> str:
    """``segmentation`` (class labels: the patch baseline) or ``refinement`` (the default)."""
    return str(node.get("task") or "refinement")


def _check_task(cfg: DictConfig) -> None:
    """The model and the training data must be of one task."""
    model, data = task_of(cfg.model), task_of(cfg.data)
    if model != data:
        fix = (
            "data=voc or data=synthetic_classes"
            if model == "segmentation"
            else "a refinement set (data=synthetic, duts, train_merged)"
        )
        raise ConfigError(
            f"model={cfg.model.get('name')} is a {model} model but data={cfg.data.get('name')} "
            f"is a {data} set; use {fix}."
        )


def segmentation_predictor(
    model: nn.Module, model_cfg: DictConfig, device: torch.device
) -> SegmentationPredictor:
    """The high-resolution predictor of a segmentation model (``model.inference``)."""
    from samsr.inference.sliding import SegmentationPredictor

    values = OmegaConf.to_container(model_cfg.inference, resolve=True)
    assert isinstance(values, dict)
    try:
        return SegmentationPredictor(model, device=device, **values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid model.inference: {err}") from err


def evaluate_segmentation_model(
    model: nn.Module,
    cfg: DictConfig,
    device: torch.device,
    split: str,
    out_dir: str | Path,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Evaluates a segmentation model on ``data.<split>`` (a BIG-layout folder) with
    ``model.inference``; with ``eval.export_coarse``, writes each object mask there as
    ``<name>_seg.png`` (a coarse source for the refiners)."""
    from samsr.engine.segmentation_eval import evaluate_segmentation

    split_cfg = cfg.data.get(split)
    if not split_cfg:
        raise ConfigError(
            f"data={cfg.data.get('name')} has no '{split}' split to evaluate on; evaluate the "
            "baseline on data=big (or data=synthetic_classes)."
        )
    export = cfg.eval.get("export_coarse")
    return evaluate_segmentation(
        segmentation_predictor(model, cfg.model, device),
        split_cfg.split_dir,
        device,
        source=f"{cfg.model.name}_{cfg.model.inference.mode}",
        out_dir=out_dir,
        method=str(cfg.model.name),
        export_dir=export,
        save_masks=bool(cfg.eval.save_masks),
        max_images=cfg.eval.get("max_images"),
        warmup=int(cfg.eval.warmup),
        num_classes=int(cfg.model.net.num_classes),
        progress=progress,
    )


def _train(cfg: DictConfig, ctx: DistContext, device: torch.device) -> dict[str, Any]:
    seed_everything(int(cfg.seed))
    _check_task(cfg)
    segmentation = task_of(cfg.model) == "segmentation"
    run_dir = _run_dir(cfg)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        where = f", {ctx.world_size} ranks" if ctx.enabled else ""
        log.info("run dir: %s, device: %s%s", run_dir, device, where)

    _prepare_data(cfg.data, ctx)
    settings = train_settings(cfg.trainer)
    # Every evaluation set is found and checked now, not at the first validation or after the
    # last step: a missing folder or an unpaired file fails before step 0 (and before any
    # SAM precompute).
    validate = None
    if cfg.data.get("val") and settings.val_every > 0 and not segmentation:
        val_sets = build_eval_datasets(cfg.data, "val", settings.val_max_images)
        predictor: Refiner | SamGuidedRefiner | None = None  # built at the first validation

        def validate(m: nn.Module, step: int) -> dict[str, float]:
            nonlocal predictor
            out = run_dir / "val" / f"step_{step:07d}"
            if predictor is None:
                predictor = build_predictor(m, cfg, device)
            res = evaluate_model(m, cfg, device, val_sets, out, False, predictor, ctx)
            return {f"{src}/{k}": float(r[k]) for src, r in res.items() for k in _VAL_KEYS}

    test_sets = None
    if cfg.get("test_after_training") and cfg.data.get("test") and not segmentation:
        test_sets = build_eval_datasets(
            cfg.data, "test", cfg.eval.get("max_images"), cfg.eval.get("sources")
        )

    _precompute_sam_inputs(cfg, device, ctx)
    dataset = build_train_dataset(cfg.data, cfg.model)
    if settings.epochs is not None:  # the schedule follows (optim's ${trainer.max_steps})
        settings.max_steps = math.ceil(settings.epochs * len(dataset) / settings.batch_size)
        with open_dict(cfg):
            cfg.trainer.max_steps = settings.max_steps
        if ctx.is_main:
            log.info("%s epochs of %d samples: %d steps", settings.epochs, len(dataset),
                     settings.max_steps)  # fmt: skip
    init_weights = cfg.model.init_weights
    model = build_model(cfg.model, weights=init_weights, init=True)
    if not init_weights and not cfg.get("resume"):  # from scratch: ImageNet encoder weights
        source = load_pretrained(model, cfg.model, str(cfg.paths.checkpoint_dir))
        if ctx.is_main:
            log.info("encoder initialisation: %s", source or "random")
    if ctx.rank:  # the same initial weights (DDP copies rank 0's), other dropout numbers
        seed_everything(int(cfg.seed) + 1_000_003 * ctx.rank)

    trainer = Trainer(
        model=model,
        loss_fn=build_loss(cfg.model),
        optimizer_factory=instantiate(cfg.optim.optimizer),
        scheduler_factory=instantiate(cfg.optim.scheduler),
        dataset=dataset,
        settings=settings,
        run_dir=run_dir,
        device=device,
        seed=int(cfg.seed),
        config=to_container(cfg),
        model_name=str(cfg.model.name),
        validate=validate,
        guidance=build_train_guidance(cfg.model, device),
        writer_factory=instantiate(cfg.logger),
        dist=ctx,
    )
    if cfg.get("resume"):
        trainer.resume(cfg.resume)
    ckpt = trainer.fit()
    if ctx.is_main:
        log.info("checkpoint: %s", ckpt)

    results = None
    if segmentation and cfg.get("test_after_training") and cfg.data.get("test") and ctx.is_main:
        out = run_dir / "test"
        results = evaluate_segmentation_model(trainer.model, cfg, device, "test", out)
        print(format_results(results, method=str(cfg.model.name)))
    if test_sets is not None:
        results = evaluate_model(
            trainer.model, cfg, device, test_sets, run_dir / "test", ctx.is_main, dist=ctx
        )
        if ctx.is_main:
            print(format_results(results, method=str(cfg.model.name)))
            print(f"\nresults: {run_dir / 'test' / 'results.md'}\ncheckpoint: {ckpt}")
        else:
            results = None
    return {"run_dir": run_dir, "checkpoint": ckpt, "test": results}


def run_eval(cfg: DictConfig, overrides: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Evaluate a checkpoint on ``data.<split>``; writes metrics.json and results.md. Under
    ``torchrun`` the images are split over the ranks; rank 0 writes (``{}`` elsewhere).

    The model is the checkpoint's own (its stored config); ``overrides`` (the command line) say
    which model keys ``cfg`` sets explicitly, and those win, each difference logged (None: all
    of ``cfg.model`` is explicit; see :func:`samsr.engine.loading.resolve_model_config`)."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise ConfigError(
            "eval needs weights: pass ckpt_path=<run dir>/checkpoints/last.pt (from "
            "scripts/train.py) or the official CRM checkpoint (see checkpoints/README.md)"
        )
    ctx, device = distributed.setup(cfg.device)
    try:
        seed_everything(int(cfg.seed))
        _prepare_data(cfg.data, ctx)
        segmentation = task_of(cfg.model) == "segmentation"  # scored per image, no coarse
        datasets = None
        if not segmentation:  # every source found and checked before the checkpoint is read
            datasets = build_eval_datasets(
                cfg.data, str(cfg.split), cfg.eval.get("max_images"), cfg.eval.get("sources")
            )
        cfg, model = _checkpoint_model(cfg, overrides)
        out_dir = Path(distributed.broadcast_object(str(cfg.paths.output_dir)))
        if datasets is not None:
            results = evaluate_model(model, cfg, device, datasets, out_dir, ctx.is_main, dist=ctx)
        elif ctx.is_main:  # one process segments (the other ranks have nothing to do)
            results = evaluate_segmentation_model(model, cfg, device, str(cfg.split), out_dir)
        else:
            results = {}
        if ctx.is_main:
            print(format_results(results, method=str(cfg.model.name)))
            print(f"\nresults: {out_dir / 'results.md'}")
            if segmentation and cfg.eval.get("export_coarse"):
                print(f"coarse masks: {cfg.eval.export_coarse}")
        return results
    finally:
        distributed.teardown()


def _checkpoint_model(
    cfg: DictConfig, overrides: Sequence[str] | None
) -> tuple[DictConfig, nn.Module]:
    """The network of ``cfg.ckpt_path`` with its weights, and a copy of ``cfg`` whose ``model``
    is the one it was built from (the checkpoint's, with what ``overrides`` set)."""
    loaded = LoadedCheckpoint.read(cfg.ckpt_path)
    model_cfg = resolve_model_config(loaded, cfg.model, overrides)
    cfg = copy.deepcopy(cfg)  # the caller's config stays as it was
    with open_dict(cfg):
        cfg.model = model_cfg
    return cfg, build_model(cfg.model, weights=loaded)
