"""Heads on frozen frame embeddings: a small MLP and a linear probe (the paper's V01-V03 on stored features).

Several feature sets are concatenated. The paper fine-tuned whole CNNs on frames; with frozen stored
embeddings the trainable part is this head, which is what makes an experiment take seconds.
"""
from __future__ import annotations

from dataclasses import field
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from featurestore.typed_config import typed_config
from heads._registry import Head, register_head
from heads.config import ConfigError, Probability, Size


@typed_config(ConfigError)
class EmbeddingMLPConfig:
    input_dims: Annotated[list[Size], Field(min_length=1)] = field(default_factory=lambda: [512])  # one per feature set (concatenated)
    n_classes: Size = 10  # output classes
    hidden: list[Size] = field(default_factory=lambda: [512])  # hidden layer widths
    dropout: Probability = 0.2  # dropout after each hidden layer
    batchnorm: bool = True  # BatchNorm1d after each hidden Linear
    l2_normalize: bool = False  # L2-normalise each input embedding first (CLIP-style features)


@typed_config(ConfigError)
class LinearProbeConfig:
    input_dims: Annotated[list[Size], Field(min_length=1)] = field(default_factory=lambda: [512])  # one per feature set (concatenated)
    n_classes: Size = 10  # output classes
    l2_normalize: bool = False  # L2-normalise each input embedding first


def _joined(inputs: list[torch.Tensor], l2: bool) -> torch.Tensor:
    if l2:
        inputs = [F.normalize(x, dim=-1) for x in inputs]
    return torch.cat(inputs, dim=-1) if len(inputs) > 1 else inputs[0]


@register_head
class EmbeddingMLP(Head):
    """``[Linear - BatchNorm1d - ReLU - Dropout] * len(hidden) - Linear(n_classes)`` on concatenated embeddings."""

    name = "embedding_mlp"
    config_class = EmbeddingMLPConfig
    default_batch_size = 48

    def __init__(self, cfg: EmbeddingMLPConfig):
        super().__init__(cfg)
        layers: list[nn.Module] = []
        width = sum(cfg.input_dims)
        for h in cfg.hidden:
            layers.append(nn.Linear(width, h))
            if cfg.batchnorm:
                layers.append(nn.BatchNorm1d(h))
            layers += [nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = h
        layers.append(nn.Linear(width, cfg.n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        self.check_inputs(inputs, len(self.cfg.input_dims))
        return self.net(_joined(inputs, self.cfg.l2_normalize))


@register_head
class LinearProbe(Head):
    """One Linear layer on the concatenated frozen embeddings."""

    name = "linear"
    config_class = LinearProbeConfig
    default_batch_size = 48

    def __init__(self, cfg: LinearProbeConfig):
        super().__init__(cfg)
        self.fc = nn.Linear(sum(cfg.input_dims), cfg.n_classes)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        self.check_inputs(inputs, len(self.cfg.input_dims))
        return self.fc(_joined(inputs, self.cfg.l2_normalize))
