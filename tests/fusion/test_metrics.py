"""Metrics against a hand computation and against scikit-learn where it has the same quantity."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from fusion.metrics import (
    accuracy, classwise_accuracy, classwise_log_loss, confusion_matrix, log_loss, per_clip_log_loss,
    reliability, score,
)

# 4 clips, 3 classes; true labels 0, 0, 1, 2
PROBS = np.array([[0.7, 0.2, 0.1],
                  [0.4, 0.5, 0.1],
                  [0.1, 0.8, 0.1],
                  [0.3, 0.3, 0.4]])
LABELS = np.array([0, 0, 1, 2])


@pytest.fixture(scope="module")
def skm():
    """scikit-learn's metrics, the reference, imported by the tests that compare with it: every
    pytest-xdist process collects this file, and the one that runs none of it need not spend the
    ~1 s of CPU that importing sklearn takes."""
    from sklearn import metrics

    return metrics


def test_log_losses_by_hand():
    per_clip = [-math.log(0.7), -math.log(0.4), -math.log(0.8), -math.log(0.4)]
    np.testing.assert_allclose(per_clip_log_loss(PROBS, LABELS), per_clip)
    assert log_loss(PROBS, LABELS) == pytest.approx(sum(per_clip) / 4)
    # class-wise: class 0 -> mean of the first two clips; classes 1 and 2 -> one clip each
    per_class = [(per_clip[0] + per_clip[1]) / 2, per_clip[2], per_clip[3]]
    mean, got = classwise_log_loss(PROBS, LABELS)
    np.testing.assert_allclose(got, per_class)
    assert mean == pytest.approx(sum(per_class) / 3)
    assert mean != pytest.approx(log_loss(PROBS, LABELS))  # the two averages really differ here


def test_log_losses_match_sklearn(skm):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(200, 10))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 10, size=200)
    assert log_loss(probs, labels) == pytest.approx(skm.log_loss(labels, probs, labels=list(range(10))), rel=1e-10)
    # the organisers' class-wise metric: sklearn's log_loss over each class's clips, then the mean
    per_class = [skm.log_loss(labels[labels == c], probs[labels == c], labels=list(range(10))) for c in range(10)]
    mean, got = classwise_log_loss(probs, labels)
    np.testing.assert_allclose(got, per_class, rtol=1e-10)
    assert mean == pytest.approx(np.mean(per_class), rel=1e-10)


def test_unnormalised_rows_renormalize_flag(skm):
    # equation (1) output: rows do not sum to one
    rows = np.array([[0.99, 0.001, 0.001], [0.06, 0.5, 0.99]])
    labels = np.array([0, 1])
    sums = rows.sum(axis=1)
    by_hand_renorm = -np.log([0.99 / sums[0], 0.5 / sums[1]]).mean()
    by_hand_raw = -np.log([0.99, 0.5]).mean()
    assert log_loss(rows, labels, renormalize=True) == pytest.approx(by_hand_renorm)
    assert log_loss(rows, labels, renormalize=False) == pytest.approx(by_hand_raw)
    # scikit-learn installed here scores the raw values (and warns); renormalize=False matches it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sk = skm.log_loss(labels, rows, labels=[0, 1, 2])
    assert sk == pytest.approx(by_hand_raw)
    assert any("do not sum to one" in str(w.message) for w in caught)


def test_zero_probability_is_clipped_not_infinite():
    rows = np.array([[1.0, 0.0], [0.0, 1.0]])
    loss = log_loss(rows, np.array([1, 1]))
    assert np.isfinite(loss) and loss == pytest.approx(-math.log(1e-15) / 2, rel=1e-6)


def test_accuracy_and_confusion_match_sklearn(skm):
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(10), size=150)
    labels = rng.integers(0, 10, size=150)
    pred = probs.argmax(axis=1)
    assert accuracy(probs, labels) == pytest.approx(skm.accuracy_score(labels, pred))
    np.testing.assert_array_equal(confusion_matrix(probs, labels), skm.confusion_matrix(labels, pred, labels=range(10)))
    np.testing.assert_allclose(classwise_accuracy(probs, labels),
                               skm.recall_score(labels, pred, labels=range(10), average=None, zero_division=0))


def test_accuracy_by_hand():
    assert accuracy(PROBS, LABELS) == pytest.approx(0.75)  # clip 2 predicts class 1 for class 0
    np.testing.assert_array_equal(confusion_matrix(PROBS, LABELS), [[1, 1, 0], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_allclose(classwise_accuracy(PROBS, LABELS), [0.5, 1.0, 1.0])


def test_absent_class_is_nan_and_left_out():
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1]])
    mean, per_class = classwise_log_loss(probs, np.array([0, 1]))
    assert np.isnan(per_class[2])
    assert mean == pytest.approx((-math.log(0.9) - math.log(0.7)) / 2)
    assert score(probs, np.array([0, 1]), ["a", "b", "c"]).to_dict()["classwise_logloss"]["c"] is None


def test_reliability_by_hand():
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.6, 0.4], [0.55, 0.45]])
    labels = np.array([0, 1, 0, 0])
    bins = reliability(probs, labels, n_bins=2)
    np.testing.assert_array_equal(bins.count, [0, 4])  # every top confidence is above 0.5
    assert bins.accuracy[1] == pytest.approx(0.75)
    assert bins.confidence[1] == pytest.approx(np.mean([0.95, 0.9, 0.6, 0.55]))
    assert bins.ece == pytest.approx(abs(0.75 - 0.75))
    bins10 = reliability(probs, labels, n_bins=10)
    expected = (abs(1 - 0.95) + abs(0 - 0.9) + abs(1 - 0.6) + abs(1 - 0.55)) / 4
    assert bins10.ece == pytest.approx(expected)


@pytest.mark.parametrize("bad, message", [
    (np.array([[0.5, np.nan]]), "finite"),
    (np.array([[1.5, -0.5]]), r"\[0, 1\]"),
    (np.array([0.5, 0.5]), "2-D"),
])
def test_bad_probabilities_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        log_loss(bad, np.array([0]))


def test_unknown_labels_are_refused():
    with pytest.raises(ValueError, match="unlabelled split"):
        log_loss(PROBS, np.array([0, -1, 1, 2]))
    with pytest.raises(ValueError, match="expected 4 labels"):
        accuracy(PROBS, np.array([0, 1]))
