"""Training losses: focal loss (the paper's, gamma 2) and plain cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("focal", "cross_entropy")


class FocalLoss(nn.Module):
    """Multi-class focal loss ``-(1 - p_t)^gamma * log p_t``, averaged over the batch (Lin et al. 2017).

    With ``gamma = 0`` it equals cross-entropy; larger gamma down-weights samples already classified
    well, which is why the paper used it.
    """

    def __init__(self, gamma: float = 2.0):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal loss gamma must be >= 0, got {gamma}")
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=-1).gather(1, target.view(-1, 1)).squeeze(1)
        weight = (1 - log_p.exp()).clamp_min(0) ** self.gamma
        return -(weight * log_p).mean()


def make_loss(name: str, focal_gamma: float = 2.0) -> nn.Module:
    """The loss called ``name`` (``focal`` or ``cross_entropy``)."""
    if name == "focal":
        return FocalLoss(focal_gamma)
    if name == "cross_entropy":
        return nn.CrossEntropyLoss()
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
