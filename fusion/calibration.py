"""Calibration fitted on one split and applied to another (the principled alternative to eq. (1)).

Everything here that learns from labels is a *fitted object* that remembers the clip ids it was
fitted on and refuses to be applied to any of them (:class:`LeakageError`): a calibrator scored on
its own fit data reports a log-loss that no held-out set will reproduce.

* :class:`TemperatureScaling` - one scalar T; p -> softmax(log p / T). Fitted by minimising the
  negative log-likelihood over log T with a bounded 1-D search (scipy). Keeps the arg-max, so
  accuracy is unchanged; only confidence moves.
* :class:`StackingCalibrator` - multinomial logistic regression (scikit-learn) on log-probabilities.
  On the fused output it is a full affine recalibration; on the families' outputs side by side it
  is a learned fusion (stacking).
* :class:`ConfidenceWeights` - the paper's class-wise family weights, fitted on validation data
  (see :func:`fusion.rules.confidence_weights`).
"""
from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping, Sequence

import numpy as np

from fusion._validate import as_labels, as_probs
from fusion.rules import confidence_weights

LOG_FLOOR = 1e-12  # probabilities are floored here before taking logs


class LeakageError(ValueError):
    """A fitted object was asked to score clips it was fitted on."""


class NotFittedError(RuntimeError):
    """``apply`` was called before ``fit``."""


def check_disjoint(fit_ids: Collection[str], apply_ids: Collection[str], what: str = "calibration") -> None:
    """Raise :class:`LeakageError` naming the shared clips when the two id lists overlap."""
    shared = sorted(set(fit_ids) & set(apply_ids))
    if shared:
        shown = ", ".join(shared[:5]) + (f" and {len(shared) - 5} more" if len(shared) > 5 else "")
        raise LeakageError(
            f"{what}: the fit clips and the clips to score overlap in {len(shared)} clip(s) ({shown}); "
            f"fit on a split disjoint from the one you evaluate"
        )


class _FittedOnClips:
    """Remembers the clip ids of the fit and guards every apply against them."""

    what = "fitted object"

    def __init__(self) -> None:
        self.fit_ids: frozenset[str] | None = None

    def _remember(self, clip_ids: Sequence[str], n_rows: int) -> None:
        ids = list(clip_ids)
        if len(ids) != n_rows:
            raise ValueError(f"{self.what}: expected one clip id per row ({n_rows}), found {len(ids)}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.what}: clip ids given to fit contain duplicates")
        self.fit_ids = frozenset(ids)

    def _guard(self, clip_ids: Sequence[str], n_rows: int) -> None:
        if self.fit_ids is None:
            raise NotFittedError(f"{self.what}: call fit() on a labelled split before apply()")
        if len(clip_ids) != n_rows:
            raise ValueError(f"{self.what}: expected one clip id per row ({n_rows}), found {len(clip_ids)}")
        check_disjoint(self.fit_ids, clip_ids, self.what)


def _log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(probs, LOG_FLOOR, 1.0))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _check_bounds(bounds: Sequence[float]) -> tuple[float, float]:
    """The temperature search interval, refused in one line naming ``bounds`` unless 0 < low <= high
    (both finite): the search runs on log T, and scipy's own words for a bad interval name neither
    the calibrator nor the parameter."""
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"temperature scaling bounds: expected two numbers (low, high), found {bounds!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and 0.0 < lo <= hi):
        raise ValueError(f"temperature scaling bounds: expected finite temperatures 0 < low <= high, found {bounds!r}")
    return lo, hi


def _warn_if_unidentified(temperature: float, bounds: tuple[float, float], logits: np.ndarray,
                          labels: np.ndarray) -> None:
    """Warn when the fit split cannot pin T down, instead of returning the search's edge as an optimum.

    Where every fit clip's true class is its strict arg-max (a tiny or an easy split), the NLL keeps
    falling as T -> 0: the search stops wherever the NLL stops changing in floating point, and the
    calibrated output is close to 0/1, so a single held-out error costs ~34.5 nats. T at the upper
    bound means the fit split prefers uniform rows. Either way the number is the split's, not the model's.
    """
    n = len(labels)
    if not n or bounds[0] == bounds[1] or logits.shape[1] < 2:  # a fixed T, or one class: nothing to fit
        return
    true = logits[np.arange(n), labels]
    others = np.where(np.eye(logits.shape[1], dtype=bool)[labels], -np.inf, logits)
    if bool(np.all(true > others.max(axis=1))):
        warnings.warn(f"temperature scaling: all {n} fit clips have their true class on top, so the fit "
                      f"cannot stop sharpening (T={temperature:.3g}, search bounds {bounds[0]:g}..{bounds[1]:g}): "
                      f"calibrated probabilities are near 0/1; fit on a larger labelled split with errors", stacklevel=3)
    elif min(abs(np.log(temperature / b)) for b in bounds) < 1e-3:
        warnings.warn(f"temperature scaling: the fit stopped at the search bound T={temperature:.3g} "
                      f"(bounds {bounds[0]:g}..{bounds[1]:g}) on {n} fit clips: the optimum lies beyond it; "
                      f"check the fit split (size, labels)", stacklevel=3)


class TemperatureScaling(_FittedOnClips):
    """p -> softmax(log p / T), with T fitted by minimum NLL on a labelled split.

    Args:
        bounds: search interval for T (the search runs on log T).
    """

    what = "temperature scaling"

    def __init__(self, bounds: tuple[float, float] = (0.02, 50.0)) -> None:
        super().__init__()
        self.bounds = _check_bounds(bounds)
        self.temperature: float | None = None

    @staticmethod
    def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
        """Mean negative log-likelihood of ``labels`` under softmax(logits / T)."""
        z = logits / temperature
        z = z - z.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(z).sum(axis=1))
        return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))

    def fit(self, clip_ids: Sequence[str], probs: np.ndarray, labels: np.ndarray) -> "TemperatureScaling":
        from scipy.optimize import minimize_scalar

        p = as_probs(probs, "temperature fit probs")
        if p.shape[0] == 0:  # the NLL of no clip is NaN, and the bounded search still returns "a" T
            raise ValueError("temperature scaling: expected at least one clip to fit on, found none")
        y = as_labels(labels, p.shape[0], p.shape[1], "temperature fit labels")
        self._remember(clip_ids, p.shape[0])
        logits = _log_probs(p)
        lo, hi = np.log(self.bounds[0]), np.log(self.bounds[1])
        result = minimize_scalar(lambda lt: self.nll(logits, y, float(np.exp(lt))),
                                 bounds=(lo, hi), method="bounded", options={"xatol": 1e-5})
        self.temperature = float(np.exp(result.x))
        _warn_if_unidentified(self.temperature, self.bounds, logits, y)
        return self

    def apply(self, clip_ids: Sequence[str], probs: np.ndarray) -> np.ndarray:
        p = as_probs(probs, "temperature apply probs")
        self._guard(clip_ids, p.shape[0])
        return _softmax(_log_probs(p) / self.temperature)

    def describe(self) -> dict:
        return {"method": "temperature", "temperature": self.temperature, "n_fit": len(self.fit_ids or ())}


class StackingCalibrator(_FittedOnClips):
    """Multinomial logistic regression on log-probabilities (one or several models side by side).

    Args:
        n_classes: number of output classes (columns of the result).
        C: inverse L2 regularisation strength of scikit-learn's ``LogisticRegression``.
    """

    what = "stacking calibrator"

    def __init__(self, n_classes: int, C: float = 1.0, max_iter: int = 2000) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.C = C
        self.max_iter = max_iter
        self.model = None
        self.missing_classes: list[int] = []
        self.floor = 0.0

    def fit(self, clip_ids: Sequence[str], probs: np.ndarray, labels: np.ndarray) -> "StackingCalibrator":
        from sklearn.linear_model import LogisticRegression

        x = as_probs(probs, "stacking fit inputs")
        y = as_labels(labels, x.shape[0], self.n_classes, "stacking fit labels")
        self._remember(clip_ids, x.shape[0])
        present = np.unique(y)
        if present.size < 2:
            raise ValueError(f"stacking calibrator: expected at least 2 classes in the fit split, found {present.tolist()}")
        self.missing_classes = sorted(set(range(self.n_classes)) - set(present.tolist()))
        if self.missing_classes:
            warnings.warn(f"stacking calibrator: classes {self.missing_classes} have no clip in the fit data; "
                          f"it gives them the add-one floor 1/(n_fit + n_classes) each", stacklevel=2)
        self.floor = 1.0 / (x.shape[0] + self.n_classes)
        self.model = LogisticRegression(C=self.C, max_iter=self.max_iter)
        self.model.fit(_log_probs(x), y)
        return self

    def apply(self, clip_ids: Sequence[str], probs: np.ndarray) -> np.ndarray:
        x = as_probs(probs, "stacking apply inputs")
        self._guard(clip_ids, x.shape[0])
        fitted = int(self.model.n_features_in_)
        if x.shape[1] != fitted:  # scikit-learn's "X has N features" named neither the calibrator nor its fit
            raise ValueError(f"stacking calibrator: fitted on {fitted} input columns, given {x.shape[1]} "
                             f"(apply it to what it was fitted on: the same families, or the fused output)")
        out = np.zeros((x.shape[0], self.n_classes))
        seen = self.model.predict_proba(_log_probs(x))
        if self.missing_classes:
            # A class never seen in fitting must not get probability 0 (an infinite log-loss on the
            # first clip of it): it gets an add-one (Laplace) floor and the seen classes share the rest.
            seen = seen * (1.0 - self.floor * len(self.missing_classes))
            out[:, self.missing_classes] = self.floor
        out[:, self.model.classes_] = seen
        return out

    def describe(self) -> dict:
        return {"method": "stacking", "C": self.C, "n_fit": len(self.fit_ids or ()),
                "classes_missing_from_fit": self.missing_classes}


class ConfidenceWeights(_FittedOnClips):
    """The paper's class-wise family weights, fitted on a labelled validation split."""

    what = "class-wise confidence weights"

    def __init__(self) -> None:
        super().__init__()
        self.families: list[str] = []
        self.weights: np.ndarray | None = None

    def fit(self, clip_ids: Sequence[str], family_probs: Mapping[str, np.ndarray],
            labels: np.ndarray) -> "ConfidenceWeights":
        self.families = list(family_probs)
        self.weights = confidence_weights(family_probs, labels)
        self._remember(clip_ids, len(labels))
        return self

    def for_clips(self, clip_ids: Sequence[str]) -> np.ndarray:
        """The [n_families, n_classes] weights, after checking ``clip_ids`` were not in the fit."""
        self._guard(list(clip_ids), len(clip_ids))
        return self.weights


CALIBRATORS = ("temperature", "stacking")


def fold_of_groups(groups: Sequence[str], folds: int) -> dict[str, int]:
    """Assign each distinct group (a recording location) to one of ``folds`` folds, deterministically."""
    distinct = sorted(set(groups))
    if len(distinct) < folds:
        raise ValueError(f"cross-fitting: expected at least {folds} distinct locations, found {len(distinct)}")
    return {g: i % folds for i, g in enumerate(distinct)}


def crossfit_apply(method: str, n_classes: int, params: dict, folds: int,
                   fit: tuple[Sequence[str], np.ndarray, np.ndarray, Sequence[str]],
                   apply: tuple[Sequence[str], np.ndarray, Sequence[str]]) -> tuple[np.ndarray, list[dict]]:
    """Calibrate clips that lie inside the fit pool without ever scoring a clip with its own fit.

    The clips to calibrate are split into ``folds`` folds by location (a location never spans two
    folds, as in the official splits). Fold k is calibrated by a calibrator fitted on the pool minus
    every clip recorded at fold k's locations; the calibrators' own guard re-checks disjointness.

    Args:
        method, n_classes, params: as for :func:`make_calibrator`.
        folds: number of folds (>= 2).
        fit: (clip ids, inputs, labels, locations) of the fit pool.
        apply: (clip ids, inputs, locations) of the clips to calibrate.

    Returns:
        (calibrated probabilities for ``apply``, one description per fold).
    """
    fit_ids, fit_x, fit_y, fit_groups = fit
    apply_ids, apply_x, apply_groups = apply
    fold = fold_of_groups(apply_groups, folds)
    out = np.zeros((len(apply_ids), n_classes))
    described = []
    fit_groups_arr, apply_groups_arr = np.asarray(fit_groups), np.asarray(apply_groups)
    for k in range(folds):
        held_groups = [g for g, f in fold.items() if f == k]
        held = np.isin(apply_groups_arr, held_groups)
        train = ~np.isin(fit_groups_arr, held_groups)
        if not train.any():
            raise ValueError(f"cross-fitting: fold {k} of {folds} (locations {', '.join(held_groups[:5])}) leaves no "
                             f"clip of the fit split to fit on: all {len(fit_ids)} were recorded at those locations; "
                             f"fit on a split with clips recorded at other locations too")
        calibrator = make_calibrator(method, n_classes, **params)
        try:
            calibrator.fit([fit_ids[i] for i in np.flatnonzero(train)], fit_x[train], fit_y[train])
        except ValueError as err:  # e.g. a fold whose fit clips hold one class: say which fold
            raise ValueError(f"cross-fitting: fold {k} of {folds} (locations {', '.join(held_groups[:5])}): "
                             f"{err}") from err
        out[held] = calibrator.apply([apply_ids[i] for i in np.flatnonzero(held)], apply_x[held])
        described.append({**calibrator.describe(), "fold": k, "n_scored": int(held.sum())})
    return out, described


def make_calibrator(method: str, n_classes: int, **params) -> TemperatureScaling | StackingCalibrator:
    """Build an unfitted calibrator by name (``temperature`` or ``stacking``)."""
    if method == "temperature":
        return TemperatureScaling(**params)
    if method == "stacking":
        return StackingCalibrator(n_classes, **params)
    raise ValueError(f"unknown calibration method {method!r}; expected one of {list(CALIBRATORS)}")
