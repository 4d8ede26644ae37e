"""``python -m fusion`` / ``fusion``: evaluate, report, submit and classify with fusion recipes on a store.

Each command is a thin wrapper: it opens the store read-only, reads the recipe and calls one library
function (:func:`fusion.evaluate.evaluate_recipe`, :func:`fusion.report.write_report`,
:func:`fusion.submit.submit_recipe`, :func:`fusion.classify.classify_files`). ``--json`` prints what
a command did as one JSON object on stdout.

Every command that scores or writes a recipe's output says when a run behind it used random encoder
weights (a ``WARNING: run ... uses RANDOM weights`` line: first on stdout, or on stderr with
``--json``). Python warnings (a calibrator fitted on a training split, a class missing from a
stacking fit) are one line each, ``fusion <cmd>: warning: ...``, without source lines.

``--predictions MINE`` reads prediction runs from a prediction store of the user's own too (what
``heads predict --predictions`` writes for a store the user may only read); its index must be the
store's (docs/store.md, "Shared, read-only stores"). Ctrl-C is one line saying what was kept, exit 130.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from collections.abc import Sequence

from fusion.recipe import FusionRecipe, RecipeError
from fusion.submission import DEFAULT_FILENAME_TEMPLATE


def _open(args: argparse.Namespace):
    """The store, read-only; with ``--predictions`` together with the runs of that prediction store."""
    from featurestore import open_store
    from featurestore.store.shared import open_with_predictions

    if getattr(args, "predictions", None):
        return open_with_predictions(args.store, args.predictions)
    return open_store(args.store, mode="r")


def random_warnings(store, runs: Sequence[str]) -> list[str]:
    """One ``WARNING:`` line per run whose inputs ran with random weights (README: every output says so)."""
    from fusion.runinfo import describe_runs

    return random_lines({run: info.random_features for run, info in describe_runs(store, runs).items()
                         if info.random})


def random_lines(random_weights: dict[str, list[str]]) -> list[str]:
    """``WARNING: run R uses RANDOM weights (features): ...`` for each run -> its random-weight inputs."""
    return [f"WARNING: run {run} uses RANDOM weights ({', '.join(features)}): its probabilities carry no "
            f"pretrained knowledge" for run, features in random_weights.items()]


def _say_warnings(lines: list[str], as_json: bool) -> None:
    for line in lines:
        print(line, file=sys.stderr if as_json else sys.stdout)


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

    with _open(args) as store:
        recipe = _recipe(args)
        ev = evaluate_recipe(store, recipe, args.split, args.calibration_split, args.cross_fit)
        _say_warnings(random_warnings(store, recipe.runs), args.json)
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

    with _open(args) as store:
        recipe = _recipe(args)
        report = write_report(store, recipe, args.out, args.split, args.calibration_split, args.cross_fit)
        _say_warnings(random_warnings(store, recipe.runs), args.json)
    final = report.evaluation.final
    if args.json:
        print(json.dumps({"recipe": report.evaluation.output.recipe.name, "split": report.evaluation.output.split,
                          "directory": str(report.directory), "markdown": str(report.markdown),
                          "figures": [str(report.confusion_png), str(report.reliability_png)],
                          "metrics_json": str(report.metrics_json), "final": {"logloss": final.logloss,
                          "accuracy": final.accuracy, "n_clips": final.n_clips}}, indent=2))
        return 0
    print(f"wrote {report.markdown} (+ {report.confusion_png.name}, {report.reliability_png.name}, "
          f"{report.metrics_json.name}); final log-loss {final.logloss:.3f}, accuracy {100 * final.accuracy:.1f} %")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from fusion.submit import submit_recipe

    recipe = _recipe(args)
    with _open(args) as store:
        path, n = submit_recipe(store, recipe, args.split, args.out, args.filename_template)
        _say_warnings(random_warnings(store, recipe.runs), args.json)
    if args.json:
        print(json.dumps({"recipe": recipe.name, "split": args.split or recipe.eval_split, "path": str(path),
                          "clips": n}, indent=2))
        return 0
    print(f"wrote {path}: {n} clips")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from fusion.runinfo import describe_runs

    with _open(args) as store:
        runs = describe_runs(store)
    if args.json:
        print(json.dumps({run: {**dataclasses.asdict(info), "random": info.random} for run, info in runs.items()},
                         indent=2))
        return 0
    for run, info in runs.items():
        flag = "  RANDOM weights: " + ", ".join(info.random_features) if info.random else ""
        print(f"{run}: {info.architecture}; audio={info.audio_inputs} video={info.video_inputs}{flag}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    """``fusion classify``: the recipe's fusion of new files, as a table or JSON; 1 if a clip failed."""
    from fusion.classify import classify_files
    from fusion.submission import check_output_file

    run_dirs = {}
    for item in args.run_dir:
        run, sep, path = item.partition("=")
        if not sep or not run or not path:
            raise ValueError(f"--run-dir expects RUN=PATH, got {item!r}")
        run_dirs[run] = path
    recipe = FusionRecipe.from_json(args.recipe)
    with _open(args) as store:
        if args.out:  # a directory or a file of the store is refused before any run classifies the files
            check_output_file(args.out, store)
        result = classify_files(store, recipe, args.files, args.device, run_dirs, progress=not args.quiet)
    if args.out:
        result.write_csv(args.out)
    if args.json:
        _say_warnings(random_lines(result.random_weights), as_json=True)
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(classify_table(result))
    failed = f"; {len(result.errors)} failed" if result.errors else ""
    print(f"fusion classify: {len(result.clips)} clip(s) fused with {recipe.name} from {len(result.runs)} run(s)"
          f"{failed}" + (f"; wrote {args.out}" if args.out else ""), file=sys.stderr)
    return result.exit_code


def classify_table(result) -> str:
    """Random-weights warning, a table (file, top class, probability) and the failed clips."""
    lines = random_lines(result.random_weights)
    rows = [("file", "top class", "probability")]
    rows += [(clip.describe(), label, f"{p:.4f}") for clip, (label, p) in zip(result.clips, result.top())]
    if len(rows) > 1:
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines += [f"FAILED {name}: {message}" for name, message in result.errors.items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion", description="Evaluate, report and submit fusion recipes "
                                     "on the prediction runs of a feature store.")
    sub = parser.add_subparsers(dest="command", required=True)

    def store_flags(p: argparse.ArgumentParser, store_help: str = "feature store path or URL") -> None:
        p.add_argument("--store", required=True, help=store_help)
        p.add_argument("--predictions", metavar="MINE", help="also read the prediction runs of this store of your "
                       "own (written by 'heads predict --predictions' for a --store you can only read); its clip "
                       "ids and classes must be --store's")

    def common(p: argparse.ArgumentParser, split_help: str) -> None:
        store_flags(p)
        p.add_argument("--recipe", required=True, help="fusion recipe JSON file")
        p.add_argument("--split", default=None, help=split_help)

    def scoring(p: argparse.ArgumentParser) -> None:
        common(p, "labelled split to score (default: the recipe's eval_split)")
        p.add_argument("--calibration-split", default=None, metavar="SPLIT",
                       help="fit split for the temperature/stacking rows")
        p.add_argument("--cross-fit", type=int, default=None, metavar="K",
                       help="location folds when that split overlaps --split")
        p.add_argument("--raw-metric", action="store_true", help="score rows without renormalising them")

    ev = sub.add_parser("evaluate", help="score a recipe on a labelled split")
    scoring(ev)
    ev.add_argument("--json", action="store_true", help="print every score as JSON")
    ev.set_defaults(func=cmd_evaluate)

    rp = sub.add_parser("report", help="write report.md, figures and metrics.json")
    scoring(rp)
    rp.add_argument("--out", required=True, help="output directory")
    rp.add_argument("--json", action="store_true", help="print the files written and the final scores as JSON")
    rp.set_defaults(func=cmd_report)

    sm = sub.add_parser("submit", help="write a DCASE submission CSV")
    common(sm, "split to write (e.g. fold1_test; labels not needed)")
    sm.add_argument("--out", required=True, help="output .csv file (tab-separated)")
    sm.add_argument("--filename-template", default=DEFAULT_FILENAME_TEMPLATE,
                    help="filename column, a format string with {clip_id} (default: %(default)s)")
    sm.add_argument("--json", action="store_true", help="print the recipe, split, file written and clip count as JSON")
    sm.set_defaults(func=cmd_submit)

    rn = sub.add_parser("runs", help="list the store's prediction runs and their inputs")
    store_flags(rn)
    rn.add_argument("--json", action="store_true", help="print every run's head, inputs, weights and splits as JSON")
    rn.set_defaults(func=cmd_runs)

    cl = sub.add_parser("classify", help="fuse the recipe's runs on audio/video files that are in no store",
                        description="Each run of the recipe classifies the files through 'python -m heads "
                        "classify' (its recorded run directory); the recipe's rules, weights and calibration "
                        "are fitted on the store, as 'fusion evaluate' does. Files sharing a stem (x.wav "
                        "x.mp4) form one clip.")
    store_flags(cl, "feature store path or URL holding the recipe's runs")
    cl.add_argument("--recipe", required=True, help="fusion recipe JSON file")
    cl.add_argument("files", nargs="+", metavar="FILE", help="audio (.wav ...) and/or video (.mp4 ...) files")
    cl.add_argument("--device", default="auto", help="device each run's 'heads classify' uses: auto (CUDA "
                    "when available, else the CPU), cpu, cuda or cuda:N")
    cl.add_argument("--run-dir", action="append", default=[], metavar="RUN=PATH",
                    help="training run directory of a prediction run, instead of the one it records; repeatable")
    cl.add_argument("--out", metavar="CSV", help="also write clip,files,top_class,probability,<class>... to this CSV")
    cl.add_argument("--json", action="store_true", help="print the runs asked and per clip its files, top class "
                    "and fused probabilities as JSON")
    cl.add_argument("-q", "--quiet", action="store_true", help="no progress lines (the summary line is still "
                    "printed on stderr)")
    cl.set_defaults(func=cmd_classify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fusion`` and ``python -m fusion``; returns the exit code.

    2: bad input (a recipe, a store, an output path that is a directory or a file); 1: the work
    failed (an output file could not be written -- a full disk --, or probabilities came out NaN).
    """
    from featurestore.atomic_files import OutputWriteError
    from featurestore.cli import run_command
    from featurestore.errors import FeatureStoreError
    from fusion._validate import NonFiniteProbabilitiesError

    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning(args.command)
        return run_command("fusion", args.command, lambda: args.func(args),
                           usage=(RecipeError, FeatureStoreError, ValueError, OSError),
                           failures=(OutputWriteError, NonFiniteProbabilitiesError),
                           interrupted=lambda err: _interrupted_kept(args))  # Ctrl-C: one line


def _interrupted_kept(args: argparse.Namespace) -> str:
    """What an interrupted command left: fusion writes its files whole or not at all, never the store."""
    out = getattr(args, "out", None)
    if not out:
        return "nothing was written (the store is only read); rerun the same command"
    if args.command == "report":
        return (f"the files already in {out} are whole (each is written at once) but the report may lack some; "
                f"rerun the same command")
    return f"{out} is written whole or not at all, never half; rerun the same command"


def _one_line_warning(command: str):
    """``warnings.showwarning`` for the command line: ``fusion <cmd>: warning: ...``, no source lines.

    Each text is said once (a calibration fitted for the recipe and again for a comparison row warns
    from two places about one thing).
    """
    said: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if str(message) not in said:
            said.add(str(message))
            print(f"fusion {command}: warning: {message}", file=sys.stderr)

    return show


if __name__ == "__main__":
    raise SystemExit(main())
