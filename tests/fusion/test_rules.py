"""Aggregation, the paper's rules and equation (1) on hand-made inputs."""
from __future__ import annotations

import numpy as np
import pytest

from fusion.aggregate import aggregate_segments
from fusion.postprocess import ClampBands, clamp_eq1
from fusion.rules import (
    average_models, classwise_fuse, confidence_weights, replace_low_confidence, selection_weights,
)

CLASSES = ["airport", "bus", "park", "tram"]


def test_mean_aggregation_is_the_segment_average():
    segs = np.array([[[0.6, 0.4], [0.2, 0.8], [0.4, 0.6]]])
    np.testing.assert_allclose(aggregate_segments(segs), [[0.4, 0.6]])


def test_geometric_median_max_are_renormalised():
    segs = np.array([[[0.8, 0.2], [0.2, 0.8], [0.5, 0.5]]])
    np.testing.assert_allclose(aggregate_segments(segs, "geometric_mean"), [[0.5, 0.5]])
    np.testing.assert_allclose(aggregate_segments(segs, "max"), [[0.5, 0.5]])
    np.testing.assert_allclose(aggregate_segments(segs, "median"), [[0.5, 0.5]])
    lopsided = np.array([[[0.9, 0.1], [0.6, 0.4]]])
    g = np.sqrt([0.9 * 0.6, 0.1 * 0.4])
    np.testing.assert_allclose(aggregate_segments(lopsided, "geometric_mean"), [g / g.sum()])


def test_aggregation_errors():
    with pytest.raises(ValueError, match="unknown aggregation 'vote'"):
        aggregate_segments(np.ones((1, 2, 2)) / 2, "vote")
    with pytest.raises(ValueError, match="3-D"):
        aggregate_segments(np.ones((2, 2)) / 2)


def test_average_models_equal_and_weighted():
    a = np.array([[0.6, 0.4]])
    b = np.array([[0.2, 0.8]])
    c = np.array([[0.1, 0.9]])
    np.testing.assert_allclose(average_models([a, b, c]), [[0.3, 0.7]])  # A04 = (A01+A02+A03)/3
    np.testing.assert_allclose(average_models([a, b], weights=[3, 1]), [[0.5, 0.5]])
    with pytest.raises(ValueError, match="one shape"):
        average_models([a, np.ones((2, 2)) / 2])


def test_replacement_fires_at_and_beyond_the_margin_only():
    audio = np.array([[0.9, 0.1], [0.7, 0.3], [0.8, 0.2], [0.6, 0.4]])
    video = np.array([[0.5, 0.5], [0.5, 0.5], [0.61, 0.39], [0.1, 0.9]])
    # max gaps: 0.4 (replace), exactly 0.2 (replace), 0.19 (keep), video more confident (keep)
    out, replaced = replace_low_confidence(video, audio, margin=0.2)
    np.testing.assert_array_equal(replaced, [True, True, False, False])
    np.testing.assert_allclose(out, [[0.9, 0.1], [0.7, 0.3], [0.61, 0.39], [0.1, 0.9]])
    assert video[0, 0] == 0.5  # input untouched
    _, wider = replace_low_confidence(video, audio, margin=0.3)
    np.testing.assert_array_equal(wider, [True, False, False, False])


def test_selection_weights_paper_e01():
    w = selection_weights(["A04", "V04", "C04"], CLASSES, {"A04": ["bus", "park", "tram"]})
    np.testing.assert_array_equal(w, [[0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="unknown classes \\['boat'\\]"):
        selection_weights(["A04"], CLASSES, {"A04": ["boat"]})
    with pytest.raises(ValueError, match="unknown families"):
        selection_weights(["A04"], CLASSES, {"X": ["bus"]})


def test_classwise_fuse_uses_audio_only_for_selected_classes():
    audio = np.array([[0.1, 0.6, 0.2, 0.1]])
    video = np.array([[0.5, 0.1, 0.3, 0.1]])
    w = selection_weights(["A04", "V04"], CLASSES, {"A04": ["bus", "park", "tram"]})
    raw = classwise_fuse({"A04": audio, "V04": video}, w, renormalize=False)
    # airport: video only; bus/park/tram: mean of both
    np.testing.assert_allclose(raw, [[0.5, 0.35, 0.25, 0.1]])
    fused = classwise_fuse({"A04": audio, "V04": video}, w)
    np.testing.assert_allclose(fused, raw / raw.sum())
    with pytest.raises(ValueError, match="no family with positive weight"):
        classwise_fuse({"A04": audio}, np.array([[0, 1, 1, 1.0]]))


def test_confidence_weights_by_hand():
    labels = np.array([0, 0, 1])
    audio = np.array([[0.6, 0.4], [0.4, 0.6], [0.2, 0.8]])
    video = np.array([[0.9, 0.1], [0.7, 0.3], [0.5, 0.5]])
    w = confidence_weights({"A04": audio, "V04": video}, labels)
    np.testing.assert_allclose(w, [[0.5, 0.8], [0.8, 0.5]])
    fused = classwise_fuse({"A04": audio, "V04": video}, w, renormalize=False)
    np.testing.assert_allclose(fused[0], [(0.5 * 0.6 + 0.8 * 0.9) / 1.3, (0.8 * 0.4 + 0.5 * 0.1) / 1.3])


@pytest.mark.parametrize("x, expected", [
    (0.0, 0.001), (1e-9, 0.001), (0.03, 0.001), (0.06, 0.001),
    (0.0600001, 0.06), (0.15, 0.06), (0.20, 0.06),
    (0.2000001, 0.2000001), (0.45, 0.45), (0.70, 0.70),
    (0.7000001, 0.99), (0.999, 0.99), (1.0, 0.99),
])
def test_equation_1_bands_and_edges(x, expected):
    assert clamp_eq1(np.array([[x]]))[0, 0] == pytest.approx(expected, abs=0)


def test_equation_1_rows_no_longer_sum_to_one():
    rows = np.array([[0.95, 0.03, 0.02], [0.45, 0.45, 0.10]])
    out = clamp_eq1(rows)
    np.testing.assert_allclose(out, [[0.99, 0.001, 0.001], [0.45, 0.45, 0.06]])
    np.testing.assert_allclose(out.sum(axis=1), [0.992, 0.96])
    np.testing.assert_allclose(clamp_eq1(rows, renormalize=True).sum(axis=1), [1.0, 1.0])


def test_equation_1_custom_bands_are_validated():
    out = clamp_eq1(np.array([[0.3, 0.7]]), ClampBands(edges=(0.5, 1.0), values=(0.01, None)))
    np.testing.assert_allclose(out, [[0.01, 0.7]])
    with pytest.raises(ValueError, match="one value per edge"):
        ClampBands(edges=(0.5, 1.0), values=(0.01,))


def test_a_flat_row_ties_after_eq1_and_the_arg_max_takes_the_first_class_as_documented():
    """docs/fusion.md, 'Ties after equation (1)': the clamp erases the ranking inside a band."""
    row = np.full((1, 10), 0.09)
    row[0, 7] = 0.19  # ranked first before the clamp
    out = clamp_eq1(row / row.sum())
    assert np.all(out == out[0, 0]) and out.argmax() == 0 and (row / row.sum()).argmax() == 7
