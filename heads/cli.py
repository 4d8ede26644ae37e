"""``heads`` command line: a thin layer over `heads.train` and `heads.predict`.

    heads list
    heads train --store S --head late_fusion --features clip/RN50x4,clip/RN101,clip/ViT-B-32 \\
                --train-split fold1_train --val-split fold1_evaluate --out runs/c04
    heads train --recipe scripts/recipes/paper/C04_late_fusion.json --store S [--epochs 5 ...]
    heads predict --store S --run runs/c04 [--name c04] [--split fold1_evaluate] [--predictions MINE.zarr]
    heads classify runs/c04 x.wav x.mp4 y.wav [--json] [--out probs.csv]
    heads sweep --store S --head linear --features clip/ViT-B-32 --grid lr=0.1,0.01 --seeds 0,1,2 --out sweeps/x

``--json`` prints what a command did as one JSON object on stdout (progress and summary lines go
to stderr); ``--quiet`` (``-q``) silences progress bars and per-epoch lines. Ctrl-C is one line
saying what was kept and how to resume (``heads train: interrupted; epochs 1-3 kept in runs/x, ...``),
exit code 130.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from featurestore._sigint import kept
from featurestore.atomic_files import OutputWriteError
from featurestore.cli import run_command
from featurestore.encoders import DEVICE_HELP
from featurestore.errors import CorruptChunkError, FeatureStoreError
from featurestore.extract.errors import ExtractionStopped
from heads._registry import head_class, list_heads
from heads.checkpoint import NonFiniteWeightsError
from heads.config import TrainConfig, parse_head_set
from heads.errors import HeadConfigError
from heads.predict import FLUSH_CLIPS
from heads.train import TrainingDivergedError

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
    "shuffle_buffer": (int, "clips per read group (read into memory and shuffled together) when streaming from the store"),
    "num_workers": (int, "DataLoader processes reading the store (0: a reader thread)"),
    "precision": (str, "fp32, or bf16: bfloat16 autocast of the head's forward passes (for a GPU; recorded in run.json)"),
    "max_steps_per_epoch": (int, "cap on optimizer steps per epoch (quick demos)"),
    "family": (str, "ensemble family recorded with the predictions (default: derived from the inputs)"),
}
_TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                   if f.default is not dataclasses.MISSING}
#: Errors that mean bad input (exit 2, one line on stderr): missing store or run, unknown head or
#: field, a fingerprint refusal, an unavailable device, a path that cannot be read (a directory given
#: as a recipe), a store another process writes. RuntimeError is not one: torch raises it for real
#: failures (out of memory, a broken kernel), which keep their traceback.
_USAGE_ERRORS = (FeatureStoreError, HeadConfigError, ValueError, KeyError, OSError)
#: Errors that mean the work failed (exit 1): the store or an output file could not be written (disk
#: full: a rerun resumes), stored data is damaged, training diverged (non-finite loss or weights).
_FAILURE_ERRORS = (ExtractionStopped, OutputWriteError, CorruptChunkError, NonFiniteWeightsError,
                   TrainingDivergedError)


class CommandInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a command; the message says what was kept and how to resume."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``heads`` and ``python -m heads``; returns the exit code (2: bad input, 1: failed,
    130: interrupted by Ctrl-C)."""
    args = _parser().parse_args(argv)
    # Ctrl-C: one line, no traceback, what was kept and how to go on (the commands' interrupts say)
    return run_command("heads", args.command, lambda: args.func(args), usage=_USAGE_ERRORS,
                       failures=_FAILURE_ERRORS,
                       interrupted=lambda err: str(err) or "nothing was kept; rerun the same command")


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
    _output_flags(p, "the run directory, epochs done and the best epoch's metrics")
    p.set_defaults(func=cmd_train)

    _sweep_parser(sub)

    p = sub.add_parser("predict", help="write a trained head's predictions into the store")
    p.add_argument("--store", required=True, help="feature store path or URL (opened for writing, unless "
                   "--predictions is given)")
    p.add_argument("--predictions", metavar="MINE", help="write the predictions into this store of your own "
                   "instead (created with a copy of --store's index when missing): for a --store you can only "
                   "read, such as a shared read-only one; fusion reads it with --predictions too")
    p.add_argument("--run", required=True, help="training run directory")
    p.add_argument("--name", help="prediction run name (default: the run directory's name)")
    p.add_argument("--split", help="only this split's clips (default: every clip with its features done)")
    p.add_argument("--batch-size", type=int, help="clips per forward pass")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--family", help="ensemble family to record (default: from the run)")
    p.add_argument("--weights", default="best", choices=["best", "last"],
                   help="best epoch (by validation accuracy) or last completed epoch")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prediction run (default: continue "
                   "the same run where it stopped, refuse another run into that name)")
    p.add_argument("--flush-clips", type=int, default=FLUSH_CLIPS, metavar="N",
                   help="clips per store write (default: %(default)s, or a minute's work): a killed predict loses "
                        "at most these; rerun it to continue")
    _output_flags(p, "the prediction run, clips written, resumed and skipped, family, random-weights flag and "
                  "the clips that failed")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("classify", help="classify audio/video files that are in no store with a trained run",
                       description="Run the encoders recorded with the run's feature sets and its head on new "
                       "files. Files sharing a stem (x.wav x.mp4) form one clip; a clip needs a file of each "
                       "modality the run's feature sets were made from.")
    p.add_argument("run", help="training run directory (written by 'heads train')")
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="audio (.wav, .flac, ...) and/or video (.mp4, .mkv, ...) files")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--weights", default="best", choices=["best", "last"],
                   help="best epoch (by validation accuracy) or last completed epoch")
    p.add_argument("--out", metavar="CSV", help="also write clip,files,top_class,probability,<class>... to this CSV")
    p.add_argument("--store", help="store to read the feature sets' provenance from, for runs that did not record "
                   "it (default: the store the run was trained on)")
    p.add_argument("--checkpoint", action="append", default=[], metavar="FEATURE_SET=PATH",
                   help="where a feature set's encoder checkpoint lies now, when it was moved (its sha256 must "
                        "be the recorded one); repeatable")
    p.add_argument("--segments", type=int, help="audio segments per clip (default: as in the training features)")
    p.add_argument("--frames", type=int, help="video frames per clip (default: as in the training features)")
    p.add_argument("--batch-size", type=int, default=16, help="clips per encoder call (default: %(default)s)")
    p.add_argument("--num-workers", type=int, default=0,
                   help="decoding processes (default: %(default)s, decode in this process)")
    _output_flags(p, "the run, classes and per clip its files, top class, clip and segment probabilities")
    p.set_defaults(func=cmd_classify)
    return parser


_SWEEP_EXAMPLE = """\
example (the paper's C04 late fusion over learning rate x hidden width x 3 seeds):
  heads sweep --store S --head late_fusion --features clip/RN50x4,clip/RN101,clip/ViT-B-32 \\
      --train-split fold1_train --val-split fold1_evaluate --epochs 20 \\
      --grid lr=0.1,0.01,0.001 --grid hidden=128,256,512 --seeds 0,1,2 --out sweeps/c04
random search beside the grid: --grid lr=log:1e-4:1e-1 --samples 8 (also lin:LOW:HIGH, int:LOW:HIGH)
"""


def _sweep_parser(sub: Any) -> None:
    """``heads sweep``: every ``heads train`` flag, fixed for all trials, plus the swept axes."""
    p = sub.add_parser("sweep", help="train a grid (or random draws) of configurations x seeds; mean +- std table",
                       description="Train every configuration of --grid with every seed of --seeds, each a normal "
                       "run directory DIR/<config>/seed_<s> (a rerun skips finished trials and resumes a killed "
                       "one); print the validation metrics per configuration as mean +- std (DIR/results.md, "
                       ".csv, .json) and point DIR/best at the best configuration by --metric.",
                       epilog=_SWEEP_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="JSON recipe (a TrainConfig); flags given override its fields")
    for flag, (kind, text) in _TRAIN_FLAGS.items():
        if flag == "out":
            text = "sweep directory: one run directory per trial, the results table and 'best'"
        elif flag == "seed":
            text = "the one seed when --seeds is not given"
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=kind, default=None,
                       help=_flag_help(flag, text))
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a swept training field (lr, batch_size, weight_decay, ...) or head field (hidden, dropout, "
                        "...) and its values; repeatable (the product is swept); KEY=log:LOW:HIGH, lin:LOW:HIGH or "
                        "int:LOW:HIGH is a range for --samples")
    p.add_argument("--seeds", help="comma-separated seeds, each configuration is trained with every one "
                   "(default: --seed, or the recipe's)")
    p.add_argument("--samples", type=int, default=0, metavar="N",
                   help="random search: draw N configurations from the --grid ranges (crossed with the grid's values)")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of the random-search draws (default: %(default)s; "
                   "a rerun draws the same configurations)")
    p.add_argument("--metric", default="val_accuracy", choices=["val_accuracy", "val_logloss", "loss"],
                   help="picks the best configuration: its mean over seeds at each trial's best epoch (the trainer "
                        "picks that epoch by val_accuracy) (default: %(default)s)")
    p.add_argument("--set", dest="head_set", action="append", default=[], metavar="KEY=VALUE",
                   help="head config field fixed for all trials, e.g. --set dropout=0.1")
    p.add_argument("--cache", action="store_true", default=None, help="load training features into memory")
    p.add_argument("--overwrite", action="store_true", help="train every trial afresh (default: skip finished "
                   "trials, resume killed ones)")
    p.add_argument("--no-shared-reads", dest="share_reads", action="store_false",
                   help="read the store for every trial and epoch, as separate 'heads train' runs do (default: the "
                        "linear, embedding_mlp and late_fusion trials share one in-memory read of their splits)")
    p.add_argument("--no-stack", dest="stack", action="store_false",
                   help="train the small heads' trials one after another (default: fresh linear, embedding_mlp "
                        "and late_fusion trials of one model shape, differing in lr, momentum, weight decay, "
                        "schedule or seed, train stacked, one step for all; equal to lone runs within float "
                        "tolerance, --no-stack bit for bit)")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="processes for the trials that cannot be stacked (spectrogram_cnn, frame_cnn), each reading "
                        "the store itself (default: one per CPU core; 1: one after another in this process)")
    _output_flags(p, "the sweep directory, metric, the table's rows and the best configuration")
    p.set_defaults(func=cmd_sweep)


def _output_flags(p: argparse.ArgumentParser, json_what: str) -> None:
    """``--json`` and ``--quiet``/``-q`` (``--no-progress`` stays as a hidden alias)."""
    p.add_argument("--json", action="store_true", help=f"print a JSON object on stdout: {json_what}")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or per-epoch lines "
                   "(the summary line is still printed on stderr)")
    p.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)


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
    if args.quiet:
        flags["progress"] = False
    if args.recipe:
        cfg = TrainConfig.from_json(args.recipe, **flags)
    else:
        missing = [f"--{k.replace('_', '-')}" for k in ("store", "head", "features") if k not in flags]
        if missing:
            raise ValueError(f"{args.command} needs {', '.join(missing)} (or --recipe)")
        cfg = TrainConfig(**flags)
    cfg.head_config = {**cfg.head_config, **parse_head_set(cfg.head, args.head_set)}
    return cfg


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns as wide as their longest cell."""
    cells = [headers, *rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _parse_pair(item: str, flag: str, form: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key or not value:
        raise ValueError(f"{flag} expects {form}, got {item!r}")
    return key, value


def cmd_train(args: argparse.Namespace) -> int:
    from heads.train import train

    cfg = train_config_from_args(args)
    try:
        with kept():  # a Ctrl-C that Python dropped in a finalizer still stops (featurestore._sigint)
            result = train(cfg, overwrite=args.overwrite)
    except KeyboardInterrupt:
        raise CommandInterrupted(train_kept(cfg.out)) from None
    if args.json:
        print(json.dumps({"run_dir": str(result.run_dir), "head": cfg.head, "features": list(cfg.features),
                          "epochs": cfg.epochs, "epochs_completed": result.epochs_completed,
                          "nothing_to_do": result.nothing_to_do, "best_epoch": result.best_epoch,
                          "best_val_accuracy": result.best_val_accuracy,
                          "best_val_logloss": result.best_val_logloss}, indent=2))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """``heads sweep``: the Markdown table (or ``--json``) on stdout, a summary line on stderr."""
    from heads.sweep import SweepError, parse_grid, parse_seeds, sweep

    cfg = train_config_from_args(args)
    grid, ranges = parse_grid(cfg.head, args.grid)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    if args.samples < 0:
        raise SweepError(f"--samples must be an integer >= 0, got {args.samples}")
    try:
        with kept():
            result = sweep(cfg, grid, seeds=seeds, ranges=ranges, samples=args.samples, sample_seed=args.sample_seed,
                           metric=args.metric, overwrite=args.overwrite, share_reads=args.share_reads,
                           stack=args.stack, jobs=args.jobs)
    except KeyboardInterrupt:
        raise CommandInterrupted(f"finished trials and committed epochs kept in {cfg.out}, rerun the same command "
                                 f"to resume") from None
    if args.json:
        print(json.dumps({"out": str(result.out), "metric": result.metric, "trials": len(result.trials),
                          "trained": result.trained, "rows": result.rows, "best": result.best}, indent=2))
    else:
        print(result.markdown())
    best = f"; best {result.best['config']} ({result.metric} {result.best['mean']:.4f})" if result.best else ""
    print(f"sweep: {len(result.trials)} trial(s), {result.trained} trained now, in {result.out}{best}", file=sys.stderr)
    return 0


def train_kept(run_dir: str) -> str:
    """What an interrupted ``heads train`` kept: the epochs committed to ``state.json``."""
    try:
        epoch = int(json.loads((Path(run_dir) / "state.json").read_text()).get("epoch", 0))
    except (OSError, ValueError, AttributeError):
        epoch = 0
    if epoch < 1:
        return f"no epoch was finished, nothing kept in {run_dir}; rerun the same command to start"
    epochs = "epoch 1" if epoch == 1 else f"epochs 1-{epoch}"
    return f"{epochs} kept in {run_dir}, rerun the same command to resume"


def cmd_predict(args: argparse.Namespace) -> int:
    """``heads predict``: 0, or 1 when some clip had non-finite features or probabilities (named)."""
    from heads.predict import predict

    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be an integer >= 1, got {args.batch_size}")
    if args.flush_clips < 1:
        raise ValueError(f"--flush-clips must be an integer >= 1, got {args.flush_clips}")
    result = predict(args.store, args.run, name=args.name, split=args.split, batch_size=args.batch_size,
                     device=args.device, overwrite=args.overwrite, family=args.family, weights=args.weights,
                     progress=not args.quiet, flush_clips=args.flush_clips, predictions=args.predictions)
    if args.json:
        print(json.dumps({"store": str(args.store), "predictions": args.predictions, "run": result.run, "run_dir": result.attrs["run_dir"],
                          "clips": result.n_clips, "resumed": result.n_resumed, "skipped": result.n_skipped,
                          "segments": result.n_segments, "family": result.attrs["family"],
                          "random_weights": result.attrs["random_weights"], "errors": result.errors}, indent=2))
    if result.errors:
        shown = "; ".join(f"{clip}: {why}" for clip, why in list(result.errors.items())[:5])
        more = f"; and {len(result.errors) - 5} more" if len(result.errors) > 5 else ""
        print(f"heads predict: error: {len(result.errors)} clip(s) not predicted (not marked done): {shown}{more}",
              file=sys.stderr)
    return result.exit_code


def cmd_classify(args: argparse.Namespace) -> int:
    """``heads classify RUN FILE...``: a table (file, top class, probability) or JSON; 1 if a clip failed."""
    from featurestore.encode_files import group_files
    from heads.classify import Classifier, check_output, check_sizes

    check_sizes({"segments": args.segments, "frames": args.frames, "batch_size": args.batch_size,
                 "num_workers": args.num_workers}, _CLASSIFY_FLAGS)  # before anything is allocated
    if args.out:
        check_output(args.out, args.run, store=args.store)
    clips = group_files(args.files)  # missing files and unknown kinds are refused before any model is built
    checkpoints = dict(_parse_pair(item, "--checkpoint", "FEATURE_SET=PATH") for item in args.checkpoint)
    classifier = Classifier(args.run, args.device, weights=args.weights, store=args.store, checkpoints=checkpoints,
                            segments=args.segments, frames=args.frames, batch_size=args.batch_size,
                            num_workers=args.num_workers)
    try:
        with kept():
            result = classifier.classify(clips, progress=not args.quiet)
    except KeyboardInterrupt:
        raise CommandInterrupted("nothing was written; rerun the same command") from None
    if args.out:
        result.write_csv(args.out)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(classify_table(result))
    failed = f"; {len(result.errors)} failed" if result.errors else ""
    print(f"classify: {len(result.clips)} clip(s) classified with {args.run} ({args.weights} weights) on "
          f"{classifier.trained.device}{failed}" + (f"; wrote {args.out}" if args.out else ""), file=sys.stderr)
    return result.exit_code


_CLASSIFY_FLAGS = {"segments": "--segments", "frames": "--frames", "batch_size": "--batch-size",
                   "num_workers": "--num-workers"}


def classify_table(result: Any) -> str:
    """The plain-text answer of ``heads classify``: random-weights warning, table, failures."""
    lines = []
    if result.random_weights:
        lines.append(f"WARNING: RANDOM weights in {', '.join(result.random_weights)}: these probabilities carry "
                     f"no pretrained knowledge")
    rows = [(clip.describe(), label, f"{p:.4f}") for clip, (label, p) in zip(result.clips, result.top())]
    if rows:
        lines.append(_table(("file", "top class", "probability"), rows))
    lines += [f"FAILED {name}: {message}" for name, message in result.errors.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
