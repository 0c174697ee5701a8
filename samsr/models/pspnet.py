"""PSPNet (Zhao et al., CVPR 2017), the patch-based segmentation baseline of thesis section 4.1.

The original network (hszhao/semseg) on torchvision parts:

* a dilated Bottleneck ResNet at output stride 8 (torchvision's ``replace_stride_with_dilation``:
  layer3 dilation 2, layer4 dilation 4);
* a pyramid pooling module over bins 1/2/3/6 (each: adaptive average pool, 1x1 conv to C/4
  channels, BN, ReLU, bilinear upsampling with ``align_corners=True``), concatenated with its
  input;
* a 3x3 conv head (512 channels, BN, ReLU, dropout 0.1, 1x1 classifier) and, in training, an
  auxiliary head on layer3 (256 channels) whose loss is weighted 0.4;
* logits upsampled bilinearly to the input size.

Two differences from the original, both from torchvision's ResNet: its stem is one 7x7 conv where
the original has three 3x3 convs (the "deep stem"), and the first block of each dilated stage keeps
the previous dilation (the original dilates every block). ImageNet weights are torchvision's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samsr.models.components.resnet_encoder import read_imagenet_state
from samsr.models.crm import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["DilatedResNet", "PSPNet", "PyramidPooling", "build_pspnet"]

_DEPTHS = {"50": [3, 4, 6, 3], "101": [3, 4, 23, 3], "tiny": [1, 1, 1, 1]}
HEAD_LR_MULT = 10.0  # the heads learn 10x faster than the pretrained backbone (hszhao/semseg)


class DilatedResNet(nn.Module):
    """A torchvision Bottleneck ResNet at output stride 8, without its classifier.

    Args:
        depth: ``50``, ``101``, or ``"tiny"`` (one Bottleneck block per stage, for tests;
            torchvision's BasicBlock refuses dilation).
    """

    def __init__(self, depth: int | str = 101) -> None:
        super().__init__()
        from torchvision.models.resnet import Bottleneck, ResNet

        self.depth = str(depth)
        if self.depth not in _DEPTHS:
            raise ValueError(f"model.net.depth must be 50, 101 or tiny, got {depth!r}.")
        net = ResNet(
            Bottleneck, _DEPTHS[self.depth], replace_stride_with_dilation=[False, True, True]
        )
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        self.aux_channels = 1024  # layer3 of a Bottleneck ResNet
        self.out_channels = 2048

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """B x 3 x H x W (normalised) -> (layer3, layer4), each B x C x ceil(H/8) x ceil(W/8)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x3 = self.layer3(self.layer2(self.layer1(x)))
        return x3, self.layer4(x3)

    def load_imagenet(self, source: str, search_dirs: Sequence[str | Path] = ()) -> None:
        """Loads torchvision ImageNet weights of ResNet-``depth`` (``fc`` ignored; strict).

        Args:
            source: ``"imagenet"`` (torchvision's IMAGENET1K_V1 release file from one of
                ``search_dirs``, else its download) or a local state-dict path.
            search_dirs: folders to look in first for ``"imagenet"``.
        """
        if self.depth == "tiny":
            raise ValueError("the tiny test backbone has no ImageNet weights; set pretrained=null.")
        arch = f"resnet{self.depth}"
        state, origin = read_imagenet_state(arch, source, search_dirs)
        if not isinstance(state, dict):
            raise ValueError(f"{origin} is not a state dict (got {type(state).__name__}).")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{origin} is not a torchvision {arch} state dict: {err}") from err


class PyramidPooling(nn.Module):
    """The input concatenated with its pooled, reduced and upsampled views.

    Args:
        in_channels: channels of the input (2048).
        bins: pooled grid sizes (1, 2, 3, 6).
    """

    def __init__(self, in_channels: int, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        reduced = in_channels // len(bins)
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(int(b)),
                nn.Conv2d(in_channels, reduced, 1, bias=False),
                nn.BatchNorm2d(reduced),
                nn.ReLU(inplace=True),
            )
            for b in bins
        )
        self.out_channels = in_channels + reduced * len(bins)

    def forward(self, x: Tensor) -> Tensor:
        """B x C x h x w -> B x out_channels x h x w."""
        size = x.shape[-2:]
        pooled = [
            F.interpolate(stage(x), size, mode="bilinear", align_corners=True)
            for stage in self.stages
        ]
        return torch.cat([x, *pooled], dim=1)


def _head(in_channels: int, mid: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, mid, 3, padding=1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Dropout2d(dropout),
        nn.Conv2d(mid, num_classes, 1),
    )


class PSPNet(nn.Module):
    """PSPNet over a dilated ResNet.

    Args:
        encoder: the dilated backbone (:class:`DilatedResNet`).
        num_classes: output classes (21 for PASCAL VOC: background + 20 objects).
        bins: pyramid pooling bins.
        dropout: dropout before each classifier.
        aux: build the auxiliary head on layer3 (its logits are returned in training).
    """

    def __init__(
        self,
        encoder: DilatedResNet,
        num_classes: int = 21,
        bins: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        aux: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"model.net.num_classes must be >= 2, got {num_classes}.")
        self.num_classes = int(num_classes)
        self.encoder = encoder
        self.ppm = PyramidPooling(encoder.out_channels, bins)
        self.cls = _head(self.ppm.out_channels, 512, self.num_classes, dropout)
        self.aux = _head(encoder.aux_channels, 256, self.num_classes, dropout) if aux else None
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        """Class logits at the input size.

        Args:
            image: B x 3 x H x W RGB in [0, 1].

        Returns:
            ``{"logits": B x K x H x W}``, plus ``"aux"`` (B x K x H x W) in training mode.
        """
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be B x 3 x H x W, got {tuple(image.shape)}.")
        size = image.shape[-2:]
        x3, x4 = self.encoder((image - self.pixel_mean) / self.pixel_std)
        logits = self.cls(self.ppm(x4))
        out = {"logits": F.interpolate(logits, size, mode="bilinear", align_corners=True)}
        if self.training and self.aux is not None:
            aux = F.interpolate(self.aux(x3), size, mode="bilinear", align_corners=True)
            out["aux"] = aux
        return out

    def param_groups(self) -> list[dict[str, Any]]:
        """The backbone at the base learning rate, the new layers at ``HEAD_LR_MULT`` times it
        (``lr_mult``, applied by the trainer), as in the PSPNet authors' training."""
        heads = [p for m in (self.ppm, self.cls, self.aux) if m is not None for p in m.parameters()]
        return [
            {"params": list(self.encoder.parameters())},
            {"params": heads, "lr_mult": HEAD_LR_MULT},
        ]


def build_pspnet(
    depth: int | str = 101,
    num_classes: int = 21,
    bins: Sequence[int] = (1, 2, 3, 6),
    dropout: float = 0.1,
    aux: bool = True,
) -> PSPNet:
    """PSPNet with a dilated ResNet-``depth`` (random init; ``model.net.pretrained`` is loaded
    into ``model.encoder`` by the training entry point, as for CRM)."""
    return PSPNet(DilatedResNet(depth), num_classes, tuple(int(b) for b in bins), dropout, aux)
