"""Prediction: run a trained head over a store and write ``predictions/<run>/probs`` back into it.

Probabilities are written per clip and segment, ``[n_clips, n_segments, n_classes]``, so fusion can
aggregate segments however it likes. The run's attributes say what produced them: the head and its
config, the feature sets with their fingerprints, the splits, the ensemble family, and whether any
weights involved were random (so no report presents a random-weights result as a real one).

A predict writes a store under the store's writer lock (``featurestore.store.lock``, the lock
extraction takes), probabilities before done flags, a few thousand clips or a minute's work at a
time. A killed predict is resumed by running it again: the same run (same run directory, weights
and settings, compared through the run's attributes) continues with the clips not done; another
run into that name is refused unless ``overwrite``. A clip whose features or probabilities hold NaN
or infinity is reported and never written: no NaN is stored as a probability.

A store this user cannot write (a lab's shared store on a read-only mount) is refused before
anything is tried, in one line pointing at ``predictions=`` (``--predictions``): a *prediction store*
of the user's own holding a copy of the store's index, where the probabilities (and the writer lock)
go while the features are read from the shared store (docs/store.md, "Shared, read-only stores").
Ctrl-C stops a predict with ``PredictInterrupted`` saying how many clips were kept.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from featurestore._sigint import kept
from featurestore.encoders import resolve_device
from featurestore.atomic_files import find_os_error
from featurestore.checks import is_int_in, non_finite_rows
from featurestore.extract.errors import NO_ROOM, store_write_error
from featurestore.store.layout import validate_name
from featurestore.provenance import file_sha256, is_random_weights
from featurestore.provenance import fingerprint as provenance_fingerprint
from featurestore.errors import ReadOnlyStoreError
from featurestore.store.lock import writer_lock
from featurestore.store.shared import open_prediction_store, write_problem
from featurestore.torchdata import StoreDataset
from heads._registry import head_class
from heads.errors import FeatureFingerprintError
from heads.evaluate import clip_outputs
from heads.train import class_features_fingerprint
from heads.trained import load_head, weights_path

__all__ = ["FLUSH_CLIPS", "PredictInterrupted", "PredictResult", "load_head", "predict"]

#: Clips whose probabilities are gathered before one store write (a write rewrites whole chunks).
FLUSH_CLIPS = 4096
#: ...or this many seconds since the last write, so a kill loses at most about a minute of work.
FLUSH_SECONDS = 60.0
#: Test hook: ``SIGNAL:N`` sends the process SIGNAL (``KILL``, ``STOP``...) once, after the store
#: write that brings the clips written to N or more (tests kill a real ``heads predict`` mid-run).
TEST_SIGNAL_ENV = "HEADS_TEST_SIGNAL_AT_DONE"


class PredictInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a predict; the message says how many clips the store kept and how to resume.

    A KeyboardInterrupt still, so a script or notebook stops as it would; ``heads predict`` prints
    the message as one line and exits 130."""


@dataclass
class PredictResult:
    """What `predict` wrote.

    Attributes:
        run: the prediction run's name.
        n_clips: clips written by this call.
        n_skipped: clips left out because their features are not done.
        n_segments: segments per clip.
        attrs: the run's attributes.
        n_resumed: selected clips that were done already (an interrupted run continued).
        errors: clip id -> why it was not predicted (non-finite inputs or outputs); not marked done.
    """

    run: str
    n_clips: int
    n_skipped: int
    n_segments: int
    attrs: dict
    n_resumed: int = 0
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0 when every selected clip with features was predicted, 1 when some failed."""
        return 1 if self.errors else 0


def check_fingerprints(store: Any, info: dict, run_dir: str | Path) -> dict[str, Any]:
    """Refuse feature sets (and class features) whose fingerprint differs from the ones trained on.

    Returns:
        The store's ``FeatureInfo`` of each feature set the head was trained on, by name.
    """
    sets = {name: store.feature_info(name) for name in info["features"]}  # raises UnknownFeatureError
    for name, trained in info["features"].items():
        if sets[name].fingerprint != trained:
            raise FeatureFingerprintError(str(run_dir), name, trained, sets[name].fingerprint)
    for name, trained in (info.get("class_features") or {}).items():
        if name in store.class_feature_sets():
            attrs = store.get_class_features(name)[1]
            found = class_features_fingerprint(attrs)
            if found != trained and _in_run_order(attrs, info.get("classes")) != trained:
                raise FeatureFingerprintError(str(run_dir), name, trained, found)
    return sets


def _in_run_order(attrs: dict, run_classes: list[str] | None) -> str | None:
    """The fingerprint stored class features would have with their prompts in the run's class order.

    Extraction records one prompt per class, in the store's class order, in the provenance: the
    same tower over a store with the same classes in another order has another fingerprint, though
    predict maps the head's columns to the store's classes by name (`class_order`). None when the
    store's classes are not the run's in another order, or no prompts are recorded per class."""
    prov, classes = attrs.get("provenance"), attrs.get("classes")
    prompts = prov.get("prompts") if isinstance(prov, dict) else None
    if not (isinstance(prompts, list) and isinstance(classes, list) and isinstance(run_classes, list)):
        return None
    if len(prompts) != len(classes) or len(set(classes)) != len(classes) or sorted(classes) != sorted(run_classes):
        return None
    position = {name: i for i, name in enumerate(classes)}
    return provenance_fingerprint({**prov, "prompts": [prompts[position[name]] for name in run_classes]})


def class_order(run_classes: list[str] | None, store_classes: list[str], run_dir: str | Path) -> np.ndarray | None:
    """Columns of the head's output in the store's class order, matched by name.

    Returns:
        ``order`` such that ``probs[..., order]`` lists the store's classes in the store's order, or
        None when the orders already agree (or the run predates recording its classes).

    Raises:
        ValueError: the run's class names and the store's are not the same set, or neither the
            run nor the store has classes (a store from a manifest without labels takes the
            run's, see ``_predict``; a run too old to record them cannot give them).
    """
    if not store_classes and not run_classes:
        raise ValueError(f"the store has no classes (made from a manifest without labels) and run {str(run_dir)!r} "
                         f"does not record the classes it was trained on; extract with --classes A,B,C "
                         f"(extract(..., classes=[...])) to give the store its classes")
    if run_classes is None or list(run_classes) == list(store_classes):
        return None
    run, stored = list(run_classes), list(store_classes)
    if sorted(run) != sorted(stored) or len(set(run)) != len(run):
        only_run = sorted(set(run) - set(stored))
        only_store = sorted(set(stored) - set(run))
        raise ValueError(f"run {str(run_dir)!r} was trained on classes {run} but the store has {stored}"
                         f" (only in the run: {only_run or 'none'}; only in the store: {only_store or 'none'})")
    position = {name: i for i, name in enumerate(run)}
    return np.asarray([position[name] for name in stored], dtype=np.int64)


def prediction_attrs(info: dict, family: str | None = None) -> dict:
    """The attributes fusion reads from ``predictions/<run>``."""
    train = info.get("train", {})
    feature_info = info.get("feature_info", {})
    backbone = info.get("backbone_weights")
    random = any(v.get("random_weights") for v in feature_info.values()) or \
        is_random_weights({"weights": backbone})
    return {
        "head": info["head"],
        "head_config": info["head_config"],
        "features": {name: info["features"][name] for name in train.get("features", info["features"])},
        "class_features": dict(info.get("class_features") or {}),
        "train_split": train.get("train_split"),
        "val_split": train.get("val_split"),
        "family": family or train.get("family") or _family(info),
        "random_weights": bool(random),
        "weights_identity": {name: v.get("weights_identity") for name, v in feature_info.items()},
        "backbone_weights": backbone,
    }


def _family(info: dict) -> str:
    """Ensemble family from the head and its input feature sets: audio, clip or video."""
    default = head_class(info["head"]).default_family
    if default:
        return default
    kinds = set()
    for name in info["train"]["features"]:
        meta = info.get("feature_info", {}).get(name, {})
        encoder = str(meta.get("encoder") or name)
        if encoder.startswith("clip/"):
            kinds.add("clip")
        elif meta.get("modality") == "audio" or encoder.startswith("logmel"):
            kinds.add("audio")
        else:
            kinds.add("video")
    return kinds.pop() if len(kinds) == 1 else "+".join(sorted(kinds))


def predict(store: Any, run_dir: str | Path, *, name: str | None = None, split: str | list[str] | None = None,
            batch_size: int | None = None, device: str = "auto", overwrite: bool = False,
            family: str | None = None, weights: str = "best", progress: bool = True,
            flush_clips: int = FLUSH_CLIPS, predictions: str | Path | None = None) -> PredictResult:
    """Run the head trained in ``run_dir`` over the store and write ``predictions/<name>/probs``.

    The writer lock of the store written is held throughout (the one extraction takes), so two
    predicts, or a predict and an extraction, never write one store at once. Probabilities are
    written before their done flags, ``flush_clips`` clips (or a minute's work) at a time; rerunning
    the same run into the same name continues with the clips not done yet.

    Args:
        store: an open store (mode ``"a"``; ``"r"`` with ``predictions``) or the path of an existing store.
        run_dir: the training run directory.
        name: prediction run name (default: the run directory's name).
        split: predict only this split's clips (default: every clip whose features are done).
        batch_size: clips per forward pass (default: about 4 training batches of segments).
        overwrite: replace an existing prediction run of that name (default: resume the same run
            -- same run directory, weights and settings --, refuse another).
        family: ensemble family recorded in the attrs (default: the training config's, else derived).
        weights: ``"best"`` or ``"last"`` checkpoint.
        flush_clips: clips gathered per store write; a killed predict loses at most these.
        predictions: a prediction store of your own to write into, for a ``store`` you may only read
            (created with a copy of its index when missing; its index must be ``store``'s). Its
            lock is taken; ``store`` is only read.

    Returns:
        A PredictResult; clips whose features or probabilities are not finite are in ``errors``,
        not written and not marked done (``exit_code`` 1).

    Raises:
        ReadOnlyStoreError: the store written cannot be written by this process (a read-only mount,
            no permission): nothing was tried; use ``predictions``.
        StoreLockedError: another process writes the store.
        StoreWriteError: the store could not be written (disk full, file-size limit); the clips
            written before stay done and a rerun continues.
        FileExistsError: a prediction run of that name exists with other settings.
        PredictInterrupted: Ctrl-C; the clips written before stay done and a rerun continues.
    """
    if not is_int_in(flush_clips, 1):
        raise ValueError(f"flush_clips must be an integer >= 1, got {flush_clips!r}")
    name = validate_name("prediction run", name or Path(run_dir).name)  # before the lock file or classes
    own = isinstance(store, (str, Path))
    location = str(store) if own else store.location
    target = location if predictions is None else str(predictions)
    if own:
        from featurestore.store import open_store

        # mode "a" would create a missing store: a typo must fail instead; with ``predictions`` the
        # store is only read, and stays open as the reader
        store = open_store(store, mode="r")
        if predictions is None:
            store.close()
            store = location
    try:
        _check_writable(target, location, predictions is not None)
        with _no_room(target, "writing its lock file"):
            options = None if own or predictions is not None else store.open_args.get("storage_options")
            lock = writer_lock(target, storage_options=options).acquire()  # refused while another process writes
        try:
            return _predict_locked(store, target, predictions, Path(run_dir), name, _Options(
                split, batch_size, device, overwrite, family, weights, progress, flush_clips))
        finally:
            lock.release()
    finally:
        if own and predictions is not None:
            store.close()


def _check_writable(target: str, location: str, own_store: bool) -> None:
    """Refuse, before any lock file is tried, a store this process cannot write (one line)."""
    problem = write_problem(target)
    if problem is None:
        return
    if own_store:
        raise ReadOnlyStoreError(f"cannot write the prediction store {target}: {problem}; choose a "
                                 f"--predictions path you can write")
    raise ReadOnlyStoreError(f"cannot write predictions into {location}: {problem}; write them into a store of "
                             f"your own with --predictions MINE.zarr (predictions= in Python), which fusion reads "
                             f"beside it (docs/store.md, 'Shared, read-only stores')")


@dataclass
class _Options:
    split: Any
    batch_size: int | None
    device: str
    overwrite: bool
    family: str | None
    weights: str
    progress: bool
    flush_clips: int


def _predict_locked(store: Any, target: str, predictions: Any, run_dir: Path, name: str,
                    opt: _Options) -> PredictResult:
    """Open what is written (the store itself, or the prediction store) and predict; the lock is held.

    ``store`` is an open store, or the path of one to open for writing (no ``predictions``)."""
    from featurestore.store import open_store

    opened = predictions is not None or isinstance(store, (str, Path))
    with _no_room(target, f"writing predictions/{name}"):
        if predictions is not None:
            out = open_prediction_store(predictions, store, mode="a")
        else:
            out = store = open_store(store, mode="a") if opened else store
        try:
            with kept():  # a Ctrl-C that Python dropped in a finalizer still stops (featurestore._sigint)
                return _predict(store, out, run_dir, name, opt)
        except KeyboardInterrupt:
            raise _interrupted(out, name) from None
        finally:
            if opened:
                out.close()


def _interrupted(target: Any, name: str) -> PredictInterrupted:
    """What a Ctrl-C kept: the clips whose probabilities and done flags were written."""
    try:
        kept = int(target.prediction_done(name).sum()) if name in target.prediction_runs() else 0
    except Exception:  # the store is as it was at the interrupt; a failed count must not hide the interrupt
        kept = 0
    return PredictInterrupted(f"{kept} clip(s) of predictions/{name} kept in {target.location}; rerun the same "
                              f"command to resume")


@contextlib.contextmanager
def _no_room(location: str, doing: str) -> Iterator[None]:
    """An OSError for lack of room (disk full, quota, file-size limit) becomes a StoreWriteError."""
    try:
        yield
    except Exception as err:  # the store's libraries may wrap the OSError
        os_error = find_os_error(err)
        if os_error is None or os_error.errno not in NO_ROOM:
            raise
        raise store_write_error(location, os_error, doing) from None


def _predict(store: Any, out: Any, run_dir: Path, name: str, opt: _Options) -> PredictResult:
    """Read features from ``store``, write probabilities into ``out`` (``store`` itself, or a
    prediction store of the same index: the same rows)."""
    dev = resolve_device(opt.device)
    head, info = load_head(run_dir, dev, opt.weights)  # (zero-shot prompts of another CLIP model are refused)
    sets = check_fingerprints(store, info, run_dir)
    # an unknown split is refused before the run is created (or, with --overwrite, deleted)
    selected = np.arange(store.n_clips) if opt.split is None else store.rows(store.select(split=opt.split))
    if not out.classes and info.get("classes"):
        out.set_classes(info["classes"])  # a store of unlabelled clips takes the classes the head predicts
    order = class_order(info.get("classes"), out.classes, run_dir)
    features = list(info["train"]["features"])  # the head's input order (the JSON dict is key-sorted)
    segments = {sets[f].n_segments for f in features}
    if len(segments) != 1:
        raise ValueError(f"feature sets {features} have different segment counts {sorted(segments)}; "
                         f"a head predicts one row per segment, so they must match")
    n_segments = segments.pop()
    attrs = prediction_attrs(info, opt.family)
    # absolute, so that `fusion classify` finds the run from any working directory; the weights'
    # hash tells a rerun of this run (resumed) from a retrained one (refused without overwrite)
    attrs.update({"run_dir": str(run_dir.resolve()), "weights": opt.weights,
                  "weights_sha256": file_sha256(weights_path(run_dir, opt.weights)), "n_segments": n_segments})
    out.create_predictions(name, n_segments, attrs, overwrite=opt.overwrite)
    todo = selected[~out.prediction_done(name)[selected]]
    ids = store.clip_ids
    clips = opt.batch_size or max(1, 4 * head.default_batch_size // n_segments)
    data = StoreDataset(store, features, clip_ids=[ids[r] for r in todo], level="clip", batch_size=clips,
                        missing="skip")
    writer = _Writer(out, name, opt.flush_clips)
    errors: dict[str, str] = {}
    with tqdm(total=len(data.rows), desc=f"predict {name}", unit="clip", disable=not opt.progress) as bar:
        for batch in data:
            outputs = next(clip_outputs(head, [batch], dev))  # one batch: its inputs are checked below
            probs = outputs.probs if order is None else outputs.probs[..., order]
            bad = _non_finite(batch.inputs, probs, features)
            errors.update({ids[int(outputs.rows[i])]: message for i, message in bad.items()})
            keep = np.setdiff1d(np.arange(len(outputs.rows)), list(bad))
            writer.add(outputs.rows[keep], probs[keep])
            bar.update(len(outputs.rows))
        writer.flush()
    result = PredictResult(name, writer.written, data.n_skipped, n_segments, attrs, len(selected) - len(todo), errors)
    tqdm.write(_summary(result), file=sys.stderr)  # stderr: stdout holds only the command's result (--json)
    return result


def _non_finite(inputs: list[torch.Tensor], probs: np.ndarray, features: list[str]) -> dict[int, str]:
    """Batch position -> why that clip's probabilities must not be stored (NaN or inf in or out)."""
    bad: dict[int, str] = {}
    for feature, x in zip(features, inputs):
        for i in np.flatnonzero(non_finite_rows(x)):
            bad.setdefault(int(i), f"its {feature!r} features hold NaN or infinity")
    for i in np.flatnonzero(non_finite_rows(probs)):
        bad.setdefault(int(i), "the head gave NaN or infinite probabilities (are the run's weights finite?)")
    return bad


def _summary(result: PredictResult) -> str:
    name = result.run
    line = f"predict {name}: wrote {result.n_clips} clip(s) x {result.n_segments} segment(s) to predictions/{name}"
    if result.n_resumed:
        line += f"; {result.n_resumed} clip(s) were done already (resumed)"
    if result.n_skipped:
        line += f"; skipped {result.n_skipped} clip(s) whose features are not done"
    if result.errors:
        line += f"; {len(result.errors)} clip(s) failed, not marked done"
    return line


class _Writer:
    """Gathers probabilities and writes them (values, then done flags) every ``flush_clips`` clips
    or every ``FLUSH_SECONDS``, whichever comes first."""

    def __init__(self, store: Any, name: str, flush_clips: int):
        self.store, self.name, self.flush_clips = store, name, flush_clips
        self.rows: list[np.ndarray] = []
        self.probs: list[np.ndarray] = []
        self.pending = self.written = 0
        self.last = time.monotonic()

    def add(self, rows: np.ndarray, probs: np.ndarray) -> None:
        if len(rows):
            self.rows.append(rows)
            self.probs.append(probs)
            self.pending += len(rows)
        if self.pending >= self.flush_clips or (self.pending and time.monotonic() - self.last >= FLUSH_SECONDS):
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.store.write_predictions(self.name, np.concatenate(self.rows), np.concatenate(self.probs))
            self.written += self.pending
        self.rows.clear()
        self.probs.clear()
        self.pending, self.last = 0, time.monotonic()
        _test_signal(self.written)


_signalled = False


def _test_signal(written: int) -> None:
    """The ``TEST_SIGNAL_ENV`` hook: signal this process once ``written`` reaches the given count."""
    global _signalled
    value = os.environ.get(TEST_SIGNAL_ENV)
    if not value or _signalled:
        return
    name, _, at = value.partition(":")
    if written >= int(at):
        _signalled = True
        os.kill(os.getpid(), signal.Signals[f"SIG{name.upper()}"])
