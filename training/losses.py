"""Segmentation losses: Tversky and Dice + cross-entropy, with class weights.

Tversky index per class ``TP / (TP + alpha FP + beta FN)``; alpha > beta penalises false
positives more (the original report found alpha 0.85, beta 0.15 best on its data).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

LOSSES = ("dicece", "tversky", "tverskyce")


def _soft_counts(logits: torch.Tensor, target: torch.Tensor):
    prob = torch.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.long(), prob.shape[1]).movedim(-1, 1).float()
    dims = tuple([0] + list(range(2, prob.ndim)))
    tp = (prob * onehot).sum(dims)
    fp = (prob * (1 - onehot)).sum(dims)
    fn = ((1 - prob) * onehot).sum(dims)
    return tp, fp, fn, onehot.sum(dims)


def tversky_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.85, beta: float = 0.15,
                 weights: Optional[torch.Tensor] = None, smooth: float = 1.0) -> torch.Tensor:
    """1 - Tversky index, averaged over the foreground classes present in the batch
    (weighted by ``weights`` when given)."""
    tp, fp, fn, n = _soft_counts(logits, target)
    index = (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)
    present = (n[1:] > 0).float()
    w = present if weights is None else present * weights[1:]
    return 1 - (index[1:] * w).sum() / w.sum().clamp_min(1e-6)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "dicece",
                      alpha: float = 0.85, beta: float = 0.15,
                      class_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``dicece``: soft Dice + CE; ``tversky``: Tversky alone; ``tverskyce``: both.

    ``class_weights`` weight the classes' terms of the Dice/Tversky average only (small
    regions count as much as large ones). The cross-entropy stays unweighted: weighting
    it scales each class's odds at the optimum by its weight, and with the background
    weighted ~20x below the regions the first bundled models grew every region by
    20-50% into the background (held-out FP/FN ratios of 3-14).
    """
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; use one of {LOSSES}")
    if kind == "dicece":
        region = tversky_loss(logits, target, 0.5, 0.5, class_weights)
    else:
        region = tversky_loss(logits, target, alpha, beta, class_weights)
    if kind == "tversky":
        return region
    return region + F.cross_entropy(logits.float(), target.long())
