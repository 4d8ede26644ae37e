"""``timm/<model>[@weights]``: pooled frame embeddings from any timm image model.

The model is built with ``num_classes=0``, so its forward returns the globally pooled pre-logit
features (``[B, D]``) that the paper's video heads (RegNetY-6.4F, ResNeSt-50d, HRNet-W18) sit on.
Preprocessing follows the model's own pretrained data config (input size, crop_pct, interpolation,
mean/std from ``timm.data.resolve_model_data_config``), reimplemented as a picklable
``FramePreprocessor`` that works on numpy uint8 frames.

Weights: ``@<tag>`` (``ra3_in1k``) or ``@pretrained`` / no ``@`` (the model's default tag) load via
``timm.create_model(..., pretrained=True)``, which reads the Hugging Face / torch hub caches (the
file it read is recorded with its SHA-256);
``@/path.pth`` loads a state dict strictly except for the classifier head (a pooled-feature encoder
has none); ``@none`` is a seeded random init. timm is imported lazily so that importing the
registry stays cheap.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from featurestore.encoders._content_hash import loaded_weights_hash, recording_loaded_files
from featurestore.encoders._encoder import Encoder
from featurestore.encoders._names import EncoderSpec, SpecError, UnknownEncoderError
from featurestore.encoders._preprocess import FramePreprocessor, check_normalised_batch
from featurestore.encoders._registry import register_encoder
from featurestore.encoders._weights import (
    Weights,
    announce_random_weights,
    hf_cache_location,
    hub_offline,
    load_into,
    parse_weights,
    pretrained_unavailable,
    read_checkpoint,
    seeded,
    torch_hub_location,
)


def _split_tag(model: str) -> tuple[str, str | None]:
    """``regnety_064.ra3_in1k`` -> (``regnety_064``, ``ra3_in1k``); timm's own naming is accepted."""
    name, _, tag = model.partition(".")
    return name, tag or None


def default_tag(model: str) -> str | None:
    """The default pretrained tag timm would load for ``model`` (None when it has no weights)."""
    import timm.models

    cfg = timm.models.get_pretrained_cfg(model)
    if cfg is None:
        return None
    return getattr(cfg, "tag", None) or None


def pretrained_tags(model: str) -> list[str]:
    """All pretrained tags timm lists for ``model``."""
    import timm

    return [name.partition(".")[2] for name in timm.list_pretrained(f"{model}.*")]


def frame_preprocessor(data_config: dict[str, Any]) -> FramePreprocessor:
    """Translate a timm data config into a ``FramePreprocessor`` (timm's eval transform).

    timm resizes to ``floor(size / crop_pct)`` (shorter side for ``crop_mode="center"``, both sides
    for ``"squash"``) and then center-crops ``size``.
    """
    _, height, width = data_config["input_size"]
    crop_pct = data_config.get("crop_pct") or 0.875
    crop_mode = data_config.get("crop_mode") or "center"
    scaled = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    if crop_mode == "squash":
        resize: int | tuple[int, int] = scaled
    elif crop_mode == "center" and height == width:
        resize = scaled[0]
    else:
        raise SpecError(f"timm data config with crop_mode={crop_mode!r} and input size {height}x{width} is not "
                        f"supported (supported: 'center' with a square input, 'squash')")
    interpolation = data_config.get("interpolation") or "bilinear"
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        interpolation = "bicubic"  # timm maps 'random' and the like to bicubic at eval time
    return FramePreprocessor(crop=(int(height), int(width)), resize=resize, interpolation=interpolation,
                             mean=tuple(data_config["mean"]), std=tuple(data_config["std"]))


@register_encoder("timm")
class TimmFrameEncoder(Encoder):
    """Pooled frame embeddings ``[B, D]`` from ``timm.create_model(model, num_classes=0)``."""

    modality = "video"
    smoke_spec = "timm/test_resnet@none"

    def __init__(self, spec: str | EncoderSpec, strict: bool = True) -> None:
        super().__init__(spec)
        model_name, name_tag = _split_tag(self._spec.model or "")
        if name_tag is not None and self._spec.weights is not None:
            raise SpecError(f"{self._spec}: give the tag once, either 'timm/{model_name}.{name_tag}' or "
                            f"'timm/{model_name}@{name_tag}'")
        self.model_name = model_name
        requested = name_tag or self._spec.weights
        self.weights = self._resolve_weights(requested)
        self._spec = EncoderSpec("timm", model_name, self.weights.spec_text)
        self.strict = strict
        self.module = self._build().eval()
        self.data_config = self._data_config()
        self._preprocessor = frame_preprocessor(self.data_config)
        self._dim = int(getattr(self.module, "head_hidden_size", None) or self.module.num_features)
        if self.weights.kind == "random":
            announce_random_weights(self.spec)

    # ----------------------------------------------------------------- spec checks
    @classmethod
    def known_models(cls) -> list[str]:
        import timm

        return timm.list_models()

    @classmethod
    def check_spec(cls, spec: EncoderSpec) -> None:
        import timm

        if spec.model is None:
            raise SpecError(f"encoder spec {str(spec)!r} needs a model: 'timm/<model>', e.g. timm/regnety_064")
        name, _ = _split_tag(spec.model)
        if not timm.is_model(name):
            raise UnknownEncoderError("timm model", name, timm.list_models(),
                                      hint="See list_encoders('timm/*', models=True).")

    def _resolve_weights(self, requested: str | None) -> Weights:
        default = default_tag(self.model_name)
        weights = parse_weights(None if requested == "pretrained" else requested, default, str(self._spec))
        if weights.kind == "pretrained":
            tags = pretrained_tags(self.model_name)
            if weights.tag not in tags:
                raise SpecError(f"{self._spec}: timm has no pretrained tag {weights.tag!r} for {self.model_name}; "
                                f"known tags: {tags or '(none)'}; or use '@none' (random) or '@/path/to.pth'")
        return weights

    # ----------------------------------------------------------------- building
    def _build(self) -> torch.nn.Module:
        import timm

        with seeded(self.weights.seed):
            if self.weights.kind == "pretrained":
                return self._build_pretrained()
            model = timm.create_model(self.model_name, pretrained=False, num_classes=0)
        if self.weights.kind == "file":
            state = self._drop_classifier(read_checkpoint(self.weights), model)
            load_into(model, state, self.weights.path, strict=self.strict)
        return model

    def _build_pretrained(self) -> torch.nn.Module:
        import timm
        import timm.models

        full_name = f"{self.model_name}.{self.weights.tag}"
        try:
            with hub_offline(), recording_loaded_files() as files:
                model = timm.create_model(full_name, pretrained=True, num_classes=0)
        except Exception as exc:
            cfg = timm.models.get_pretrained_cfg(full_name)
            looked = []
            if cfg is not None and cfg.hf_hub_id:
                looked.append(f"Hugging Face cache {hf_cache_location(cfg.hf_hub_id)}")
            if cfg is not None and cfg.url:
                looked.append(f"torch hub cache {torch_hub_location(cfg.url)}")
            raise pretrained_unavailable(self.spec, self.model_name, str(self.weights.tag), looked, exc) from exc
        path, sha256 = loaded_weights_hash(files, model)
        self.weights = dataclasses.replace(self.weights, path=Path(path), sha256=sha256)
        return model

    @staticmethod
    def _drop_classifier(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Remove classifier-head keys the headless model does not have (e.g. ``fc.weight``)."""
        classifiers = model.pretrained_cfg.get("classifier") or ()
        classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
        own = model.state_dict().keys()
        return {key: value for key, value in state.items()
                if key in own or not any(key.startswith(head + ".") for head in classifiers)}

    def _data_config(self) -> dict[str, Any]:
        from timm.data import resolve_model_data_config

        return resolve_model_data_config(self.module)

    # ----------------------------------------------------------------- the Encoder interface
    @property
    def output_shape(self) -> tuple[int, ...]:
        return (self._dim,)

    def config(self) -> dict[str, Any]:
        return {"library": "timm", "model": self.model_name, "head": "num_classes=0 (pooled pre-logits)",
                "preprocess": self._preprocessor.config()}

    def weights_provenance(self) -> dict[str, Any]:
        return self.weights.provenance()

    def preprocessor(self) -> FramePreprocessor:
        return self._preprocessor

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        check_normalised_batch(batch, self.spec)
        return self.module(batch.float()).float()
