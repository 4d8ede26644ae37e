"""Segment -> clip aggregation of stored predictions.

A prediction run stores one probability vector per segment (10 one-second audio segments or 12
video frames per development clip). The paper averages them equally per clip ("we equally made an
ensemble of the output confidences of each split audio file and image frame file"); that is the
default here. Geometric mean, median and max are offered for experiments; they do not keep rows
summing to one, so their result is renormalised.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fusion._validate import as_probs, check_distribution_rows, check_finite_rows, name_some

GEOMETRIC_EPS = 1e-7  # floor before the log, so one zero segment does not zero the clip


def _mean(p: np.ndarray) -> np.ndarray:
    return p.mean(axis=1)


def _geometric_mean(p: np.ndarray) -> np.ndarray:
    return _renormalize(np.exp(np.log(np.clip(p, GEOMETRIC_EPS, 1.0)).mean(axis=1)))


def _median(p: np.ndarray) -> np.ndarray:
    return _renormalize(np.median(p, axis=1))


def _max(p: np.ndarray) -> np.ndarray:
    return _renormalize(p.max(axis=1))


def _renormalize(p: np.ndarray) -> np.ndarray:
    return p / np.maximum(p.sum(axis=1, keepdims=True), 1e-300)


AGGREGATORS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": _mean,
    "geometric_mean": _geometric_mean,
    "median": _median,
    "max": _max,
}


def aggregate_segments(probs: np.ndarray, method: str = "mean") -> np.ndarray:
    """Reduce [n_clips, n_segments, n_classes] segment probabilities to [n_clips, n_classes].

    Args:
        probs: segment-level probabilities as stored by a prediction run.
        method: one of :data:`AGGREGATORS` (``mean``, the paper's choice, by default).
    """
    if method not in AGGREGATORS:
        raise ValueError(f"unknown aggregation {method!r}; expected one of {sorted(AGGREGATORS)}")
    arr = as_probs(probs, "segment probabilities", ndim=3)
    if arr.shape[1] == 0:
        raise ValueError(f"segment probabilities: expected at least one segment, found shape {arr.shape}")
    return AGGREGATORS[method](arr)


def load_clip_probs(store, run: str, clip_ids: Sequence[str], method: str = "mean") -> np.ndarray:
    """Read one prediction run for ``clip_ids`` from a store and aggregate it to clip level.

    Raises the store's ``MissingFeatureError`` when some clips were not predicted by the run,
    ``UnknownFeatureError`` (listing the runs that exist) when the run is not in the store, and
    ``NonFiniteProbabilitiesError`` naming the run and the clips whose stored probabilities hold a NaN
    or an infinity (a model that diverged): those never reach a fusion, a submission or a score.
    A ``ValueError`` names the run and the first clip whose stored rows are not probability
    distributions (a negative value, or a sum off one by more than ``SUM_TOLERANCE``): runs store
    softmax probabilities (``heads predict``; no run records logits), so such rows are a store
    written by mistake and are refused rather than fused as probabilities.
    """
    ids = list(clip_ids)
    segment_probs = store.get_predictions(run, ids)
    check_finite_rows(segment_probs, ids, f"prediction run {run!r}")
    check_distribution_rows(segment_probs, ids, f"prediction run {run!r}")
    try:
        clip_probs = aggregate_segments(segment_probs, method)
    except ValueError as err:
        raise ValueError(f"prediction run {run!r}: {err}") from None
    _refuse_empty_rows(clip_probs, ids, run, method)
    return clip_probs


def _refuse_empty_rows(clip_probs: np.ndarray, clip_ids: list[str], run: str, method: str) -> None:
    """A clip whose aggregate is all zeros (the median of segments that disagree, each with exact zeros).

    Renormalising cannot make a distribution of it: the zeros would be fused and scored as if the run
    gave every class probability 0.
    """
    empty = [clip_ids[i] for i in np.flatnonzero(clip_probs.sum(axis=1) <= 0)]
    if empty:
        raise ValueError(f"prediction run {run!r}: the {method} of the segments is 0 for every class for "
                         f"{len(empty)} clip(s): {name_some(empty)}; use aggregation 'mean'")
