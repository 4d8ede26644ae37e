"""The training configuration: plain data, so a recipe is a JSON file and a run records exactly what it did."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from heads.losses import LOSSES

# Fields that may change between an interrupted run and its resumption without changing its result.
RESUMABLE_FIELDS = ("epochs", "device", "progress", "num_workers", "store", "out", "cache")


@dataclass
class TrainConfig:
    head: str  # registered head name (heads.list_heads())
    features: list[str]  # input feature sets, in the head's input order
    train_split: str = "fold1_train"  # store split to train on
    val_split: str | None = "fold1_evaluate"  # split for validation / best-epoch choice (None: keep the last epoch)
    out: str = "runs/run"  # run directory (checkpoints, metrics, config)
    store: str | None = None  # store path or URL (library callers may pass an open store instead)
    head_config: dict = field(default_factory=dict)  # head config fields beyond those read from the store
    epochs: int = 20  # the paper trains 20 epochs
    batch_size: int | None = None  # None: the head's default (paper: 24 audio, 48 late fusion)
    lr: float = 0.01  # initial learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # SGD weight decay (IBN-Net's value, which the paper follows)
    lr_milestones: list[int] = field(default_factory=lambda: [5, 10, 15])  # lr *= lr_gamma after these epochs
    lr_gamma: float = 0.1  # learning-rate decay factor at each milestone
    loss: str = "focal"  # "focal" or "cross_entropy"
    focal_gamma: float = 2.0  # focal loss gamma
    seed: int = 0  # seeds the head's init, the data order and dropout/augmentation, per epoch
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    cache: bool = False  # load the training features into memory instead of streaming them
    shuffle_buffer: int = 2048  # clips per read group (read at once, shuffled together) when streaming
    num_workers: int = 0  # DataLoader worker processes reading the store (0: a reader thread)
    max_steps_per_epoch: int | None = None  # cap on optimizer steps per epoch (quick demos); None: full epochs
    family: str | None = None  # ensemble family for predictions ("audio", "video", "clip", ...); None: derived
    progress: bool = True  # tqdm progress bar per epoch

    def __post_init__(self) -> None:
        if isinstance(self.features, str):
            self.features = [f for f in self.features.split(",") if f]
        if not self.features:
            raise ValueError("features must name at least one stored feature set")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """A config from a recipe file, with ``overrides`` (None values ignored) applied on top.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a JSON object, unknown fields, or required fields missing (naming the file).
        """
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"recipe {str(path)!r} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"recipe {str(path)!r}: expected a JSON object, found {type(data).__name__}")
        data.pop("description", None)
        fields = dataclasses.fields(cls)
        unknown = sorted(set(data) - {f.name for f in fields})
        if unknown:
            raise ValueError(f"recipe {str(path)!r}: unknown field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(f.name for f in fields))}")
        data.update({k: v for k, v in overrides.items() if v is not None})
        required = [f.name for f in fields
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"recipe {str(path)!r}: required field(s) {', '.join(missing)} missing "
                             f"(give them in the file or as flags)")
        return cls(**data)

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 1-based ``epoch``: divided by 10 once each milestone epoch has been completed."""
        passed = sum(1 for m in self.lr_milestones if epoch > m)
        return self.lr * self.lr_gamma ** passed
