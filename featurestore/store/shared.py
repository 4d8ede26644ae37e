"""Shared, read-only stores: predictions of a user who cannot write the store go into one of their own.

A store on a read-only mount (a lab's shared features) is read by everyone; predictions of a user who
cannot write it go into a small store of the user's own, a *prediction store*: the shared store's index
(clip ids, classes, splits, labels, cities) and prediction runs only. Rows match the shared store's
rows, so its runs are read beside the shared store's (``StoreWithPredictions``), after a check, on every
open, that both hold the same clip ids in the same order and the same classes: by the digests of the
ids kept with each store's id lookup (two attribute reads; decoding both id columns took seconds at a
million clips), by the ids themselves for a store written before those digests. See docs/store.md,
"Shared, read-only stores".
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.errors import UnknownFeatureError
from featurestore.manifest import Manifest
from featurestore.store.store import FeatureStore, open_store

__all__ = ["PREDICTIONS_FOR", "StoreWithPredictions", "index_difference", "index_manifest", "open_prediction_store",
           "open_with_predictions", "write_problem"]

#: Root attribute of a prediction store: the location and clip count of the store whose index it copies.
PREDICTIONS_FOR = "predictions_for"


def write_problem(location: str | Path) -> str | None:
    """Why this process cannot write the local store at ``location`` and its lock file, or None.

    Asked before anything is tried, so that a store on a read-only mount (or one this user may not
    write) is refused in one line, and no lock file is attempted beside it. Checks the store (its
    directory or HDF5 file, and its ``predictions`` group), and the directory its lock file goes in
    (the nearest existing one); a remote URL answers None (its writes fail, or not, when made).
    """
    text = str(location)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        return None
    path = Path(text).absolute()
    places = [p for p in (path, path / "predictions") if p.exists()]
    lock_dir = path.parent
    while not lock_dir.exists() and lock_dir != lock_dir.parent:
        lock_dir = lock_dir.parent
    for place in [*places, lock_dir]:
        if os.statvfs(place).f_flag & os.ST_RDONLY:
            return f"{place} is on a read-only file system"
        if not os.access(place, os.W_OK):
            return f"{place} is not writable by this user"
    return None


def index_manifest(store: FeatureStore, rows: slice = slice(None)) -> Manifest:
    """The store's index (or these rows of it) as a Manifest: what a prediction store copies."""
    attrs, classes = store.attrs, store.classes
    ids = store.clip_ids[rows]
    labels = store.labels[rows]
    columns = {name: store.column(name)[rows] for name in ("city", "location", "audio_path", "video_path")}
    splits = {split: store.column(f"split/{split}")[rows].astype(bool) for split in store.splits()}
    names = np.array([*classes, None], dtype=object)  # label -1 (none) is the last
    return Manifest.from_columns(
        str(attrs.get("dataset", "")), classes, ids, label=names[labels], city=columns["city"],
        location=columns["location"], audio=columns["audio_path"], video=columns["video_path"], splits=splits,
        audio_segments=int(attrs.get("audio_segments", 10)), segment_seconds=float(attrs.get("segment_seconds", 1.0)),
        video_frames=int(attrs.get("video_frames", 12)))


def index_difference(store: FeatureStore, predictions: FeatureStore) -> str | None:
    """How a prediction store's index differs from the store it must copy, or None when it is the same.

    The rows of the two must be the same clips in the same order (prediction rows are addressed by
    row), and the class lists equal (a store without classes takes the run's, so it matches any).
    Ids are compared by their digests where both stores have one (``ClipIndex.ids_digest``), and
    decoded only where one has none, or to say how they differ.
    """
    digests = predictions.index.ids_digest(), store.index.ids_digest()
    if None in digests or digests[0] != digests[1]:
        problem = _id_difference(predictions.clip_ids, store.clip_ids)
        if problem:
            return problem
    if store.classes and predictions.classes != store.classes:
        return f"classes {predictions.classes} against {store.classes}"
    return None


def _id_difference(mine: list[str], theirs: list[str]) -> str | None:
    """How two id lists differ (count, ids only in one, order), or None when they are equal."""
    if mine != theirs:
        only = sorted(set(mine) ^ set(theirs))
        what = (f"{len(mine)} clip ids against {len(theirs)}" if len(mine) != len(theirs) or only
                else "the same clip ids in another order")
        return what + (f" (e.g. {', '.join(only[:3])} only in one of them)" if only else "")
    return None


def open_prediction_store(path: str | Path, store: FeatureStore, mode: str = "r") -> FeatureStore:
    """Open the prediction store ``path`` kept beside ``store`` (a shared store this user may only read).

    With ``mode="a"`` a missing one is created holding a copy of ``store``'s index, and one made
    before ``store`` grew (its clip ids the first of ``store``'s) gets the new clips appended; with
    ``mode="r"`` it must exist. Either way its index must then be ``store``'s.

    Raises:
        ValueError: ``path`` is ``store`` itself, or its index is not ``store``'s (one line saying how).
        StoreFormatError: ``path`` is no store (``mode="r"``).
    """
    if Path(str(path)).absolute() == Path(store.location).absolute():
        raise ValueError(f"--predictions {path} is the store itself; name a store of your own")
    mine = open_store(path, mode=mode)
    try:
        n = mine.n_clips
        if mode == "a" and n < store.n_clips and mine.clip_ids == store.clip_ids[:n]:
            # a new prediction store (or one made before the shared store grew): copy the index rows;
            # a creation killed before its commit is cut back by this writable open and done again
            mine.append_clips(index_manifest(store, slice(n, None)))
            mine.arrays.set_attrs("", {PREDICTIONS_FOR: {"store": str(store.location), "n_clips": store.n_clips},
                                       "dataset_root": store.attrs.get("dataset_root", "")})
        problem = index_difference(store, mine)
        if problem:
            raise ValueError(f"prediction store {path} does not hold the index of {store.location}: {problem}; "
                             f"it was made for another store (predict into a new --predictions store)")
        return mine
    except BaseException:
        mine.close()
        raise


class StoreWithPredictions:
    """A store read together with a prediction store of the same index: runs come from both.

    Everything but the prediction runs is the store's (``__getattr__`` passes it on); a run name
    found in both is refused when they are opened, so no run means two things. Read-only.
    """

    def __init__(self, store: FeatureStore, predictions: FeatureStore):
        self.store, self.predictions = store, predictions
        both = sorted(set(store.prediction_runs()) & set(predictions.prediction_runs()))
        if both:
            raise ValueError(f"prediction run(s) {', '.join(both)} are in both {store.location} and "
                             f"{predictions.location}; predict again under another name (heads predict --name)")

    def __getattr__(self, name: str) -> Any:
        if name in ("store", "predictions"):  # not set yet (a failed __init__): no recursion
            raise AttributeError(name)
        return getattr(self.store, name)

    @property
    def classes(self) -> list[str]:
        return self.store.classes or self.predictions.classes

    def _holder(self, run: str) -> FeatureStore:
        for store in (self.predictions, self.store):
            if run in store.prediction_runs():
                return store
        raise UnknownFeatureError("prediction run", run, sorted(self.prediction_runs()))

    def prediction_runs(self) -> dict[str, dict]:
        return {**self.store.prediction_runs(), **self.predictions.prediction_runs()}

    def prediction_done(self, run: str) -> np.ndarray:
        return self._holder(run).prediction_done(run)

    def get_predictions(self, run: str, clip_ids: Sequence[str] | None = None) -> np.ndarray:
        return self._holder(run).get_predictions(run, clip_ids)

    def refresh(self) -> None:
        self.store.refresh()
        self.predictions.refresh()

    def close(self) -> None:
        self.predictions.close()
        self.store.close()

    def __enter__(self) -> "StoreWithPredictions":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StoreWithPredictions({self.store.location!r}, predictions={self.predictions.location!r})"


def open_with_predictions(store: str | Path | FeatureStore, predictions: str | Path) -> StoreWithPredictions:
    """``store`` (read-only) with the runs of the prediction store ``predictions`` beside its own.

    Raises:
        ValueError: the prediction store's index is not the store's, or a run is in both.
    """
    shared = open_store(store, mode="r") if isinstance(store, (str, Path)) else store
    try:
        mine = open_prediction_store(predictions, shared, mode="r")
        try:
            return StoreWithPredictions(shared, mine)
        except BaseException:
            mine.close()
            raise
    except BaseException:
        if shared is not store:
            shared.close()
        raise
