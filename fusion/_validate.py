"""Input checks shared by the pure numpy modules.

Every public function of `fusion` takes plain arrays; these helpers turn a wrong shape, a NaN or a
label out of range into a ``ValueError`` that says what was expected and what was found, instead of
a silent broadcast or a log of a negative number three calls later.
"""
from __future__ import annotations

import numpy as np

from featurestore.checks import non_finite_rows


def as_probs(probs: np.ndarray, what: str = "probs", ndim: int = 2) -> np.ndarray:
    """Return ``probs`` as a float64 array after checking its rank, finiteness and range [0, 1].

    Args:
        probs: array of probabilities (rows need not sum to one).
        what: name used in error messages.
        ndim: expected number of dimensions.
    """
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{what}: expected a {ndim}-D array, found shape {arr.shape}")
    if arr.size and not np.all(np.isfinite(arr)):
        bad = int(np.sum(~np.isfinite(arr)))
        raise ValueError(f"{what}: expected finite values, found {bad} NaN/inf entries")
    if arr.size and (arr.min() < -1e-6 or arr.max() > 1 + 1e-6):
        raise ValueError(f"{what}: expected values in [0, 1], found range [{arr.min():.6g}, {arr.max():.6g}]")
    return np.clip(arr, 0.0, 1.0)


def as_labels(labels: np.ndarray, n_rows: int, n_classes: int, what: str = "labels") -> np.ndarray:
    """Return integer labels after checking their count and that each is a valid class index.

    Unknown labels (-1, the store's marker for evaluation data) are refused: a metric or a fit on
    them would be meaningless.
    """
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n_rows:
        raise ValueError(f"{what}: expected {n_rows} labels (one per row), found shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what}: expected integer class indices, found dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        unknown = int(np.sum(arr < 0))
        raise ValueError(
            f"{what}: expected class indices in [0, {n_classes}), found range [{arr.min()}, {arr.max()}]"
            + (f" ({unknown} unknown labels: is this an unlabelled split?)" if unknown else "")
        )
    return arr


def same_shape(arrays: dict[str, np.ndarray]) -> tuple[int, ...]:
    """Check that all named arrays share one shape and return it."""
    shapes = {name: np.shape(a) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{n}: {s}" for n, s in shapes.items())
        raise ValueError(f"expected arrays of one shape, found {listing}")
    return next(iter(shapes.values()))


class NonFiniteProbabilitiesError(ValueError):
    """Probabilities that are NaN or infinite for some clips.

    Raised before anything is written or printed from them: a submission or a classify answer holding
    ``nan`` looks like an answer and is not one. The command line counts it as failed work (exit 1).
    """


def nonfinite_rows(probs: np.ndarray) -> np.ndarray:
    """Bool mask of the rows (first axis) of ``probs`` holding any NaN or infinity."""
    return non_finite_rows(np.asarray(probs, dtype=np.float64))


def name_some(names: list[str], limit: int = 5) -> str:
    """``a, b, c`` or ``a, b, c, d, e and 7 more``: clip lists short enough for one error line."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_finite_rows(probs: np.ndarray, clip_ids: list[str], source: str) -> None:
    """Refuse probabilities with a non-finite entry, naming the clips and where they came from.

    Args:
        probs: ``[n_clips, ...]`` probabilities, one row per clip id.
        clip_ids: the clips of the rows.
        source: what produced them, for the message ("prediction run 'A01'").
    """
    bad = [clip_ids[i] for i in np.flatnonzero(nonfinite_rows(probs))]
    if bad:
        raise NonFiniteProbabilitiesError(f"{source} holds non-finite probabilities (NaN/inf) for {len(bad)} "
                                          f"clip(s): {name_some(bad)}; nothing was written")


# How far a stored row's sum may be from one. A float32 softmax of 10 classes sums to 1 within about
# 1e-6, of a thousand within about 1e-4, a half-precision softmax cast to float32 within about 5e-4;
# logits, sigmoid scores or rows scaled by mistake are off by far more than 1e-3.
SUM_TOLERANCE = 1e-3


def check_distribution_rows(probs: np.ndarray, clip_ids: list[str], source: str) -> None:
    """Refuse stored rows (last axis) that are not probability distributions, naming the first bad clip.

    Why: fusion averages, compares and clamps rows as probabilities. Logits that happen to lie in
    [0, 1], sigmoid scores or a row of zeros would be fused and scored as if they were, silently
    (the fused rows are renormalised later, hiding it). Non-finite rows are refused before this by
    :func:`check_finite_rows`.

    Args:
        probs: ``[n_clips, ..., n_classes]`` probabilities, one leading row per clip id.
        clip_ids: the clips of the rows.
        source: what produced them, for the message ("prediction run 'A01'").
    """
    arr = np.asarray(probs, dtype=np.float64)
    if not arr.size:
        return
    flat = arr.reshape(len(arr), -1, arr.shape[-1])  # [clips, rows of a clip, classes]
    sums = flat.sum(axis=-1)
    outside = (flat.min(axis=-1) < -1e-6) | (flat.max(axis=-1) > 1 + 1e-6)
    bad_rows = outside | (np.abs(sums - 1.0) > SUM_TOLERANCE)
    bad = np.flatnonzero(bad_rows.any(axis=1))
    if not bad.size:
        return
    clip, segment = int(bad[0]), int(np.flatnonzero(bad_rows[bad[0]])[0])
    row = flat[clip, segment]
    raise ValueError(f"{source} holds rows that are not probability distributions (values in [0, 1] summing to 1 "
                     f"within {SUM_TOLERANCE:g}) for {len(bad)} clip(s): {name_some([clip_ids[i] for i in bad])}; "
                     f"first: clip {clip_ids[clip]!r} segment {segment} sums to {row.sum():.6g} "
                     f"(range [{row.min():.6g}, {row.max():.6g}]): logits or unnormalised scores stored as "
                     f"probabilities? nothing was fused or written")
