"""Training losses: soft Dice + cross-entropy (softmax) or + binary cross-entropy (sigmoid regions), with
deep supervision. Dice is computed over the whole batch for 3D (batch Dice: tiny structures in one sample do not
dominate), per sample for 2D."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def deep_supervision_weights(n: int) -> list[float]:
    """Weight of each output, highest resolution first: halving per scale, normalised to sum to 1."""
    w = [0.5**i for i in range(n)]
    return [v / sum(w) for v in w]


def soft_dice(probs: torch.Tensor, onehot: torch.Tensor, batch_dice: bool, smooth: float = 1e-5) -> torch.Tensor:
    """Mean soft Dice over foreground channels (channel 0 is background for softmax, kept for regions)."""
    axes = [0] + list(range(2, probs.ndim)) if batch_dice else list(range(2, probs.ndim))
    inter = (probs * onehot).sum(axes)
    denom = probs.sum(axes) + onehot.sum(axes)
    return ((2 * inter + smooth) / (denom + smooth).clamp_min(1e-8)).mean()


class SegmentationLoss(nn.Module):
    """Dice + CE on every deep-supervision output; ``regions=True`` switches to sigmoid outputs and BCE."""

    def __init__(self, n_outputs: int, batch_dice: bool, regions: bool = False):
        super().__init__()
        self.weights = deep_supervision_weights(n_outputs)
        self.batch_dice, self.regions = batch_dice, regions

    def _single(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.regions:
            probs = torch.sigmoid(logits)
            return F.binary_cross_entropy_with_logits(logits, target) + 1 - soft_dice(probs, target, self.batch_dice)
        labels = target[:, 0].long()
        probs = torch.softmax(logits, 1)
        onehot = F.one_hot(labels, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
        dice = soft_dice(probs[:, 1:], onehot[:, 1:], self.batch_dice)
        return F.cross_entropy(logits, labels) + 1 - dice

    def forward(self, outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
        return sum(w * self._single(o, t) for w, o, t in zip(self.weights, outputs, targets))
