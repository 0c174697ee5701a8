"""CRM's training loss: BCE on logits + L1 + L2 on probabilities + Sobel gradient loss.

Reference facts (dvlab-research/Entity, High-Quality-Segmention: util/metrics_compute_crm.py,
models/sobel_op.py, README training command):

* ``bce = binary_cross_entropy_with_logits(logits, (gt > 0.5).float())`` (mean);
* ``l1 = l1_loss(prob, gt)``, ``l2 = mse_loss(prob, gt)`` against the raw (possibly soft) GT;
* gradient: 3x3 average pool (stride 1, zero padding 1, padded zeros counted), then Sobel
  kernels ``[[1, 0, -1], [2, 0, -2], [1, 0, -1]] / 4`` (x) and its transpose with rows
  ``[1, 2, 1], [0, 0, 0], [-1, -2, -1]`` / 4 (y) as cross-correlation with zero padding 1;
  magnitude ``sqrt(gx^2 + gy^2 + 1e-4)``; ``grad = l1_loss(sobel(gt), sobel(prob))`` (mean);
* weights used for the released model (README): ce 1.0, l1 0.5, l2 0.5, grad 2.0 (the script's
  argparse defaults differ: ce 0, l1 1, l2 1, grad 5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RefinementLoss", "SegmentationLoss", "sobel_magnitude"]

_SOBEL_EPS = 1e-4  # ref SobelComputer: SobelOperator(1e-4)


def _sobel_kernels() -> Tensor:
    kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]) / 4
    ky = torch.tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]) / 4
    return torch.stack([kx, ky]).unsqueeze(1)  # 2 x 1 x 3 x 3


def sobel_magnitude(x: Tensor, kernels: Tensor | None = None, eps: float = _SOBEL_EPS) -> Tensor:
    """Smoothed Sobel gradient magnitude of each channel.

    Args:
        x: B x C x H x W map (probabilities or GT).
        kernels: 2 x 1 x 3 x 3 (x, y) Sobel kernels; built if None.
        eps: added under the square root.

    Returns:
        B x C x H x W, ``sqrt(gx^2 + gy^2 + eps)`` of the 3x3 average-pooled map.
    """
    b, c, h, w = x.shape
    if kernels is None:
        kernels = _sobel_kernels().to(device=x.device, dtype=x.dtype)
    x = x.reshape(b * c, 1, h, w)
    x = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)  # ref: count_include_pad default
    g = F.conv2d(x, kernels.to(device=x.device, dtype=x.dtype), padding=1)
    mag = torch.sqrt(g[:, :1] ** 2 + g[:, 1:] ** 2 + eps)
    return mag.view(b, c, h, w)


class RefinementLoss(nn.Module):
    """Weighted sum of BCE, L1, L2 and gradient losses (CRM / CascadePSP style).

    Args:
        bce: weight of BCE-with-logits against the binarised GT.
        l1: weight of L1 between probability and GT.
        l2: weight of MSE between probability and GT.
        grad: weight of L1 between the Sobel magnitudes of probability and GT.
    """

    def __init__(self, bce: float = 1.0, l1: float = 0.5, l2: float = 0.5, grad: float = 2.0):
        super().__init__()
        self.weights = {"bce": float(bce), "l1": float(l1), "l2": float(l2), "grad": float(grad)}
        self.register_buffer("sobel_kernels", _sobel_kernels(), persistent=False)

    def forward(self, logits: Tensor, gt: Tensor) -> dict[str, Tensor]:
        """Computes every term and the weighted total (float32).

        Args:
            logits: B x 1 x H x W logits.
            gt: B x 1 x H x W ground truth in {0, 1} (soft values allowed).

        Returns:
            Dict with scalar ``bce``, ``l1``, ``l2``, ``grad`` (unweighted) and ``total``.
        """
        if logits.shape != gt.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} and gt {tuple(gt.shape)} must have the same shape."
            )
        logits = logits.float()
        gt = gt.float()
        prob = torch.sigmoid(logits)
        terms = {
            "bce": F.binary_cross_entropy_with_logits(logits, (gt > 0.5).float()),
            "l1": F.l1_loss(prob, gt),
            "l2": F.mse_loss(prob, gt),
            "grad": F.l1_loss(
                sobel_magnitude(gt, self.sobel_kernels), sobel_magnitude(prob, self.sobel_kernels)
            ),
        }
        total = sum(self.weights[k] * v for k, v in terms.items())
        assert isinstance(total, Tensor)
        terms["total"] = total
        return terms


class SegmentationLoss(nn.Module):
    """PSPNet's training loss: cross-entropy of the main logits plus ``aux_weight`` times that of
    the auxiliary head's (hszhao/semseg: 0.4), pixels labelled ``ignore_index`` left out.

    Args:
        aux_weight: weight of the auxiliary loss (0: main loss only).
        ignore_index: the label of unlabelled pixels (255: VOC's object borders and padding).
    """

    def __init__(self, aux_weight: float = 0.4, ignore_index: int = 255) -> None:
        super().__init__()
        if aux_weight < 0:
            raise ValueError(f"model.loss.aux_weight must be >= 0, got {aux_weight}.")
        self.aux_weight = float(aux_weight)
        self.ignore_index = int(ignore_index)

    def forward(
        self, logits: Tensor, target: Tensor, aux: Tensor | None = None
    ) -> dict[str, Tensor]:
        """``logits`` (and ``aux``): B x K x H x W; ``target``: B x H x W class indices (int64).

        Returns:
            ``{"total", "main"}`` and ``"aux"`` when ``aux`` is given (scalars).
        """
        target = target.long()
        main = F.cross_entropy(logits, target, ignore_index=self.ignore_index)
        out = {"total": main, "main": main}
        if aux is not None and self.aux_weight > 0:
            out["aux"] = F.cross_entropy(aux, target, ignore_index=self.ignore_index)
            out["total"] = main + self.aux_weight * out["aux"]
        return out
