"""The training configuration: plain data, so a recipe is a JSON file and a run records exactly what it did."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from featurestore.typed_config import field_names, load_data, parse_field, repeated_keys, typed_config
from heads.losses import LOSSES

# Fields that may change between an interrupted run and its resumption without changing its result.
RESUMABLE_FIELDS = ("epochs", "device", "progress", "store", "out", "cache")
# Fields that set a run's data order (worker processes each shuffle their own share, seeded by worker id,
# and drop their own short batch): a resume must keep them, a finished run is the same run whatever they are.
ORDER_FIELDS = ("num_workers",)

# Field types with their ranges, shared with the heads' configs (`heads.embedding_mlp`, ...).
Name = Annotated[str, Field(min_length=1)]  # a head, feature set, split, path or device: never empty
Count = Annotated[int, Field(ge=0)]  # 0 allowed (epochs, workers, seeds, masks)
Size = Annotated[int, Field(ge=1)]  # a width, batch or number of classes
# torch trains in float32: a rate or decay past its largest value (lr=1e39) was a torch RuntimeError
# traceback ("value cannot be converted to type float without overflow") at the first step
FLOAT32_MAX = 3.4028234663852886e38
Positive = Annotated[float, Field(gt=0, le=FLOAT32_MAX, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, le=FLOAT32_MAX, allow_inf_nan=False)]
Probability = Annotated[float, Field(ge=0, le=1)]


class ConfigError(ValueError):
    """A train or head config holds an unknown key, a value of the wrong type or one out of range."""


@typed_config(ConfigError)
class TrainConfig:
    """What to train on what, and how; every field is typed and range-checked when it is built or loaded.

    A JSON recipe is read strictly (``"epochs": "five"`` is refused naming ``epochs``), and
    ``head_config`` is checked against the head's own config class (``head_config.l2_normalize``).
    """

    head: Name  # registered head name (heads.list_heads())
    features: Annotated[list[Name], Field(min_length=1)]  # input feature sets, in the head's input order ("a,b" is split)
    train_split: Name = "fold1_train"  # store split to train on
    val_split: Name | None = "fold1_evaluate"  # split for validation / best-epoch choice (None: keep the last epoch)
    out: Name = "runs/run"  # run directory (checkpoints, metrics, config)
    store: Name | None = None  # store path or URL (library callers may pass an open store instead)
    head_config: dict[str, Any] = field(default_factory=dict)  # head config fields beyond those read from the store
    epochs: Count = 20  # the paper trains 20 epochs
    batch_size: Size | None = None  # None: the head's default (paper: 24 audio, 48 late fusion)
    lr: Positive = 0.01  # initial learning rate
    momentum: Probability = 0.9  # SGD momentum, in [0, 1]
    weight_decay: NonNegative = 1e-4  # SGD weight decay (IBN-Net's value, which the paper follows)
    lr_milestones: list[Size] = field(default_factory=lambda: [5, 10, 15])  # lr *= lr_gamma after these epochs
    lr_gamma: Positive = 0.1  # learning-rate decay factor at each milestone
    loss: Literal[LOSSES] = "focal"  # "focal" or "cross_entropy"
    focal_gamma: NonNegative = 2.0  # focal loss gamma
    seed: Count = 0  # seeds the head's init, the data order and dropout/augmentation, per epoch
    device: Name = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    cache: bool = False  # load the training features into memory instead of streaming them
    shuffle_buffer: Size = 2048  # clips per read group (read at once, shuffled together) when streaming
    num_workers: Count = 0  # DataLoader worker processes reading the store (0: a reader thread)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: the head's forward passes under bfloat16 autocast (a GPU's fast path)
    max_steps_per_epoch: Size | None = None  # cap on optimizer steps per epoch (quick demos); None: full epochs
    family: Name | None = None  # ensemble family for predictions ("audio", "video", "clip", ...); None: derived
    progress: bool = True  # tqdm progress bar per epoch

    @field_validator("features", mode="before")
    @classmethod
    def _split_features(cls, value: Any) -> Any:
        """``--features a,b`` (and a recipe's "a,b") is the list [a, b]."""
        return [f for f in value.split(",") if f] if isinstance(value, str) else value

    @field_validator("head_config")
    @classmethod
    def _check_head_config(cls, value: dict, info: ValidationInfo) -> dict:
        """Check the head's fields now, not when the store is open and the run directory locked."""
        check_head_config(info.data.get("head"), value)
        return value

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """A config from a recipe file, with ``overrides`` (None values ignored) applied on top.

        Raises:
            FileNotFoundError: no such file.
            ConfigError: not a JSON object, or a key unknown, missing, of the wrong type or out of range
                (one line naming the file, the dotted key, the value and what was expected).
        """
        if not Path(path).is_file():  # not errno's "[Errno 2] No such file or directory: ..."
            raise FileNotFoundError(f"recipe file {str(path)!r} does not exist"
                                    + (" (it is a directory)" if Path(path).is_dir() else ""))
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"recipe {str(path)!r} is not valid JSON: {err}") from None
        repeated = repeated_keys(text)
        if repeated:  # json keeps the last value: a head_config or a field given twice lost one silently
            raise ConfigError(f"recipe {str(path)!r}: key(s) {', '.join(map(repr, repeated))} given more than once; "
                              f"JSON keeps only the last value: merge them or remove one")
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {str(path)!r}: expected a JSON object, found {type(data).__name__}")
        data.pop("description", None)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return load_data(cls, data, f"recipe {str(path)!r}", ConfigError)

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 1-based ``epoch``: divided by 10 once each milestone epoch has been completed."""
        passed = sum(1 for m in self.lr_milestones if epoch > m)
        return self.lr * self.lr_gamma ** passed


def check_head_config(head: str | None, given: dict) -> None:
    """Refuse head config fields that head ``head`` does not have, or values of the wrong type or range.

    An unregistered head is left to `heads.train`, which names the registered ones.
    """
    from heads._registry import head_class

    try:
        config_class = head_class(head or "").config_class
    except KeyError:
        return
    known = field_names(config_class)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"head_config: unknown field(s) for head {head!r}: {', '.join(unknown)}; "
                          f"known: {', '.join(known)}")
    load_data(config_class, given, "", ConfigError, at=("head_config",))


def parse_head_set(head: str, items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` strings as head config fields, each parsed into its field's type.

    ``l2_normalize=true`` is True, ``hidden=[256]`` a list, ``backbone=resnet18`` a string;
    ``l2_normalize=maybe`` is a ConfigError naming the key, the value and what was expected.
    """
    from heads._registry import head_class

    config_class = head_class(head).config_class
    known = field_names(config_class)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        if key not in known:
            raise ConfigError(f"--set {key}: head {head!r} has no such field; known: {', '.join(known)}")
        try:
            out[key] = parse_field(config_class, key, raw)
        except ValueError as err:
            raise ConfigError(f"--set head_config.{err}") from None
    return out
