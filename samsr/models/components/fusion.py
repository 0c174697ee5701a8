"""CRM's multi-level feature fusion (the reference's ``ASPP_no4level``, no atrous convs).

Reference facts (dvlab-research/Entity, High-Quality-Segmention/models/network/aspp.py):

* per level: ``_ASPPModule`` = 1x1 conv (no bias) + BN + ReLU, then a second BN + ReLU + Dropout
  (``bn1_128`` / ``bn1_256`` / ``bn1_1024``), i.e. conv -> BN -> ReLU -> BN -> ReLU -> Dropout;
* the stride-4 and stride-8 maps are upsampled to the conv1 (stride-2) size with bilinear
  interpolation, ``align_corners=True``, and concatenated in level order (64 + 64 + 128);
* ``last_conv`` = 3x3 conv 256->256 (padding 1, no bias) + BN + ReLU + Dropout(0.5);
* init: conv weights ``kaiming_normal_`` (fan_in), BN weight 1 / bias 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Fusion"]


class _Branch(nn.Module):
    """1x1 conv + BN + ReLU + BN + ReLU + Dropout on one encoder level."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)  # ref _ASPPModule.bn
        self.bn2 = nn.BatchNorm2d(out_channels)  # ref bn1_<in_channels>
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv(x)))
        return self.dropout(self.relu(self.bn2(x)))


class Fusion(nn.Module):
    """Projects the three encoder levels, upsamples them to stride 2, concatenates and fuses.

    Args:
        in_channels: channels of the (conv1, layer1, layer3) encoder features.
        branch_channels: output channels of the per-level 1x1 projections (sum = fuse input).
        out_channels: channels of the fused feature map.
        dropout: dropout probability after every projection and after the fuse conv.
    """

    def __init__(
        self,
        in_channels: Sequence[int] = (64, 256, 1024),
        branch_channels: Sequence[int] = (64, 64, 128),
        out_channels: int = 256,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(branch_channels):
            raise ValueError(
                f"in_channels {tuple(in_channels)} and branch_channels "
                f"{tuple(branch_channels)} must have the same length."
            )
        self.branches = nn.ModuleList(
            _Branch(c_in, c_out, dropout) for c_in, c_out in zip(in_channels, branch_channels)
        )
        concat_channels = sum(branch_channels)
        self.fuse_conv = nn.Conv2d(concat_channels, out_channels, 3, padding=1, bias=False)
        self.fuse_bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.concat_channels = concat_channels
        self.out_channels = out_channels
        for m in self.modules():  # ref aspp.py _init_weight
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def concat(self, feats: Sequence[Tensor]) -> Tensor:
        """Projects every level and concatenates them at the first level's size.

        Args:
            feats: (f1, f2, f3) encoder features, f1 the largest (B x C1 x h x w).

        Returns:
            B x sum(branch_channels) x h x w.
        """
        if len(feats) != len(self.branches):
            raise ValueError(f"Expected {len(self.branches)} feature maps, got {len(feats)}.")
        maps = [branch(f) for branch, f in zip(self.branches, feats)]
        size = maps[0].shape[-2:]
        # ref: F.interpolate(..., size=x_1.size()[2:], mode='bilinear', align_corners=True)
        maps = [maps[0]] + [
            F.interpolate(m, size=size, mode="bilinear", align_corners=True) for m in maps[1:]
        ]
        return torch.cat(maps, dim=1)

    def fuse(self, concat: Tensor) -> Tensor:
        """3x3 conv + BN + ReLU + Dropout on the concatenation (runnable on spatial patches).

        Args:
            concat: B x concat_channels x h x w.

        Returns:
            B x out_channels x h x w.
        """
        return self.dropout(self.relu(self.fuse_bn(self.fuse_conv(concat))))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """Fuses (f1, f2, f3) into B x out_channels x h x w at f1's size (stride 2)."""
        return self.fuse(self.concat(feats))
