"""CLIP zero-shot classification from stored embeddings (the paper's C01-C03): nothing to train.

Logits are ``logit_scale * cos(image_embedding, class_prompt_embedding)`` with CLIP's logit scale of
100, so ``softmax`` of them are CLIP's zero-shot probabilities. The class-prompt embeddings come from
a stored ``cliptext/<model>`` class-feature set (``store.get_class_features``), one row per class in
the store's class order; they are kept in the head as a buffer, so a saved head predicts on another
store without re-encoding the prompts.

CLIP's two towers share one embedding space only within one model and one set of weights, so the
class features must come from the ``cliptext`` tower of the image set's own model and weights: an
RN101 image embedding compared with ViT-B-32 prompt embeddings of the same width (512) gives
cosines that mean nothing, and nothing downstream would notice. `check_towers` refuses such a run
(a checkpoint file on either side is trusted: it may hold a text tower tuned to the image tower).
"""
from __future__ import annotations

from dataclasses import field
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from featurestore._spec import EncoderSpec, SpecError, parse_spec
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
        self._check_rows(emb)
        self.class_embeddings.copy_(F.normalize(emb, dim=-1))
        self.loaded.fill_(True)

    def _check_rows(self, emb: torch.Tensor) -> None:
        """Refuse rows no cosine can be taken with (NaN/inf, all zeros: that class would get logit 0
        or NaN whatever the image) and repeated rows: two classes whose prompts are one text (CLIP
        lowercases, ``_`` becomes a space: ``Bus``/``bus``, ``metro_station``/``metro station``)
        split every probability between them, and the argmax always names the first, silently."""
        name = self.cfg.class_features
        finite = torch.isfinite(emb).all(dim=1)
        if not bool(finite.all()):
            raise ValueError(f"class features {name!r}: row(s) {_listed(~finite)} (classes in the store's order) hold "
                             f"NaN or infinity; write the class features again")
        zero = emb.abs().sum(dim=1) == 0
        if bool(zero.any()):
            raise ValueError(f"class features {name!r}: row(s) {_listed(zero)} (classes in the store's order) are all "
                             f"zeros: no direction to compare an image with; write the class features again")
        for i in range(len(emb)):
            same = (emb[i + 1:] == emb[i]).all(dim=1).nonzero().flatten()
            if len(same):
                raise ValueError(f"class features {name!r}: rows {i} and {i + 1 + int(same[0])} (classes in the "
                                 f"store's order) are identical, so zero-shot cannot tell those classes apart: "
                                 f"their prompts are the same text (CLIP lowercases, '_' becomes a space)")

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        self.check_inputs(inputs, 1)
        if not bool(self.loaded):
            raise RuntimeError(f"zero_shot has no class embeddings yet: call set_class_embeddings() with the "
                               f"stored {self.cfg.class_features!r} class features")
        image = F.normalize(inputs[0].float(), dim=-1)
        return self.cfg.logit_scale * image @ self.class_embeddings.T


def _listed(mask: torch.Tensor) -> str:
    rows = mask.nonzero().flatten().tolist()
    return ", ".join(map(str, rows[:8])) + (f" and {len(rows) - 8} more" if len(rows) > 8 else "")


def check_towers(info: dict, run_dir: str) -> None:
    """Refuse a run whose class-prompt embeddings were made by another CLIP model or other weights
    than its image features (see the module docstring); ``info`` is the run's ``run.json``.

    Raises:
        ConfigError: naming the run, both feature sets, what made each, and the way out.
    """
    summaries = info.get("feature_info") or {}
    images = (info.get("train") or {}).get("features") or list(info.get("features") or {})
    for text_name in info.get("class_features") or {}:
        for image_name in images:
            image, text = summaries.get(image_name) or {}, summaries.get(text_name) or {}
            problem = tower_problem(image, text)
            if problem:
                raise ConfigError(
                    f"run {run_dir!r}: zero_shot compares image features {image_name!r} ({image.get('encoder')}) "
                    f"with class features {text_name!r} ({text.get('encoder')}): {problem}, so the "
                    f"probabilities would mean nothing; set head_config class_features to the cliptext set "
                    f"of the same model and weights and train the run again")


def tower_problem(image: dict, text: dict) -> str | None:
    """Why prompt embeddings made by ``text`` cannot be compared with image embeddings made by
    ``image`` (summaries with ``encoder`` and ``weights_identity``, as ``run.json`` records them), or
    None when they pair. Towers this cannot judge pass: not ``clip``/``cliptext`` (a plug-in's
    embeddings may share a space in ways only their author knows), nothing recorded, or a checkpoint
    file on either side (a text tower fine-tuned against frozen image weights is one). Two pretrained
    tags, or random weights against anything else, are two trainings: two spaces."""
    image_spec, text_spec = _spec(image.get("encoder")), _spec(text.get("encoder"))
    if image_spec is None or text_spec is None or (image_spec.family, text_spec.family) != ("clip", "cliptext"):
        return None
    if _model(image_spec.model) != _model(text_spec.model):
        return f"they come from different CLIP models ({image_spec.model} and {text_spec.model})"
    image_weights, text_weights = image.get("weights_identity"), text.get("weights_identity")
    if not image_weights or not text_weights or image_weights == text_weights:
        return None
    if str(image_weights).startswith("file:") or str(text_weights).startswith("file:"):
        return None  # a checkpoint may hold one tower fine-tuned against the other's frozen weights
    return f"they come from different weights ({image_weights} and {text_weights})"


def _spec(encoder: object) -> EncoderSpec | None:
    """The parsed spec of a recorded encoder, None when nothing (or no spec) is recorded."""
    try:
        return parse_spec(str(encoder)) if encoder else None
    except SpecError:
        return None


def _model(name: str | None) -> str:
    """A model name compared across towers: ``-quickgelu`` is an activation choice of the same weights."""
    text = str(name or "").lower()
    return text[:-len("-quickgelu")] if text.endswith("-quickgelu") else text
