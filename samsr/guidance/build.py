"""Building Segment Anything (SAM): official ViT-H/L/B from local checkpoints, or a tiny random one.

One settings dataclass (:class:`SamSettings`: the ``type``/``checkpoint``/``tiny``/``seed``/
``tiny_img_size`` of a model config's SAM node) and one builder from it
(:func:`build_from_settings`), used by every caller: evaluation, training, the precompute CLIs and
SAM-SR v3's frozen image encoder.

* :func:`build_sam` builds ViT-H/L/B and loads a local official checkpoint (:data:`SAM_CHECKPOINTS`
  says which file and where to download it). :func:`build_tiny_sam` builds a tiny random SAM from
  the library's own classes for tests and smoke runs.
* :func:`image_encoder` gives SAM-SR v3 its frozen ``ImageEncoderViT`` (with the SAM type and token
  width), so the network module never imports ``segment_anything``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from torch import nn

__all__ = [
    "PATCH",
    "SAM_CHECKPOINTS",
    "SamEncoder",
    "SamSettings",
    "build_from_settings",
    "build_sam",
    "build_tiny_sam",
    "image_encoder",
]

_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_CHECKPOINTS: dict[str, tuple[str, str]] = {
    name: (file, _URL + file)
    for name, file in (
        ("vit_h", "sam_vit_h_4b8939.pth"),
        ("vit_l", "sam_vit_l_0b3195.pth"),
        ("vit_b", "sam_vit_b_01ec64.pth"),
    )
}
"""Model type -> (official checkpoint file name, official download URL)."""
PATCH = 16
"""Patch side of every SAM image encoder (official and tiny): one token per 16 x 16 pixels."""


def build_sam(model_type: str, checkpoint: str | Path, device: str | torch.device = "cpu") -> Sam:
    """Builds an official SAM and loads its weights from a local checkpoint file.

    Args:
        model_type: ``vit_h``, ``vit_l`` or ``vit_b``.
        checkpoint: Local path of the official ``.pth`` file (see :data:`SAM_CHECKPOINTS`).
        device: Where the model goes after loading on the CPU.

    Returns:
        The model in eval mode; embeddings are 1 x 256 x 64 x 64 for a 1024 px input.

    Raises:
        ValueError: Unknown ``model_type``, or a file that is not a ``model_type`` state dict.
        FileNotFoundError: ``checkpoint`` does not exist (the message says where to download it).
    """
    if model_type not in SAM_CHECKPOINTS:
        raise ValueError(
            f"Unknown SAM model_type {model_type!r}; valid: {', '.join(sorted(SAM_CHECKPOINTS))}."
        )
    file_name, url = SAM_CHECKPOINTS[model_type]
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"SAM checkpoint not found: {path}. It should be the official {model_type} file "
            f"{file_name}; download it from {url} (e.g. `wget {url} -O {path}`)."
        )
    hint = f"expected the official {model_type} checkpoint {file_name} from {url}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"Could not read SAM checkpoint {path} ({err}); {hint}.") from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a state dict (got {type(state).__name__}); {hint}.")
    with torch.device("meta"):  # the key/shape check costs no weight initialisation
        expected = sam_model_registry[model_type](checkpoint=None).state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        k
        for k in set(expected) & set(state)
        if not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong:
        other = [t for t, (f, _) in SAM_CHECKPOINTS.items() if f == path.name and t != model_type]
        if other:
            hint += f" (the file name is that of {other[0]}: pass model_type={other[0]!r})"
        raise ValueError(
            f"{path} does not match SAM {model_type}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(wrong)} of wrong shape "
            f"{wrong[:3]}; {hint}."
        )
    sam = sam_model_registry[model_type](checkpoint=None)
    sam.load_state_dict(state, strict=True)
    return sam.to(device).eval()


def build_tiny_sam(seed: int = 0, img_size: int = 64, embed_dim: int = 32) -> Sam:
    """Builds a tiny SAM with random weights from the library's own classes, for tests.

    ViT encoder of depth 2 (a windowed block, then a global one), 2 heads, patch 16; prompt and mask
    decoder width ``embed_dim``; two-way transformer of depth 2. The same ``seed`` gives identical
    weights; the global torch RNG is left untouched.

    Args:
        seed: Seed of the weight initialisation.
        img_size: Encoder input side (a multiple of 16); SamPredictor resizes images to it.
        embed_dim: Width of the encoder, prompts and decoder (a multiple of 8).

    Returns:
        The model in eval mode on the CPU; its image embedding is
        1 x embed_dim x (img_size // 16) x (img_size // 16), 1 x 32 x 4 x 4 by default.
    """
    if img_size < 16 or img_size % 16:
        raise ValueError(f"img_size must be a positive multiple of 16 (the patch), got {img_size}.")
    if embed_dim < 8 or embed_dim % 8:
        raise ValueError(f"embed_dim must be a positive multiple of 8, got {embed_dim}.")
    grid = img_size // PATCH
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=img_size,
                patch_size=PATCH,
                embed_dim=embed_dim,
                depth=2,
                num_heads=2,
                mlp_ratio=2.0,
                out_chans=embed_dim,
                qkv_bias=True,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                use_rel_pos=True,
                window_size=2,
                global_attn_indexes=(1,),
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=embed_dim,
                image_embedding_size=(grid, grid),
                input_image_size=(img_size, img_size),
                mask_in_chans=8,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(
                    depth=2, embedding_dim=embed_dim, mlp_dim=2 * embed_dim, num_heads=2
                ),
                transformer_dim=embed_dim,
                iou_head_depth=2,
                iou_head_hidden_dim=embed_dim,
            ),
        )
    return sam.eval()


@dataclass(frozen=True)
class SamSettings:
    """Which SAM to build: an official model from its local checkpoint, or the tiny random one.

    Attributes:
        type: ``vit_h``, ``vit_l`` or ``vit_b`` (ignored when ``tiny``).
        checkpoint: the official ``.pth`` file (see :data:`SAM_CHECKPOINTS`).
        tiny: build :func:`build_tiny_sam` instead (tests, smoke runs).
        seed: weight seed of the tiny SAM.
        tiny_img_size: encoder input side of the tiny SAM.
    """

    type: str = "vit_h"
    checkpoint: str | None = None
    tiny: bool = False
    seed: int = 0
    tiny_img_size: int = 64

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> SamSettings:
        """The settings among ``values`` (a model config's SAM node); other keys are ignored
        (``amg``, ``_target_``)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(values).items() if k in names})

    @property
    def kind(self) -> str:
        """``tiny`` or the ViT type: what caches and checkpoints record."""
        return "tiny" if self.tiny else self.type

    @property
    def input_size(self) -> int:
        """Side of the image encoder's square input (1024 for the official models)."""
        return int(self.tiny_img_size) if self.tiny else 1024


def build_from_settings(settings: SamSettings, device: str | torch.device = "cpu") -> Sam:
    """The SAM that ``settings`` describe, in eval mode on ``device``.

    Raises:
        ValueError: no checkpoint given, an unknown type or a file that is not that SAM.
        FileNotFoundError: the checkpoint file does not exist (the message says where to get it).
    """
    if settings.tiny:
        sam = build_tiny_sam(seed=int(settings.seed), img_size=int(settings.tiny_img_size))
        return sam.to(device)
    if not settings.checkpoint:
        raise ValueError(
            f"SAM {settings.type}: no checkpoint set (the official .pth file, "
            f"{SAM_CHECKPOINTS.get(settings.type, ('?', ''))[0]})."
        )
    return build_sam(str(settings.type), str(settings.checkpoint), device=device)


@dataclass
class SamEncoder:
    """SAM's frozen image encoder with what a network needs to know about it.

    Attributes:
        module: the ``ImageEncoderViT``.
        sam_type: ``tiny`` or the ViT type (stored in SAM-SR v3 checkpoints).
        token_dim: channels of its embedding (256 for the official models).
    """

    module: nn.Module
    sam_type: str
    token_dim: int


def image_encoder(
    type: str = "vit_h",
    checkpoint: str | None = None,
    tiny: bool = False,
    seed: int = 0,
    tiny_img_size: int = 64,
) -> SamEncoder:
    """SAM's image encoder for SAM-SR v3 (the ``model.net.sam`` node), built by the engine."""
    settings = SamSettings(type, checkpoint, tiny, seed, tiny_img_size)
    sam = build_from_settings(settings)
    return SamEncoder(sam.image_encoder, settings.kind, int(sam.prompt_encoder.embed_dim))
