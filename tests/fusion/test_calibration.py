"""Calibrators fit on one split, apply to another, and never see the held-out rows."""
from __future__ import annotations

import numpy as np
import pytest

from fusion.calibration import (
    ConfidenceWeights, LeakageError, NotFittedError, StackingCalibrator, TemperatureScaling, make_calibrator,
)
from fusion.metrics import log_loss


def _overconfident(n: int, seed: int, sharpen: float = 3.0, n_classes: int = 5):
    """Probabilities that are softmax(sharpen * true logits): temperature ``sharpen`` undoes it."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, size=n)
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), labels] += 1.0
    labels = np.array([rng.choice(n_classes, p=np.exp(l) / np.exp(l).sum()) for l in logits])
    z = sharpen * logits
    probs = np.exp(z - z.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True), labels


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


def test_temperature_recovers_the_sharpening_and_helps_held_out():
    fit_p, fit_y = _overconfident(3000, seed=0)
    test_p, test_y = _overconfident(1000, seed=1)
    ts = TemperatureScaling().fit(_ids("fit", 3000), fit_p, fit_y)
    assert ts.temperature == pytest.approx(3.0, rel=0.15)
    calibrated = ts.apply(_ids("test", 1000), test_p)
    assert log_loss(calibrated, test_y) < log_loss(test_p, test_y) - 0.1
    np.testing.assert_array_equal(calibrated.argmax(axis=1), test_p.argmax(axis=1))  # accuracy unchanged
    np.testing.assert_allclose(calibrated.sum(axis=1), 1.0)


def test_temperature_nll_by_hand():
    logits = np.log(np.array([[0.5, 0.25, 0.25]]))
    # T = 1 gives back the probabilities; T = 2 gives softmax(log p / 2) ~ sqrt(p)
    assert TemperatureScaling.nll(logits, np.array([0]), 1.0) == pytest.approx(-np.log(0.5))
    s = np.sqrt([0.5, 0.25, 0.25])
    assert TemperatureScaling.nll(logits, np.array([0]), 2.0) == pytest.approx(-np.log(s[0] / s.sum()))


def test_stacking_improves_held_out_loss():
    fit_p, fit_y = _overconfident(2000, seed=2)
    test_p, test_y = _overconfident(800, seed=3)
    st = StackingCalibrator(n_classes=5).fit(_ids("fit", 2000), fit_p, fit_y)
    out = st.apply(_ids("test", 800), test_p)
    assert out.shape == (800, 5)
    assert log_loss(out, test_y) < log_loss(test_p, test_y) - 0.1


@pytest.mark.parametrize("method", ["temperature", "stacking"])
def test_overlapping_clip_ids_are_refused(method):
    p, y = _overconfident(60, seed=4)
    cal = make_calibrator(method, 5).fit(_ids("clip", 60), p, y)
    with pytest.raises(LeakageError, match="overlap in 1 clip\\(s\\) \\(clip-59\\)"):
        cal.apply(["other-1", "clip-59"], p[:2])


@pytest.mark.parametrize("method", ["temperature", "stacking"])
def test_apply_before_fit_is_refused(method):
    with pytest.raises(NotFittedError):
        make_calibrator(method, 5).apply(["a"], np.full((1, 5), 0.2))


def test_stacking_model_is_fitted_on_the_fit_rows_only(monkeypatch):
    """Spy on LogisticRegression.fit: it must see exactly the fit split's rows, none of the held-out."""
    from sklearn.linear_model import LogisticRegression

    seen = []
    original = LogisticRegression.fit

    def spy(self, x, y, *args, **kwargs):
        seen.append(np.array(x))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(LogisticRegression, "fit", spy)
    fit_p, fit_y = _overconfident(100, seed=5)
    held_p, _ = _overconfident(40, seed=6)
    st = StackingCalibrator(n_classes=5).fit(_ids("fit", 100), fit_p, fit_y)
    st.apply(_ids("held", 40), held_p)
    assert len(seen) == 1 and seen[0].shape == (100, 5)
    held_features = np.log(np.clip(held_p, 1e-12, 1))
    for row in held_features:
        assert not np.any(np.all(np.isclose(seen[0], row), axis=1))


def test_temperature_fit_depends_only_on_fit_rows():
    fit_p, fit_y = _overconfident(500, seed=7)
    a = TemperatureScaling().fit(_ids("fit", 500), fit_p, fit_y)
    b = TemperatureScaling().fit(_ids("fit", 500), fit_p, fit_y)
    held_one, _ = _overconfident(50, seed=8)
    held_two, _ = _overconfident(50, seed=9)
    a.apply(_ids("h", 50), held_one)
    b.apply(_ids("h", 50), held_two)
    assert a.temperature == b.temperature  # different held-out data cannot change what was fitted


def test_confidence_weights_guard():
    probs = {"A04": np.array([[0.6, 0.4], [0.3, 0.7]]), "V04": np.array([[0.9, 0.1], [0.2, 0.8]])}
    cw = ConfidenceWeights().fit(["v1", "v2"], probs, np.array([0, 1]))
    np.testing.assert_allclose(cw.for_clips(["e1"]), [[0.6, 0.7], [0.9, 0.8]])
    with pytest.raises(LeakageError):
        cw.for_clips(["e1", "v2"])


def test_unknown_method_and_bad_input():
    with pytest.raises(ValueError, match="unknown calibration method 'platt'"):
        make_calibrator("platt", 5)
    with pytest.raises(ValueError, match="one clip id per row"):
        TemperatureScaling().fit(["a"], np.full((2, 2), 0.5), np.array([0, 1]))
    with pytest.raises(ValueError, match="duplicates"):
        TemperatureScaling().fit(["a", "a"], np.full((2, 2), 0.5), np.array([0, 1]))


def test_crossfit_apply_keeps_locations_apart():
    from fusion.calibration import crossfit_apply, fold_of_groups

    p, y = _overconfident(120, seed=10)
    ids = _ids("c", 120)
    groups = [f"loc{i % 6}" for i in range(120)]
    out, folds = crossfit_apply("temperature", 5, {}, 3, (ids, p, y, groups), (ids, p, groups))
    assert out.shape == (120, 5) and len(folds) == 3
    assert sorted(f["n_scored"] for f in folds) == [40, 40, 40]
    assert all(f["n_fit"] == 80 for f in folds)  # the fold's own two locations are left out of its fit
    assert fold_of_groups(groups, 3) == {"loc0": 0, "loc1": 1, "loc2": 2, "loc3": 0, "loc4": 1, "loc5": 2}
    with pytest.raises(ValueError, match="at least 7 distinct locations, found 6"):
        fold_of_groups(groups, 7)


def test_stacking_never_gives_an_unseen_class_probability_zero():
    rng = np.random.default_rng(0)
    fit_y = np.array([0, 1, 2] * 10)  # classes 3 and 4 never appear in the fit split
    fit_p = rng.dirichlet(np.ones(5), size=30)
    fit_p[np.arange(30), fit_y] += 1.0
    fit_p /= fit_p.sum(axis=1, keepdims=True)
    with pytest.warns(UserWarning, match="add-one floor"):
        st = StackingCalibrator(n_classes=5).fit(_ids("fit", 30), fit_p, fit_y)
    out = st.apply(_ids("new", 4), rng.dirichlet(np.ones(5), size=4))
    floor = 1.0 / (30 + 5)
    np.testing.assert_allclose(out[:, [3, 4]], floor)
    np.testing.assert_allclose(out.sum(axis=1), 1.0)
    assert log_loss(out, np.array([3, 4, 3, 4])) < -np.log(floor) + 1e-6


def test_stacking_applied_to_another_number_of_columns_is_named():
    from fusion.calibration import StackingCalibrator

    p, y = _overconfident(60, seed=3)
    calibrator = StackingCalibrator(5).fit(_ids("f", 60), p, y)
    wider = np.concatenate([p, p], axis=1) / 2  # two families side by side: 10 columns
    with pytest.raises(ValueError, match="stacking calibrator: fitted on 5 input columns, given 10"):
        calibrator.apply(_ids("a", 60), wider)


def test_a_cross_fitting_fold_the_calibrator_refuses_is_named():
    """Locations 1 and 2 hold only class 0: the fold holding out location 0 fits on one class."""
    from fusion.calibration import crossfit_apply

    p, _ = _overconfident(30, seed=4)
    groups = [f"loc{i % 3}" for i in range(30)]
    y = np.array([i % 5 if g == "loc0" else 0 for i, g in enumerate(groups)])
    ids = _ids("c", 30)
    with pytest.raises(ValueError, match=r"cross-fitting: fold \d of 3 \(locations loc0\): stacking calibrator: "
                                         r"expected at least 2 classes"):
        crossfit_apply("stacking", 5, {}, 3, (ids, p, y, groups), (ids, p, groups))
