"""Metrics, calibration and reports on hostile inputs, each checked against an independent reference.

References: scikit-learn's ``log_loss`` / ``accuracy_score`` with explicit labels, the 2021 scorer's
formula by hand (clip to [1e-15, 1 - 1e-15], divide each row by its sum, -log of the true class), and a
GitHub-flavoured-Markdown table-row splitter written here from the GFM spec (a ``|`` ends a cell
unless backslash-escaped; a backslash escapes the next character).

Faults these tests caught (each test says which):
- ``renormalize=False`` (``--raw-metric``, documented as "as current scikit-learn does") clipped at
  1e-15 instead of scikit-learn's float64 machine epsilon: a true class given exactly 0 scored 34.54
  instead of 36.04; ``eps=0`` returned ``inf`` without a word;
- a class, family or recipe name holding ``|`` shifted every number of its report row into the next
  column (the "Clips" column showed "tram", the log-loss column the clip count); a line break in a
  name ended the table; ``<b>`` in a name was rendered, not shown;
- a class or recipe name holding a pair of ``$`` (TeX math for matplotlib) crashed ``write_report``
  after the whole evaluation with a pyparsing ``ValueError``, or drew the name as math;
- temperature scaling fitted on a split where every clip is already right (a tiny or easy split)
  silently returned a near-zero T (near one-hot outputs: one held-out error costs ~34.5 nats);
  bad ``bounds`` failed inside scipy with words naming neither the calibrator nor ``bounds``.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from fusion.calibration import TemperatureScaling
from fusion.metrics import accuracy, classwise_log_loss, log_loss, per_clip_log_loss, score

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def skm():
    """scikit-learn's metrics, the reference (imported only by the tests that use it)."""
    from sklearn import metrics

    return metrics


def _hostile_probs(seed: int, n: int = 60, n_classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Rows with exact 0s on the true class, exact one-hot rows (right and wrong), and ordinary rows."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, size=n)
    probs = rng.dirichlet(np.ones(n_classes), size=n)
    wrong = (labels + 1) % n_classes
    probs[:10] = np.eye(n_classes)[wrong[:10]]          # confidently wrong: true class exactly 0
    probs[10:20] = np.eye(n_classes)[labels[10:20]]     # confidently right: true class exactly 1
    return probs, labels


def _sklearn_quiet(skm, labels, probs, n_classes: int) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "do not sum to one" where rows do not
        return skm.log_loss(labels, probs, labels=list(range(n_classes)))


def _scorer_2021(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """scikit-learn 0.24's log_loss per clip, by hand: clip to [1e-15, 1 - 1e-15], renormalise, -log."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-15, 1 - 1e-15)
    p = p / p.sum(axis=1, keepdims=True)
    return -np.log(p[np.arange(len(labels)), labels])


# --- metrics ---------------------------------------------------------------------------------------

def test_raw_log_loss_matches_current_sklearn_on_exact_zeros_and_ones(skm):
    """Fault: renormalize=False clipped at 1e-15, sklearn at float64's eps (2.2e-16): -log(0) scored
    34.54, not 36.04, on every confidently wrong clip, micro and class-wise."""
    probs, labels = _hostile_probs(0)
    assert log_loss(probs, labels, renormalize=False) == pytest.approx(_sklearn_quiet(skm, labels, probs, 5), rel=1e-12)
    one = np.array([[0.0, 1.0]])
    assert log_loss(one, np.array([0]), renormalize=False) == pytest.approx(-math.log(np.finfo(float).eps))
    per_class = [_sklearn_quiet(skm, labels[labels == c], probs[labels == c], 5) for c in range(5)]
    mean, got = classwise_log_loss(probs, labels, renormalize=False)
    np.testing.assert_allclose(got, per_class, rtol=1e-12)
    assert mean == pytest.approx(np.mean(per_class), rel=1e-12)
    # unnormalised rows (equation (1)'s output) with zeros: still sklearn's number, not renormalised
    rows = probs * np.linspace(0.5, 1.5, len(probs))[:, None].clip(0, 1)
    assert log_loss(rows, labels, renormalize=False) == pytest.approx(_sklearn_quiet(skm, labels, rows, 5), rel=1e-12)


def test_renormalized_log_loss_is_the_2021_scorer_on_hostile_rows():
    """Held: the default (2021) scorer on 0s, 1s, all-zero rows, rows summing to 0.3 or 2.5, float16/32."""
    probs, labels = _hostile_probs(1)
    probs[20] = 0.0                          # no information at all: uniform after clipping
    probs[21] *= 0.3
    probs[22] = np.minimum(probs[22] * 2.5, 1.0)
    for dtype in (np.float64, np.float32, np.float16):
        p = probs.astype(dtype)
        np.testing.assert_allclose(per_clip_log_loss(p, labels), _scorer_2021(p, labels), rtol=1e-12)
    assert per_clip_log_loss(probs, labels)[20] == pytest.approx(math.log(5))
    assert per_clip_log_loss(probs, labels)[0] == pytest.approx(-math.log(1e-15 / (1 + 4e-15)))


@pytest.mark.parametrize("eps", [0.0, -1e-15, 0.5, 1.0])
def test_a_clipping_constant_outside_0_half_is_refused_naming_eps(eps):
    """Fault: eps=0 with renormalize=False returned inf (log of an exact 0) without a word."""
    probs, labels = _hostile_probs(2)
    with pytest.raises(ValueError, match=r"log-loss eps: expected a clipping constant in \(0, 0.5\)"):
        log_loss(probs, labels, renormalize=False, eps=eps)


def test_scores_of_degenerate_splits_match_sklearn_and_absent_classes_are_null(skm):
    """Held: one clip; every clip one class; a class never predicted and one never true; label
    order unlike class order. Micro log-loss and accuracy equal sklearn with explicit labels; the
    class-wise mean is over the classes present; absent classes are null in JSON (never NaN)."""
    classes = ["zeta", "alpha", "mid", "beta"]
    cases = [
        (np.array([[0.1, 0.6, 0.2, 0.1]]), np.array([2])),
        (np.random.default_rng(3).dirichlet(np.ones(4), size=7), np.full(7, 3)),
        (np.array([[0.7, 0.3, 0.0, 0.0], [0.2, 0.8, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]), np.array([1, 1, 0])),
    ]
    for probs, labels in cases:
        s = score(probs, labels, classes)
        assert s.logloss_micro == pytest.approx(skm.log_loss(labels, probs, labels=range(4)), rel=1e-12)
        assert s.accuracy == pytest.approx(skm.accuracy_score(labels, probs.argmax(axis=1)))
        present = sorted(set(labels.tolist()))
        by_class = [skm.log_loss(labels[labels == c], probs[labels == c], labels=range(4)) for c in present]
        assert s.logloss == pytest.approx(np.mean(by_class), rel=1e-12)
        text = json.dumps(s.to_dict(), allow_nan=False)  # NaN would be invalid JSON
        absent = [classes[c] for c in range(4) if c not in present]
        assert all(json.loads(text)["classwise_logloss"][name] is None for name in absent)
    assert accuracy(np.array([[0.5, 0.5]]), np.array([1])) == skm.accuracy_score([1], [0])  # a tie: first class


# --- temperature scaling ---------------------------------------------------------------------------

def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i}" for i in range(n)]


def test_temperature_fitted_on_an_all_correct_split_warns_instead_of_sharpening_silently():
    """Fault: 8 fit clips all right (a tiny or easy split) gave T ~ 0.02..0.13 without a word; the
    calibrated output is near one-hot, and the held-out log-loss of one error grows ~10-fold."""
    rng = np.random.default_rng(4)
    fit_y = np.arange(8) % 4
    fit_p = rng.dirichlet(np.ones(4), size=8) * 0.5
    fit_p[np.arange(8), fit_y] += 0.5                       # every true class on top, none certain
    with pytest.warns(UserWarning, match=r"all 8 fit clips have their true class on top.*near 0/1"):
        ts = TemperatureScaling().fit(_ids("fit", 8), fit_p, fit_y)
    held = np.array([[0.55, 0.35, 0.05, 0.05]])             # an honest error: true class 1 at 0.35
    calibrated = ts.apply(["held-0"], held)
    assert log_loss(calibrated, np.array([1])) > 5 * log_loss(held, np.array([1]))  # what the warning is for


def test_temperature_fitted_on_a_split_the_model_always_gets_wrong_warns_at_the_upper_bound():
    """Fault: fit labels the model always ranks last (e.g. labels in another class order than the
    model's columns) gave T = 50, the search's edge, without a word: every clip it calibrates comes
    out nearly flat."""
    rng = np.random.default_rng(6)
    probs = rng.dirichlet(np.ones(3), size=12)
    labels = probs.argmin(axis=1)
    with pytest.warns(UserWarning, match=r"stopped at the search bound T=50 \(bounds 0.02..50\) on 12 fit clips"):
        ts = TemperatureScaling().fit(_ids("fit", 12), probs, labels)
    assert ts.temperature == pytest.approx(50, rel=1e-3)


def test_temperature_fit_with_errors_does_not_warn():
    """No false alarm: a split with errors has a finite optimum inside the bounds."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 5, size=400)
    logits = rng.normal(size=(400, 5))
    logits[np.arange(400), labels] += 1.5
    z = 3.0 * logits
    probs = np.exp(z - z.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ts = TemperatureScaling().fit(_ids("fit", 400), probs, labels)
    assert 0.05 < ts.temperature < 20


@pytest.mark.parametrize("bounds", [(0.0, 50.0), (-1.0, 5.0), (50.0, 0.02), (0.02, float("inf")), (1.0,)])
def test_bad_temperature_bounds_are_refused_naming_bounds(bounds):
    """Fault: scipy's "Optimization bounds must be finite scalars" at fit time, naming neither."""
    with pytest.raises(ValueError, match="temperature scaling bounds: expected"):
        TemperatureScaling(bounds=bounds).fit(["a", "b"], np.array([[0.7, 0.3], [0.4, 0.6]]), np.array([0, 0]))


# --- reports and plots -----------------------------------------------------------------------------

def _gfm_cells(line: str) -> list[str]:
    """Split one GFM table row into its cells' rendered text (GFM spec, tables extension: a pipe ends
    a cell unless backslash-escaped; then backslash escapes of ASCII punctuation and entities)."""
    import html

    assert line.startswith("|") and line.endswith("|"), line
    cells, current, i, body = [], "", 0, line[1:-1]
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            current += body[i:i + 2]
            i += 2
            continue
        if body[i] == "|":
            cells.append(current)
            current = ""
        else:
            current += body[i]
        i += 1
    cells.append(current)
    out = []
    for cell in cells:
        text, j = "", 0
        cell = cell.strip()
        while j < len(cell):
            if cell[j] == "\\" and j + 1 < len(cell) and cell[j + 1] in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~":
                text += cell[j + 1]
                j += 2
            else:
                text += cell[j]
                j += 1
        out.append(html.unescape(text))
    return out


def _table(text: str, heading: str) -> list[list[str]]:
    """The rows (header first, separator left out) of the first table after ``heading``."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    block = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        block.append(line)
    return [_gfm_cells(line) for k, line in enumerate(block) if k != 1]


def _odd_store(path: Path, classes: list[str]):
    """A real Zarr store whose class names are hostile; two runs; fold1_evaluate lacks the last class."""
    from featurestore import ClipRecord, Manifest, create_store, open_store

    clips = []
    for split, n in {"fold1_val": 12, "fold1_evaluate": 9}.items():
        n_classes = len(classes) if split == "fold1_val" else len(classes) - 1
        for i in range(n):
            clips.append(ClipRecord(clip_id=f"c-{split}-{i}", label=classes[i % n_classes], city="x",
                                    location=f"{split}-{i % 2}", splits=frozenset({split}),
                                    audio=Path("audio") / f"c-{split}-{i}.wav"))
    store = create_store(path, Manifest("odd", classes, clips, root=None, audio_segments=2, video_frames=2))
    labels = np.asarray(store.labels)
    rng = np.random.default_rng(6)
    for run in ("A01", "V01"):
        store.create_predictions(run, 2, {"head": "embedding_mlp", "features": {}, "family": "x"})
        logits = 2.0 * np.eye(len(classes))[labels][:, None, :] + rng.normal(size=(len(labels), 2, len(classes)))
        e = np.exp(logits)
        store.write_predictions(run, np.arange(len(labels)), (e / e.sum(axis=2, keepdims=True)).astype(np.float32))
    store.close()
    return open_store(path, mode="r")


def test_report_tables_keep_odd_class_and_recipe_names_in_their_own_cells(tmp_path):
    """Fault: ``| bus|tram | 2 | 0.406 |`` put "tram" under Clips and the clip count under log-loss;
    a line break in a class name ended the table; ``<b>`` was rendered; a ``|`` in the recipe's
    name shifted every fused row of Table 2. Absent classes are "-" and null (held)."""
    from fusion.recipe import FusionRecipe
    from fusion.report import write_report

    classes = ["bus|tram", "metro\nstation", "a\\|b", "<b>x</b>", "end\\", "absent|here"]
    store = _odd_store(tmp_path / "odd.zarr", classes)
    try:
        recipe = FusionRecipe.from_dict({"name": "odd|name\n# injected", "families": {"A|1": ["A01"], "V": ["V01"]}})
        report = write_report(store, recipe, tmp_path / "rep", "fold1_evaluate")
        counts = np.bincount(report.evaluation.output.labels, minlength=len(classes))
    finally:
        store.close()
    text = report.markdown.read_text()
    assert "\n# injected" not in text
    classwise = _table(text, "## Class-wise results")
    assert all(len(row) == len(classwise[0]) for row in classwise)
    assert [row[0] for row in classwise[1:]] == [" ".join(c.splitlines()) for c in classes]
    assert [row[1] for row in classwise[1:]] == [str(n) for n in counts]
    metrics = json.loads(report.metrics_json.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    for k, header in enumerate(classwise[0]):
        if not header.startswith("log-loss: "):
            continue
        per_class = metrics["variants"][header[len("log-loss: "):]]["classwise_logloss"]
        for row, name in zip(classwise[1:], classes):  # each number under its own variant, on its class's row
            assert row[k] == ("-" if per_class[name] is None else f"{per_class[name]:.3f}")
    assert classwise[-1][2:] == ["-"] * (len(classwise[0]) - 2)  # the class with no clip
    table2 = _table(text, "## Models and ensembles")
    assert all(len(row) == len(table2[0]) for row in table2)
    fused = [row for row in table2 if row[0].startswith("odd|name # injected: ")]
    assert len(fused) == 2 and [row[0] for row in table2 if row[0] == "A|1"] == ["A|1"]
    for row in fused:
        variant = row[0].split(": ", 1)[1]
        assert row[5] == f"{metrics['variants'][variant]['logloss']:.3f}"


def test_plots_and_report_draw_dollar_signs_in_names_as_text(tmp_path):
    """Fault: matplotlib read ``$...$`` in a class or recipe name as TeX: ``park $\\frac$`` raised a
    pyparsing ValueError after the whole evaluation, and no report was written."""
    from fusion.metrics import reliability
    from fusion.plots import confusion_png, reliability_png
    from fusion.recipe import FusionRecipe
    from fusion.report import write_report

    names = ["park $\\frac$", "cost $5 to $6", "$$"]
    assert confusion_png(np.eye(3, dtype=np.int64), names, "recipe $\\frac$")[:8] == PNG_MAGIC
    bins = reliability(np.eye(3) * 0.8 + 0.05, np.arange(3))
    assert reliability_png({"$\\frac$": bins}, "recipe $\\frac$")[:8] == PNG_MAGIC
    store = _odd_store(tmp_path / "dollar.zarr", names + ["plain"])
    try:
        recipe = FusionRecipe.from_dict({"name": "E $\\frac$", "families": {"A": ["A01"], "V": ["V01"]}})
        report = write_report(store, recipe, tmp_path / "rep", "fold1_evaluate")
    finally:
        store.close()
    assert report.confusion_png.read_bytes()[:8] == PNG_MAGIC
    assert [row[0] for row in _table(report.markdown.read_text(), "## Class-wise results")[1:]] == names + ["plain"]
