"""The CNN parts of SAM-SR v3: a shallow local encoder and the fuser (CRM's stride-2 map)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["GuidedFusion", "LocalEncoder"]


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class LocalEncoder(nn.Module):
    """Shallow CNN on image + mask that keeps local detail at stride 2.

    3x3 convs: ``in -> width/2`` (stride 1), ``-> width`` (stride 2), ``-> width``, ``-> width``
    (dilation 2); BN + ReLU after each. Receptive field 19 input pixels.

    Input B x in_channels x H x W; output B x width x ceil(H/2) x ceil(W/2).
    """

    strides = (2,)

    def __init__(self, in_channels: int = 4, width: int = 64) -> None:
        super().__init__()
        self.out_channels = width
        self.net = nn.Sequential(
            _conv_bn_relu(in_channels, width // 2),
            _conv_bn_relu(width // 2, width, stride=2),
            _conv_bn_relu(width, width),
            _conv_bn_relu(width, width, dilation=2),
        )

    @staticmethod
    def level_sizes(h: int, w: int) -> list[tuple[int, int]]:
        """Feature-map size for an ``h x w`` input (one level, stride 2)."""
        return [(-(-h // 2), -(-w // 2))]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class GuidedFusion(nn.Module):
    """Fuses local features with sampled SAM token features into CRM's 256-channel map.

    ``cat(local, tokens)`` -> 3x3 conv + BN + ReLU -> 3x3 conv + BN + ReLU + Dropout.
    Inputs B x local_channels x h x w and B x token_channels x h x w; output B x out x h x w.
    """

    def __init__(
        self,
        local_channels: int,
        token_channels: int,
        out_channels: int = 256,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.halo = 2  # rows of context each output row needs (two 3x3 convs)
        self.net = nn.Sequential(
            _conv_bn_relu(local_channels + token_channels, out_channels),
            _conv_bn_relu(out_channels, out_channels),
            nn.Dropout(dropout),
        )

    def forward(self, local: Tensor, tokens: Tensor) -> Tensor:
        return self.net(torch.cat([local, tokens.to(local.dtype)], dim=1))
