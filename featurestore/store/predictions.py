"""Prediction runs: per-clip class probabilities of a head, created (or reopened to resume) by settings.

``FeatureStore.create_predictions``, ``write_predictions``, ``prediction_runs``, ``get_predictions``
and ``delete_predictions`` delegate here. A run's arrays (values and ``done`` flags) are a
``RowGroup`` (``row_group.py``); the store keeps each run's attributes once read (``store._runs``),
dropped by ``refresh()`` and by every change to the runs.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Sequence

import numpy as np

from featurestore.provenance import runtime_info
from featurestore.store.clips import check_id_sequence, require_classes
from featurestore.store.layout import default_chunk_clips, validate_name
from featurestore.store.row_group import DATA_VERSION, PREDICTION_RUNS

if TYPE_CHECKING:
    from featurestore.store.store import FeatureStore


def create_predictions(store: FeatureStore, run: str, n_segments: int, attrs: dict, overwrite: bool = False,
                       chunk_clips: int | None = None) -> bool:
    """See ``FeatureStore.create_predictions``."""
    store.arrays.require_writable()
    validate_name("prediction run", run)
    require_classes(store, f"prediction run {run!r}")
    group = store._group(PREDICTION_RUNS, run)
    n_classes = len(store.classes)
    shape = (store.n_clips, int(n_segments), n_classes)
    if group.exists() and not overwrite:
        stored = group.attrs
        if stored:  # none: a creation killed before its attributes (written last), replaced below
            differs = _run_differences(stored, attrs) + (["shape"] if tuple(group.shape) != shape else [])
            if not differs:
                store._runs = None
                return True
            raise FileExistsError(f"{store.location}: prediction run {run!r} exists with other settings "
                                  f"(differing: {', '.join(differs[:8])}); use another name, or "
                                  f"overwrite=True (--overwrite) to replace it")
    if group.exists():
        group.delete()
    rows = int(chunk_clips or default_chunk_clips(n_segments, (n_classes,), "float32", store.n_clips))
    group.create(shape, "float32", rows, attrs={**attrs, "runtime": runtime_info()})
    store._runs = None
    return False


def write_predictions(store: FeatureStore, run: str, rows: np.ndarray | slice | int, probs: np.ndarray) -> None:
    """See ``FeatureStore.write_predictions``."""
    store.arrays.require_writable()
    group = store.row_group(PREDICTION_RUNS, run)
    probs = np.asarray(probs, dtype=np.float32)
    rows = _row_numbers(run, rows, store.n_clips)
    if len(rows) != len(probs):
        raise ValueError(f"predictions {run!r}: {len(rows)} rows but {len(probs)} probability rows")
    expected = tuple(group.shape[1:])
    if probs.shape[1:] != expected:
        raise ValueError(f"predictions {run!r}: rows have shape {probs.shape[1:]}, expected {expected}")
    finite = np.isfinite(probs.reshape(len(probs), -1)).all(axis=1)
    if not finite.all():
        bad = store.index.ids_at(rows[~finite][:5])
        raise ValueError(f"predictions {run!r}: {int((~finite).sum())} clip(s) have non-finite probabilities "
                         f"(e.g. {', '.join(bad)}); nothing was written")
    group.write_scattered(rows, probs)


def _row_numbers(run: str, rows: np.ndarray | slice | int, n_clips: int) -> np.ndarray:
    """``rows`` as distinct int64 row numbers in ``0:n_clips``, else ValueError.

    Rows are written one run of consecutive rows at a time, as slices: a negative row would write
    (and mark done) the clip counted from the end, a row past the end nothing at all, a row given
    twice one of its two values (which one depends on the sort), a bool mask the rows 0 and 1;
    each silently, so they are refused here before anything is written.
    """
    if isinstance(rows, slice):
        return np.arange(n_clips)[rows]
    arr = np.atleast_1d(np.asarray(rows))
    if arr.size and (arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"predictions {run!r}: rows must be a 1-D list of row numbers, got "
                         f"{arr.dtype} of shape {arr.shape} (a bool mask? pass np.flatnonzero(mask))")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n_clips):
        raise ValueError(f"predictions {run!r}: rows {arr.min()}..{arr.max()} go outside the store's "
                         f"0:{n_clips}; nothing was written")
    distinct, counts = np.unique(arr, return_counts=True)
    if len(distinct) != len(arr):
        raise ValueError(f"predictions {run!r}: rows {distinct[counts > 1][:5].tolist()} are given more than "
                         f"once; nothing was written")
    return arr


def prediction_runs(store: FeatureStore) -> dict[str, dict]:
    """See ``FeatureStore.prediction_runs``."""
    kind = PREDICTION_RUNS
    names = store.arrays.groups_with(kind.top, kind.leaf)
    cached = store._runs or {}
    store._runs = {name: cached[name] if name in cached else store._group(kind, name).attrs for name in names}
    return {run: dict(attrs) for run, attrs in store._runs.items()}


def get_predictions(store: FeatureStore, run: str, clip_ids: Sequence[str] | None = None) -> np.ndarray:
    """See ``FeatureStore.get_predictions``."""
    check_id_sequence("get_predictions", clip_ids)
    group = store.row_group(PREDICTION_RUNS, run)
    rows = np.arange(store.n_clips) if clip_ids is None else store.rows(clip_ids)
    return group.gather(rows)


def delete_predictions(store: FeatureStore, run: str) -> None:
    """See ``FeatureStore.delete_predictions``."""
    store.arrays.require_writable()
    store.row_group(PREDICTION_RUNS, run).delete()
    store._runs = None


def _run_differences(stored: dict, requested: dict) -> list[str]:
    """Top-level attributes of a prediction run that differ (``runtime`` and the data version aside).

    Both sides go through JSON first, as stored attributes did (tuples become lists, keys strings).
    """
    ignore = {"runtime", DATA_VERSION}
    old = json.loads(json.dumps({k: v for k, v in stored.items() if k not in ignore}, default=str))
    new = json.loads(json.dumps({k: v for k, v in requested.items() if k not in ignore}, default=str))
    return sorted(k for k in set(old) | set(new) if old.get(k, _MISSING) != new.get(k, _MISSING))


_MISSING = object()
