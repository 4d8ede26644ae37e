"""``python -m fusion`` / ``fusion``: evaluate, report and submit fusion recipes on a store.

Each command is a thin wrapper: it opens the store read-only, reads the recipe and calls one library
function (:func:`fusion.evaluate.evaluate_recipe`, :func:`fusion.report.write_report`,
:func:`fusion.submit.submit_recipe`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence

from fusion.recipe import FusionRecipe, RecipeError
from fusion.submission import DEFAULT_FILENAME_TEMPLATE


def _open(path: str):
    from featurestore import open_store

    return open_store(path, mode="r")


def _recipe(args: argparse.Namespace) -> FusionRecipe:
    recipe = FusionRecipe.from_json(args.recipe)
    if getattr(args, "raw_metric", False):
        recipe.metric_renormalize = False
    if getattr(args, "cross_fit", None) is not None and recipe.calibration:
        # one fold count for the recipe and its comparison rows; replace() re-runs the checks
        recipe.calibration = dataclasses.replace(recipe.calibration, cross_fit=args.cross_fit)
    return recipe


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fusion.evaluate import evaluate_recipe

    with _open(args.store) as store:
        ev = evaluate_recipe(store, _recipe(args), args.split, args.calibration_split, args.cross_fit)
    if args.json:
        print(json.dumps(ev.to_dict(), indent=2))
        return 0
    print(f"{ev.output.recipe.name} on {ev.output.split} ({len(ev.output.clip_ids)} clips)")
    print(f"{'row':<34} {'log-loss':>9} {'micro':>8} {'acc %':>7}")
    for group in (ev.runs, ev.families, ev.variants, {"recipe output": ev.final}):
        for name, s in group.items():
            print(f"{name:<34} {s.logloss:9.3f} {s.logloss_micro:8.3f} {100 * s.accuracy:7.1f}")
    for note in ev.output.notes:
        print(f"note: {note}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fusion.report import write_report

    with _open(args.store) as store:
        report = write_report(store, _recipe(args), args.out, args.split, args.calibration_split, args.cross_fit)
    final = report.evaluation.final
    print(f"wrote {report.markdown} (+ {report.confusion_png.name}, {report.reliability_png.name}, "
          f"{report.metrics_json.name}); final log-loss {final.logloss:.3f}, accuracy {100 * final.accuracy:.1f} %")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from fusion.submit import submit_recipe

    with _open(args.store) as store:
        path, n = submit_recipe(store, _recipe(args), args.split, args.out, args.filename_template)
    print(f"wrote {path}: {n} clips")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from fusion.runinfo import describe_runs

    with _open(args.store) as store:
        for run, info in describe_runs(store).items():
            flag = "  RANDOM weights: " + ", ".join(info.random_features) if info.random else ""
            print(f"{run}: {info.architecture}; audio={info.audio_inputs} video={info.video_inputs}{flag}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion", description="Evaluate, report and submit fusion recipes "
                                     "on the prediction runs of a feature store.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, split_help: str) -> None:
        p.add_argument("--store", required=True, help="feature store path or URL")
        p.add_argument("--recipe", required=True, help="fusion recipe JSON file")
        p.add_argument("--split", default=None, help=split_help)

    def scoring(p: argparse.ArgumentParser) -> None:
        common(p, "labelled split to score (default: the recipe's eval_split)")
        p.add_argument("--calibration-split", default=None, help="fit split for the temperature/stacking rows")
        p.add_argument("--cross-fit", type=int, default=None, help="location folds when that split overlaps --split")
        p.add_argument("--raw-metric", action="store_true", help="score rows without renormalising them")

    ev = sub.add_parser("evaluate", help="score a recipe on a labelled split")
    scoring(ev)
    ev.add_argument("--json", action="store_true", help="print every score as JSON")
    ev.set_defaults(func=cmd_evaluate)

    rp = sub.add_parser("report", help="write report.md, figures and metrics.json")
    scoring(rp)
    rp.add_argument("--out", required=True, help="output directory")
    rp.set_defaults(func=cmd_report)

    sm = sub.add_parser("submit", help="write a DCASE submission CSV")
    common(sm, "split to write (e.g. fold1_test; labels not needed)")
    sm.add_argument("--out", required=True, help="output .csv file (tab-separated)")
    sm.add_argument("--filename-template", default=DEFAULT_FILENAME_TEMPLATE,
                    help="filename column, a format string with {clip_id} (default: %(default)s)")
    sm.set_defaults(func=cmd_submit)

    rn = sub.add_parser("runs", help="list the store's prediction runs and their inputs")
    rn.add_argument("--store", required=True, help="feature store path or URL")
    rn.set_defaults(func=cmd_runs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fusion`` and ``python -m fusion``; returns the exit code (2: bad input)."""
    from featurestore.cli import run_command
    from featurestore.errors import FeatureStoreError

    args = build_parser().parse_args(argv)
    return run_command("fusion", args.command, lambda: args.func(args),
                       usage=(RecipeError, FeatureStoreError, FileNotFoundError, ValueError), failures=())


if __name__ == "__main__":
    raise SystemExit(main())
