"""The challenge's metrics: class-wise averaged log-loss (primary), micro log-loss, accuracy.

DCASE2021 Task 1 ranks systems by the *class-wise averaged* multi-class log-loss: the log-loss is
computed separately over the clips of each true class, then the ten numbers are averaged. It weights
each class equally whatever its number of clips. The plain (micro) log-loss over all clips is kept
beside it, named as such.

Row sums. The paper's post-processing (equation (1)) leaves rows that do not sum to one. How that is
scored depends on the scorer:

* scikit-learn up to the releases used in 2021 (e.g. 0.24) clipped to [1e-15, 1 - 1e-15] and then
  *renormalised every row* before taking the log; the organisers' evaluation calls
  ``sklearn.metrics.log_loss`` per class (DCASE2021 Task 1A baseline, ``task1a.py``,
  ``do_evaluation``), so the challenge scored renormalised rows.
* scikit-learn 1.9.1 (installed here) clips to [eps, 1 - eps] with ``eps`` the dtype's machine
  epsilon, does *not* renormalise, and only warns "The y_prob values do not sum to one".

Our functions make the choice explicit with ``renormalize`` (default True: the challenge's scoring);
``renormalize=False`` scores the raw values, as current scikit-learn does. The clipping constant
follows the same choice (``eps=None``): 1e-15 with renormalisation, as the 2021 scorer did, and
float64's machine epsilon without, as current scikit-learn does for the float64 rows we score (a
true class given exactly 0 costs -log(2.2e-16) = 36.04 there, not -log(1e-15) = 34.54).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from fusion._validate import as_labels, as_probs

DCASE_EPS = 1e-15  # scikit-learn's clipping constant before 1.2, the one the 2021 evaluation used
RAW_EPS = float(np.finfo(np.float64).eps)  # scikit-learn >= 1.5's for float64 rows (it does not renormalise)


def clip_eps(renormalize: bool, eps: float | None = None) -> float:
    """The clipping constant of a scorer: ``eps`` if given, else the one of the scorer that
    ``renormalize`` stands for (:data:`DCASE_EPS` for the 2021 one, :data:`RAW_EPS` for current
    scikit-learn), so that ``renormalize=False`` reproduces current scikit-learn on exact 0s and 1s too."""
    if eps is None:
        return DCASE_EPS if renormalize else RAW_EPS
    if not 0.0 < eps < 0.5:
        raise ValueError(f"log-loss eps: expected a clipping constant in (0, 0.5), found {eps!r}")
    return float(eps)


def per_clip_log_loss(probs: np.ndarray, labels: np.ndarray, *, renormalize: bool = True,
                      eps: float | None = None) -> np.ndarray:
    """Negative log of the probability given to the true class, one value per clip.

    Args:
        probs: [n, n_classes] probabilities (rows may not sum to one).
        labels: [n] true class indices.
        renormalize: divide each row by its sum after clipping (the 2021 scorer) or score it raw.
        eps: values are clipped to [eps, 1 - eps] first, so that log(0) never happens (default:
            :func:`clip_eps` of ``renormalize``).
    """
    p = as_probs(probs)
    y = as_labels(labels, p.shape[0], p.shape[1])
    eps = clip_eps(renormalize, eps)
    p = np.clip(p, eps, 1.0 - eps)
    if renormalize:
        p = p / p.sum(axis=1, keepdims=True)
    return -np.log(p[np.arange(len(y)), y])


def log_loss(probs: np.ndarray, labels: np.ndarray, *, renormalize: bool = True,
             eps: float | None = None) -> float:
    """Micro (plain) log-loss: the mean of :func:`per_clip_log_loss` over all clips."""
    losses = per_clip_log_loss(probs, labels, renormalize=renormalize, eps=eps)
    if losses.size == 0:
        raise ValueError("log_loss: expected at least one clip, found none")
    return float(losses.mean())


def classwise_log_loss(probs: np.ndarray, labels: np.ndarray, *, renormalize: bool = True,
                       eps: float | None = None) -> tuple[float, np.ndarray]:
    """DCASE's primary metric: log-loss per true class, then the mean over classes.

    Classes without any clip get NaN in the per-class array and are left out of the mean (a
    tiny test store may lack a class; the real fold1_evaluate split has all ten).

    Returns:
        (mean over classes present, per-class log-loss [n_classes]).
    """
    losses = per_clip_log_loss(probs, labels, renormalize=renormalize, eps=eps)
    y = np.asarray(labels, dtype=np.int64)
    n_classes = np.shape(probs)[1]
    per_class = np.full(n_classes, np.nan)
    for c in range(n_classes):
        if np.any(y == c):
            per_class[c] = losses[y == c].mean()
    if np.all(np.isnan(per_class)):
        raise ValueError("classwise_log_loss: expected at least one labelled clip, found none")
    return float(np.nanmean(per_class)), per_class


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of clips whose highest-probability class is the true class."""
    p = as_probs(probs)
    y = as_labels(labels, p.shape[0], p.shape[1])
    if y.size == 0:
        raise ValueError("accuracy: expected at least one clip, found none")
    return float(np.mean(p.argmax(axis=1) == y))


def confusion_matrix(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Counts [true class, predicted class] of the arg-max decisions."""
    p = as_probs(probs)
    y = as_labels(labels, p.shape[0], p.shape[1])
    n_classes = p.shape[1]
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (y, p.argmax(axis=1)), 1)
    return matrix


def classwise_accuracy(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per true class, the fraction of its clips classified correctly (NaN for absent classes)."""
    matrix = confusion_matrix(probs, labels)
    totals = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(matrix) / np.maximum(totals, 1), np.nan)


@dataclass
class ReliabilityBins:
    """Top-label reliability: per confidence bin, mean confidence, accuracy and clip count."""

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray

    @property
    def ece(self) -> float:
        """Expected calibration error: count-weighted mean |accuracy - confidence|."""
        used = self.count > 0
        total = self.count.sum()
        if total == 0:
            return float("nan")
        gaps = np.abs(self.accuracy[used] - self.confidence[used])
        return float(np.sum(gaps * self.count[used]) / total)


def reliability(probs: np.ndarray, labels: np.ndarray, *, n_bins: int = 10,
                renormalize: bool = True) -> ReliabilityBins:
    """Bin clips by their top probability and compare confidence with accuracy in each bin.

    ``renormalize`` follows the log-loss convention so that the diagram shows the probabilities
    the metric scores.
    """
    p = as_probs(probs)
    y = as_labels(labels, p.shape[0], p.shape[1])
    if renormalize:
        p = p / np.maximum(p.sum(axis=1, keepdims=True), 1e-300)
    conf = p.max(axis=1)
    hit = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore"):
        mean_conf = np.bincount(index, weights=conf, minlength=n_bins) / count
        mean_acc = np.bincount(index, weights=hit, minlength=n_bins) / count
    return ReliabilityBins(edges, mean_conf, mean_acc, count)


@dataclass
class Scores:
    """Every metric of one set of clip probabilities, JSON-ready through :meth:`to_dict`."""

    logloss: float                 # class-wise averaged log-loss (DCASE primary)
    logloss_micro: float           # plain log-loss over all clips
    accuracy: float
    classwise_logloss: dict[str, float]
    classwise_accuracy: dict[str, float]
    confusion: list[list[int]]
    ece: float
    n_clips: int
    renormalize: bool
    classes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain JSON types; NaN (a class with no clips) becomes None."""
        return _jsonable(asdict(self))


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def score(probs: np.ndarray, labels: np.ndarray, classes: list[str], *, renormalize: bool = True,
          eps: float | None = None) -> Scores:
    """All metrics at once, with class names attached to the class-wise ones."""
    if np.shape(probs)[-1] != len(classes):
        raise ValueError(f"score: expected {len(classes)} class columns, found shape {np.shape(probs)}")
    mean_ll, per_class_ll = classwise_log_loss(probs, labels, renormalize=renormalize, eps=eps)
    per_class_acc = classwise_accuracy(probs, labels)
    return Scores(
        logloss=mean_ll,
        logloss_micro=log_loss(probs, labels, renormalize=renormalize, eps=eps),
        accuracy=accuracy(probs, labels),
        classwise_logloss={c: float(v) for c, v in zip(classes, per_class_ll)},
        classwise_accuracy={c: float(v) for c, v in zip(classes, per_class_acc)},
        confusion=confusion_matrix(probs, labels).tolist(),
        ece=reliability(probs, labels, renormalize=renormalize).ece,
        n_clips=int(len(labels)),
        renormalize=renormalize,
        classes=list(classes),
    )
