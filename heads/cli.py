"""``heads`` command line: a thin layer over `heads.train` and `heads.predict`.

    heads list
    heads train --store S --head late_fusion --features clip/RN50x4,clip/RN101,clip/ViT-B-32 \\
                --train-split fold1_train --val-split fold1_evaluate --out runs/c04
    heads train --recipe scripts/recipes/paper/C04_late_fusion.json --store S [--epochs 5 ...]
    heads predict --store S --run runs/c04 [--name c04] [--split fold1_evaluate]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from featurestore.cli import run_command
from featurestore.encoders import DEVICE_HELP
from featurestore.errors import FeatureStoreError
from heads._registry import head_class, list_heads
from heads.config import TrainConfig
from heads.errors import HeadConfigError

# CLI flag -> (type, help) for TrainConfig fields; a flag given overrides the recipe's field.
_TRAIN_FLAGS: dict[str, tuple[type, str]] = {
    "store": (str, "feature store path or URL"),
    "head": (str, "registered head name ('heads list')"),
    "features": (str, "comma-separated input feature sets, in the head's input order"),
    "train_split": (str, "store split to train on"),
    "val_split": (str, "split that picks the best epoch"),
    "out": (str, "run directory (checkpoints, metrics, run.json)"),
    "epochs": (int, "training epochs"),
    "batch_size": (int, "samples per batch (default: the head's, 24 for audio CNNs, 48 for embeddings)"),
    "lr": (float, "initial learning rate"),
    "momentum": (float, "SGD momentum"),
    "weight_decay": (float, "SGD weight decay"),
    "loss": (str, "focal or cross_entropy"),
    "focal_gamma": (float, "focal loss gamma"),
    "seed": (int, "seed of the head's init, the data order and augmentation"),
    "device": (str, DEVICE_HELP),
    "shuffle_buffer": (int, "clips per shuffle window when streaming from the store"),
    "num_workers": (int, "DataLoader processes reading the store (0: a reader thread)"),
    "max_steps_per_epoch": (int, "cap on optimizer steps per epoch (quick demos)"),
    "family": (str, "ensemble family recorded with the predictions (default: derived from the inputs)"),
}
_TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                   if f.default is not dataclasses.MISSING}
#: Errors that mean bad input (exit 2, one line on stderr): missing store or run, unknown head or
#: field, a fingerprint refusal, an unavailable device.
_USAGE_ERRORS = (FeatureStoreError, HeadConfigError, ValueError, KeyError, FileNotFoundError, FileExistsError,
                 RuntimeError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``heads`` and ``python -m heads``; returns the exit code (2: bad input)."""
    args = _parser().parse_args(argv)
    return run_command("heads", args.command, lambda: args.func(args), usage=_USAGE_ERRORS, failures=())


def _flag_help(field: str, text: str) -> str:
    """The help text with TrainConfig's default, so the two cannot disagree."""
    default = _TRAIN_DEFAULTS.get(field)
    return text if default is None else f"{text} (default: {default})"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heads", description="Train classifier heads on stored features "
                                     "and write their predictions back into the store.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="registered heads and their default configs")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("train", help="train a head (from flags, or a recipe plus overriding flags)")
    p.add_argument("--recipe", help="JSON recipe (a TrainConfig); flags given override its fields")
    for flag, (kind, text) in _TRAIN_FLAGS.items():
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=kind, default=None,
                       help=_flag_help(flag, text))
    p.add_argument("--set", dest="head_set", action="append", default=[], metavar="KEY=VALUE",
                   help="head config field (value parsed as JSON when it can be), e.g. --set backbone=test_resnet")
    p.add_argument("--cache", action="store_true", default=None, help="load training features into memory")
    p.add_argument("--overwrite", action="store_true", help="discard what the run directory holds and train "
                   "afresh (default: resume the same run, refuse another)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="write a trained head's predictions into the store")
    p.add_argument("--store", required=True, help="feature store path or URL (opened for writing)")
    p.add_argument("--run", required=True, help="training run directory")
    p.add_argument("--name", help="prediction run name (default: the run directory's name)")
    p.add_argument("--split", help="only this split's clips (default: every clip with its features done)")
    p.add_argument("--batch-size", type=int, help="clips per forward pass")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--family", help="ensemble family to record (default: from the run)")
    p.add_argument("--weights", default="best", choices=["best", "last"],
                   help="best epoch (by validation accuracy) or last completed epoch")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prediction run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_predict)
    return parser


def cmd_list(args: argparse.Namespace) -> int:
    table = {}
    for name in list_heads():
        cls = head_class(name)
        table[name] = {"default_batch_size": cls.default_batch_size,
                       "config": dataclasses.asdict(cls.config_class())}
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    for name, entry in table.items():
        print(f"{name:16s} batch {entry['default_batch_size']:<4d} {json.dumps(entry['config'])}")
    return 0


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A TrainConfig from ``--recipe`` (if any) with the flags given on top."""
    flags = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k) is not None}
    if args.cache:
        flags["cache"] = True
    if args.no_progress:
        flags["progress"] = False
    head_set = dict(_parse_set(item) for item in args.head_set)
    if args.recipe:
        cfg = TrainConfig.from_json(args.recipe, **flags)
    else:
        missing = [f"--{k.replace('_', '-')}" for k in ("store", "head", "features") if k not in flags]
        if missing:
            raise ValueError(f"train needs {', '.join(missing)} (or --recipe)")
        cfg = TrainConfig(**flags)
    cfg.head_config = {**cfg.head_config, **head_set}
    return cfg


def _parse_set(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def cmd_train(args: argparse.Namespace) -> int:
    from heads.train import train

    cfg = train_config_from_args(args)
    result = train(cfg, overwrite=args.overwrite)
    print(json.dumps({"run_dir": str(result.run_dir), "best_epoch": result.best_epoch,
                      "best_val_accuracy": result.best_val_accuracy, "best_val_logloss": result.best_val_logloss}))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from heads.predict import predict

    result = predict(args.store, args.run, name=args.name, split=args.split, batch_size=args.batch_size,
                     device=args.device, overwrite=args.overwrite, family=args.family, weights=args.weights,
                     progress=not args.no_progress)
    print(json.dumps({"run": result.run, "clips": result.n_clips, "skipped": result.n_skipped,
                      "segments": result.n_segments, "family": result.attrs["family"],
                      "random_weights": result.attrs["random_weights"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
