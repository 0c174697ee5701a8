"""The only place that turns configuration into objects (models, datasets, refiners)."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import pickle
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from samsr.data.layouts import find_coarse_sources
from samsr.data.train_dataset import EvalDataset
from samsr.engine.checkpoint import CheckpointError, CheckpointSource, load_model_weights
from samsr.engine.trainer import TrainSettings
from samsr.errors import ConfigError
from samsr.inference import CascadeConfig, Refiner

if TYPE_CHECKING:
    from samsr.guidance.build import SamSettings
    from samsr.guidance.prompts import BatchPromptMaps
    from samsr.guidance.runner import AmgConfig
    from samsr.inference.sam_refiner import SamGuidedRefiner

T = TypeVar("T")
log = logging.getLogger(__name__)


def build_model(
    model_cfg: DictConfig, weights: CheckpointSource | None = None, init: bool = False
) -> nn.Module:
    """Instantiate ``model.net``; load ``weights`` (samsr or official CRM checkpoint: a file, or
    one already read) if given.

    ``model.net.pretrained`` is never loaded here (evaluation, the benchmark and every run that
    loads a checkpoint never touch ImageNet weights): :func:`load_pretrained` does that for
    training from scratch. ``init=True`` (``model.init_weights`` for training) also accepts
    another variant's weights and zero-fills extra input channels (CRM -> SAM-SR v2.1/v2.2).
    """
    net = OmegaConf.to_container(model_cfg.net, resolve=True)
    assert isinstance(net, dict)
    net.pop("pretrained", None)
    _migrate_net_config(net)
    _check_keys(net, f"model.net (model={model_cfg.get('name')})")
    model = instantiate(net)
    if weights:
        # SAM-SR v1 runs an unchanged CRM: checkpoints of ``weights_name`` fit too
        # (.get: the stored config of a checkpoint of an older samsr may lack the key)
        also = (str(model_cfg.weights_name),) if model_cfg.get("weights_name") else ()
        name = model_cfg.get("name")
        load_model_weights(model, weights, model_name=name, init=init, also=also)
    return model


def _check_keys(node: dict[str, Any], where: str) -> None:
    """Every key of a ``_target_`` node must be a parameter of its target (ConfigError naming
    the stray key otherwise, e.g. a CRM setting such as ``backbone`` under a SAM-SR v3 model)."""
    target = node.get("_target_")
    if not isinstance(target, str):
        return
    try:
        params = inspect.signature(get_method(target)).parameters
    except (ValueError, TypeError, ImportError, AttributeError):
        return  # not introspectable: instantiate reports what goes wrong
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    stray = sorted(k for k in node if not k.startswith("_") and k not in params)
    if stray:
        valid = ", ".join(k for k in params if not k.startswith("_"))
        raise ConfigError(
            f"{where}: {', '.join(stray)} not a setting of {target} (valid: {valid}); remove "
            "it or pick another model."
        )


SAM_ENCODER_TARGET = "samsr.guidance.build.image_encoder"


def _migrate_net_config(net: dict[str, Any]) -> None:
    """Brings a stored ``model.net`` of an older samsr up to date, in place (with a warning).

    SAM-SR v3 configs before samsr.guidance held SAM's settings in ``net.sam`` without a
    ``_target_`` (the network built SAM itself); SAM's encoder is now built by
    ``samsr.guidance.build.image_encoder`` from the same settings.
    """
    sam = net.get("sam")
    v3 = str(net.get("_target_", "")).endswith("build_sam_crm")
    if v3 and isinstance(sam, dict) and "_target_" not in sam:
        log.warning(
            "model.net.sam has no _target_ (a config written before samsr.guidance): "
            "building SAM's encoder with %s from its settings",
            SAM_ENCODER_TARGET,
        )
        net["sam"] = {"_target_": SAM_ENCODER_TARGET, **sam}


def load_pretrained(model: nn.Module, model_cfg: DictConfig, checkpoint_dir: str) -> str | None:
    """Loads ``model.net.pretrained`` into the encoder (training from scratch only).

    ``imagenet`` takes torchvision's release file from ``checkpoint_dir`` if it is there, else
    torchvision's download (hash checked); a path loads that file; null keeps the random init.

    Returns:
        Where the weights came from, or None (random init).

    Raises:
        CheckpointError: If the weights are missing, cannot be downloaded or do not fit.
    """
    source = model_cfg.net.get("pretrained")
    if not source:
        return None
    source = "imagenet" if source is True else source
    encoder = getattr(model, "encoder", None)
    if not hasattr(encoder, "load_imagenet"):
        raise ConfigError(
            f"model.net.pretrained={source} but model={model_cfg.get('name')} has no ImageNet "
            "encoder; set model.net.pretrained=null."
        )
    try:
        encoder.load_imagenet(str(source), search_dirs=[checkpoint_dir])
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        # missing, undownloadable, not a state dict, or not even a torch file
        raise CheckpointError(f"model.net.pretrained={source}: {err}") from err
    return str(source)


def build_loss(model_cfg: DictConfig) -> nn.Module:
    """Instantiate the training loss of the model config."""
    return instantiate(model_cfg.loss)


def prepare_data(data_cfg: DictConfig) -> None:
    """Runs the data config's ``prepare`` step (e.g. generate the synthetic set), or each of its
    named steps (a mapping of ``_target_`` nodes, e.g. DUTS's test and val exports); idempotent."""
    prepare = data_cfg.get("prepare")
    if not prepare:
        return
    for step in [prepare] if "_target_" in prepare else prepare.values():
        instantiate(step)


def build_train_dataset(data_cfg: DictConfig, model_cfg: DictConfig) -> torch.utils.data.Dataset:
    """The training dataset of ``data.train``, with what the model reads beside each crop
    (``model.train_inputs``: SAM-SR v2.1's cached maps, v3's cached tokens)."""
    if not data_cfg.get("train"):
        raise ConfigError(
            f"data={data_cfg.get('name')} has no training set (data.train is null); "
            "train with data=train_merged, data=duts or data=synthetic."
        )
    if not model_cfg.train_inputs:
        return instantiate(data_cfg.train)
    roots = [str(r) for r in data_cfg.train.roots]
    inputs = {
        keyword: _instantiate(node.loader, f"model.train_inputs.{keyword}.loader")(
            dataset_roots=roots
        )
        for keyword, node in model_cfg.train_inputs.items()
    }
    return instantiate(data_cfg.train, **inputs)


def make_train_caches(
    model_cfg: DictConfig,
    roots: list[str],
    device: torch.device,
    shard: tuple[int, int] = (0, 1),
) -> list[tuple[str, Any]]:
    """Makes the missing cache files of every ``model.train_inputs`` entry (its ``make``) with
    the model's SAM, for this process's ``shard`` (index, count) of the images; returns
    ``(cache folder, summary)`` per entry. Current files are skipped."""
    sam = sam_settings(model_cfg.sam)
    done = []
    for keyword, node in model_cfg.train_inputs.items():
        make = _instantiate(node.make, f"model.train_inputs.{keyword}.make")
        summary = make(images=roots, sam=sam, device=str(device), shard=shard)
        done.append((str(node.make.out), summary))
    return done


def _instantiate(node: DictConfig, where: str) -> Any:
    """``instantiate(node)``; a dataclass refusing a value -> ConfigError naming ``where``."""
    try:
        return instantiate(node)
    except InstantiationException as err:
        raise ConfigError(f"invalid {where}: {err}") from err


def sam_settings(sam_cfg: DictConfig) -> SamSettings:
    """The SAM of a model config's ``model.sam`` (the one SAM schema of every SAM-SR variant)."""
    from samsr.guidance.build import SamSettings

    values = OmegaConf.to_container(sam_cfg, resolve=True)
    assert isinstance(values, dict)
    try:
        return SamSettings.from_mapping(values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid SAM settings {values}: {err}") from err


def amg_settings(sam_cfg: DictConfig) -> AmgConfig:
    """The automatic-mask settings of a model config's ``model.sam.amg``."""
    from samsr.guidance.runner import AmgConfig

    return _settings(AmgConfig, sam_cfg.amg, "model.sam.amg")


def _settings(cls: type[T], node: DictConfig, where: str) -> T:
    """A settings dataclass from a config node; bad or unknown keys -> ConfigError naming it."""
    values = OmegaConf.to_container(node, resolve=True)
    assert isinstance(values, dict)
    values.pop("_target_", None)  # the same node also instantiates the class itself
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid {where}: {err}") from err


def train_settings(trainer_cfg: DictConfig) -> TrainSettings:
    """The training-loop settings of ``trainer`` (bad or unknown keys: ConfigError)."""
    return _settings(TrainSettings, trainer_cfg, "trainer")


def build_train_guidance(model_cfg: DictConfig, device: torch.device) -> BatchPromptMaps | None:
    """What the trainer runs on each batch on its device (``model.train_guidance``: SAM-SR
    v2.2's prompt maps, with the model's SAM on ``device``), or None."""
    if model_cfg.train_guidance is None:
        return None
    from samsr.guidance.build import build_from_settings
    from samsr.guidance.runner import SamRunner

    make = _instantiate(model_cfg.train_guidance, "model.train_guidance")
    sam = build_from_settings(sam_settings(model_cfg.sam), device)
    return make(runner=SamRunner(sam))


def build_sam_refiner(
    refiner: Refiner, model_cfg: DictConfig, device: torch.device
) -> Refiner | SamGuidedRefiner:
    """Composes SAM, the model's guidance strategy (``model.guidance``) and ``refiner`` for
    SAM-SR v1/v2.x; returns ``refiner`` itself for models without one (CRM, SAM-SR v3)."""
    if model_cfg.guidance is None:
        return refiner
    from samsr.guidance.build import build_from_settings
    from samsr.guidance.runner import SamRunner
    from samsr.inference.sam_refiner import SamGuidedRefiner

    guidance = _instantiate(model_cfg.guidance, "model.guidance")
    sam = build_from_settings(sam_settings(model_cfg.sam), device)
    return SamGuidedRefiner(refiner, SamRunner(sam), guidance)


def build_eval_datasets(
    data_cfg: DictConfig,
    split: str,
    max_images: int | None = None,
    sources: Sequence[str] | None = None,
) -> dict[str, EvalDataset]:
    """One BIG-layout dataset per coarse source of ``data.<split>``: its ``coarse_dirs``, or
    when it names none, every folder of ``<split>_coarse/`` (:func:`find_coarse_sources`), else
    the ``_seg.png`` files beside the images; only those named in ``sources`` (None: all)."""
    split_cfg = data_cfg.get(split)
    if split not in ("val", "test") or not split_cfg:
        raise ConfigError(f"data={data_cfg.get('name')} has no '{split}' split (use val or test)")
    coarse_dirs = split_cfg.get("coarse_dirs")
    if not coarse_dirs:
        coarse_dirs = find_coarse_sources(split_cfg.split_dir) or {None: None}
        log.info("data.%s coarse sources: %s", split, ", ".join(map(str, coarse_dirs)))
    if sources is not None:
        names = [str(source or "seg") for source in coarse_dirs]
        unknown = [s for s in sources if s not in names]
        if unknown or not sources:
            raise ConfigError(
                f"eval.sources={list(sources)}: data.{split} has the coarse sources {names}; "
                "name some of them, or null for all"
            )
        coarse_dirs = {k: v for k, v in coarse_dirs.items() if str(k or "seg") in sources}
    return {
        str(source or "seg"): EvalDataset(
            split_cfg.split_dir,
            coarse_dir=coarse_dir,
            source=str(source or "seg"),
            max_images=max_images,
        )
        for source, coarse_dir in coarse_dirs.items()
    }


def cascade_config(inference_cfg: DictConfig) -> CascadeConfig:
    """The cascade settings of an ``inference`` config (unknown keys are an error)."""
    values = OmegaConf.to_container(inference_cfg, resolve=True)
    assert isinstance(values, dict)
    known = {f.name for f in dataclasses.fields(CascadeConfig)}
    ignored = {"name", "amp_dtype"}
    unknown = sorted(k for k in values if k not in known and k not in ignored)
    if unknown:
        raise ConfigError(
            f"unknown inference option(s) {unknown}; valid options: {sorted(known | ignored)}"
        )
    try:
        return CascadeConfig(**{k: v for k, v in values.items() if k in known})
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid inference config: {err}") from err


def build_refiner(model: nn.Module, inference_cfg: DictConfig, device: torch.device) -> Refiner:
    """The full-resolution predictor for ``model`` with the ``inference`` settings."""
    return Refiner(
        model,
        device=device,
        cascade=cascade_config(inference_cfg),
        amp_dtype=inference_cfg.get("amp_dtype"),
    )


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain containers (stored in checkpoints and metrics)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
