"""Eq. 5 of the paper as the authors implemented it: L = Dice·Jaccard / (Dice + Jaccard).

The details are the released code's (MODEL_SPEC.md §1): Dice is one scalar
over the whole batch with smooth 1; "Jaccard" is per pixel with smooth 100 and
scaled by 100, so it behaves like an L1 term; the product/sum is averaged over
pixels. ``eps`` guards the 0/0 where both vanish. An optional ``valid`` mask
drops pixels outside an annotated region from every sum and mean, so that
unannotated tissue is not taught as background.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-7


def dice_distance(target: torch.Tensor, prob: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """1 - (2·Σtp + 1) / (Σt + Σp + 1), one scalar over the batch."""
    if valid is not None:
        target, prob = target * valid, prob * valid
    intersection = (target * prob).sum()
    return 1.0 - (2.0 * intersection + 1.0) / (target.sum() + prob.sum() + 1.0)


def jaccard_distance_map(target: torch.Tensor, prob: torch.Tensor, smooth: float = 100.0) -> torch.Tensor:
    """Per-pixel 100·(1 − (tp + s)/(t + p − tp + s))."""
    intersection = target * prob
    return 100.0 * (1.0 - (intersection + smooth) / (target + prob - intersection + smooth))


def dan_nucnet_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None, eps: float = EPS
) -> torch.Tensor:
    """Eq. 5 on logits (B×1×H×W), target in {0, 1}, optional valid mask of the same shape."""
    prob = torch.sigmoid(logits.float())
    target = target.float()
    d = dice_distance(target, prob, valid)
    j = jaccard_distance_map(target, prob)
    per_pixel = j * d / (j + d + eps)
    if valid is None:
        return per_pixel.mean()
    valid = valid.float()
    return (per_pixel * valid).sum() / valid.sum().clamp_min(1.0)


def bce_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Ablation (Table 5): plain binary cross-entropy instead of Eq. 5."""
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    if valid is None:
        return per_pixel.mean()
    valid = valid.float()
    return (per_pixel * valid).sum() / valid.sum().clamp_min(1.0)


LOSSES = {"dan": dan_nucnet_loss, "bce": bce_loss}
