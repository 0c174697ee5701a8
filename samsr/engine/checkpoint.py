"""Checkpoints: atomic writes, exact-resume state, and loading weights from any supported file.

A samsr checkpoint is a dict holding only plain containers and tensors (loadable with
``torch.load(..., weights_only=True)``):

    {"format": "samsr", "version": str, "model_name": str, "model": state_dict,
     "optimizer": ..., "scheduler": ..., "scaler": ..., "step": int, "rng": {...},
     "config": dict (resolved), "git_commit": str | None,
     "rng_ranks": [every rank's RNG state], "layout": {"world_size", "batch_size",
     "per_rank_batch", "micro_batch", "accumulate"}}

(``rng`` is rank 0's; older checkpoints lack the last two keys: one rank, no accumulation.)
"""

from __future__ import annotations

import os
import random
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import samsr
from samsr.errors import SamsrError

CKPT_FORMAT = "samsr"


class CheckpointError(SamsrError, RuntimeError):
    """A checkpoint file is missing, unreadable or does not fit the model."""


def git_commit() -> str | None:
    """Commit hash of the samsr source tree, or None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` with torch.save to a temp file in the same folder, then rename over ``path``.

    A kill at any moment leaves either the old file or the new one, never a truncated file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def rng_state() -> dict[str, Any]:
    """Global RNG states (python, numpy, torch, cuda) as weights_only-safe containers."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by :func:`rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file to CPU with a clear error when it is missing or unreadable."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file: pass a file in it.")
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path}. Train one with `python scripts/train.py` "
            "(checkpoints land in <run dir>/checkpoints/), or download the official CRM "
            "weights (model_45705) and pass their path; see checkpoints/README.md."
        )
    import warnings

    try:  # torch warns about odd pickles before failing on them: shown only if it loads
        with warnings.catch_warnings(record=True) as caught:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised in plain words, naming the file
        # Say what the file is from its first bytes; torch's message is only the short reason.
        try:
            with path.open("rb") as f:
                head: bytes | None = f.read(512)
        except OSError:  # e.g. no read permission: torch failed the same way
            head = None
        detail = str(err).split("WeightsUnpickler error:")[-1].strip()
        detail = detail.splitlines()[0].split(". ")[0][:200] if detail else ""
        reason = f"{type(err).__name__}: {detail}" if detail else type(err).__name__
        start = (head or b"").decode("utf-8", "replace")
        is_text = b"\x00" not in (head or b"\x00") and start.count("\ufffd") <= 1
        is_text = is_text and all(c.isprintable() or c in "\t\r\n\ufffd" for c in start)
        legacy_magic = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
        damaged = f"is a damaged or truncated PyTorch checkpoint ({reason}; copy it again)"
        if head is None:
            what = f"cannot be read ({reason})"
        elif not head:
            what = "is not a PyTorch checkpoint: the file is empty"
        elif "Unsupported global" in reason:
            what = f"holds pickled Python objects, not only tensors and containers ({reason})"
        elif head.startswith(b"PK\x03\x04"):  # torch's zip format (torch >= 1.6)
            zip_ok = b"data.pkl" in head
            what = damaged if zip_ok else "is a zip archive, not a PyTorch checkpoint"
        elif head.startswith(legacy_magic):  # torch's legacy (pre-zip) format
            what = damaged
        elif head.startswith((b"\x89PNG", b"\xff\xd8\xff")):
            what = "is not a PyTorch checkpoint: it is an image"
        elif is_text:
            first_line = (start.strip().splitlines() or [""])[0][:60]
            what = f"is not a PyTorch checkpoint: it is a text file starting {first_line!r}"
        else:
            what = f"is not a PyTorch checkpoint (could not unpickle it: {reason})"
        raise CheckpointError(
            f"{path} {what}; pass a .pt file written by scripts/train.py "
            "(<run dir>/checkpoints/) or the official CRM weights (model_45705), see "
            "checkpoints/README.md."
        ) from err
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return ckpt


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint file read once (:func:`load_checkpoint`), for the functions that accept a path
    or this: the config and the weights then come from one read of the file."""

    path: Path
    content: Any

    @classmethod
    def read(cls, path: str | Path) -> LoadedCheckpoint:
        """Reads ``path`` (CheckpointError if it is missing or not a checkpoint)."""
        return cls(Path(path), load_checkpoint(path))

    @property
    def is_samsr(self) -> bool:
        """Written by samsr (else: taken for the official CRM release)."""
        return isinstance(self.content, dict) and self.content.get("format") == CKPT_FORMAT


CheckpointSource = str | Path | LoadedCheckpoint
"""A checkpoint file, or one already read."""


def _read(source: CheckpointSource) -> LoadedCheckpoint:
    return source if isinstance(source, LoadedCheckpoint) else LoadedCheckpoint.read(source)


INPUT_CONV_KEY = "encoder.conv1.weight"  # CRM's first conv: its input channels grow in SAM-SR v2
EXTRA_STATE_KEY = "_extra_state"  # nn.Module extra state (SAM-SR v3: variant and SAM type)


def model_state_from_file(
    source: CheckpointSource,
    model_name: str | None = None,
    init: bool = False,
    also: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Return a state dict for ``model`` from a samsr or an official CRM checkpoint.

    Args:
        source: the checkpoint file (or the file already read).
        model_name: the name of the model that will receive the weights (``cfg.model.name``);
            a samsr checkpoint of another variant is refused with a clear message.
        init: initialising a new model for training: a checkpoint of another variant is
            accepted (e.g. CRM weights for SAM-SR v2.1).
        also: other model names whose checkpoints fit (SAM-SR v1 runs CRM checkpoints).
    """
    loaded = _read(source)
    path, ckpt = loaded.path, loaded.content
    if loaded.is_samsr:
        saved = ckpt.get("model_name")
        accepted = (model_name, *also)
        if not init and model_name is not None and saved is not None and saved not in accepted:
            raise CheckpointError(
                f"{path} holds a '{saved}' model but the config builds '{model_name}': "
                f"pass model={saved} or another checkpoint."
            )
        return ckpt["model"]
    # Not ours: the official CRM release (a raw, DataParallel-prefixed state dict).
    from samsr.models.crm_official import convert_official_crm

    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is neither a samsr checkpoint nor a CRM state dict")
    return convert_official_crm(state)


def expand_input_channels(state: dict[str, Any], target: dict[str, Any]) -> int:
    """Zero-fills the input conv of ``state`` up to ``target``'s input channels, in place.

    The reference rule for new input channels (as for the mask channel on ImageNet weights):
    the pretrained filters keep their channels, the new ones start at zero, so the initialised
    model computes exactly what the checkpoint did until training moves them.

    Returns:
        The number of channels added (0 if nothing changed).
    """
    src, dst = state.get(INPUT_CONV_KEY), target.get(INPUT_CONV_KEY)
    if src is None or dst is None or src.shape == dst.shape:
        return 0
    if (
        src.shape[0] != dst.shape[0]
        or src.shape[2:] != dst.shape[2:]
        or src.shape[1] > dst.shape[1]
    ):
        return 0  # not a channel expansion: the strict load reports it
    extra = dst.shape[1] - src.shape[1]
    state[INPUT_CONV_KEY] = torch.cat(
        [src, src.new_zeros((src.shape[0], extra, *src.shape[2:]))], 1
    )
    return extra


def load_model_weights(
    model: nn.Module,
    source: CheckpointSource,
    model_name: str | None = None,
    init: bool = False,
    also: tuple[str, ...] = (),
) -> None:
    """Load weights into ``model`` (strict) from a samsr or official CRM checkpoint.

    With ``init=True`` (training initialisation) a checkpoint of another variant is accepted and
    a model with more input channels gets the extra input weights zero-filled
    (:func:`expand_input_channels`).
    """
    loaded = _read(source)
    state = dict(model_state_from_file(loaded, model_name, init=init, also=also))
    if init:
        target = model.state_dict()
        expand_input_channels(state, target)
        for key in [k for k in target if k.endswith(EXTRA_STATE_KEY)]:
            state[key] = target[key]  # another variant's identity (SAM-SR v3) is accepted here
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(
            f"weights in {loaded.path} do not fit the configured model ({model_name}): {err}\n"
            "Check model.net.backbone / model variant against the run that wrote the checkpoint."
        ) from err


def training_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    step: int,
    config: dict[str, Any],
    model_name: str,
) -> dict[str, Any]:
    """Everything needed to resume training exactly at ``step``."""
    return {
        "format": CKPT_FORMAT,
        "version": samsr.__version__,
        "model_name": model_name,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "step": step,
        "rng": rng_state(),
        "config": config,
        "git_commit": git_commit(),
    }
