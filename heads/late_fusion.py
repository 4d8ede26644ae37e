"""The paper's CLIP Late Fusion Network (Table 1), for any number of input feature sets.

One branch per input, ``Linear(d, 512) - BatchNorm1d(512) - ReLU - Dropout(0.2) - Linear(512, 256)``;
the branch outputs are concatenated and go through ``Linear(256 * k, 128) - Linear(128, n_classes)``
(no activation between those two, as in Table 1). With inputs (640, 512, 512) and 10 classes it has
exactly 1,350,282 parameters, the paper's "1.35M".
"""
from __future__ import annotations

from dataclasses import field
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from featurestore.typed_config import typed_config
from heads._registry import Head, register_head
from heads.config import ConfigError, Probability, Size


@typed_config(ConfigError)
class LateFusionConfig:
    input_dims: Annotated[list[Size], Field(min_length=1)] = field(default_factory=lambda: [640, 512, 512])  # one per feature set
    n_classes: Size = 10  # output classes
    hidden: Size = 512  # first layer of each branch
    branch_out: Size = 256  # output of each branch (concatenated)
    fusion_hidden: Size = 128  # layer after the concatenation
    dropout: Probability = 0.2  # dropout in each branch


@register_head
class LateFusion(Head):
    """Multi-branch MLP over k frame embeddings of the same frame (paper C04)."""

    name = "late_fusion"
    config_class = LateFusionConfig
    default_batch_size = 48
    default_family = None

    def __init__(self, cfg: LateFusionConfig):
        super().__init__(cfg)
        if not cfg.input_dims:
            raise ValueError("late_fusion needs at least one input dim")
        self.branches = nn.ModuleList(_branch(d, cfg) for d in cfg.input_dims)
        self.fusion = nn.Linear(cfg.branch_out * len(cfg.input_dims), cfg.fusion_hidden)
        self.classifier = nn.Linear(cfg.fusion_hidden, cfg.n_classes)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        self.check_inputs(inputs, len(self.branches))
        joined = torch.cat([branch(x) for branch, x in zip(self.branches, inputs)], dim=1)
        return self.classifier(self.fusion(joined))


def _branch(dim: int, cfg: LateFusionConfig) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, cfg.hidden), nn.BatchNorm1d(cfg.hidden), nn.ReLU(),
                         nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, cfg.branch_out))
