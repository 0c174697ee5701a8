"""How the coarse mask enters SAM's image tokens (SAM-SR v3.1-v3.4).

* ``none`` (v3.1): the tokens are left as SAM computed them;
* ``add`` (v3.2): a CNN mask encoder's embedding is added to them;
* ``global`` (v3.3): every image token gathers mask features (the mask encoder's tokens), weighted
  by its attention to the other *image* tokens (multi-head; queries and keys from the image,
  values from the mask), and the result is added back;
* ``window`` (v3.4): the same attention restricted to non-overlapping ``window x window`` blocks of
  the grid (padded keys are masked out, so a window covering the grid is the global block).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["INJECTIONS", "MaskAttention", "MaskEncoder", "MaskInjection"]

INJECTIONS = ("none", "add", "global", "window")


class _LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a B x C x H x W map (as SAM's mask downscaling)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MaskEncoder(nn.Module):
    """CNN from a mask in SAM's frame to one embedding per token (like SAM's dense prompt).

    Two 2x2 stride-2 convs (LayerNorm + GELU), then a 1x1 conv to ``dim`` channels.
    Input B x 1 x 4gh x 4gw in [-1, 1]; output B x dim x gh x gw.
    """

    def __init__(self, dim: int, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, hidden, 2, stride=2),
            _LayerNorm2d(hidden),
            nn.GELU(),
            nn.Conv2d(hidden, hidden * 4, 2, stride=2),
            _LayerNorm2d(hidden * 4),
            nn.GELU(),
            nn.Conv2d(hidden * 4, dim, 1),
        )

    def forward(self, mask: Tensor) -> Tensor:
        return self.net(mask)


def _partition(x: Tensor, window: int) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """B x gh x gw x C -> (B * nW) x window^2 x C windows, their key mask, padded grid size."""
    b, gh, gw, _ = x.shape
    ph, pw = -(-gh // window) * window, -(-gw // window) * window
    valid = torch.zeros((1, ph, pw, 1), dtype=torch.bool, device=x.device)
    valid[:, :gh, :gw] = True
    x = F.pad(x, (0, 0, 0, pw - gw, 0, ph - gh))

    def split(t: Tensor) -> Tensor:
        t = t.reshape(t.shape[0], ph // window, window, pw // window, window, t.shape[-1])
        return t.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, t.shape[-1])

    keys = split(valid.expand(b, -1, -1, -1))[..., 0]  # (B * nW) x window^2, True = real token
    return split(x), keys, (ph, pw)


def _merge(x: Tensor, window: int, padded: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """(B * nW) x window^2 x C -> B x gh x gw x C (inverse of :func:`_partition`)."""
    ph, pw = padded
    c = x.shape[-1]
    x = x.view(-1, ph // window, pw // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ph, pw, c)[:, : grid[0], : grid[1]]


class MaskAttention(nn.Module):
    """Image tokens gather mask features: ``x + proj(softmax(q(x) k(x)^T / sqrt(d)) v(m))``.

    Args:
        dim: token channels (256 for SAM).
        heads: attention heads (``dim`` must divide by it).
        window: None for global attention over the whole grid, else the window side.
    """

    def __init__(self, dim: int, heads: int = 8, window: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"token channels ({dim}) must be divisible by heads ({heads}).")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 token, got {window}.")
        self.heads = heads
        self.window = window
        self.norm_image = nn.LayerNorm(dim)
        self.norm_mask = nn.LayerNorm(dim)
        self.qk = nn.Linear(dim, 2 * dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, image: Tensor, mask: Tensor) -> Tensor:
        """Args: image, mask: B x C x gh x gw tokens. Returns B x C x gh x gw."""
        b, c, gh, gw = image.shape
        x = image.permute(0, 2, 3, 1)
        m = mask.permute(0, 2, 3, 1)
        q, k = self.qk(self.norm_image(x)).chunk(2, dim=-1)
        v = self.v(self.norm_mask(m))
        qkv = torch.cat([q, k, v], dim=-1)
        if self.window is None:
            qkv, keys = qkv.reshape(b, gh * gw, 3 * c), None
        else:
            qkv, keys, padded = _partition(qkv, self.window)
        parts = qkv.chunk(3, dim=-1)
        n, length = qkv.shape[:2]
        q, k, v = (t.reshape(n, length, self.heads, c // self.heads).transpose(1, 2) for t in parts)
        attn_mask = None if keys is None else keys[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.proj(out.transpose(1, 2).reshape(n, length, c))
        if self.window is None:
            out = out.view(b, gh, gw, c)
        else:
            out = _merge(out, self.window, padded, (gh, gw))
        return image + out.permute(0, 3, 1, 2)


class MaskInjection(nn.Module):
    """One of :data:`INJECTIONS` applied to SAM's tokens.

    Args:
        kind: ``none`` | ``add`` | ``global`` | ``window``.
        dim: token channels.
        heads: attention heads (``global`` / ``window``).
        window: window side in tokens (``window``).
    """

    def __init__(self, kind: str, dim: int, heads: int = 8, window: int = 16) -> None:
        super().__init__()
        if kind not in INJECTIONS:
            raise ValueError(f"mask injection must be one of {INJECTIONS}, got {kind!r}.")
        self.kind = kind
        self.mask_encoder = MaskEncoder(dim) if kind != "none" else None
        self.attention = (
            MaskAttention(dim, heads, window if kind == "window" else None)
            if kind in ("global", "window")
            else None
        )

    @property
    def uses_mask(self) -> bool:
        return self.kind != "none"

    def forward(self, tokens: Tensor, mask: Tensor | None) -> Tensor:
        """Args: tokens B x C x gh x gw; mask B x 1 x 4gh x 4gw in [-1, 1] (None for ``none``)."""
        if self.mask_encoder is None:
            return tokens
        if mask is None:
            raise ValueError(f"mask injection '{self.kind}' needs the mask.")
        embedded = self.mask_encoder(mask)
        if self.attention is None:
            return tokens + embedded
        return self.attention(tokens, embedded)
