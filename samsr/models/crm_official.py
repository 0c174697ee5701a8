"""Loading the official CRM checkpoint (``model_45705``) into :class:`samsr.models.crm.CRM`.

The release is ``torch.save(model.state_dict())`` of ``nn.DataParallel(CRMNet('resnet50'))``
(dvlab-research/Entity, High-Quality-Segmention: train.py, util/model_saver.py), so every key starts
with ``module.``. Module names in the reference (models/network/crm.py, aspp.py, extractors.py):

===========================================  ===========================================
official (after ``module.``)                  samsr
===========================================  ===========================================
``feats.{conv1,bn1,layer1,layer2,layer3}.*``  ``encoder.{conv1,bn1,layer1,layer2,layer3}.*``
``feats.layer4.*``                           dropped (computed and discarded by the reference)
``aspp_.aspp1_128.atrous_conv.*``            ``fusion.branches.0.conv.*``
``aspp_.aspp1_128.bn.*``                     ``fusion.branches.0.bn1.*``
``aspp_.bn1_128.*``                          ``fusion.branches.0.bn2.*``
(``_256`` -> branch 1, ``_1024`` -> branch 2)
``aspp_.last_conv.0.*`` / ``last_conv.1.*``  ``fusion.fuse_conv.*`` / ``fusion.fuse_bn.*``
``imnet.layers.{i}.*``                       ``decoder.mlp.{i}.*``
===========================================  ===========================================

Any other key is an error. The checkpoint is a ResNet-50 model: build ``build_crm("resnet50")``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "OFFICIAL_CHECKPOINT_HINT",
    "convert_official_crm",
    "load_official_crm",
    "official_key",
    "samsr_key",
]

OFFICIAL_CHECKPOINT_HINT = (
    "the official CRM checkpoint 'model_45705' (ResNet-50, 93 MB) is linked from the README of "
    "https://github.com/dvlab-research/Entity/tree/main/High-Quality-Segmention "
    "('Pretrained weights of CRM', OneDrive); download it by hand and pass its local path"
)

_DP_PREFIX = "module."  # nn.DataParallel wrapper
_DROPPED = ("feats.layer4.",)
# official prefix -> samsr prefix; matched in order, the first hit wins
_PREFIX_MAP: tuple[tuple[str, str], ...] = (
    ("feats.conv1.", "encoder.conv1."),
    ("feats.bn1.", "encoder.bn1."),
    ("feats.layer1.", "encoder.layer1."),
    ("feats.layer2.", "encoder.layer2."),
    ("feats.layer3.", "encoder.layer3."),
    ("aspp_.aspp1_128.atrous_conv.", "fusion.branches.0.conv."),
    ("aspp_.aspp1_128.bn.", "fusion.branches.0.bn1."),
    ("aspp_.bn1_128.", "fusion.branches.0.bn2."),
    ("aspp_.aspp1_256.atrous_conv.", "fusion.branches.1.conv."),
    ("aspp_.aspp1_256.bn.", "fusion.branches.1.bn1."),
    ("aspp_.bn1_256.", "fusion.branches.1.bn2."),
    ("aspp_.aspp1_1024.atrous_conv.", "fusion.branches.2.conv."),
    ("aspp_.aspp1_1024.bn.", "fusion.branches.2.bn1."),
    ("aspp_.bn1_1024.", "fusion.branches.2.bn2."),
    ("aspp_.last_conv.0.", "fusion.fuse_conv."),
    ("aspp_.last_conv.1.", "fusion.fuse_bn."),
    ("imnet.layers.", "decoder.mlp."),
)


def samsr_key(key: str) -> str | None:
    """Maps one official key (with or without ``module.``) to ours.

    Returns:
        The samsr key, or None for a key that is deliberately dropped (layer4).

    Raises:
        KeyError: If the key is not part of the official CRM network.
    """
    name = key.removeprefix(_DP_PREFIX)
    if name.startswith(_DROPPED):
        return None
    for official, ours in _PREFIX_MAP:
        if name.startswith(official):
            return ours + name[len(official) :]
    raise KeyError(key)


def official_key(key: str) -> str:
    """Maps one samsr key to the official (``module.``-prefixed) key: the inverse of
    :func:`samsr_key`, used to export weights to the reference code and in tests.
    """
    for official, ours in _PREFIX_MAP:
        if key.startswith(ours):
            return _DP_PREFIX + official + key[len(ours) :]
    raise KeyError(key)


def convert_official_crm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Converts an official CRM state dict to samsr's key names.

    ``feats.layer4.*`` is dropped. BatchNorm ``num_batches_tracked`` buffers missing from an old
    checkpoint are filled with 0 so that a strict load works.

    Args:
        state_dict: the official state dict (keys with or without the ``module.`` prefix).

    Returns:
        A state dict for ``CRM`` built by ``build_crm("resnet50")``; load it with ``strict=True``.

    Raises:
        KeyError: Listing every key that has no mapping.
    """
    out: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for key, value in state_dict.items():
        try:
            new_key = samsr_key(key)
        except KeyError:
            unmapped.append(key)
            continue
        if new_key is not None:
            out[new_key] = value
    if unmapped:
        raise KeyError(
            f"{len(unmapped)} key(s) of the checkpoint have no mapping to samsr's CRM (is it the "
            f"official CRM release?): {unmapped}"
        )
    for key in list(out):
        if key.endswith(".running_mean"):
            tracked = key[: -len("running_mean")] + "num_batches_tracked"
            out.setdefault(tracked, torch.tensor(0, dtype=torch.long))
    return out


def load_official_crm(path: str | Path, model: nn.Module) -> None:
    """Loads the official CRM checkpoint into ``model`` (CPU load, explicit key map, strict).

    Args:
        path: local path of ``model_45705``.
        model: a ``CRM`` from ``build_crm("resnet50")``.

    Raises:
        FileNotFoundError: If the file is missing (the message says where to get it).
        KeyError: If the file holds keys that are not CRM's.
        ValueError: If the weights do not fit the model (e.g. another backbone).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"CRM checkpoint not found: {path}; {OFFICIAL_CHECKPOINT_HINT}.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} is not a state dict (got {type(state).__name__}).")
    converted = convert_official_crm(state)
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"The weights in {path} do not fit this model (the official CRM is "
            f'build_crm("resnet50", in_channels=4)): {err}'
        ) from err
