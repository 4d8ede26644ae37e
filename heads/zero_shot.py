"""CLIP zero-shot classification from stored embeddings (the paper's C01-C03): nothing to train.

Logits are ``logit_scale * cos(image_embedding, class_prompt_embedding)`` with CLIP's logit scale of
100, so ``softmax`` of them are CLIP's zero-shot probabilities. The class-prompt embeddings come from
a stored ``cliptext/<model>`` class-feature set (``store.get_class_features``), one row per class in
the store's class order; they are kept in the head as a buffer, so a saved head predicts on another
store without re-encoding the prompts.
"""
from __future__ import annotations

from dataclasses import field
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from featurestore.typed_config import typed_config
from heads._registry import Head, register_head
from heads.config import ConfigError, Name, Positive, Size


@typed_config(ConfigError)
class ZeroShotConfig:
    input_dims: Annotated[list[Size], Field(min_length=1, max_length=1)] = field(default_factory=lambda: [512])  # one image feature set: [dim]
    n_classes: Size = 10  # rows of the class-prompt embeddings
    class_features: Name = "cliptext/ViT-B-32"  # stored class-feature set with the prompt embeddings
    logit_scale: Positive = 100.0  # CLIP's learned temperature (exp(4.6052) = 100)


@register_head
class ZeroShot(Head):
    """Cosine similarity of one image embedding with each class-prompt embedding, times the logit scale."""

    name = "zero_shot"
    config_class = ZeroShotConfig
    default_batch_size = 256
    default_family = "clip"

    def __init__(self, cfg: ZeroShotConfig):
        super().__init__(cfg)
        if len(cfg.input_dims) != 1:
            raise ValueError(f"zero_shot takes exactly one image feature set, got input_dims={cfg.input_dims}")
        self.register_buffer("class_embeddings", torch.zeros(cfg.n_classes, cfg.input_dims[0]))
        self.register_buffer("loaded", torch.zeros((), dtype=torch.bool))

    @classmethod
    def store_config(cls, infos: list, n_classes: int) -> dict:
        out = super().store_config(infos, n_classes)
        if len(infos) != 1:
            raise ValueError(f"zero_shot takes exactly one image feature set, got {[i.name for i in infos]}")
        return out

    @property
    def class_features(self) -> str | None:
        return self.cfg.class_features

    def set_class_embeddings(self, embeddings: np.ndarray | torch.Tensor) -> None:
        """Install the class-prompt embeddings (``[n_classes, dim]``, any float dtype)."""
        emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        expected = tuple(self.class_embeddings.shape)
        if tuple(emb.shape) != expected:
            raise ValueError(f"class features {self.cfg.class_features!r} have shape {tuple(emb.shape)}, "
                             f"expected {expected} (n_classes, image embedding dim)")
        self.class_embeddings.copy_(F.normalize(emb, dim=-1))
        self.loaded.fill_(True)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        self.check_inputs(inputs, 1)
        if not bool(self.loaded):
            raise RuntimeError(f"zero_shot has no class embeddings yet: call set_class_embeddings() with the "
                               f"stored {self.cfg.class_features!r} class features")
        image = F.normalize(inputs[0].float(), dim=-1)
        return self.cfg.logit_scale * image @ self.class_embeddings.T
