"""The paper's ensemble rules (section 2.4), each a small function on clip probabilities.

The paper fuses three families of models: log-mel audio CNNs (A01-A03 -> A04), frame CNNs (V01-V03
-> V04) and the CLIP late-fusion network (C04). In order:

1. :func:`average_models` - equal-weight mean within a family (A04 = mean of A01-A03).
2. :func:`replace_low_confidence` - replace a video family's probabilities by audio's for a clip
   when video's top probability is at least ``margin`` (0.20) below audio's (dim night scenes).
3. :func:`classwise_fuse` with a family x class weight matrix from :func:`selection_weights`
   (audio counts only for bus/park/tram) and/or :func:`confidence_weights` (each family weighted
   per class by its mean validation confidence in that class).
4. Equation (1), in :mod:`fusion.postprocess`.

All functions take and return [n_clips, n_classes] arrays and never modify their inputs.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fusion._validate import as_labels, as_probs, same_shape

# A tiny slack on the margin comparison, so that the rule fires for "0.20 lower" as written: 0.7 - 0.5
# is 0.19999999999999996 in float64, and a store keeps probabilities as float32, where 0.7 is read back
# as 0.699999988 (0.7 - 0.5 = 0.199999988). 1e-6 covers float32 rounding (about 6e-8 near 1) with room
# to spare and is far below any margin that means something.
MARGIN_TOLERANCE = 1e-6


def average_models(probs: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted (equal by default) mean of several models' clip probabilities.

    Args:
        probs: one [n, n_classes] array per model, all of one shape.
        weights: optional non-negative weight per model; equal weights reproduce the paper.
    """
    if len(probs) == 0:
        raise ValueError("average_models: expected at least one model, found none")
    arrays = [as_probs(p, f"model {i}") for i, p in enumerate(probs)]
    same_shape({f"model {i}": a for i, a in enumerate(arrays)})
    w = np.ones(len(arrays)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(arrays),) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"average_models: expected {len(arrays)} non-negative weights with a positive sum, found {w}")
    return np.tensordot(w / w.sum(), np.stack(arrays), axes=1)


def replace_low_confidence(target: np.ndarray, source: np.ndarray, margin: float = 0.20
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Replace ``target`` rows by ``source`` rows where target's top value is >= ``margin`` below source's.

    The paper: "we replaced the confidences of video models with those of audio models when the
    maximum confidence of 10 classes from video models is 0.20 lower than that of audio models".
    Equality (exactly ``margin`` lower) replaces.

    Returns:
        (new target array, boolean mask of the replaced clips).
    """
    t = as_probs(target, "target")
    s = as_probs(source, "source")
    same_shape({"target": t, "source": s})
    if not 0.0 <= margin <= 1.0:
        raise ValueError(f"replace_low_confidence: expected a margin in [0, 1], found {margin}")
    replaced = s.max(axis=1) - t.max(axis=1) >= margin - MARGIN_TOLERANCE
    out = t.copy()
    out[replaced] = s[replaced]
    return out, replaced


def selection_weights(families: Sequence[str], classes: Sequence[str],
                      selected: Mapping[str, Sequence[str]]) -> np.ndarray:
    """A 0/1 family x class matrix: a family in ``selected`` counts only for its listed classes.

    Families not named in ``selected`` count for every class. The paper's E01 is
    ``selected={"audio": ["bus", "park", "tram"]}``.

    Refused, naming the family or the classes: an empty list (the family's runs would be read and
    then count for nothing) and a selection that leaves some class with no family at all (every
    family selected away from it: that column could only be fused by dividing by zero).
    """
    unknown_fam = sorted(set(selected) - set(families))
    if unknown_fam:
        raise ValueError(f"class selection names unknown families {unknown_fam}; the recipe has {list(families)}")
    weights = np.ones((len(families), len(classes)))
    for f, family in enumerate(families):
        if family not in selected:
            continue
        unknown = sorted(set(selected[family]) - set(classes))
        if unknown:
            raise ValueError(f"class selection for {family!r} names unknown classes {unknown}; classes are {list(classes)}")
        if not selected[family]:
            raise ValueError(f"class selection for {family!r} is empty: the family would count for no class; "
                             f"list its classes or remove it from the recipe's families")
        weights[f] = [1.0 if c in selected[family] else 0.0 for c in classes]
    uncovered = [c for c, total in zip(classes, weights.sum(axis=0)) if total <= 0]
    if uncovered:
        raise ValueError(f"class selection leaves classes {uncovered} with no family counting for them "
                         f"(every family is selected for other classes); selection: {dict(selected)}")
    return weights


def confidence_weights(family_probs: Mapping[str, np.ndarray], labels: np.ndarray) -> np.ndarray:
    """Family x class weights: each family's mean probability for class c over the clips of class c.

    Fit these on a validation split (see :class:`fusion.calibration.ConfidenceWeights`, which
    refuses to apply them to the clips they were fitted on). A class absent from the fit data gets
    equal weights for every family.
    """
    names = list(family_probs)
    arrays = {n: as_probs(family_probs[n], f"family {n!r}") for n in names}
    n_rows, n_classes = same_shape(arrays)
    y = as_labels(labels, n_rows, n_classes)
    weights = np.ones((len(names), n_classes))
    for c in range(n_classes):
        rows = y == c
        if rows.any():
            weights[:, c] = [arrays[n][rows, c].mean() for n in names]
    return weights


def classwise_fuse(family_probs: Mapping[str, np.ndarray], weights: np.ndarray,
                   renormalize: bool = True) -> np.ndarray:
    """Per class c: the weighted mean of the families' column c, ``sum_f w[f,c] p_f[:,c] / sum_f w[f,c]``.

    Args:
        family_probs: family name -> [n, n_classes]; order matches the rows of ``weights``.
        weights: [n_families, n_classes] non-negative; a class must have some positive weight.
        renormalize: with class-wise weights the fused rows no longer sum to one; True rescales
            them (our default; the paper does not say, and its 2021 scorer renormalised anyway).
    """
    names = list(family_probs)
    arrays = {n: as_probs(family_probs[n], f"family {n!r}") for n in names}
    n_rows, n_classes = same_shape(arrays)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(names), n_classes) or np.any(w < 0):
        raise ValueError(f"classwise_fuse: expected non-negative weights of shape {(len(names), n_classes)}, found {w.shape}")
    totals = w.sum(axis=0)
    if np.any(totals <= 0):
        raise ValueError(f"classwise_fuse: class columns {np.flatnonzero(totals <= 0).tolist()} have no family with positive weight")
    fused = sum(w[f] * arrays[n] for f, n in enumerate(names)) / totals
    if renormalize:
        fused = fused / np.maximum(fused.sum(axis=1, keepdims=True), 1e-300)
    return fused
