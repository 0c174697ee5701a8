"""SAM-SR v3.1-v3.4 (thesis 3.3, integrated): SAM's frozen ViT encoder inside CRM.

The frozen SAM image encoder gives context (the B x 256 x 64 x 64 embedding of the image resized
to 1024); the coarse mask enters those tokens according to the variant (see
:mod:`samsr.models.components.mask_injection`); a 1x1 conv projects them to ``token_channels``.
A shallow CNN on image + mask keeps local detail at stride 2; the fuser samples the tokens at
every stride-2 cell (through a :class:`~samsr.models.components.sam_frame.Frame`) and merges both
into CRM's 256-channel map, which CRM's implicit decoder decodes.

Training (``forward``) encodes each crop with SAM (the crop resized to 1024), or takes the crop's
tokens sampled from a cached whole-image embedding (``sam_tokens``; see
:mod:`samsr.data.sam_tokens`). The cascade
(:func:`samsr.inference.cascade.refine`) encodes the whole image once, then at each scale
re-injects the current mask (:meth:`SamCRM.guide`) and samples the tokens per scale or tile.

SAM's weights are not part of this model's ``state_dict``: they are loaded from the official SAM
checkpoint when the model is built. The variant and SAM type are (``_extra_state``), so weights
of one variant refuse to load into another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from samsr.models.components.guided_encoder import GuidedFusion, LocalEncoder
from samsr.models.components.implicit_decoder import ImplicitDecoder
from samsr.models.components.mask_injection import MaskInjection
from samsr.models.components.sam_frame import (
    Frame,
    mask_to_token_frame,
    sam_preprocess,
    sample_tokens,
    valid_grid,
)
from samsr.models.crm import CRM

__all__ = ["VARIANTS", "Guide", "SamCRM", "build_sam_crm", "sam_embedding"]

# mask injection -> variant name (thesis numbering)
VARIANTS = {"none": "v3.1", "add": "v3.2", "global": "v3.3", "window": "v3.4"}
SAM_PREFIX = "sam_encoder."


@dataclass
class Guide:
    """SAM context for one network input.

    Attributes:
        tokens: B x token_channels x gh x gw projected tokens (mask injected), valid grid only.
        frame: where the network input lies in the encoded image.
    """

    tokens: Tensor
    frame: Frame


class SamCRM(CRM):
    """SAM-SR v3: CRM whose ResNet is replaced by frozen SAM tokens + a shallow CNN.

    Args:
        sam_encoder: SAM's ``ImageEncoderViT`` (frozen here: eval mode, no gradients).
        sam_type: its name (``vit_h`` / ``vit_l`` / ``vit_b`` / ``tiny``), kept in checkpoints.
        injection: how the mask enters the tokens (the variant).
        local: the shallow CNN (B x 4 x H x W -> B x Cl x ceil(H/2) x ceil(W/2)).
        fusion: merges local features and sampled tokens into B x 256 x h x w.
        decoder: CRM's implicit decoder.
        token_dim: SAM's embedding channels (256); ``token_channels``: after the projection.
    """

    guided = True  # the cascade computes the SAM embedding once and passes guides per scale
    # input px a tile's features need around them (``inference.tile_halo=auto``): the local
    # encoder's receptive radius (9: four 3x3 convs, one of stride 2 and one of dilation 2) plus
    # the fuser's two 3x3 convs at stride 2 (4); the SAM tokens are sampled for the window itself
    context_radius_px = 13

    def __init__(
        self,
        sam_encoder: nn.Module,
        sam_type: str,
        injection: MaskInjection,
        local: LocalEncoder,
        fusion: GuidedFusion,
        decoder: ImplicitDecoder,
        token_dim: int,
        token_channels: int,
    ) -> None:
        super().__init__(local, fusion, decoder, in_channels=4)
        self.sam_encoder = sam_encoder.eval().requires_grad_(False)
        self.sam_type = sam_type
        self.injection = injection
        self.token_proj = nn.Conv2d(token_dim, token_channels, 1)
        self.img_size = int(sam_encoder.img_size)
        self.patch = int(sam_encoder.patch_embed.proj.kernel_size[0])
        self.register_load_state_dict_post_hook(_ignore_missing_sam)

    @property
    def variant(self) -> str:
        return VARIANTS[self.injection.kind]

    def train(self, mode: bool = True) -> SamCRM:
        super().train(mode)
        self.sam_encoder.eval()  # frozen: always inference behaviour
        return self

    # -- SAM context ---------------------------------------------------------------------------

    def embed_image(self, image: Tensor) -> Tensor:
        """SAM's embedding of whole images (no gradients): :func:`sam_embedding`.

        Args:
            image: B x 3 x H x W RGB, uint8 or float in [0, 1].

        Returns:
            B x token_dim x gh x gw: the valid token grid (:func:`valid_grid`).
        """
        return sam_embedding(self.sam_encoder, image, self.token_proj.weight.dtype)

    def guide(self, embedding: Tensor, mask: Tensor, frame: Frame) -> Guide:
        """Injects the mask into the embedding and projects it.

        Args:
            embedding: B x token_dim x gh x gw from :meth:`embed_image`.
            mask: B x 1 x H x W in [-1, 1], aligned with the encoded image (unpadded).
            frame: where the network input to be encoded lies in that image.
        """
        m = None
        if self.injection.uses_mask:
            m = mask_to_token_frame(mask, embedding.shape[-2:], self.img_size, self.patch)
            m = m.to(embedding.dtype)
        tokens = self.token_proj(self.injection(embedding, m))
        return Guide(tokens, frame)

    # -- CRM interface ---------------------------------------------------------------------------

    def encode_normalized(
        self, x: Tensor, fusion_patch: int = 0, guide: Guide | None = None
    ) -> Tensor:
        """Encodes a normalised input.

        Args:
            x: B x 4 x H x W from :meth:`normalize_inputs` (possibly resized).
            fusion_patch: > 0 runs the fuser in patches of that many feature rows (same output:
                the concatenated map and the first conv's output never exist at full size).
            guide: the SAM context of this input (:meth:`guide`).

        Returns:
            B x 256 x ceil(H/2) x ceil(W/2).
        """
        self._check_input(x)
        local = self.encoder(x)
        size = tuple(x.shape[-2:])
        return self._fuse(local, self._require(guide), size, local.shape[-2:], (0, 0), fusion_patch)

    def encode_window(
        self,
        x: Tensor,
        offset: tuple[int, int],
        full_size: tuple[int, int],
        fusion_patch: int = 0,
        guide: Guide | None = None,
    ) -> tuple[Tensor, tuple[int, int]]:
        """Encodes a window (tile) of a larger input; see :meth:`CRM.encode_window`.

        ``offset`` must be even; tokens are sampled for exactly the window's cells, so only the
        shallow CNN's receptive field (19 px + the fuser's) needs a halo.
        """
        self._check_input(x)
        guide = self._require(guide)
        oy, ox = offset
        if oy % 2 or ox % 2:
            raise ValueError(f"window offsets must be even, got {offset}.")
        local = self.encoder(x)
        full = self.encoder.level_sizes(*full_size)[0]
        origin = (oy // 2, ox // 2)
        return self._fuse(local, guide, full_size, full, origin, fusion_patch), origin

    def encode_windows(
        self,
        x: Tensor,
        offsets: Sequence[tuple[int, int]],
        full_size: tuple[int, int],
        fusion_patch: int = 0,
        guide: Guide | None = None,
        cells: Sequence[tuple[int, int, int, int]] | None = None,
    ) -> list[tuple[Tensor, tuple[int, int]]]:
        """B equal-sized windows of one image: the local CNN on the batch, the token fusion per
        window with the image's ``guide`` (see :meth:`CRM.encode_windows`; offsets even).
        ``cells`` is accepted and the whole window returned: the halo of these models is the
        shallow CNN's few pixels, so there is little to skip."""
        self._check_input(x)
        guide = self._require(guide)
        if any(oy % 2 or ox % 2 for oy, ox in offsets):
            raise ValueError(f"window offsets must be even, got {list(offsets)}.")
        if len(offsets) != x.shape[0]:
            raise ValueError(f"{len(offsets)} offsets for a batch of {x.shape[0]} windows.")
        local = self.encoder(x)
        full = self.encoder.level_sizes(*full_size)[0]
        out = []
        for j, (oy, ox) in enumerate(offsets):
            origin = (oy // 2, ox // 2)
            feat = self._fuse(local[j : j + 1], guide, full_size, full, origin, fusion_patch)
            out.append((feat, origin))
        return out

    def _fuse(
        self,
        local: Tensor,
        guide: Guide,
        input_size: tuple[int, int],
        full: tuple[int, int],
        origin: tuple[int, int],
        fusion_patch: int,
    ) -> Tensor:
        """Fuses ``local`` (the window at ``origin`` of the ``full`` feature map) with the tokens
        sampled at the same cells, in row patches (halo: the fuser's radius) if asked."""
        rows, cols = local.shape[-2:]
        fy, fx = origin

        def fuse_rows(a: int, b: int) -> Tensor:
            window = (fy + a, fx, b - a, cols)
            ctx = sample_tokens(
                guide.tokens, guide.frame, self.img_size, self.patch, input_size, full, window
            )
            return self.fusion(local[:, :, a:b], ctx)

        if fusion_patch <= 0 or fusion_patch >= rows:
            return fuse_rows(0, rows)
        halo = self.fusion.halo
        out: Tensor | None = None
        for r0 in range(0, rows, fusion_patch):
            r1 = min(r0 + fusion_patch, rows)
            a, b = max(0, r0 - halo), min(rows, r1 + halo)
            y = fuse_rows(a, b)
            if out is None:
                out = y.new_empty((y.shape[0], y.shape[1], rows, cols))
            out[:, :, r0:r1] = y[:, :, r0 - a : r1 - a]
        assert out is not None
        return out

    def encode(
        self,
        image: Tensor,
        coarse: Tensor,
        extra: Tensor | None = None,
        sam_tokens: Tensor | None = None,
    ) -> Tensor:
        """Training encoding: SAM's tokens of each input, computed here or given.

        Args:
            image: B x 3 x H x W RGB in [0, 1].
            coarse: B x 1 x H x W mask in [0, 1].
            extra: must be None (v3 takes no extra channels).
            sam_tokens: B x C x gh x gw tokens at the input's own valid grid (the ``cached``
                training scheme: :class:`~samsr.data.sam_tokens.SamTokenLoader`); None runs SAM
                on each input (the ``per_crop`` scheme).

        Returns:
            B x 256 x ceil(H/2) x ceil(W/2).
        """
        if extra is not None:
            raise ValueError("SAM-SR v3 takes image + mask only (extra channels given).")
        x = self.normalize_inputs(image, coarse)
        h, w = image.shape[-2:]
        if sam_tokens is None:
            embedding = self.embed_image(image)
        else:
            grid = valid_grid(h, w, self.img_size, self.patch)
            if sam_tokens.dim() != 4 or tuple(sam_tokens.shape[-2:]) != grid:
                raise ValueError(
                    f"sam_tokens must be B x C x {grid[0]} x {grid[1]} for {h}x{w} inputs, got "
                    f"{tuple(sam_tokens.shape)}."
                )
            embedding = sam_tokens.to(self.token_proj.weight.dtype)
        guide = self.guide(embedding, x[:, 3:4], Frame.identity(h, w))
        return self.encode_normalized(x, guide=guide)

    def forward(
        self,
        image: Tensor,
        coarse: Tensor,
        extra: Tensor | None = None,
        sam_tokens: Tensor | None = None,
        windows: Tensor | None = None,
        window_size: tuple[int, int] | None = None,
    ) -> dict[str, Tensor]:
        """Training forward (see :meth:`CRM.forward`); ``sam_tokens`` as in :meth:`encode`."""
        feat = self.encode(image, coarse, extra, sam_tokens)
        return {"logits": self.decode_grid(feat, coarse, windows, window_size)}

    def _require(self, guide: Guide | None) -> Guide:
        if guide is None:
            raise ValueError(
                f"SAM-SR {self.variant} encodes with SAM's context: pass guide=model.guide(...) "
                "(samsr.inference.refine does this), or call the model on (image, coarse)."
            )
        return guide

    # -- checkpoints -------------------------------------------------------------------------

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The trainable state only: SAM's frozen weights come from the SAM checkpoint."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "") + SAM_PREFIX
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        return state

    def get_extra_state(self) -> dict[str, str]:
        return {"variant": self.variant, "sam_type": self.sam_type}

    def set_extra_state(self, state: Any) -> None:
        saved = dict(state) if isinstance(state, Mapping) else {}
        if saved.get("variant") != self.variant:
            raise ValueError(
                f"these weights are SAM-SR {saved.get('variant')}, the model is SAM-SR "
                f"{self.variant}: pass model=samsr_{str(saved.get('variant')).replace('.', '_')} "
                "or a checkpoint of this variant."
            )
        if saved.get("sam_type") != self.sam_type:
            fix = (
                "model.sam.tiny=true"
                if saved.get("sam_type") == "tiny"
                else f"model.sam.tiny=false model.sam.type={saved.get('sam_type')}"
            )
            raise ValueError(
                f"these weights were trained on SAM {saved.get('sam_type')} tokens, the model "
                f"uses SAM {self.sam_type}: set {fix}."
            )


def sam_embedding(encoder: nn.Module, image: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """SAM's image embedding on the valid token grid, without gradients.

    Args:
        encoder: SAM's ``ImageEncoderViT`` (its ``img_size`` and patch size are read from it).
        image: B x 3 x H x W RGB, uint8 or float in [0, 1].
        dtype: the encoder input's dtype (default float32).

    Returns:
        B x C x gh x gw (C = 256 for the official models; :func:`valid_grid`).
    """
    img_size = int(encoder.img_size)
    patch = int(encoder.patch_embed.proj.kernel_size[0])
    h, w = image.shape[-2:]
    x = sam_preprocess(image, img_size).to(dtype or torch.float32)
    with torch.no_grad():
        emb = encoder(x)
    gh, gw = valid_grid(h, w, img_size, patch)
    return emb[..., :gh, :gw]


def _ignore_missing_sam(module: nn.Module, keys: Any) -> None:
    """Load post-hook: SAM's weights are not expected in a state dict."""
    keys.missing_keys[:] = [k for k in keys.missing_keys if SAM_PREFIX not in k]


class SamImageEncoder(Protocol):
    """What :func:`build_sam_crm` needs of SAM (``samsr.guidance.build.SamEncoder``, built by the
    engine: this module never imports ``segment_anything``)."""

    module: nn.Module  # SAM's ImageEncoderViT
    sam_type: str  # tiny | vit_b | vit_l | vit_h, stored in checkpoints
    token_dim: int  # channels of its embedding


def build_sam_crm(
    sam: SamImageEncoder,
    injection: str = "none",
    local_width: int = 64,
    token_channels: int = 128,
    heads: int = 8,
    window: int = 16,
    decoder_hidden: Sequence[int] = (32, 32, 32, 32),
    dropout: float = 0.5,
    decoder_factorized: bool = False,
) -> SamCRM:
    """Builds SAM-SR v3 from plain values.

    Args:
        sam: SAM's image encoder with its type and token width (the ``model.net.sam`` node, from
            ``model.sam``:
            ``samsr.guidance.build.image_encoder`` of ``type``/``checkpoint`` or ``tiny``).
        injection: ``none`` (v3.1), ``add`` (v3.2), ``global`` (v3.3) or ``window`` (v3.4).
        local_width: channels of the shallow CNN.
        token_channels: channels of the projected SAM tokens fed to the fuser.
        heads: attention heads (v3.3, v3.4).
        window: attention window side in tokens (v3.4).
        decoder_hidden: hidden widths of the implicit decoder.
        dropout: dropout of the fuser.
        decoder_factorized: see :class:`ImplicitDecoder`.

    Returns:
        The model (train mode; SAM frozen in eval mode).
    """
    if injection not in VARIANTS:
        raise ValueError(f"injection must be one of {sorted(VARIANTS)}, got {injection!r}.")
    if local_width < 2 or token_channels < 1:
        raise ValueError(
            f"local_width must be >= 2 and token_channels >= 1, got {local_width}, "
            f"{token_channels}."
        )
    if injection == "window" and window < 1:
        raise ValueError(f"model.net.window must be >= 1 token, got {window}.")
    encoder, sam_type, token_dim = sam.module, str(sam.sam_type), int(sam.token_dim)
    if injection in ("global", "window") and (heads < 1 or token_dim % heads):
        raise ValueError(
            f"model.net.heads={heads} must divide SAM's {token_dim} token channels (e.g. 8)."
        )
    local = LocalEncoder(in_channels=4, width=local_width)
    fusion = GuidedFusion(local.out_channels, token_channels, out_channels=256, dropout=dropout)
    decoder = ImplicitDecoder(
        feat_dim=fusion.out_channels, hidden=tuple(decoder_hidden), factorized=decoder_factorized
    )
    inject = MaskInjection(injection, token_dim, heads=heads, window=window)
    return SamCRM(encoder, sam_type, inject, local, fusion, decoder, token_dim, token_channels)
