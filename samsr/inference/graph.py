"""Inference-time graph work on a trained model: BatchNorm folded into the convolution before it.

In eval mode a BatchNorm after a convolution is an affine map per channel, so it can be folded into
the convolution's weight and bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``): one pass over
each feature map instead of two, the same function up to float rounding. The folded pairs are the
ones where the BatchNorm reads the convolution's output directly:

* CRM's encoder: the stem (``conv1``/``bn1``), every torchvision BasicBlock/Bottleneck
  (``conv1``/``bn1``, ``conv2``/``bn2``, ``conv3``/``bn3``) and every ``downsample``;
* CRM's fusion: each level's 1x1 conv and its first BatchNorm (the second one follows a ReLU and
  stays), and the 3x3 fuse conv with its BatchNorm;
* any ``nn.Sequential`` holding a Conv2d directly followed by a BatchNorm2d (SAM-SR v3's local
  encoder and fuser).
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.resnet import BasicBlock, Bottleneck

from samsr.models.components.fusion import Fusion, _Branch
from samsr.models.components.resnet_encoder import ResNetEncoder

__all__ = ["fold_batchnorm", "folded_copy"]

_PAIRS: dict[type, tuple[tuple[str, str], ...]] = {
    ResNetEncoder: (("conv1", "bn1"),),
    BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
    Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    _Branch: (("conv", "bn1"),),
    Fusion: (("fuse_conv", "fuse_bn"),),
}


def _fold_pair(owner: nn.Module, conv_name: str, bn_name: str) -> int:
    conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
        return 0  # already folded (Identity) or not a conv-BN pair
    setattr(owner, conv_name, fuse_conv_bn_eval(conv, bn))
    setattr(owner, bn_name, nn.Identity())
    return 1


def fold_batchnorm(model: nn.Module) -> int:
    """Folds every conv-BN pair of ``model`` (in eval mode) in place; returns how many.

    The folded model is for inference only: its BatchNorms are gone, so it must not be trained.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (call model.eval() first).")
    folded = 0
    for module in list(model.modules()):
        for kind, pairs in _PAIRS.items():
            if isinstance(module, kind):
                folded += sum(_fold_pair(module, c, b) for c, b in pairs)
        if isinstance(module, nn.Sequential):
            items = list(module)
            for i in range(len(items) - 1):
                conv, bn = items[i], items[i + 1]
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    module[i] = fuse_conv_bn_eval(conv, bn)
                    module[i + 1] = nn.Identity()
                    folded += 1
    return folded


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.BatchNorm2d) for m in module.modules())


def folded_copy(model: nn.Module) -> nn.Module:
    """An inference copy of ``model`` (eval mode) with BatchNorm folded; ``model`` is untouched.

    Only the top-level children holding a BatchNorm are copied; the others (e.g. a SAM-guided
    model's frozen ViT) are shared with ``model``, so no second copy of a large backbone is made.
    """
    if model.training:
        raise ValueError("folded_copy needs a model in eval mode (call model.eval() first).")
    new = copy.copy(model)
    new._modules = dict(model._modules)  # a shallow copy shares the child dict: unshare it
    for name, child in model.named_children():
        if _has_batchnorm(child):
            child = copy.deepcopy(child)
            fold_batchnorm(child)
            new._modules[name] = child
    return new
