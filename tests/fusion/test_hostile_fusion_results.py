"""Every number fusion reports and every submission row comes from the right clip, in the right class
order, and equals an independent numpy computation; what cannot be answered is refused, never filled.

The reference below re-implements docs/fusion.md in plain numpy (segment mean, family mean, the
replacement rule, class-wise selection, renormalisation, equation (1), the 2021 scorer: clip to
[1e-15, 1 - 1e-15], renormalise, class-wise mean) without calling fusion. The store is built by hand:
runs written in a shuffled row order, clip ids with commas, '=', '@', '+' and non-ASCII letters, a
class order that is not alphabetical, an evaluated split without any clip of one class, exact zeros
and a row whose arg-max is a tie (rows that do not sum to one are refused: test_hostile_fusion_rows.py).

Bugs these tests caught (each test says which):
- ``write_predictions`` took a negative row as a row counted from the end (another clip's row written
  and marked done), a row past the end as nothing, a repeated row as one of its values, a bool mask
  as rows 0 and 1: all silently;
- the replacement rule's 1e-9 slack did not cover float32 storage: a run storing 0.7 against 0.5
  (docs: "0.7 - 0.5 counts as 0.2") was not replaced;
- cross-fitting whose fold left no fit clip fitted temperature scaling on nothing (a NaN objective)
  and applied the arbitrary temperature to that fold's clips;
- the submission was written in the locale's encoding: a non-ASCII clip id crashed under a C locale.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from featurestore import ClipRecord, Manifest, create_store, open_store
from featurestore.errors import MissingFeatureError
from fusion.calibration import TemperatureScaling
from fusion.evaluate import EQ1, FUSED, evaluate_recipe
from fusion.pipeline import fuse
from fusion.recipe import FusionRecipe
from fusion.submit import submit_recipe

CLASSES = ["park", "bus", "airport", "tram", "metro"]  # not alphabetical: order is the store's
SEG = 2
EPS = 1e-15
ATTRS = {"head": "embedding_mlp", "head_config": {}, "features": {}, "family": "audio"}
RUNS = ("A01", "A02", "V01")

# clip id, label (None: unlabelled), splits, location. Rows interleave the splits; "ev" has no metro clip.
CLIPS = [
    ("café,1", "park", {"ev", "ev_l0"}, "L0"),
    ("bus=2@x", None, {"test"}, "L9"),
    ("tram+3", "bus", {"ev", "ev_l0"}, "L0"),
    ("Ölpark_4", "park", {"cal"}, "L5"),
    ("a,b,c", "airport", {"ev"}, "L1"),
    ("x@y=z", None, {"test"}, "L9"),
    ("flat-6", "tram", {"ev"}, "L1"),
    ("cal-7", "bus", {"cal"}, "L6"),
    ("bus-8", "bus", {"ev"}, "L2"),
    ("t,9", None, {"test"}, "L9"),
    ("air-10", "tram", {"ev"}, "L2"),
    ("cal-11", "airport", {"cal"}, "L7"),
    ("cal-12", "tram", {"cal"}, "L8"),
    ("cal-13", "park", {"cal"}, "L5"),
]
IDS = [c[0] for c in CLIPS]
LABEL = {c[0]: (CLASSES.index(c[1]) if c[1] else -1) for c in CLIPS}
FLAT = IDS.index("flat-6")

RECIPE = {
    "name": "hostile",
    "families": {"A04": ["A01", "A02"], "V04": ["V01"]},
    "eval_split": "ev",
    "replacement": {"source": "A04", "targets": ["V04"], "margin": 0.2},
    "class_weights": {"select": {"A04": ["bus", "airport", "tram"]}},
    "postprocess": {"method": "eq1"},
}


def _manifest(clips) -> Manifest:
    records = [ClipRecord(clip_id=cid, label=label, city="c", location=loc, splits=frozenset(splits))
               for cid, label, splits, loc in clips]
    return Manifest("hostile", list(CLASSES), records, audio_segments=SEG, video_frames=SEG)


def _segment_probs(seed: int) -> np.ndarray:
    """[n_clips, SEG, C] float32: random rows plus exact zeros and a flat row."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(len(CLASSES), 0.6), size=(len(IDS), SEG))
    zero = IDS.index("café,1")
    probs[zero, :, 2] = 0.0                           # an exact zero (airport, which A04 does not count for)
    probs[zero] /= probs[zero].sum(axis=-1, keepdims=True)  # still a distribution (others are refused on read)
    probs[FLAT] = [0.3, 0.3, 0.3, 0.05, 0.05]         # three tied maxima, kept as they are by eq. (1)
    return probs.astype(np.float32)


def _write_run(store, run: str, probs: np.ndarray, rows: np.ndarray) -> None:
    """Write ``probs[rows]`` in a shuffled order, so rows must land by row number, not by position."""
    store.create_predictions(run, SEG, ATTRS)
    order = np.random.default_rng(len(run) + sum(map(ord, run))).permutation(len(rows))
    store.write_predictions(run, rows[order], probs[rows[order]])


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("hostile_results") / "s.zarr"
    store = create_store(path, _manifest(CLIPS))
    runs = {run: _segment_probs(seed) for seed, run in enumerate(RUNS)}
    for run, probs in runs.items():
        _write_run(store, run, probs, np.arange(len(IDS)))
    store.close()
    return path, runs


@pytest.fixture()
def store(built):
    with open_store(built[0], mode="r") as opened:
        yield opened


# ------------------------------------------------------------------------------ the numpy reference
def ref_eq1(x: np.ndarray) -> np.ndarray:
    """docs/fusion.md equation (1), edges inclusive on the right, 0 -> 0.001."""
    return np.select([x <= 0.06, x <= 0.20, x <= 0.70], [0.001, 0.06, x], 0.99)


def ref_fused(runs: dict[str, np.ndarray], rows: list[int], margin_slack: float = 1e-6) -> np.ndarray:
    clip = {r: p[rows].astype(np.float64).mean(axis=1) for r, p in runs.items()}
    a04, v04 = (clip["A01"] + clip["A02"]) / 2, clip["V01"]
    replace = a04.max(axis=1) - v04.max(axis=1) >= 0.2 - margin_slack
    v04 = np.where(replace[:, None], a04, v04)
    audio_counts = np.isin(CLASSES, ["bus", "airport", "tram"]).astype(float)
    raw = (audio_counts * a04 + v04) / (audio_counts + 1.0)
    return raw / raw.sum(axis=1, keepdims=True)


def ref_scores(probs: np.ndarray, labels: np.ndarray, renormalize: bool = True) -> dict:
    p = np.clip(probs, EPS, 1 - EPS)
    if renormalize:
        p = p / p.sum(axis=1, keepdims=True)
    loss = -np.log(p[np.arange(len(labels)), labels])
    present = [c for c in range(len(CLASSES)) if (labels == c).any()]
    return {"logloss": np.mean([loss[labels == c].mean() for c in present]), "micro": loss.mean(),
            "accuracy": np.mean(probs.argmax(axis=1) == labels), "present": present}


def _rows(split: str) -> list[int]:
    return [i for i, c in enumerate(CLIPS) if split in c[2]]


# ------------------------------------------------------------------------------------------ tests
def test_fused_output_is_each_clips_own_row_by_the_papers_rules(store, built):
    out = fuse(store, FusionRecipe.from_dict(RECIPE), "ev")
    rows = _rows("ev")
    assert out.clip_ids == [IDS[i] for i in rows] and out.classes == CLASSES
    np.testing.assert_array_equal(out.labels, [LABEL[IDS[i]] for i in rows])
    expected = ref_fused(built[1], rows)
    np.testing.assert_allclose(out.fused, expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out.final, ref_eq1(expected), rtol=1e-9, atol=1e-12)
    flat = out.final[out.clip_ids.index("flat-6")]
    assert flat[0] == flat[1] == flat[2] > flat[3] and flat.argmax() == 0  # a tie: the first class in store order


@pytest.mark.parametrize("renormalize", [True, False])
def test_evaluate_numbers_equal_the_2021_scorer_on_a_split_missing_a_class(store, built, renormalize):
    recipe = FusionRecipe.from_dict({**RECIPE, "metric_renormalize": renormalize})
    ev = evaluate_recipe(store, recipe, "ev")
    rows = _rows("ev")
    labels = np.array([LABEL[IDS[i]] for i in rows])
    fused = ref_fused(built[1], rows)
    for got, probs in [(ev.variants[FUSED], fused), (ev.variants[EQ1], ref_eq1(fused)), (ev.final, ref_eq1(fused))]:
        want = ref_scores(probs, labels, renormalize)
        assert got.logloss == pytest.approx(want["logloss"], rel=1e-9)
        assert got.logloss_micro == pytest.approx(want["micro"], rel=1e-9)
        assert got.accuracy == pytest.approx(want["accuracy"])
        assert np.isnan(got.classwise_logloss["metro"]) and want["present"] == [0, 1, 2, 3]
        assert got.n_clips == len(rows) and got.classes == CLASSES
    for run, stored in built[1].items():  # each run's row: its own clips' segment means
        want = ref_scores(stored[rows].astype(np.float64).mean(axis=1), labels, renormalize)
        assert ev.runs[run].logloss == pytest.approx(want["logloss"], rel=1e-9)
        assert ev.runs[run].accuracy == pytest.approx(want["accuracy"])
    # the tied clip (a tram) is decided as the first tied class (park): a miss, as documented
    confusion = np.array(ev.final.confusion)
    assert confusion[CLASSES.index("tram"), 0] >= 1


def test_submission_rows_are_each_clips_own_probabilities_under_the_header(store, built, tmp_path):
    recipe = FusionRecipe.from_dict(RECIPE)
    path, n = submit_recipe(store, recipe, "test", tmp_path / "sub.csv", filename_template="{clip_id}.wav")
    rows = _rows("test")
    lines = path.read_bytes().decode("utf-8").split("\n")
    assert n == len(rows) and lines[-1] == "" and len(lines) == len(rows) + 2
    assert lines[0].split("\t") == ["filename", "scene_label", *CLASSES]
    expected = ref_eq1(ref_fused(built[1], rows))
    for line, row, want in zip(lines[1:], rows, expected):
        fields = line.split("\t")  # plain split, as a simple evaluator reads it: no quoting may occur
        assert fields[0] == f"{IDS[row]}.wav" and fields[1] == CLASSES[int(want.argmax())]
        np.testing.assert_allclose([float(v) for v in fields[2:]], want, rtol=1e-7)


def test_submission_is_utf8_whatever_the_locale(tmp_path):
    """Before: written in the locale's encoding; under a C locale ``café,1`` was a UnicodeEncodeError."""
    out = tmp_path / "sub.csv"
    code = ("import numpy as np, sys; from fusion.submission import write_submission; "
            "write_submission(sys.argv[1], ['caf\\u00e9,1', '\\u00d6lpark_4'], np.array([[0.3, 0.7], [0.9, 0.1]]), "
            "['bus', 'park'])")  # an ASCII command line: a C locale cannot pass other bytes in argv
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-400:]
    text = out.read_bytes().decode("utf-8")
    assert "audio/café,1.wav\tpark\t" in text and "audio/Ölpark_4.wav\tbus\t" in text


def test_a_run_of_one_split_is_refused_on_another_not_filled(tmp_path, built):
    path = tmp_path / "s.zarr"
    with create_store(path, _manifest(CLIPS)) as store:
        _write_run(store, "A01", built[1]["A01"], np.array(_rows("ev")))  # only the evaluated clips
        for run in ("A02", "V01"):
            _write_run(store, run, built[1][run], np.arange(len(IDS)))
        recipe = FusionRecipe.from_dict(RECIPE)
        out = tmp_path / "sub.csv"
        with pytest.raises(MissingFeatureError, match=r"predictions/A01.*bus=2@x"):
            submit_recipe(store, recipe, "test", out)
        assert not out.exists()
        np.testing.assert_allclose(fuse(store, recipe, "ev").fused, ref_fused(built[1], _rows("ev")), rtol=1e-9)


def test_clips_appended_after_a_run_are_refused_until_predicted_and_old_rows_stay(tmp_path, built):
    path = tmp_path / "s.zarr"
    first, later = CLIPS[:8], [("late,1", "park", {"ev"}, "L3"), ("late=2", None, {"test"}, "L9")]
    with create_store(path, _manifest(first)) as store:
        for run, probs in built[1].items():
            _write_run(store, run, probs, np.arange(len(first)))
        store.append_clips(_manifest(later))
        recipe = FusionRecipe.from_dict(RECIPE)
        with pytest.raises(MissingFeatureError, match="late,1"):
            fuse(store, recipe, "ev")
        with pytest.raises(MissingFeatureError, match="late=2"):
            submit_recipe(store, recipe, "test", tmp_path / "sub.csv")
        assert not (tmp_path / "sub.csv").exists()
        extra = {run: np.random.default_rng(7 + k).dirichlet(np.ones(len(CLASSES)), size=(2, SEG)).astype(np.float32)
                 for k, run in enumerate(RUNS)}
        for run in RUNS:  # the same run reopened (same attributes): only the new rows are written
            assert store.create_predictions(run, SEG, ATTRS) is True
            store.write_predictions(run, np.array([8, 9]), extra[run])
        out = fuse(store, recipe, "ev")
    full = {run: np.concatenate([built[1][run][:8], extra[run]]) for run in RUNS}
    rows = [i for i, c in enumerate(first + later) if "ev" in c[2]]
    assert out.clip_ids == [(first + later)[i][0] for i in rows] and out.clip_ids[-1] == "late,1"
    np.testing.assert_allclose(out.fused, ref_fused(full, rows), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rows", [[-1], [4], [3, -4], [0, 0], np.ones(4, dtype=bool), [0.5, 1.7]],
                         ids=["negative", "past-the-end", "negative-aliasing-row-0", "repeated", "bool-mask", "floats"])
def test_write_predictions_refuses_rows_that_are_not_distinct_rows_of_the_store(tmp_path, rows):
    """Before: -4 wrote (and marked done) row 0, -1 and 4 wrote nothing, [0, 0] kept one of the two
    values, a bool mask wrote rows 0 and 1, 1.7 wrote row 1; all without a word."""
    with create_store(tmp_path / "s.zarr", _manifest(CLIPS[:4])) as store:
        store.create_predictions("R", SEG, ATTRS)
        n = len(np.atleast_1d(rows))
        probs = np.random.default_rng(0).dirichlet(np.ones(len(CLASSES)), size=(n, SEG)).astype(np.float32)
        with pytest.raises(ValueError, match="predictions 'R': rows"):
            store.write_predictions("R", np.asarray(rows), probs)
        assert not store.prediction_done("R").any()
        with pytest.raises(MissingFeatureError):
            store.get_predictions("R", [CLIPS[0][0]])


def test_replacement_fires_at_exactly_the_margin_for_stored_float32_runs(tmp_path):
    """docs/fusion.md: '0.7 - 0.5 counts as 0.2'. Stored as float32, 0.7 reads back as 0.699999988,
    and the 1e-9 slack missed it: clip 0 was not replaced."""
    audio = np.array([[0.7, 0.2, 0.1, 0.0, 0.0], [0.69, 0.21, 0.1, 0.0, 0.0]])
    video = np.array([[0.1, 0.5, 0.3, 0.1, 0.0], [0.1, 0.5, 0.3, 0.1, 0.0]])
    clips = [(f"c{i}", "park", {"ev"}, "L0") for i in range(2)]
    with create_store(tmp_path / "s.zarr", _manifest(clips)) as store:
        for run, p in (("A01", audio), ("V01", video)):
            store.create_predictions(run, SEG, ATTRS)
            store.write_predictions(run, np.arange(2), np.repeat(p[:, None], SEG, axis=1).astype(np.float32))
        recipe = FusionRecipe.from_dict({"name": "m", "families": {"A04": ["A01"], "V04": ["V01"]}, "eval_split": "ev",
                                         "replacement": {"source": "A04", "targets": ["V04"], "margin": 0.2}})
        out = fuse(store, recipe, "ev")
    np.testing.assert_array_equal(out.stage.replaced["V04"], [True, False])
    np.testing.assert_allclose(out.stage.family_probs["V04"], [audio[0], video[1]], atol=1e-7)


def test_out_of_range_stored_probabilities_are_refused_naming_the_run(tmp_path, built):
    bad = built[1]["V01"].copy()
    bad[IDS.index("a,b,c"), 1, 0] = 1.5  # finite, so write_predictions takes it
    with create_store(tmp_path / "s.zarr", _manifest(CLIPS)) as store:
        for run in RUNS:
            _write_run(store, run, bad if run == "V01" else built[1][run], np.arange(len(IDS)))
        with pytest.raises(ValueError, match=r"prediction run 'V01'.*\[0, 1\]"):
            fuse(store, FusionRecipe.from_dict(RECIPE), "ev")


def test_cross_fit_fold_without_fit_clips_is_refused_not_fitted_on_nothing(store):
    """``ev_l0`` (the fit split) is the ev clips of location L0: the fold holding L0 has nothing left
    to fit on. Before: temperature scaling minimised a NaN objective and applied whatever T came out."""
    recipe = FusionRecipe.from_dict({**RECIPE, "postprocess": None,
                                     "calibration": {"method": "temperature", "fit_split": "ev_l0", "cross_fit": 3}})
    with pytest.raises(ValueError, match=r"cross-fitting: fold \d of 3 \(locations L0\) leaves no clip"):
        fuse(store, recipe, "ev")
    with pytest.raises(ValueError, match="at least one clip"):
        TemperatureScaling().fit([], np.zeros((0, 3)), np.zeros(0, dtype=int))


def test_stacking_fitted_without_a_class_keeps_every_column_under_its_own_class(store, built):
    """Fit on ``cal`` (no metro clip), apply to ``ev``: the seen classes' columns come from the
    model's own class indices, metro gets the documented add-one floor, rows sum to one."""
    from sklearn.linear_model import LogisticRegression

    recipe = FusionRecipe.from_dict({**RECIPE, "postprocess": None,
                                     "calibration": {"method": "stacking", "fit_split": "cal"}})
    with pytest.warns(UserWarning, match=r"classes \[4\] have no clip"):
        out = fuse(store, recipe, "ev")
    cal = _rows("cal")
    fit_x = np.log(np.clip(ref_fused(built[1], cal), 1e-12, 1))
    fit_y = np.array([LABEL[IDS[i]] for i in cal])
    model = LogisticRegression(max_iter=2000).fit(fit_x, fit_y)
    floor = 1 / (len(cal) + len(CLASSES))
    expected = np.full((len(_rows("ev")), len(CLASSES)), floor)
    seen = model.predict_proba(np.log(np.clip(ref_fused(built[1], _rows("ev")), 1e-12, 1)))
    expected[:, [0, 1, 2, 3]] = seen * (1 - floor)
    np.testing.assert_allclose(out.final, expected, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(out.final.sum(axis=1), 1.0)


def test_new_files_answered_in_another_class_order_are_fused_by_class_name(store, built):
    """``fusion classify``: a run answering in its own class order is mapped by name before fusing."""
    from fusion.classify import fuse_new_clips, read_answer

    reversed_classes = CLASSES[::-1]
    answers = {}
    for run, probs in built[1].items():
        segs = probs[0][:, ::-1]  # clip "café,1"'s segments, in the run's (reversed) class order
        answer = {"classes": reversed_classes, "features": {}, "clips": [{"clip": "new", "segment_probs": segs.tolist()}]}
        answers[run] = read_answer(run, "runs/x", {}, answer, CLASSES)
        np.testing.assert_array_equal(answers[run].segment_probs["new"], probs[0])
    final, _ = fuse_new_clips(store, FusionRecipe.from_dict(RECIPE), ["new"], answers)
    np.testing.assert_allclose(final[0], ref_eq1(ref_fused(built[1], [0]))[0], rtol=1e-7)


def test_a_run_listed_twice_in_a_family_is_refused_not_weighed_twice():
    """A family's runs are averaged equally: ``["A01", "A01", "A02"]`` gave A01 two thirds of the
    family's weight without a word. The recipe refuses it, naming the family and the run."""
    from fusion.recipe import RecipeError

    text = '{"name": "r", "families": {"A04": ["A01", "A01", "A02"], "V04": ["V01"]}}'
    with pytest.raises(RecipeError, match=r"family 'A04' lists run\(s\) \['A01'\] more than once"):
        FusionRecipe.from_json(text)
    ok = FusionRecipe.from_json('{"name": "r", "families": {"A04": ["A01", "A02"], "V04": ["A01"]}}')
    assert ok.runs == ["A01", "A02"]  # one run in two families is allowed (each family averages its own)
