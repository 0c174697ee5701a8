"""The training loop: iterations, logging, atomic checkpoints, exact resume, validation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid
from tqdm import tqdm

from samsr.device import autocast, backend_flags
from samsr.engine.checkpoint import (
    atomic_torch_save,
    load_checkpoint,
    set_rng_state,
    training_state,
)
from samsr.engine.data_stream import SampleStream, StreamSampler

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    """Loop settings (``configs/trainer``)."""

    max_steps: int = 45705
    batch_size: int = 12
    num_workers: int = 4
    amp_dtype: str | None = None
    cudnn_benchmark: bool = True
    tf32: bool = True
    grad_clip: float | None = None
    log_every: int = 20
    image_every: int = 500
    ckpt_every: int = 1000
    keep_checkpoints: int = 3
    val_every: int = 5000
    val_max_images: int | None = 10

    def __post_init__(self) -> None:
        if self.max_steps <= 0 or self.batch_size <= 0:
            raise ValueError("trainer.max_steps and trainer.batch_size must be positive")
        if self.num_workers < 0:
            raise ValueError("trainer.num_workers must be >= 0")
        for name in ("log_every", "image_every", "ckpt_every", "val_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name} must be >= 0 (0 disables)")


def _every(step: int, period: int) -> bool:
    return period > 0 and step % period == 0


def loss_values(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    """Loss terms as Python floats, copied to the host in one transfer (one device sync)."""
    values = torch.stack([v.float() for v in losses.values()]).tolist()
    return dict(zip(losses, values))


class Trainer:
    """Trains ``model`` on a stream of samples from ``dataset``.

    Args:
        model: returns ``{"logits": B x 1 x H x W}`` from ``(image, coarse)``.
        loss_fn: ``(logits, gt) -> {"total": scalar, ...}``.
        optimizer_factory: params -> optimizer (``functools.partial`` of its class).
        scheduler_factory: optimizer -> LR scheduler stepped once per iteration.
        dataset: training samples following the batch contract of :mod:`samsr.data`.
        settings: loop settings.
        run_dir: run folder (``checkpoints/`` and ``tensorboard/`` go inside).
        device: where to train.
        seed: run seed (data order and augmentation are a function of it).
        config: resolved config stored in each checkpoint.
        model_name: stored in checkpoints so a checkpoint refuses another variant.
        validate: optional ``(model, step) -> {metric: value}`` called every ``val_every`` steps.
        guidance: optional ``(image, coarse) -> extra`` run on the training device for every
            batch (B x 3 x S x S, B x 1 x S x S -> B x E x S x S): SAM-SR v2.2's prompt maps.
        writer_factory: ``(log_dir=..., purge_step=...) -> SummaryWriter`` (the ``logger``
            config); default TensorBoard's ``SummaryWriter``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        optimizer_factory: Callable[..., torch.optim.Optimizer],
        scheduler_factory: Callable[..., Any],
        dataset: Dataset,
        settings: TrainSettings,
        run_dir: str | Path,
        device: torch.device,
        seed: int = 0,
        config: dict[str, Any] | None = None,
        model_name: str = "crm",
        validate: Callable[[nn.Module, int], dict[str, float]] | None = None,
        guidance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        writer_factory: Callable[..., SummaryWriter] = SummaryWriter,
    ) -> None:
        self.model = model.to(device)
        self.loss_fn = loss_fn.to(device)
        self.optimizer = optimizer_factory([p for p in model.parameters() if p.requires_grad])
        self.scheduler = scheduler_factory(self.optimizer)
        use_scaler = device.type == "cuda" and settings.amp_dtype == "float16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.stream = SampleStream(dataset, seed)
        self.settings = settings
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.device = device
        self.config = config or {}
        self.model_name = model_name
        self.validate = validate
        self.guidance = guidance
        self.writer_factory = writer_factory
        self.step = 0

    # -- checkpoints -------------------------------------------------------------------------

    def save(self) -> Path:
        """Write ``step_<n>.pt`` and ``last.pt`` atomically; prune old step checkpoints."""
        state = training_state(
            self.model,
            self.optimizer,
            self.scheduler,
            self.scaler,
            self.step,
            self.config,
            self.model_name,
        )
        path = atomic_torch_save(state, self.ckpt_dir / f"step_{self.step:07d}.pt")
        atomic_torch_save(state, self.ckpt_dir / "last.pt")
        keep = self.settings.keep_checkpoints
        if keep > 0:
            for old in sorted(self.ckpt_dir.glob("step_*.pt"))[:-keep]:
                old.unlink(missing_ok=True)
        return path

    def resume(self, path: str | Path) -> None:
        """Restore weights, optimiser, schedule, scaler, step and RNG from a checkpoint."""
        ckpt = load_checkpoint(path)
        if ckpt.get("format") != "samsr" or "optimizer" not in ckpt:
            raise ValueError(f"{path} is not a samsr training checkpoint; cannot resume from it")
        if ckpt.get("model_name") != self.model_name:
            raise ValueError(
                f"{path} was trained as '{ckpt.get('model_name')}', not '{self.model_name}'"
            )
        self.model.load_state_dict(ckpt["model"], strict=True)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.step = int(ckpt["step"])
        log.info("resumed from %s at step %d", path, self.step)

    # -- loop --------------------------------------------------------------------------------

    def _loader(self) -> DataLoader:
        s = self.settings
        sampler = StreamSampler(self.step * s.batch_size, s.max_steps * s.batch_size)
        return DataLoader(
            self.stream,
            batch_size=s.batch_size,
            sampler=sampler,
            num_workers=s.num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=False,
            # Worker seeds come from this generator, not the global RNG (exact resume).
            generator=torch.Generator().manual_seed(0),
        )

    def train_step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch; returns the loss terms as detached device tensors.

        Nothing here waits for the device: the terms are read (one synchronisation) only on
        logging steps, by :func:`loss_values`.
        """
        image = batch["image"].to(self.device, non_blocking=True)
        coarse = batch["coarse"].to(self.device, non_blocking=True)
        gt = batch["gt"].to(self.device, non_blocking=True)
        args = [image, coarse]
        if self.guidance is not None:  # SAM-SR v2.2: SAM on this device, batched
            args.append(self.guidance(image, coarse))
        elif batch.get("extra") is not None:
            args.append(batch["extra"].to(self.device, non_blocking=True))
        kwargs = {}
        if batch.get("sam_tokens") is not None:  # SAM-SR v3, cached training scheme
            kwargs["sam_tokens"] = batch["sam_tokens"].to(self.device, non_blocking=True)
        self.model.train()
        with autocast(self.device, self.settings.amp_dtype):
            out = self.model(*args, **kwargs)
        losses = self.loss_fn(out["logits"].float(), gt)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["total"]).backward()
        if self.settings.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self._last_images = (image, coarse, gt, out["logits"].detach())
        return {k: v.detach() for k, v in losses.items()}

    def _log_images(self, writer: SummaryWriter) -> None:
        image, coarse, gt, logits = self._last_images
        n = min(4, image.shape[0])
        masks = [m[:n].float().expand(-1, 3, -1, -1) for m in (coarse, torch.sigmoid(logits), gt)]
        grid = make_grid(torch.cat([image[:n].float(), *masks]).cpu(), nrow=n)
        writer.add_image("train/image_coarse_pred_gt", grid, self.step)

    def fit(self) -> Path:
        """Train until ``max_steps``; returns the last checkpoint's path."""
        s = self.settings
        log_dir = str(self.run_dir / "tensorboard")
        writer = self.writer_factory(log_dir=log_dir, purge_step=self.step + 1)
        try:
            with backend_flags(s.cudnn_benchmark, s.tf32):
                self._loop(writer)
        finally:
            writer.close()
        if self.step < s.max_steps:
            raise RuntimeError(f"training stopped early at step {self.step} of {s.max_steps}")
        return self.ckpt_dir / "last.pt"

    def _loop(self, writer: SummaryWriter) -> None:
        s = self.settings
        bar = tqdm(total=s.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        for batch in self._loader():
            losses = self.train_step(batch)
            self.step += 1
            bar.update(1)
            if _every(self.step, s.log_every) or self.step == s.max_steps:
                losses = loss_values(losses)
                for k, v in losses.items():
                    writer.add_scalar(f"train/loss_{k}", v, self.step)
                writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.step)
                bar.set_postfix(loss=f"{losses['total']:.4f}")
            if _every(self.step, s.image_every):
                self._log_images(writer)
            if _every(self.step, s.ckpt_every) or self.step == s.max_steps:
                self.save()
            if self.validate is not None and _every(self.step, s.val_every):
                for k, v in self.validate(self.model, self.step).items():
                    writer.add_scalar(f"val/{k}", v, self.step)
                self.model.train()
        bar.close()
