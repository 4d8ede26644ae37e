"""``featurestore`` / ``python -m featurestore``: look into, check, copy and fill feature stores.

Each command is a thin function over a library call (``open_store``, ``FeatureStore.verify``,
``convert_store``, ``featurestore.extract.extract``), so what the command line does is what the
tests exercise through the library. Exit codes: 0 ok, 1 the work failed (verify found problems, a
clip's features are missing or corrupt), 2 usage or bad input (unknown store, clip or feature);
errors print their message, never a traceback. ``run_command`` is that error handling, shared with
the ``heads`` and ``fusion`` command lines.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from featurestore._devices import DEVICE_HELP
from featurestore.atomic_files import OutputWriteError, atomic_write, atomic_write_text
from featurestore.extract import DEFAULT_BATCH_SIZE, DEFAULT_ENCODERS, ExtractSummary
from featurestore.extract.errors import ExtractionStopped
from featurestore.errors import CorruptChunkError, FeatureStoreError, MissingFeatureError
from featurestore.provenance import is_random_weights, weights_identity
from featurestore.store import FeatureStore, backend_for, convert_store, open_store

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader quit
RANDOM_FLAG = "<-- RANDOM WEIGHTS, not pretrained"


# --------------------------------------------------------------------------------------- helpers
def _emit_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> str:
    """Left-aligned columns wide enough for their longest cell."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def add_store_argument(parser: argparse.ArgumentParser, help: str, after: Sequence[str] = ()) -> None:
    """The store argument, spelled the same way in every command line: ``STORE`` or ``--store STORE``.

    Args:
        parser: the subcommand's parser; call this where the positional STORE goes.
        help: what the store is, for ``--help``.
        after: names of the positional arguments that follow STORE (``show STORE CLIP_ID``): with
            ``--store`` they shift left, which `resolve_store_argument` undoes.
    """
    parser.add_argument("store", nargs="?", default=None, metavar="STORE", help=f"{help} (or give it as --store STORE)")
    parser.add_argument("--store", dest="store_option", default=None, metavar="STORE",
                        help="the store, as an option instead of the positional STORE")
    parser.set_defaults(store_positionals_after=tuple(after))


def resolve_store_argument(args: argparse.Namespace) -> argparse.Namespace:
    """Set ``args.store`` from ``--store`` or the positional, shifting the positionals after it.

    With ``--store S``, argparse hands the first remaining positional to STORE; the values are
    moved back to the arguments they belong to. Giving the store both ways, or not at all, is a
    usage error (exit 2)."""
    after = tuple(getattr(args, "store_positionals_after", ()))
    option = getattr(args, "store_option", None)
    if option is None:
        if args.store is None:
            raise _UsageError("give the store: STORE or --store STORE")
        return args
    values = [v for v in [args.store, *(getattr(args, name) for name in after)] if v is not None]
    if len(values) > len(after):
        raise _UsageError(f"the store is given twice: {values[0]!r} and --store {option!r}")
    for name, value in zip(after, values + [None] * (len(after) - len(values))):
        setattr(args, name, value)
    args.store = option
    return args


def _encoder_spec(provenance: dict) -> str:
    encoder = provenance.get("encoder", "?")
    return encoder if isinstance(encoder, str) else json.dumps(encoder, sort_keys=True)


def _head_of(attrs: dict) -> str:
    head = attrs.get("head", "?")
    if isinstance(head, dict):
        return str(head.get("name") or head.get("head") or json.dumps(head, sort_keys=True)[:60])
    return str(head)


# ------------------------------------------------------------------------------------------- ls
def describe_store(store: FeatureStore) -> dict[str, Any]:
    """Everything ``ls`` shows, as JSON-able data: index summary, feature sets, class features, runs."""
    n = store.n_clips
    attrs = store.attrs
    features = {}
    for name, info in store.feature_sets().items():
        features[name] = {
            "shape": list(info.shape), "dtype": info.dtype, "chunk_clips": info.chunk_clips,
            "n_done": info.n_done, "n_clips": n, "n_errors": info.n_errors,
            "encoder": _encoder_spec(info.provenance), "weights": info.weights_identity,
            "random_weights": info.random_weights, "fingerprint": info.fingerprint,
        }
    class_features = {}
    for name in store.class_feature_sets():
        data, cattrs = store.get_class_features(name)
        prov = cattrs.get("provenance", {})
        class_features[name] = {"shape": list(data.shape), "dtype": str(data.dtype),
                                "encoder": _encoder_spec(prov), "weights": weights_identity(prov),
                                "random_weights": is_random_weights(prov),
                                "fingerprint": cattrs.get("fingerprint", "")}
    runs = {run: {"head": _head_of(rattrs), "n_done": int(store.prediction_done(run).sum()), "n_clips": n,
                  "attrs": {k: v for k, v in rattrs.items() if k != "runtime"}}
            for run, rattrs in store.prediction_runs().items()}
    return {"location": store.location, "backend": store.backend,
            "schema_version": attrs.get("schema_version"), "dataset": attrs.get("dataset", ""),
            "datasets": attrs.get("datasets", []),
            "created_by": attrs.get("created_by", ""), "index": _index_summary(store),
            "features": features, "class_features": class_features, "predictions": runs}


def _index_summary(store: FeatureStore) -> dict[str, Any]:
    labels = store.labels
    splits = {s: int(store.column(f"split/{s}").astype(bool).sum()) for s in store.splits()}
    cities = store.index.distinct("city")  # kept by appends in the root attributes: no column decoded
    return {"n_clips": store.n_clips, "classes": store.classes, "n_labelled": int((labels >= 0).sum()),
            "splits": splits, "cities": cities}


def _print_store(desc: dict[str, Any]) -> None:
    idx = desc["index"]
    print(f"store     {desc['location']}  ({desc['backend']}, schema {desc['schema_version']}, "
          f"dataset {desc['dataset']!r}, created by {desc['created_by']})")
    print(f"index     {idx['n_clips']} clips ({idx['n_labelled']} labelled), {len(idx['classes'])} classes, "
          f"{len(idx['cities'])} cities")
    if len(desc["datasets"]) > 1:  # clips were added from more than one manifest
        parts = [f"{d['dataset']!r} rows {d['rows'][0]}:{d['rows'][1]} ({d['dataset_root'] or 'no root'})"
                 for d in desc["datasets"]]
        print(f"added     {'; '.join(parts)}")
    print(f"classes   {', '.join(idx['classes']) or '(none)'}")
    splits = ", ".join(f"{s} ({k})" for s, k in idx["splits"].items())
    print(f"splits    {splits or '(none)'}")
    _print_features(desc["features"])
    _print_class_features(desc["class_features"])
    _print_runs(desc["predictions"])
    random = [n for n, f in {**desc["features"], **desc["class_features"]}.items() if f["random_weights"]]
    if random:
        print(f"\nWARNING: {len(random)} set(s) were computed with RANDOM encoder weights (not pretrained); "
              f"their features carry no pretrained knowledge: {', '.join(random)}")


def _print_features(features: dict[str, dict]) -> None:
    print(f"\nfeature sets ({len(features)})")
    if not features:
        return
    rows = [[name, "x".join(map(str, f["shape"])), f["dtype"], f"{f['n_done']}/{f['n_clips']}", f["n_errors"],
             f["encoder"], f["weights"] + ("  " + RANDOM_FLAG if f["random_weights"] else ""), f["fingerprint"]]
            for name, f in features.items()]
    print(_table(["name", "shape", "dtype", "done", "errors", "encoder", "weights", "fingerprint"], rows))


def _print_class_features(class_features: dict[str, dict]) -> None:
    if not class_features:
        return
    print(f"\nclass feature sets ({len(class_features)})")
    rows = [[name, "x".join(map(str, f["shape"])), f["dtype"], f["encoder"],
             f["weights"] + ("  " + RANDOM_FLAG if f["random_weights"] else ""), f["fingerprint"]]
            for name, f in class_features.items()]
    print(_table(["name", "shape", "dtype", "encoder", "weights", "fingerprint"], rows))


def _print_runs(runs: dict[str, dict]) -> None:
    print(f"\nprediction runs ({len(runs)})")
    if runs:
        print(_table(["run", "head", "done"], [[r, v["head"], f"{v['n_done']}/{v['n_clips']}"]
                                               for r, v in runs.items()]))


def cmd_ls(args: argparse.Namespace) -> int:
    with open_store(args.store, "r") as store:
        desc = describe_store(store)
    _emit_json(desc) if args.json else _print_store(desc)
    return EXIT_OK


# ----------------------------------------------------------------------------------------- show
def array_stats(array: np.ndarray) -> dict[str, float]:
    """min/max/mean/std in float64 (float16 sums would overflow or round)."""
    values = np.asarray(array, dtype=np.float64)
    return {"min": float(values.min()), "max": float(values.max()),
            "mean": float(values.mean()), "std": float(values.std())}


def describe_clip(store: FeatureStore, clip_id: str) -> dict[str, Any]:
    """Index metadata of one clip plus, per feature set and prediction run, its state and stats."""
    row = store.row(clip_id)
    label = int(store.labels[row])
    meta = {"clip_id": clip_id, "row": row, "label": store.classes[label] if label >= 0 else None,
            "label_index": label,
            "splits": [s for s in store.splits() if bool(store.column(f"split/{s}")[row])]}
    for column in ("city", "location", "audio_path", "video_path"):
        meta[column] = str(store.column(column)[row])
    features = {name: _feature_state(store, name, info.shape[1:], info.dtype, clip_id)
                for name, info in store.feature_sets().items()}
    runs = {run: _prediction_state(store, run, clip_id) for run in store.prediction_runs()}
    return {"clip": meta, "features": features, "predictions": runs}


def _feature_state(store: FeatureStore, name: str, shape: tuple, dtype: str, clip_id: str) -> dict:
    state: dict[str, Any] = {"shape": list(shape), "dtype": dtype}
    error = store.errors(name).get(clip_id)
    if error:
        return {**state, "status": "error", "error": error}
    try:
        return {**state, "status": "done", **array_stats(store.get(name, clip_id))}
    except MissingFeatureError:
        return {**state, "status": "not computed"}
    except CorruptChunkError as err:
        return {**state, "status": "corrupt", "error": str(err)}


def _prediction_state(store: FeatureStore, run: str, clip_id: str) -> dict:
    try:
        probs = store.get_predictions(run, [clip_id])[0]
    except MissingFeatureError:
        return {"status": "not computed"}
    except CorruptChunkError as err:
        return {"status": "corrupt", "error": str(err)}
    mean = probs.mean(axis=0)
    top = int(mean.argmax())
    return {"status": "done", "shape": list(probs.shape), "top_class": store.classes[top],
            "top_prob": float(mean[top])}


def _print_clip(desc: dict[str, Any]) -> None:
    clip = desc["clip"]
    for key in ("clip_id", "row", "label", "city", "location", "splits", "audio_path", "video_path"):
        value = ", ".join(clip[key]) if key == "splits" else clip[key]
        print(f"{key:<11} {value if value not in ('', None) else '-'}")
    print("\nfeatures")
    rows = []
    for name, f in desc["features"].items():
        shape = "x".join(map(str, f["shape"]))
        if f["status"] == "done":
            detail = f"min {f['min']:.4g}  max {f['max']:.4g}  mean {f['mean']:.4g}  std {f['std']:.4g}"
        else:
            detail = f"{f['status']}: {f['error']}" if "error" in f else f["status"]
        rows.append([name, shape, f["dtype"], detail])
    print(_table(["name", "shape", "dtype", "values"], rows) if rows else "  (none)")
    if desc["predictions"]:
        print("\npredictions")
        rows = [[run, f"{p['top_class']} ({p['top_prob']:.3f})" if p["status"] == "done" else p["status"]]
                for run, p in desc["predictions"].items()]
        print(_table(["run", "top class (mean prob)"], rows))


def cmd_show(args: argparse.Namespace) -> int:
    with open_store(args.store, "r") as store:
        desc = describe_clip(store, args.clip_id)
    _emit_json(desc) if args.json else _print_clip(desc)
    return EXIT_OK


# ------------------------------------------------------------------------------------------ get
def cmd_get(args: argparse.Namespace) -> int:
    if (args.feature is None) == (args.run is None):
        raise _UsageError("give exactly one of FEATURE or --run RUN")
    out = Path(args.output)
    if out.suffix != ".npy":
        raise _UsageError(f"output {out} must end with .npy (it is written with numpy.save)")
    if not out.parent.is_dir():  # said before the store is read, not as an errno after it
        raise _UsageError(f"output {out}: folder {out.parent} does not exist; create it or choose another -o")
    with open_store(args.store, "r") as store:
        if args.run is not None:
            array = store.get_predictions(args.run, [args.clip_id])[0]
        else:
            array = store.get(args.feature, args.clip_id)
    with atomic_write(out, "wb") as handle:  # whole or not at all: Ctrl-C or a full disk keeps the old file
        np.save(handle, array)
    print(f"wrote {out}: {args.feature or 'predictions/' + args.run} of {args.clip_id}, "
          f"shape {list(array.shape)}, {array.dtype}")
    return EXIT_OK


# --------------------------------------------------------------------------------------- search
def cmd_search(args: argparse.Namespace) -> int:
    """``search STORE --feature-set F (--like CLIP_ID [--like ...] | --text TEXT) [-k K]``: the nearest clips.

    Several ``--like`` ids are one batch query (one matrix product); ``--json`` then prints a list.
    A sentence is embedded here, above the store (`featurestore.text_query`), which searches vectors only.
    """
    if (not args.like) == (args.text is None):
        raise _UsageError("give --like CLIP_ID (one or more) or --text TEXT, not both")
    with open_store(args.store, "r") as store:
        if args.text is not None:
            from featurestore.text_query import search_text

            results = [search_text(store, args.feature_set, args.text, args.k, method=args.method, device=args.device)]
        else:
            results = store.search(args.feature_set, list(args.like), args.k, method=args.method,
                                   include_self=args.include_self)
    if args.json:
        _emit_json(results[0].to_dict() if len(results) == 1 else [r.to_dict() for r in results])
        return EXIT_OK
    for number, result in enumerate(results):
        query = f"clip {result.query['like']}" if "like" in result.query else \
            f"the text {args.text!r} ({result.query['encoder']})"
        print(("\n" if number else "") + f"{result.feature_set}: the {len(result.clip_ids)} clips nearest to {query}, "
              f"{result.method} search")
        rows = [(i + 1, c, f"{s:.4f}", lab if lab is not None else "-")
                for i, (c, s, lab) in enumerate(zip(result.clip_ids, result.scores, result.labels))]
        print(_table(["rank", "clip_id", "score", "label"], rows, indent=""))
    for note in results[0].notes:
        print(f"note: {note}", file=sys.stderr)
    if any(r.random_weights for r in results):
        print(f"WARNING: {results[0].feature_set} (or its text tower) has RANDOM weights: these neighbours "
              f"carry no pretrained knowledge", file=sys.stderr)
    return EXIT_OK


# ----------------------------------------------------------------------------------------- view
def cmd_view(args: argparse.Namespace) -> int:
    """``view STORE``: the store in the browser until Ctrl-C (`featurestore.viewer`, docs/view.md)."""
    from featurestore.viewer import view

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how the viewer stops: exit 0, no message
        view(args.store, host=args.host, port=args.port, feature_sets=args.feature_set, method=args.method,
             recipes=args.recipe or ())
    return EXIT_OK


# --------------------------------------------------------------------------------------- verify
def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 1 for problems, also for a store that does not open because a ``zarr.json`` is damaged."""
    from featurestore.store.verify import unopenable_report

    try:
        store = open_store(args.store, "r")
    except Exception:  # noqa: BLE001 - damaged metadata is a report; anything else keeps its error
        report = unopenable_report(args.store)
        if report is None:
            raise
    else:
        with store:
            report = store.verify()
    if args.remove_leftovers and report.leftovers:
        from featurestore.store.verify import remove_leftovers

        print(f"removed {remove_leftovers(report)} temp file(s) left by interrupted writes", file=sys.stderr)
        report.leftovers = []
    if args.json:
        _emit_json(report.to_dict())
    else:
        for problem in report.problems:
            print(f"PROBLEM {problem}")
        print(report.summary())
    return EXIT_OK if report.ok else EXIT_FAILED


# -------------------------------------------------------------------------------------- convert
def cmd_convert(args: argparse.Namespace) -> int:
    dst = Path(args.dst)
    if not args.overwrite and _exists(args.dst):
        _refuse_unreplaceable(args.src, args.dst)  # never advise an --overwrite that would be refused
        raise _UsageError(f"{args.dst} exists; pass --overwrite to replace it")
    n_arrays = convert_store(args.src, args.dst, progress=not args.quiet)
    if args.json:
        _emit_json({"src": str(args.src), "dst": str(args.dst), "backend": backend_for(dst),
                    "n_arrays": n_arrays})
    else:
        print(f"converted {args.src} -> {args.dst}: {n_arrays} arrays copied")
    return EXIT_OK


def _refuse_unreplaceable(src: str, dst: str) -> None:
    """Raise the refusal ``convert_store`` gives with ``--overwrite`` (the source itself, a folder
    holding it, a dataset folder, any other file) for a local ``dst``, so the advice is to choose
    another destination, not to pass ``--overwrite``."""
    from featurestore.store.convert import _check_destination

    if "://" not in dst:
        final = Path(os.path.realpath(dst)) if Path(dst).is_symlink() else Path(dst)
        _check_destination(src, final)


def _exists(location: str) -> bool:
    """Whether something is at a local path, or a store at a URL (``s3://``, ``memory://``): a URL has
    no path to test, and a store there would be replaced in place (zarr clears it) without asking."""
    if "://" not in location or location.startswith("file://"):
        path = Path(location.removeprefix("file://"))
        return path.exists() or path.is_symlink()
    try:
        open_store(location, "r").close()
    except (FeatureStoreError, OSError, ValueError):
        return False
    return True


# -------------------------------------------------------------------------------------- extract
def add_extract_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``featurestore extract`` arguments (also used by recipes that build their own parser)."""
    parser.add_argument("dataset", help="dataset directory (meta.csv + audio/ + video/) or a CSV manifest")
    add_store_argument(parser, "store path (.zarr directory, .h5 file) or fsspec URL; created when missing")
    parser.add_argument("--encoders", default=DEFAULT_ENCODERS, metavar="SPECS",
                        help=f"comma-separated encoder specs [NAME=]family[/model][@weights] (default: the paper's "
                             f"{DEFAULT_ENCODERS}; '@none' = random weights, '@/path.pt' = a checkpoint; NAME= "
                             f"names the feature set, default the spec without weights, e.g. "
                             f"'clip/ViT-B-32@openai,vit_random=clip/ViT-B-32@none')")
    parser.add_argument("--encoder-option", action="append", default=[], metavar="SPEC_OR_NAME.KEY=VALUE",
                        help="a constructor option of one encoder, by spec or feature-set name, e.g. "
                             "logmel.n_mels=128 (VALUE is a JSON literal when it parses as one, else a string; "
                             "repeatable; part of the feature set's configuration and fingerprint)")
    parser.add_argument("--classes", default=None, metavar="A,B,C|@FILE",
                        help="the class order of the store, comma-separated or @FILE with one class per line; "
                             "needed for a manifest without labels (clip_id,audio,video)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="clips per batch (default: 16 on the CPU, about 768 frames' worth on a GPU)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="decoding processes (default: one per spare core, at most 8)")
    parser.add_argument("--frames", type=int, default=None, help="video frames per clip (default: the dataset's)")
    parser.add_argument("--frames-from", default=None, metavar="SET",
                        help="image encoders read the stored frames of this frames/<size> feature set "
                             "instead of decoding the videos (e.g. frames/224; see docs/extraction.md)")
    parser.add_argument("--decoder", default="pyav", choices=("pyav", "torchcodec"),
                        help="video decoder: pyav (default) or torchcodec, on the GPU (NVDEC) when the encoders "
                             "run there (pip install 'avscene[torchcodec]'; see docs/extraction.md)")
    parser.add_argument("--segments", type=int, default=None,
                        help="audio segments per clip (default: the dataset's; TAU development: 10 x 1 s)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N clips")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace feature sets made with another configuration instead of refusing")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="run as tasks on this Dask scheduler (tcp://host:8786), or local:N for a local cluster of N processes")
    parser.add_argument("--backend", choices=("zarr", "hdf5"), default=None,
                        help="store backend when the store's name does not say (.h5 -> hdf5)")
    parser.add_argument("--chunk-clips", type=int, default=None,
                        help="clips per chunk of new feature sets (default: the store's ~4 MiB rounded down "
                             "to a power of two)")
    parser.add_argument("--commit-every", type=float, default=None, metavar="SECONDS",
                        help="write and mark done the clips encoded so far at least this often, even in a "
                             "partly filled chunk: what a kill can lose (default 60)")
    parser.add_argument("--summary-json", default=None, metavar="PATH", help="also write the summary as JSON")
    parser.add_argument("--json", action="store_true",
                        help="print the summary as JSON on stdout (progress and the summary line go to stderr)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar (the summary is still printed)")
    parser.add_argument("--allow-outside-root", action="store_true",
                        help="accept manifest paths that are absolute or lead outside the dataset directory")
    return parser


def cmd_extract(args: argparse.Namespace) -> int:
    """Run ``featurestore extract``: 0 all clips done, 1 some clips failed.

    Bad usage or input raises (``run_command`` turns it into exit code 2 and one line on stderr).
    Torch and the encoders are imported by ``extract`` only once there is work to do.
    """
    from featurestore.extract import classes_argument, encoder_options_argument

    options = encoder_options_argument(args.encoder_option)
    classes = None if args.classes is None else classes_argument(args.classes)
    try:
        summary = _extract_command(args, options, classes)
    except KeyboardInterrupt as stop:  # Ctrl-C: one line saying what the store kept, as heads does
        kept = str(stop) or "nothing was kept; rerun the same command"
        print(f"featurestore extract: interrupted; {kept}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.summary_json:
        atomic_write_text(args.summary_json, json.dumps(summary.to_dict(), indent=2, default=str))
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2, default=str))
    return summary.exit_code


#: Exit code of a command stopped by Ctrl-C, as a shell reports a process stopped by SIGINT.
EXIT_INTERRUPTED = 130


def _extract_command(args: argparse.Namespace, options: dict, classes: list[str] | None) -> ExtractSummary:
    """``extract`` with the command's arguments; the summary lines on stdout (stderr with --json)."""
    from featurestore.extract import extract

    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        summary = extract(args.dataset, args.store, args.encoders, device=args.device, batch_size=args.batch_size,
                          num_workers=args.num_workers, frames=args.frames, limit=args.limit,
                          overwrite=args.overwrite, scheduler=args.scheduler, progress=not args.quiet,
                          backend=args.backend, chunk_clips=args.chunk_clips, segments=args.segments,
                          allow_outside_root=args.allow_outside_root, encoder_options=options, classes=classes,
                          frames_from=args.frames_from, decoder=args.decoder, **({} if args.commit_every is None else {"commit_seconds": args.commit_every}))
        if args.quiet and not args.json:
            print(summary.line())
            for line in summary.failure_lines():
                print(line)
    return summary


def extract_main(argv: Sequence[str] | None = None) -> int:
    """``python -m featurestore.extract``: exactly ``featurestore extract``."""
    return main(["extract", *(sys.argv[1:] if argv is None else argv)])


# ----------------------------------------------------------------------------------------- main
class _UsageError(Exception):
    """Bad command-line input that argparse cannot see (exit code 2)."""


class _FailedError(Exception):
    """The command could not do its work (exit code 1)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featurestore",
                                     description="Look into, check, copy and fill feature stores.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    where = "store path (.zarr directory, .h5 file) or fsspec URL"
    json_help = "print JSON instead of tables"

    p = sub.add_parser("ls", help="feature sets, class features, prediction runs and the index of a store")
    add_store_argument(p, where)
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("show", help="one clip: index metadata and every feature set's state and stats")
    add_store_argument(p, where, after=("clip_id",))
    p.add_argument("clip_id", help="the clip's id in the store's index")
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("get", help="write one clip's features (or predictions) to a .npy file")
    add_store_argument(p, where, after=("clip_id", "feature"))
    p.add_argument("clip_id", help="the clip's id in the store's index")
    p.add_argument("feature", nargs="?", help="feature set name, e.g. clip/ViT-B-32")
    p.add_argument("--run", help="read predictions/<RUN>/probs instead of a feature set")
    p.add_argument("-o", "--output", required=True, help="output .npy file")
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("verify", help="check consistency and every checksum; exit 1 when problems are found")
    add_store_argument(p, where)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--remove-leftovers", action="store_true",
                   help="delete temp files of interrupted Zarr writes (only while no extraction runs)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("convert", help="copy a store between Zarr and HDF5 (backend chosen by DST's name)")
    p.add_argument("src", help="the store to copy (Zarr directory or .h5 file)")
    p.add_argument("dst", help="a .h5/.hdf5 file for HDF5, anything else for Zarr")
    p.add_argument("--overwrite", action="store_true", help="replace DST when it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print what was copied as JSON")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("search", help="the clips nearest to a clip or a sentence (cosine of clip-mean embeddings)")
    add_store_argument(p, where)
    p.add_argument("--feature-set", required=True, help="embedding set to search, e.g. clip/ViT-B-32")
    p.add_argument("--like", metavar="CLIP_ID", action="append",
                   help="clips like this stored clip (itself left out); repeat for several queries at once")
    p.add_argument("--text", help="a sentence, embedded by the same CLIP model's text tower")
    p.add_argument("-k", type=int, default=10, help="how many clips (default: 10)")
    p.add_argument("--method", default="auto", choices=["auto", "exact", "faiss"],
                   help="exact numpy search or a faiss index (default auto: exact up to 24M clips x dim values, "
                        "about 50 ms a query; faiss above)")
    p.add_argument("--include-self", action="store_true", help="keep the --like clip in the results")
    p.add_argument("--device", default="cpu", help="where the text tower runs (cpu, cuda, auto)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("view", help="the store in the browser: embedding map, clip pages, search, confusion matrix")
    add_store_argument(p, where)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others warn: no login)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free one)")
    p.add_argument("--feature-set", action="append", help="embedding set(s) to map (default: every vector set)")
    p.add_argument("--method", default="pca", choices=["pca", "umap"], help="map projection (umap needs umap-learn)")
    p.add_argument("--recipe", action="append", help="fusion recipe whose fused output to show (needs fusion)")
    p.set_defaults(func=cmd_view)

    p = sub.add_parser("extract", help="run encoders over a dataset into a store (resumable)",
                       description="Run encoders over a dataset into a store (resumable).")
    add_extract_arguments(p)
    p.set_defaults(func=cmd_extract)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace | int:
    """argparse exits on --help and on errors; turn that into a return code for ``main``."""
    try:
        return parser.parse_args(argv)
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE


#: Errors that mean bad input or an unusable store (exit 2), for ``run_command``.
USAGE_ERRORS: tuple[type[BaseException], ...] = (
    _UsageError, FeatureStoreError, FileNotFoundError, FileExistsError, ValueError, OSError)
#: Errors that mean the work itself failed (exit 1): data missing or corrupt; an extraction stopped
#: part way by a failed store write (disk full) or a dead decode worker (a rerun resumes); an output
#: file that could not be written (disk full; the previous file stays). A store being written by
#: another run (StoreLockedError) is refused with exit 2, like other refused input.
FAILURE_ERRORS: tuple[type[BaseException], ...] = (MissingFeatureError, CorruptChunkError, ExtractionStopped,
                                                   OutputWriteError, _FailedError)


def run_command(prog: str, command: str, run: Callable[[], int],
                usage: tuple[type[BaseException], ...] = USAGE_ERRORS,
                failures: tuple[type[BaseException], ...] = FAILURE_ERRORS,
                interrupted: Callable[[KeyboardInterrupt], str] | None = None) -> int:
    """Run one command; an expected error becomes one line on stderr and an exit code.

    ``failures`` exit 1 and ``usage`` exit 2 (``failures`` are matched first, so a subclass of a
    usage error can still count as a failure). Ctrl-C is one line, exit 130: ``interrupted(err)``
    says what was kept (default: the interrupt's own message, else that nothing half-written was
    left). Anything else is a bug and keeps its traceback. The ``featurestore``, ``heads`` and
    ``fusion`` command lines all report errors through this.
    """
    try:
        code = run()
        sys.stdout.flush()  # a reader that quit shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        # the reader went away (`featurestore ls STORE | head`): no error to report; point stdout at
        # devnull so the interpreter's final flush does not fail again, and exit as a shell would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt as err:
        # commands that keep work say what they kept (their interrupt's message, or ``interrupted``);
        # the others only read, or write whole files (temp name + rename): nothing half-done is left
        kept = interrupted(err) if interrupted else str(err)
        print(f"{prog} {command}: interrupted; {kept or 'nothing half-written was left, rerun the same command'}",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except failures as err:
        code, message = EXIT_FAILED, error_message(err)
    except usage as err:
        code, message = EXIT_USAGE, error_message(err)
    print(f"{prog} {command}: error: {message}", file=sys.stderr)
    return code


def error_message(err: BaseException) -> str:
    """The text of an error for a one-line report (a plain KeyError's message without its quotes)."""
    if isinstance(err, KeyError) and type(err).__str__ is KeyError.__str__ and len(err.args) == 1:
        return str(err.args[0])
    return str(err) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``featurestore`` and ``python -m featurestore``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(build_parser(), argv)
    if isinstance(args, int):
        return args
    if hasattr(args, "store_option"):
        return run_command("featurestore", args.command, lambda: args.func(resolve_store_argument(args)))
    return run_command("featurestore", args.command, lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
