"""torch.distributed as samsr uses it: the process group ``torchrun`` describes, and the few
collectives the entry points need (objects only: checkpoints, metrics, manifests).

One process without ``torchrun`` (or ``torchrun --nproc_per_node=1``) is a world of one: no
process group is made and every helper is a no-op, so single-process behaviour is unchanged.

    torchrun --nproc_per_node=4 scripts/train.py ...      # one node, 4 GPUs (NCCL)
    torchrun --nproc_per_node=2 scripts/train.py device=cpu ...   # 2 CPU processes (gloo)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from samsr.device import resolve_device
from samsr.errors import SamsrError

__all__ = [
    "DistContext",
    "DistributedError",
    "all_gather_objects",
    "barrier",
    "broadcast_object",
    "env_context",
    "hydra_rank_overrides",
    "rank_device",
    "setup",
    "teardown",
]

T = TypeVar("T")


class DistributedError(SamsrError, RuntimeError):
    """A distributed setting that cannot work (e.g. SyncBatchNorm on gloo)."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job: ``rank`` of ``world_size``, ``local_rank`` on
    its node (its GPU index under ``torchrun``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """More than one process (a process group exists)."""
        return self.world_size > 1


def env_context() -> DistContext:
    """The context ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``); a world of one without them."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise DistributedError(
            f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {err}"
        ) from err
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return DistContext(rank=rank, world_size=world, local_rank=local)


def setup(device: str | torch.device = "auto") -> tuple[DistContext, torch.device]:
    """Joins the process group ``torchrun`` set up (NCCL on CUDA, gloo on CPU) and picks this
    process's device (``cuda:LOCAL_RANK`` on CUDA).

    Args:
        device: the configured device (``auto``, ``cpu``, ``cuda``...), as for one process.

    Returns:
        (context, device). Without ``torchrun`` (or with one process): (world of one, the
        device ``device`` resolves to).
    """
    ctx = env_context()
    dev = resolve_device(rank_device(str(device)))
    if not ctx.enabled:
        return ctx, dev
    if dev.type == "cuda":
        if ctx.local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK {ctx.local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                "use --nproc_per_node <= the GPUs of each node"
            )
        torch.cuda.set_device(dev)
    elif dev.type != "cpu":
        raise DistributedError(f"distributed runs need CUDA (NCCL) or the CPU (gloo), not {dev}")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return ctx, dev


def teardown() -> None:
    """Leaves the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Waits for every rank (no-op in a world of one)."""
    if _active():
        dist.barrier()


def all_gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` alone."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in a world of one)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def rank_device(device: str) -> str:
    """The device of this process: under ``torchrun``, ``cuda``, ``cuda:N`` and ``auto`` (with
    CUDA) become ``cuda:LOCAL_RANK`` (one GPU per rank); anything else (``cpu``) is kept, and
    so is every device of a plain process."""
    ctx = env_context()
    if not ctx.enabled:
        return device
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return f"cuda:{ctx.local_rank}"
    return device


def hydra_rank_overrides(argv: list[str]) -> list[str]:
    """Hydra overrides for the ranks > 0 of a ``torchrun`` job: each keeps its Hydra log in
    ``<log_dir>/torchrun/rank<r>/`` instead of making a second timestamped run folder (the
    run folder is rank 0's, see :func:`samsr.engine.run.run_train`). ``[]`` on rank 0, outside
    ``torchrun``, or when the command names ``hydra.run.dir`` itself."""
    ctx = env_context()
    if not ctx.rank or any(a.startswith("hydra.run.dir=") for a in argv):
        return []
    return [
        f"hydra.run.dir=${{paths.log_dir}}/torchrun/rank{ctx.rank}",
        "hydra.output_subdir=null",
    ]
