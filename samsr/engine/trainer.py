"""The training loop: iterations, logging, atomic checkpoints, exact resume, validation; one
process or many (DistributedDataParallel under ``torchrun``, see :mod:`samsr.distributed`)."""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid
from tqdm import tqdm

from samsr.device import autocast, backend_flags, native_bf16
from samsr.distributed import DistContext, DistributedError, all_gather_objects
from samsr.engine.checkpoint import (
    atomic_torch_save,
    load_checkpoint,
    rng_state,
    set_rng_state,
    training_state,
)
from samsr.engine.data_stream import SampleStream, StreamSampler
from samsr.models.components.implicit_decoder import crop_windows
from samsr.visualize import label_colors

log = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    """Loop settings (``samsr/configs/trainer``)."""

    max_steps: int = 45705
    # when set, max_steps = ceil(epochs x dataset size / batch_size), fixed at the start
    epochs: float | None = None
    batch_size: int = 12  # the global batch: split over ranks and accumulation steps
    accumulate: int = 1  # forward/backward passes per step and rank
    sync_batchnorm: bool = False  # SyncBatchNorm across ranks (CUDA only)
    num_workers: int = 4
    # null | bfloat16 | float16 | auto (bfloat16 on CUDA with bf16 and CPUs with AVX512-BF16/AMX,
    # float32 elsewhere, where bf16 is emulated and far slower)
    amp_dtype: str | None = None
    cudnn_benchmark: bool = True
    tf32: bool = True
    grad_clip: float | None = None
    # > 0 (not in the reference): the loss sees one random decode_window x decode_window window
    # of each crop, the only pixels decoded (the encoder still sees the whole crop)
    decode_window: int = 0
    log_every: int = 20
    image_every: int = 500
    ckpt_every: int = 1000
    keep_checkpoints: int = 3
    val_every: int = 5000
    val_max_images: int | None = 10

    def __post_init__(self) -> None:
        if self.max_steps <= 0 or self.batch_size <= 0 or self.accumulate <= 0:
            raise ValueError(
                "trainer.max_steps, trainer.batch_size and trainer.accumulate must be positive"
            )
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError("trainer.epochs must be positive (or null: trainer.max_steps)")
        if self.num_workers < 0:
            raise ValueError("trainer.num_workers must be >= 0")
        if self.decode_window < 0:
            raise ValueError("trainer.decode_window must be >= 0 (0 decodes every pixel)")
        for name in ("log_every", "image_every", "ckpt_every", "val_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name} must be >= 0 (0 disables)")


def _every(step: int, period: int) -> bool:
    return period > 0 and step % period == 0


def micro_batch_size(batch_size: int, world_size: int, accumulate: int) -> int:
    """Samples per forward pass: the global batch over ranks and accumulation steps."""
    parts = world_size * accumulate
    if batch_size % parts:
        raise ValueError(
            f"trainer.batch_size ({batch_size}, the global batch) must be a multiple of the "
            f"world size x trainer.accumulate ({world_size} x {accumulate} = {parts})"
        )
    return batch_size // parts


def build_optimizer(
    model: nn.Module, factory: Callable[..., torch.optim.Optimizer]
) -> torch.optim.Optimizer:
    """The optimiser of ``model``'s trainable parameters: one group, or the model's own
    ``param_groups()`` where it has them, each group's learning rate times its ``lr_mult``
    (PSPNet's heads learn 10x faster than its backbone)."""
    if not hasattr(model, "param_groups"):
        return factory([p for p in model.parameters() if p.requires_grad])
    groups = [
        {**g, "params": [p for p in g["params"] if p.requires_grad]} for g in model.param_groups()
    ]
    optimizer = factory([g for g in groups if g["params"]])
    for group in optimizer.param_groups:  # before the scheduler records each initial_lr
        group["lr"] *= float(group.get("lr_mult", 1.0))
    return optimizer


class _NullWriter:
    """What ranks other than 0 log to: nothing."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def add_image(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def loss_values(
    losses: dict[str, torch.Tensor], ctx: DistContext | None = None
) -> dict[str, float]:
    """Loss terms as Python floats, copied to the host in one transfer (one device sync); with
    several ranks, their mean over ranks (a collective: every rank calls it)."""
    stacked = torch.stack([v.float() for v in losses.values()])
    if ctx is not None and ctx.enabled:
        dist.all_reduce(stacked)
        stacked = stacked / ctx.world_size
    return dict(zip(losses, stacked.tolist()))


class Trainer:
    """Trains ``model`` on a stream of samples from ``dataset``.

    Args:
        model: returns ``{"logits": B x 1 x H x W}`` from ``(image, coarse)``; for segmentation
            batches (a ``label`` entry: the patch baseline) ``{"logits": B x K x H x W, ...}``
            from ``image`` alone.
        loss_fn: ``(logits, gt) -> {"total": scalar, ...}``; for segmentation ``(logits, label,
            **the model's other outputs, e.g. aux)``.
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
        dist: this process's place in a ``torchrun`` job (default: one process). With several
            ranks the model is wrapped in DistributedDataParallel, each rank reads its slice of
            every step's samples, rank 0 alone logs and writes checkpoints, and every rank calls
            ``validate`` (a distributed evaluation).
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
        dist: DistContext | None = None,
    ) -> None:
        self.dist = dist or DistContext()
        self.micro_batch = micro_batch_size(
            settings.batch_size, self.dist.world_size, settings.accumulate
        )
        if settings.sync_batchnorm:
            if device.type != "cuda":
                raise DistributedError(
                    "trainer.sync_batchnorm=true needs CUDA (NCCL): torch's SyncBatchNorm does "
                    "not run on CPU tensors. Set trainer.sync_batchnorm=false for gloo/CPU runs."
                )
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(device)
        self.net: nn.Module = self.model  # what the training forward calls
        if self.dist.enabled:
            self.net = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.loss_fn = loss_fn.to(device)
        self.optimizer = build_optimizer(model, optimizer_factory)
        self.scheduler = scheduler_factory(self.optimizer)
        if settings.amp_dtype == "auto":  # bf16 only where it is native, else float32
            settings = dataclasses.replace(
                settings, amp_dtype="bfloat16" if native_bf16(device) else None
            )
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

    def layout(self) -> dict[str, int]:
        """How this run trains: recorded in every checkpoint."""
        return {
            "world_size": self.dist.world_size,
            "batch_size": self.settings.batch_size,
            "per_rank_batch": self.settings.batch_size // self.dist.world_size,
            "micro_batch": self.micro_batch,
            "accumulate": self.settings.accumulate,
        }

    def save(self) -> Path | None:
        """Write ``step_<n>.pt`` and ``last.pt`` atomically (rank 0; every rank calls this: it
        gathers each rank's RNG state); prune old step checkpoints. Returns the step file's
        path (None on other ranks)."""
        rng_ranks = self._gather_rng_states()
        if not self.dist.is_main:
            return None
        state = training_state(
            self.model,
            self.optimizer,
            self.scheduler,
            self.scaler,
            self.step,
            self.config,
            self.model_name,
        )
        state["rng_ranks"] = rng_ranks
        state["layout"] = self.layout()
        path = atomic_torch_save(state, self.ckpt_dir / f"step_{self.step:07d}.pt")
        atomic_torch_save(state, self.ckpt_dir / "last.pt")
        keep = self.settings.keep_checkpoints
        if keep > 0:
            for old in sorted(self.ckpt_dir.glob("step_*.pt"))[:-keep]:
                old.unlink(missing_ok=True)
        return path

    def _gather_rng_states(self) -> list[dict[str, Any]]:
        """Every rank's RNG state, in rank order (a collective with several ranks)."""
        if not self.dist.enabled:
            return [rng_state()]
        # as torch.save bytes: all_gather_object's own pickling of tensors fails to load them
        buf = io.BytesIO()
        torch.save(rng_state(), buf)
        blobs = all_gather_objects(buf.getvalue())
        return [torch.load(io.BytesIO(b), weights_only=True) for b in blobs]

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
        ranks = ckpt.get("rng_ranks") or [ckpt["rng"]]
        layout = ckpt.get("layout", {"world_size": len(ranks)})
        if len(ranks) == self.dist.world_size:
            set_rng_state(ranks[self.dist.rank])
        else:  # the samples are the same; only dropout's random numbers differ
            set_rng_state(ckpt["rng"])
            if self.dist.rank:
                torch.manual_seed(int(torch.randint(2**62, (1,))) + self.dist.rank)
            if self.dist.is_main:
                log.warning(
                    "%s was trained on %d rank(s), resumed on %d: the sample stream continues "
                    "exactly, the random numbers of dropout do not",
                    path, len(ranks), self.dist.world_size,
                )  # fmt: skip
        if layout.get("batch_size", self.settings.batch_size) != self.settings.batch_size:
            log.warning(
                "%s was trained with global batch %s, resumed with %d",
                path, layout.get("batch_size"), self.settings.batch_size,
            )  # fmt: skip
        self.step = int(ckpt["step"])
        log.info("resumed from %s at step %d", path, self.step)

    # -- loop --------------------------------------------------------------------------------

    def _loader(self) -> DataLoader:
        s = self.settings
        sampler = StreamSampler(
            self.step * s.batch_size,
            s.max_steps * s.batch_size,
            period=s.batch_size,
            shard=self.dist.rank,
            shards=self.dist.world_size,
        )
        return DataLoader(
            self.stream,
            batch_size=self.micro_batch,
            sampler=sampler,
            num_workers=s.num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            persistent_workers=False,
            # Worker seeds come from this generator, not the global RNG (exact resume).
            generator=torch.Generator().manual_seed(0),
        )

    def _steps(self, loader: DataLoader) -> Iterator[list[dict[str, Any]]]:
        """The loader's micro-batches, ``accumulate`` at a time (one optimisation step)."""
        group: list[dict[str, Any]] = []
        for batch in loader:
            group.append(batch)
            if len(group) == self.settings.accumulate:
                yield group
                group = []

    def _forward(
        self, batch: dict[str, Any], micro_index: int = 0
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        image = batch["image"].to(self.device, non_blocking=True)
        if "label" in batch:  # semantic segmentation (PSPNet): image -> K class logits
            label = batch["label"].to(self.device, non_blocking=True)
            with autocast(self.device, self.settings.amp_dtype):
                out = self.net(image)
            extras = {k: v.float() for k, v in out.items() if k != "logits"}  # e.g. "aux"
            losses = self.loss_fn(out["logits"].float(), label, **extras)
            # the first classes only: a full B x K x S x S logit copy would stay on the device
            self._last_images = (image[:4], None, label[:4], out["logits"][:4].detach().argmax(1))
            return out, losses
        coarse = batch["coarse"].to(self.device, non_blocking=True)
        gt = batch["gt"].to(self.device, non_blocking=True)
        args = [image, coarse]
        if self.guidance is not None:  # SAM-SR v2.2: SAM on this device, batched
            args.append(self.guidance(image, coarse))
        elif batch.get("extra") is not None:
            args.append(batch["extra"].to(self.device, non_blocking=True))
        kwargs: dict[str, Any] = {}
        if batch.get("sam_tokens") is not None:  # SAM-SR v3, cached training scheme
            kwargs["sam_tokens"] = batch["sam_tokens"].to(self.device, non_blocking=True)
        corners = self._decode_windows(gt, micro_index)
        if corners is not None:
            size = (self.settings.decode_window,) * 2
            kwargs.update(windows=corners, window_size=size)
            image, coarse, gt = (crop_windows(t, corners, size) for t in (image, coarse, gt))
        with autocast(self.device, self.settings.amp_dtype):
            out = self.net(*args, **kwargs)
        losses = self.loss_fn(out["logits"].float(), gt)
        self._last_images = (image, coarse, gt, out["logits"].detach())
        return out, losses

    def _decode_windows(self, gt: torch.Tensor, micro_index: int) -> torch.Tensor | None:
        """B x 2 top-left corners of this micro-batch's decode windows (None: every pixel).

        Drawn from a generator seeded by (run seed, step, rank, micro-batch), so a resumed run
        draws the same windows."""
        side = self.settings.decode_window
        b, _, h, w = gt.shape
        if side <= 0 or side == h == w:
            return None
        if side > min(h, w):
            raise ValueError(
                f"trainer.decode_window={side} exceeds the {h}x{w} training crops: set it to "
                f"at most {min(h, w)} (or 0: every pixel)."
            )
        seed = (self.stream.seed, self.step, self.dist.rank, micro_index)
        gen = torch.Generator().manual_seed(hash(seed) & 0x7FFFFFFFFFFFFFFF)
        ys = torch.randint(0, h - side + 1, (b,), generator=gen)
        xs = torch.randint(0, w - side + 1, (b,), generator=gen)
        return torch.stack((ys, xs), dim=1).to(gt.device)

    def train_step(
        self, batches: dict[str, Any] | Sequence[dict[str, Any]]
    ) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch, or on ``accumulate`` micro-batches (gradients
        summed, each loss divided by their number); returns the loss terms (their mean over
        the micro-batches) as detached device tensors.

        Nothing here waits for the device: the terms are read (one synchronisation) only on
        logging steps, by :func:`loss_values`. With several ranks, DistributedDataParallel
        averages the gradients over ranks in the last micro-batch's backward pass.
        """
        micro = [batches] if isinstance(batches, dict) else list(batches)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        terms: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            no_sync = getattr(self.net, "no_sync", None)
            with nullcontext() if last or no_sync is None else no_sync():
                _, losses = self._forward(batch, i)
                self.scaler.scale(losses["total"] / len(micro)).backward()
            for k, v in losses.items():  # dividing by 1 is exact: one pass is unchanged
                terms[k] = terms.get(k, 0) + v.detach() / len(micro)
        if self.settings.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return terms

    def _log_images(self, writer: SummaryWriter) -> None:
        image, coarse, gt, pred = self._last_images  # pred: logits, or classes (segmentation)
        n = min(4, image.shape[0])
        if coarse is None:  # segmentation: image, predicted classes, labels in VOC colours
            panels = [
                torch.from_numpy(label_colors(t[:n].cpu().numpy())).permute(0, 3, 1, 2) / 255
                for t in (pred, gt)
            ]
            grid = make_grid(torch.cat([image[:n].float().cpu(), *panels]), nrow=n)
            writer.add_image("train/image_pred_label", grid, self.step)
            return
        masks = [m[:n].float().expand(-1, 3, -1, -1) for m in (coarse, torch.sigmoid(pred), gt)]
        grid = make_grid(torch.cat([image[:n].float(), *masks]).cpu(), nrow=n)
        writer.add_image("train/image_coarse_pred_gt", grid, self.step)

    def fit(self) -> Path:
        """Train until ``max_steps``; returns the last checkpoint's path."""
        s = self.settings
        log_dir = str(self.run_dir / "tensorboard")
        writer: Any = _NullWriter()
        if self.dist.is_main:
            writer = self.writer_factory(log_dir=log_dir, purge_step=self.step + 1)
        try:
            with backend_flags(s.cudnn_benchmark, s.tf32):
                self._loop(writer)
        finally:
            writer.close()
        self._sync_buffers()  # the test evaluation after training uses rank 0's model
        if self.step < s.max_steps:
            raise RuntimeError(f"training stopped early at step {self.step} of {s.max_steps}")
        return self.ckpt_dir / "last.pt"

    def _loop(self, writer: SummaryWriter) -> None:
        s = self.settings
        bar = tqdm(
            total=s.max_steps,
            initial=self.step,
            desc="train",
            dynamic_ncols=True,
            disable=not self.dist.is_main,
        )
        for micro in self._steps(self._loader()):
            losses = self.train_step(micro)
            self.step += 1
            bar.update(1)
            if _every(self.step, s.log_every) or self.step == s.max_steps:
                losses = loss_values(losses, self.dist)
                for k, v in losses.items():
                    writer.add_scalar(f"train/loss_{k}", v, self.step)
                writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.step)
                bar.set_postfix(loss=f"{losses['total']:.4f}")
            if _every(self.step, s.image_every) and self.dist.is_main:
                self._log_images(writer)
            if _every(self.step, s.ckpt_every) or self.step == s.max_steps:
                self.save()
            if self.validate is not None and _every(self.step, s.val_every):
                self._sync_buffers()
                for k, v in self.validate(self.model, self.step).items():
                    writer.add_scalar(f"val/{k}", v, self.step)
                self.model.train()
        bar.close()

    def _sync_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm statistics) on every rank, so that every rank evaluates
        the model rank 0 saves. DistributedDataParallel does the same before each forward."""
        if self.dist.enabled:
            for buf in self.model.buffers():
                dist.broadcast(buf, 0)
