"""CRM (Shen et al., CVPR 2022): ResNet encoder + fusion + implicit local-ensemble decoder.

Reference facts (dvlab-research/Entity, High-Quality-Segmention: models/network/crm.py,
dataset/online_dataset_crm.py, dataset/offline_dataset_crm_pad32.py):

* the image is ``ToTensor`` ([0, 1]) then ``Normalize`` with the ImageNet mean/std
  (``(x - mean) / std``); the mask is ``ToTensor`` then ``Normalize(0.5, 0.5)``, i.e. [-1, 1];
* the network input is ``cat((image, mask), 1)``: image channels first, then the mask;
* the decoder is queried at every pixel centre of the input grid with cell (2 / H, 2 / W)
  (``to_pixel_samples`` + ``cell``), giving logits (``out_224``); sigmoid gives ``pred_224``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samsr.models.components.fusion import Fusion
from samsr.models.components.implicit_decoder import (
    ImplicitDecoder,
    crop_windows,
    query_grid,
    query_windows,
)
from samsr.models.components.resnet_encoder import ResNetEncoder

__all__ = ["CRM", "IMAGENET_MEAN", "IMAGENET_STD", "build_crm"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # ref im_transform Normalize mean
IMAGENET_STD = (0.229, 0.224, 0.225)  # ref im_transform Normalize std
MASK_CHANNEL = 3  # the input channel holding the mask (ref: cat((image, seg), 1))


def normalize_mask(mask: Tensor) -> Tensor:
    """A mask in [0, 1] as the network sees it, in [-1, 1] (any shape)."""
    return (mask - 0.5) / 0.5  # ref seg Normalize(mean=[0.5], std=[0.5])


class CRM(nn.Module):
    """Continuous Refinement Model.

    Args:
        encoder: maps B x in_channels x H x W to the (stride 2, 4, 8) feature tuple.
        fusion: maps that tuple to a B x C x h x w feature map at stride 2.
        decoder: implicit decoder over that feature map. A ``residual`` decoder also reads the
            input mask, average-pooled to the feature grid, as its prior (appended to the
            features as one more channel): the model then predicts a correction of the mask
            it is given, at every scale of the cascade.
        in_channels: channels of the normalised input: 3 (image) + 1 (mask) + extras.
    """

    def __init__(
        self,
        encoder: nn.Module,
        fusion: nn.Module,
        decoder: ImplicitDecoder,
        in_channels: int = 4,
    ) -> None:
        super().__init__()
        if in_channels < 4:
            raise ValueError(f"in_channels must be >= 4 (image + mask), got {in_channels}.")
        self.encoder = encoder
        self.fusion = fusion
        self.decoder = decoder
        self.in_channels = in_channels
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def normalize_inputs(
        self, image: Tensor, coarse: Tensor, extra: Tensor | None = None
    ) -> Tensor:
        """Builds the network input from raw tensors.

        Args:
            image: B x 3 x H x W RGB in [0, 1].
            coarse: B x 1 x H x W mask in [0, 1] (soft values allowed).
            extra: optional B x E x H x W extra channels, appended unchanged (SAM-SR variants
                normalise their own channels).

        Returns:
            B x in_channels x H x W: [(image - mean) / std, (coarse - 0.5) / 0.5, extra].
        """
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be B x 3 x H x W, got {tuple(image.shape)}.")
        if coarse.dim() != 4 or coarse.shape[1] != 1:
            raise ValueError(f"coarse must be B x 1 x H x W, got {tuple(coarse.shape)}.")
        if coarse.shape[0] != image.shape[0] or coarse.shape[-2:] != image.shape[-2:]:
            raise ValueError(
                f"coarse {tuple(coarse.shape)} does not match image {tuple(image.shape)}."
            )
        parts = [
            (image - self.pixel_mean) / self.pixel_std,  # ref torchvision Normalize: sub, div
            normalize_mask(coarse),
        ]
        if extra is not None:
            if extra.dim() != 4 or extra.shape[0] != image.shape[0]:
                raise ValueError(f"extra must be B x E x H x W, got {tuple(extra.shape)}.")
            if extra.shape[-2:] != image.shape[-2:]:
                raise ValueError(
                    f"extra {tuple(extra.shape)} does not match image {tuple(image.shape)}."
                )
            parts.append(extra.to(parts[0].dtype))
        channels = sum(p.shape[1] for p in parts)
        if channels != self.in_channels:
            raise ValueError(
                f"The model takes {self.in_channels} input channels but got {channels} "
                f"(3 image + 1 mask + {channels - 4} extra)."
            )
        return torch.cat(parts, dim=1)  # ref: torch.cat((x, seg), 1)

    def encode_normalized(self, x: Tensor, fusion_patch: int = 0) -> Tensor:
        """Encodes an already normalised input.

        Args:
            x: B x in_channels x H x W from :meth:`normalize_inputs` (possibly resized).
            fusion_patch: > 0 runs the fusion conv in patches of that many rows (inference
                only; same output, one full-size map instead of about three; see
                :meth:`Fusion.forward_patched`).

        Returns:
            B x C x ceil(H/2) x ceil(W/2) feature map (C = 256 for CRM, 257 with the prior of a
            residual decoder).
        """
        self._check_input(x)
        if fusion_patch > 0:
            feat = self.fusion.forward_patched(list(self.encoder(x)), fusion_patch)
        else:
            feat = self.fusion(self.encoder(x))
        return self._with_prior(feat, x)

    def _with_prior(self, feat: Tensor, x: Tensor, origin: tuple[int, int] = (0, 0)) -> Tensor:
        """``feat`` plus, for a residual decoder, the input's mask channel average-pooled over
        2 x 2 pixels (an odd last row/column is repeated), one value per feature cell;
        ``feat`` covers the cells of ``x`` from ``origin`` (row, col) on."""
        if not self.decoder.cell_prior:
            return feat
        mask = x[:, MASK_CHANNEL : MASK_CHANNEL + 1].float()
        pad = (0, mask.shape[-1] % 2, 0, mask.shape[-2] % 2)
        prior = F.avg_pool2d(F.pad(mask, pad, mode="replicate"), 2)
        (r, c), (h, w) = origin, feat.shape[-2:]
        return torch.cat([feat, prior[..., r : r + h, c : c + w].to(feat.dtype)], dim=1)

    def encode_window(
        self,
        x: Tensor,
        offset: tuple[int, int],
        full_size: tuple[int, int],
        fusion_patch: int = 0,
    ) -> tuple[Tensor, tuple[int, int]]:
        """Encodes a window (tile) of a larger normalised input as part of that input.

        Args:
            x: B x in_channels x h x w, the input rows/cols starting at ``offset``.
            offset: (row, col) of the window in the full input; multiples of 8.
            full_size: (H, W) of the full input.
            fusion_patch: > 0 runs the fusion conv in patches of that many rows.

        Returns:
            (features of the window, (row, col) of the features in the full feature map). The
            features match the untiled ones away from the window's edges (up to float rounding
            once the edges are beyond the receptive field).
        """
        self._check_input(x)
        return self._fuse_window(self.encoder(x), x, offset, full_size, fusion_patch)

    def encode_windows(
        self,
        x: Tensor,
        offsets: Sequence[tuple[int, int]],
        full_size: tuple[int, int],
        fusion_patch: int = 0,
        cells: Sequence[tuple[int, int, int, int]] | None = None,
    ) -> list[tuple[Tensor, tuple[int, int]]]:
        """Encodes B equal-sized windows of one input in a single encoder pass.

        The encoder (most of the work) runs on the batch; the fusion, which depends on each
        window's position, runs per window. Item ``j`` equals ``encode_window(x[j:j+1],
        offsets[j], ...)`` up to the kernels' batch-size dependent rounding.

        Args:
            x: B x in_channels x h x w, window ``j`` of the full input starting at ``offsets[j]``.
            offsets: B (row, col) offsets, multiples of 8.
            full_size: (H, W) of the full input.
            fusion_patch: > 0 runs the fusion conv in patches of that many rows.
            cells: per window, the (y0, y1, x0, x1) cells of the full feature map that will be
                read (a tile's ``cells``): only those are fused and returned (the fusion then
                skips the halo, where the features are never read); None: the whole window.

        Returns:
            Per window, (1 x C x h1 x w1 features, (row, col) of them in the full feature map).
        """
        self._check_input(x)
        if len(offsets) != x.shape[0]:
            raise ValueError(f"{len(offsets)} offsets for a batch of {x.shape[0]} windows.")
        if cells is not None and len(cells) != len(offsets):
            raise ValueError(f"{len(cells)} cell ranges for {len(offsets)} windows.")
        levels = self.encoder(x)
        parts = [[f[j : j + 1] for f in levels] for j in range(len(offsets))]
        wanted = [None] * len(offsets) if cells is None else list(cells)
        return [
            self._fuse_window(part, x[j : j + 1], off, full_size, fusion_patch, wanted[j])
            for j, (part, off) in enumerate(zip(parts, offsets))
        ]

    def _fuse_window(
        self,
        levels: Sequence[Tensor],
        x: Tensor,
        offset: tuple[int, int],
        full_size: tuple[int, int],
        fusion_patch: int,
        cells: tuple[int, int, int, int] | None = None,
    ) -> tuple[Tensor, tuple[int, int]]:
        """The fused features of one window from its encoder levels (see :meth:`encode_window`),
        only at ``cells`` if given (see :meth:`encode_windows`)."""
        oy, ox = offset
        if oy % 8 or ox % 8:
            raise ValueError(f"window offsets must be multiples of 8, got {offset}.")
        strides = self.encoder.strides
        sizes = self.encoder.level_sizes(*full_size)
        offsets = [(oy // s, ox // s) for s in strides]
        levels = list(levels)
        if cells is None:
            feat = self.fusion.forward_window(levels, offsets, sizes, fusion_patch)
            return self._with_prior(feat, x), offsets[0]
        levels, offsets, (r0, r1, c0, c1) = self.fusion.crop_window(levels, offsets, sizes, cells)
        feat = self.fusion.forward_window(levels, offsets, sizes, fusion_patch)[..., r0:r1, c0:c1]
        fy, fx = offsets[0][0] + r0, offsets[0][1] + c0
        return self._with_prior(feat, x, (fy - oy // 2, fx - ox // 2)), (fy, fx)

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"Expected B x {self.in_channels} x H x W input, got {tuple(x.shape)}."
            )

    def encode(self, image: Tensor, coarse: Tensor, extra: Tensor | None = None) -> Tensor:
        """Normalises and encodes.

        Args:
            image: B x 3 x H x W RGB in [0, 1].
            coarse: B x 1 x H x W mask in [0, 1].
            extra: optional B x E x H x W extra channels.

        Returns:
            B x C x ceil(H/2) x ceil(W/2) feature map (the conv1 output size).
        """
        return self.encode_normalized(self.normalize_inputs(image, coarse, extra))

    def decode(
        self,
        feat: Tensor,
        coords: Tensor,
        cell: Tensor,
        prepared: bool = False,
        window: tuple[int, int, int, int] | None = None,
        prior: Tensor | None = None,
    ) -> Tensor:
        """Decodes logits at query coordinates.

        Args:
            feat: B x C x h x w from :meth:`encode` (or ``decoder.prepare`` of it if
                ``prepared``: do that once when decoding many chunks).
            coords: B x N x 2 query centres, (y, x) in [-1, 1].
            cell: B x N x 2 query cell sizes (2 / H, 2 / W).
            prepared: see ``feat``.
            window: ``(y0, x0, full_h, full_w)`` when ``feat`` is a window of the full map
                (tiled inference; see :class:`ImplicitDecoder`).
            prior: B x N normalised mask values ([-1, 1]) at the queries, for a decoder with a
                pixel prior (``decoder.pixel_prior``); None otherwise.

        Returns:
            B x N logits.
        """
        return self.decoder(feat, coords, cell, prepared=prepared, window=window, prior=prior)

    def forward(
        self,
        image: Tensor,
        coarse: Tensor,
        extra: Tensor | None = None,
        windows: Tensor | None = None,
        window_size: tuple[int, int] | None = None,
    ) -> dict[str, Tensor]:
        """Training forward: one scale, every pixel of the input grid queried (or, with
        ``windows``, only the pixels of one window per sample).

        Args:
            image: B x 3 x H x W RGB in [0, 1].
            coarse: B x 1 x H x W mask in [0, 1].
            extra: optional B x E x H x W extra channels.
            windows: optional B x 2 int64 (row, col) top-left corners of the decoded windows
                (the encoder still sees the whole input).
            window_size: (wh, ww) of those windows.

        Returns:
            ``{"logits": B x 1 x H x W}`` (B x 1 x wh x ww with ``windows``: equal to those
            pixels of the full output).
        """
        feat = self.encode(image, coarse, extra)
        return {"logits": self.decode_grid(feat, coarse, windows, window_size)}

    def decode_grid(
        self,
        feat: Tensor,
        coarse: Tensor,
        windows: Tensor | None = None,
        window_size: tuple[int, int] | None = None,
    ) -> Tensor:
        """Logits of every pixel of the B x 1 x H x W input mask ``coarse`` ([0, 1]; its values
        are a pixel-prior decoder's prior) as B x 1 x H x W, or of one ``window_size`` window
        per sample at ``windows`` (B x 2 corners) as B x 1 x wh x ww."""
        b, _, h, w = coarse.shape
        prior = normalize_mask(coarse.float()) if self.decoder.pixel_prior else None
        if windows is None:
            coords, cell = query_grid(h, w, b, device=feat.device)
            flat = None if prior is None else prior.reshape(b, -1)
            return self.decode(feat, coords, cell, prior=flat).view(b, 1, h, w)
        if window_size is None:
            raise ValueError("windows needs window_size=(rows, cols).")
        windows = windows.to(feat.device)
        coords, cell = query_windows(h, w, windows, window_size)
        flat = None if prior is None else crop_windows(prior, windows, window_size).reshape(b, -1)
        return self.decode(feat, coords, cell, prior=flat).view(b, 1, *window_size)


def build_crm(
    backbone: str = "resnet50",
    in_channels: int = 4,
    pretrained: str | bool | None = None,
    decoder_hidden: Sequence[int] = (32, 32, 32, 32),
    dropout: float = 0.5,
    decoder_factorized: bool = False,
    residual: bool = False,
    residual_prior: str = "cell",
    prior_scale: float = 5.0,
) -> CRM:
    """Builds CRM from plain values.

    Args:
        backbone: ``resnet18``, ``resnet34``, ``resnet50`` (the reference) or ``resnet101``.
        in_channels: 4 for CRM (image + mask); more for SAM-SR variants with extra channels.
        pretrained: None/False (random init), a local torchvision ImageNet state-dict path, or
            ``"imagenet"`` (True is an alias) to let torchvision download the weights.
        decoder_hidden: hidden widths of the decoder MLP.
        dropout: dropout probability in the fusion module.
        decoder_factorized: run the decoder's first layer once per feature cell (same function
            and parameters, faster; see :class:`ImplicitDecoder`); False is the reference.
        residual: predict a correction of the input mask's logit, starting as the identity
            (not in the reference; see :class:`ImplicitDecoder`); False is the reference.
        residual_prior: ``"cell"`` (the mask pooled to the feature grid) or ``"pixel"`` (the
            mask's value at each decoded pixel: the untrained model is exactly the identity).
        prior_scale: initial value of the residual decoder's learnt prior scale (the logit of
            a prior of +-1).

    Returns:
        The model (train mode).
    """
    if pretrained is False:
        pretrained = None
    elif pretrained is True:
        pretrained = "imagenet"
    encoder = ResNetEncoder(backbone, in_channels=in_channels, pretrained=pretrained)
    fusion = Fusion(in_channels=encoder.out_channels, out_channels=256, dropout=dropout)
    decoder = ImplicitDecoder(
        feat_dim=fusion.out_channels,
        hidden=tuple(decoder_hidden),
        factorized=decoder_factorized,
        residual=residual,
        prior=residual_prior,
        prior_scale=prior_scale,
    )
    return CRM(encoder, fusion, decoder, in_channels=in_channels)
