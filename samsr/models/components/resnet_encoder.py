"""CRM's ResNet encoder: a ``in_channels``-channel stem, layer3 dilated to stride 8, no layer4.

Reference facts (dvlab-research/Entity, High-Quality-Segmention/models/network/extractors.py):

* the stem is conv7x7/2 (4 input channels) + BN + ReLU; its output (stride 2, *before* the max
  pool) is the first feature returned;
* layer1 (stride 4) and layer3 are the other two features; layer3 has stride 1 and dilation 2 on
  every block except its first (which keeps dilation 1), exactly torchvision's
  ``replace_stride_with_dilation`` rule; the 1x1 downsample of layer3 has stride 1;
* layer4 is computed by the reference and discarded: it is not built here;
* ImageNet weights: RGB filters copied to the first 3 input channels, the extra ones zero
  (``load_weights_sequential``); BN ``num_batches_tracked`` buffers are not copied.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["ResNetEncoder"]

_BOTTLENECK_ARCHS = ("resnet50", "resnet101")
_BASIC_ARCHS = ("resnet18", "resnet34")
_ARCHS = _BASIC_ARCHS + _BOTTLENECK_ARCHS
_BUILT = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")
_IGNORED = ("layer4.", "fc.")  # present in torchvision files, not used by CRM


def _imagenet_hint(arch: str) -> str:
    return (
        f"torchvision's ImageNet '{arch}' state dict, e.g. saved with "
        f"`torch.save(torchvision.models.{arch}(weights='IMAGENET1K_V1').state_dict(), path)` "
        "or downloaded from https://download.pytorch.org/models/ (pass pretrained='imagenet' to "
        "let torchvision download it on a machine with network access)"
    )


def imagenet_url(arch: str) -> str:
    """The download address of torchvision's IMAGENET1K_V1 weights of ``arch``."""
    from torchvision.models import get_model_weights

    return str(get_model_weights(arch)["IMAGENET1K_V1"].url)


def _sha256_prefix_ok(path: Path) -> bool:
    """torch.hub's rule: the hex after the last '-' of the stem starts the file's SHA-256."""
    prefix = path.stem.rsplit("-", 1)[-1]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest().startswith(prefix)


def _imagenet_state(arch: str, search_dirs: Sequence[str | Path]) -> tuple[dict, str]:
    """torchvision's IMAGENET1K_V1 state dict of ``arch``: a local copy, else the download."""
    url = imagenet_url(arch)
    name = url.rsplit("/", 1)[-1]
    for folder in search_dirs:
        path = Path(folder).expanduser() / name
        if path.is_file():
            if not _sha256_prefix_ok(path):
                raise ValueError(
                    f"{path} does not match its release hash (corrupt or partial download); "
                    f"delete it and download {url} again."
                )
            return torch.load(path, map_location="cpu", weights_only=True), str(path)
    from torch.hub import load_state_dict_from_url

    try:
        state = load_state_dict_from_url(url, progress=True, check_hash=True, weights_only=True)
    except Exception as err:  # noqa: BLE001 - no network, proxy, hash mismatch ...
        where = " or ".join(str(Path(d) / name) for d in search_dirs) or name
        raise FileNotFoundError(
            f"ImageNet weights for {arch} are not on this machine and could not be downloaded "
            f"({type(err).__name__}: {err}). Download {url} on a connected machine and put it "
            f"at {where}, or pass model.net.pretrained=<file>, or model.net.pretrained=null for "
            "random init."
        ) from err
    return state, f"torchvision {arch} IMAGENET1K_V1 ({url})"


def read_imagenet_state(
    arch: str, source: str, search_dirs: Sequence[str | Path] = ()
) -> tuple[dict, str]:
    """``(state dict, where it came from)`` of torchvision's ImageNet ``arch``: ``source`` is
    ``"imagenet"`` (the release file in one of ``search_dirs``, else the download) or a path.

    Raises:
        FileNotFoundError: If the file does not exist or the weights cannot be downloaded.
    """
    if source == "imagenet":
        return _imagenet_state(arch, search_dirs)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Pretrained encoder weights not found: {path}. Expected {_imagenet_hint(arch)}."
        )
    return torch.load(path, map_location="cpu", weights_only=True), str(path)


def _dilate_basic_layer(layer: nn.Sequential, dilation: int) -> None:
    """Turns a stride-2 layer of BasicBlocks into a stride-1 dilated one, in place.

    torchvision refuses dilation for BasicBlock, so the convolutions are edited directly with the
    reference's rule: first block stride 1 / dilation 1, later blocks dilation (and padding)
    ``dilation`` on both 3x3 convs.
    """
    first = layer[0]
    first.conv1.stride = (1, 1)  # ref extractors.py: layer3 built with stride=1
    first.stride = 1
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)  # ref: 1x1 downsample conv with stride 1
    for block in list(layer)[1:]:
        for conv in (block.conv1, block.conv2):
            conv.dilation = (dilation, dilation)  # ref conv3x3: padding = dilation
            conv.padding = (dilation, dilation)


class ResNetEncoder(nn.Module):
    """ResNet trunk of CRM returning the stride-2, stride-4 and stride-8 features.

    Args:
        arch: ``resnet18``, ``resnet34``, ``resnet50`` or ``resnet101`` (torchvision classes).
        in_channels: input channels of the first conv (3 RGB + mask + extras; >= 3).
        pretrained: None (random init), a path to a local torchvision ImageNet state dict, or
            ``"imagenet"`` for the IMAGENET1K_V1 weights (the ones the reference used; see
            :meth:`load_imagenet`). samsr's engine builds with None and loads ImageNet weights
            only when training starts from scratch.

    Attributes:
        out_channels: channels of (conv1, layer1, layer3): (64, 256, 1024) for ResNet-50/101,
            (64, 64, 256) for ResNet-18/34.
    """

    def __init__(
        self, arch: str = "resnet50", in_channels: int = 4, pretrained: str | None = None
    ) -> None:
        super().__init__()
        if arch not in _ARCHS:
            raise ValueError(f"Unknown encoder arch {arch!r}; expected one of {_ARCHS}.")
        if in_channels < 3:
            raise ValueError(f"in_channels must be >= 3 (RGB first), got {in_channels}.")
        from torchvision.models import resnet as tv_resnet  # lazy: keeps `import samsr` light

        bottleneck = arch in _BOTTLENECK_ARCHS
        net = getattr(tv_resnet, arch)(
            weights=None, replace_stride_with_dilation=[False, bottleneck, False]
        )
        if not bottleneck:
            _dilate_basic_layer(net.layer3, dilation=2)

        self.arch = arch
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = net.bn1
        self.relu = net.relu
        self.maxpool = net.maxpool
        self.layer1 = net.layer1
        self.layer2 = net.layer2
        self.layer3 = net.layer3
        expansion = 4 if bottleneck else 1
        self.out_channels: tuple[int, int, int] = (64, 64 * expansion, 256 * expansion)
        del net  # layer4 and fc are never registered

        if pretrained is not None:
            self.load_imagenet(pretrained)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Encodes the normalised input.

        Args:
            x: B x in_channels x H x W, normalised image + mask (+ extra channels).

        Returns:
            (f1, f2, f3): B x 64 x ceil(H/2) x ceil(W/2) (after conv1+BN+ReLU, before the max
            pool), B x out_channels[1] x H/4 x W/4 (layer1), B x out_channels[2] x H/8 x W/8
            (dilated layer3); exact sizes follow the conv arithmetic.
        """
        f1 = self.relu(self.bn1(self.conv1(x)))
        f2 = self.layer1(self.maxpool(f1))
        f3 = self.layer3(self.layer2(f2))
        return f1, f2, f3

    strides: tuple[int, int, int] = (2, 4, 8)

    @staticmethod
    def level_sizes(h: int, w: int) -> list[tuple[int, int]]:
        """(h, w) of the (f1, f2, f3) maps for an h x w input (the convolution arithmetic)."""
        h1, w1 = (h - 1) // 2 + 1, (w - 1) // 2 + 1  # conv 7x7/2, pad 3
        h2, w2 = (h1 - 1) // 2 + 1, (w1 - 1) // 2 + 1  # max pool 3x3/2, pad 1
        h3, w3 = (h2 - 1) // 2 + 1, (w2 - 1) // 2 + 1  # layer2: 3x3/2, pad 1
        return [(h1, w1), (h2, w2), (h3, w3)]

    def load_imagenet(self, source: str, search_dirs: Sequence[str | Path] = ()) -> None:
        """Loads torchvision ImageNet weights (RGB filters to channels 0-2, extras zero).

        Args:
            source: a path to a local torchvision state dict file, or ``"imagenet"`` for
                torchvision's IMAGENET1K_V1 weights (the reference's): the file under its
                release name (e.g. ``resnet50-0676ba61.pth``) in one of ``search_dirs`` if there,
                its SHA-256 prefix checked, else torchvision's download (hash checked, cached).
            search_dirs: folders to look in first for ``"imagenet"`` (e.g. ``checkpoints/``).

        Raises:
            FileNotFoundError: If the file does not exist or the weights cannot be downloaded
                (the message says where to put the file).
            ValueError: If the file does not hold this arch's torchvision state dict.
        """
        self.load_rgb_state_dict(*read_imagenet_state(self.arch, source, search_dirs))

    def load_rgb_state_dict(self, state: Mapping[str, Tensor], origin: str = "state dict") -> None:
        """Loads a torchvision ResNet state dict with 3-channel conv1 (strict, explicit keys).

        Keys ``layer4.*`` and ``fc.*`` are ignored; any other unknown or missing key is an error.
        ``num_batches_tracked`` buffers keep their current value (the reference skips them).

        Args:
            state: torchvision ResNet state dict (keys ``conv1.weight``, ``layer1.0.conv1.weight``
                ...).
            origin: where the state dict came from, for error messages.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"{origin} is not a state dict (got {type(state).__name__}).")
        own = self.state_dict()
        unexpected = [
            k
            for k in state
            if k not in own and not k.startswith(_IGNORED) and not k.endswith("num_batches_tracked")
        ]
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        if unexpected or missing:
            raise ValueError(
                f"{origin} does not look like a torchvision {self.arch} state dict: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}."
            )
        new_state: dict[str, Tensor] = {}
        for key, value in own.items():
            if key.endswith("num_batches_tracked"):
                new_state[key] = value
                continue
            src = state[key]
            if key == "conv1.weight":
                if src.shape[1] != 3 or src.shape[0] != value.shape[0]:
                    raise ValueError(f"{origin}: conv1.weight has shape {tuple(src.shape)}.")
                # ref load_weights_sequential: pretrained RGB filters, zeros for extra channels
                src = torch.cat([src, src.new_zeros((src.shape[0], value.shape[1] - 3, 7, 7))], 1)
            if src.shape != value.shape:
                raise ValueError(
                    f"{origin}: {key} has shape {tuple(src.shape)}, expected {tuple(value.shape)} "
                    f"(is it a {self.arch} state dict?)."
                )
            new_state[key] = src.to(value.dtype)
        self.load_state_dict(new_state, strict=True)
