"""The head registry: a dict and a decorator, like timm's model registry.

A head is an ``nn.Module`` subclass of `Head` with a JSON-serialisable config dataclass. Registering
a class makes it available to `create_head`, the trainer, the CLI and the registry-wide tests.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from heads.errors import HeadConfigError, UnknownHeadError

_HEADS: dict[str, type["Head"]] = {}


class Head(nn.Module):
    """Base class of every head: maps a list of per-feature-set input tensors to class logits.

    Class attributes:
        name: registry name.
        config_class: the config dataclass; ``config_class(**json.load(f))`` round-trips.
        default_batch_size: the paper's batch size for this kind of head.
        default_family: ensemble family written into prediction attrs when the user gives none
            (None: derived from the feature sets).
        max_read_group_bytes: heads on large samples (stored frames) cap the trainer's read groups
            (clips read at once and shuffled together) at this many bytes of stored clips (None: ``TrainConfig.shuffle_buffer`` clips as given).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = object
    default_batch_size: ClassVar[int] = 48
    default_family: ClassVar[str | None] = None
    max_read_group_bytes: ClassVar[int | None] = None

    def __init__(self, cfg: Any):
        super().__init__()
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{self.name} expects a {self.config_class.__name__}, got {type(cfg).__name__}")
        self.cfg = cfg

    @classmethod
    def store_config(cls, infos: list[Any], n_classes: int) -> dict:
        """Config fields that come from the store (input dims, n_classes) for feature sets ``infos``."""
        return {"input_dims": [_flat_dim(info) for info in infos], "n_classes": n_classes}

    @classmethod
    def loading_config(cls, config: dict) -> dict:
        """The config to build the head with before loading trained weights into it (no downloads)."""
        return dict(config)

    @property
    def class_features(self) -> str | None:
        """Name of the stored class-feature set this head needs (zero-shot), else None."""
        return None

    def backbone_weights(self) -> dict | None:
        """Provenance-style ``weights`` record of a backbone inside the head, None when it has none."""
        return None

    def config_dict(self) -> dict:
        """The config as a plain JSON-serialisable dict."""
        return dataclasses.asdict(self.cfg)

    def check_inputs(self, inputs: list[torch.Tensor], expected: int) -> None:
        """Raise when the number of inputs does not match the number of feature sets the head was built for."""
        if len(inputs) != expected:
            raise ValueError(f"{self.name} was built for {expected} input feature set(s), got {len(inputs)}")


def _flat_dim(info: Any) -> int:
    """Embedding width of a feature set whose per-segment shape must be 1-D."""
    shape = tuple(info.feature_shape)
    if len(shape) != 1:
        raise ValueError(f"feature set {info.name!r} has per-segment shape {shape}; this head needs "
                         f"1-D embeddings (shape [dim])")
    return int(shape[0])


def register_head(cls: type[Head]) -> type[Head]:
    """Class decorator: add a `Head` subclass to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _HEADS:
        warnings.warn(f"head {cls.name!r} registered twice; the later definition wins", stacklevel=2)
    _HEADS[cls.name] = cls
    return cls


def list_heads() -> list[str]:
    """Names of the registered heads, sorted."""
    return sorted(_HEADS)


def head_class(name: str) -> type[Head]:
    """The `Head` subclass registered as ``name``."""
    try:
        return _HEADS[name]
    except KeyError:
        raise UnknownHeadError(name, list_heads()) from None


def create_head(name: str, **config: Any) -> Head:
    """Build a head from its name and config fields (``create_head("late_fusion", input_dims=[...])``)."""
    cls = head_class(name)
    return cls(make_config(name, config))


def make_config(name: str, config: dict) -> Any:
    """The config dataclass of head ``name`` from a dict, naming any unknown field.

    Raises:
        HeadConfigError: a field the head does not have (a TypeError, as a wrong keyword would be).
        heads.config.ConfigError: a value of the wrong type or out of range (a ValueError), naming it.
    """
    cls = head_class(name)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise HeadConfigError(f"unknown config field(s) for head {name!r}: {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(fields))}")
    return cls.config_class(**config)  # typed: the config class checks every value (strict)
