"""Hostile recipes: files a person writes by hand, and recipes given to the viewer.

Bugs these tests caught (each test says which):
- a key given twice in a recipe file (``"V04": [...]`` copied and not renamed, ``families`` twice
  after a merge) was read as its last value: a family's runs, or whole families, vanished from the
  fusion without a word;
- ``calibration.params`` was never checked: an unknown name was a ``TypeError`` traceback after the
  store was read, a bad value scikit-learn's message naming neither the recipe nor the key;
- the viewer's fused output of a recipe fitted on a split (confidence weights, or calibration
  without cross-fitting) raised ``LeakageError`` on every clip page and confusion matrix, because it
  fused every clip at once, the fit split's included; two recipes of one name showed as one;
- a family averaging an audio and a video run (a run name mistyped) was fused as one model silently;
- ``--out`` onto the user's own ``--predictions`` store (fusion), or onto the store a run was
  trained on (``heads classify``), replaced it with the CSV;
- a filename template changing the id (``{clip_id:.3}``) wrote rows of different clips under one name;
- equation (1) put a stored (float32) 0.2 above the 0.20 edge: kept at 0.2, not clamped to 0.06.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from fusion.cli import main
from fusion.pipeline import fuse
from fusion.recipe import Calibration, FusionRecipe, RecipeError
from fusion.view_outputs import outputs

FAMILIES = '"A04": ["A01", "A02"], "V04": ["V01", "V02"], "C04": ["C04"]'


# ------------------------------------------------------------------------------- repeated keys
@pytest.mark.parametrize("text, key", [
    ('{"name": "x", "families": {"A04": ["A01"], "V04": ["V01", "V02"], "V04": ["C04"]}}', "'families.V04'"),
    ('{"name": "x", "families": {"A04": ["A01"]}, "families": {"V04": ["V01"]}}', "'families'"),
    ('{"name": "x", "families": {%s}, "replacement": {"source": "A04", "targets": ["V04"], "margin": 0.2, '
     '"margin": 0.9}}' % FAMILIES, "'replacement.margin'"),
])
def test_a_key_given_twice_in_a_recipe_file_is_refused_not_read_as_its_last_value(text, key, tmp_path):
    """Before: ``{"V04": ["V01", "V02"], "V04": ["C04"]}`` loaded as ``{"V04": ["C04"]}``."""
    path = tmp_path / "twice.json"
    path.write_text(text)
    with pytest.raises(RecipeError, match=f"twice.json: key\\(s\\) {key} given more than once"):
        FusionRecipe.from_json(path)


def test_a_family_given_twice_is_refused_by_evaluate_in_one_line(tiny_store_path, tmp_path, capsys):
    path = tmp_path / "twice.json"
    path.write_text('{"name": "x", "families": {"A04": ["A01", "A02"], "V04": ["V01", "V02"], "V04": ["C04"]}}')
    code = main(["evaluate", "--store", str(tiny_store_path), "--recipe", str(path)])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and captured.out == "" and len(lines) == 1 and "'families.V04'" in lines[0]


def test_keys_given_once_at_different_places_are_not_repeats(tmp_path):
    """The same name in two objects (a family and a replacement target) is no repetition."""
    text = ('{"name": "x", "families": {%s}, "replacement": {"source": "A04", "targets": ["V04", "C04"]}, '
            '"class_weights": {"select": {"A04": ["bus"]}}}' % FAMILIES)
    recipe = FusionRecipe.from_json(text)
    assert recipe.families == {"A04": ["A01", "A02"], "V04": ["V01", "V02"], "C04": ["C04"]}


# ------------------------------------------------------------------------------ calibration params
@pytest.mark.parametrize("method, params, expected", [
    ("temperature", {"bogus": 1}, "params: unknown parameter\\(s\\) \\['bogus'\\] for 'temperature' calibration; "
                                  "allowed: \\['bounds'\\]"),
    ("stacking", {"n_classes": 3},
     "params: unknown parameter\\(s\\) \\['n_classes'\\] for 'stacking'.*allowed: \\['C', 'max_iter'\\]"),
    ("stacking", {"C": -1}, "params.C: expected a finite number > 0.*got -1"),
    ("stacking", {"C": float("nan")}, "params.C: expected a finite number > 0.*got NaN"),
    ("stacking", {"C": "0.5"}, 'params.C: expected a finite number > 0.*got "0.5"'),
    ("stacking", {"C": True}, "params.C: expected a finite number > 0.*got true"),
    ("stacking", {"max_iter": 0}, "params.max_iter: expected an integer >= 1, got 0"),
    ("temperature", {"bounds": [5, 0.1]}, "params.bounds: expected two finite temperatures.*got \\[5, 0.1\\]"),
    ("temperature", {"bounds": ["0.1", "5"]}, "params.bounds: expected two finite temperatures"),
])
def test_calibration_params_are_checked_when_the_recipe_is_loaded(method, params, expected, tmp_path):
    """Before: loaded; the fit then raised TypeError (a traceback) or scikit-learn's own message."""
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"name": "x", "families": {"A04": ["A01"]},
                                "calibration": {"method": method, "fit_split": "fold1_val", "params": params}}))
    with pytest.raises(RecipeError, match=f"cal.json: calibration: {expected}"):
        FusionRecipe.from_json(path)
    with pytest.raises(RecipeError, match=expected):  # Python callers too
        Calibration(method=method, params=params)


def test_good_calibration_params_still_load_and_fit(tiny_store):
    recipe = FusionRecipe.from_dict({"name": "x", "families": {"V04": ["V01", "V02"]}, "calibration": {
        "method": "stacking", "fit_split": "fold1_val", "params": {"C": 0.5, "max_iter": 500}}})
    assert fuse(tiny_store, recipe, "fold1_evaluate").final.shape == (40, 10)
    assert Calibration(method="temperature", params={"bounds": [0.1, 5]}).params == {"bounds": [0.1, 5]}


def test_an_unknown_calibration_param_is_one_line_on_the_command_line(tiny_store_path, tmp_path, capsys):
    """Before: a TypeError traceback from TemperatureScaling(**params), after the runs were read."""
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"name": "x", "families": {"V04": ["V01"]},
                                "calibration": {"method": "temperature", "fit_split": "fold1_val",
                                                "params": {"temprature": 2}}}))
    code = main(["evaluate", "--store", str(tiny_store_path), "--recipe", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert "cal.json: calibration: params: unknown parameter(s) ['temprature']" in err[0]


# ------------------------------------------------------------------------------------- the viewer
@pytest.mark.parametrize("rules", [
    {"class_weights": {"select": {"A04": ["bus", "park", "tram"]}, "confidence_fit_split": "fold1_val"}},
    {"calibration": {"method": "temperature", "fit_split": "fold1_val"}},
])
def test_the_viewer_shows_a_fitted_recipe_on_the_clips_outside_its_fit_split(tiny_store, tmp_path, rules):
    """Before: ``score`` fused every done clip at once, fit split included: LeakageError on every page."""
    recipe = {"name": "fitted", "families": {"A04": ["A01", "A02"], "V04": ["V01", "V02"], "C04": ["C04"]},
              "replacement": {"source": "A04", "targets": ["V04", "C04"], "margin": 0.2},
              "postprocess": {"method": "eq1"}, **rules}
    path = tmp_path / "fitted.json"
    path.write_text(json.dumps(recipe))
    score, covered = outputs(tiny_store, [str(path)])["fitted"]
    fit_rows = tiny_store.rows(tiny_store.select(split="fold1_val"))
    expected_covered = np.ones(tiny_store.n_clips, dtype=bool)
    expected_covered[fit_rows] = False
    np.testing.assert_array_equal(covered(), expected_covered)
    for split in ("fold1_evaluate", "fold1_test", "fold1_train"):
        ids = tiny_store.select(split=split)
        reference = fuse(tiny_store, FusionRecipe.from_dict(recipe), clip_ids=ids).final
        np.testing.assert_allclose(score(ids[::-1]), reference[::-1], rtol=0, atol=1e-12)


def test_the_viewer_still_covers_the_fit_split_when_the_recipe_cross_fits(tiny_store, tmp_path):
    recipe = {"name": "crossfit", "families": {"V04": ["V01", "V02"]},
              "calibration": {"method": "temperature", "fit_split": "fold1_val", "cross_fit": 2}}
    path = tmp_path / "crossfit.json"
    path.write_text(json.dumps(recipe))
    score, covered = outputs(tiny_store, [str(path)])["crossfit"]
    assert covered().all()
    assert np.isfinite(score(tiny_store.select(split="fold1_val"))).all()


# ------------------------------------------------------------------ families mixing kinds of runs
def test_a_family_mixing_audio_and_video_runs_is_said_not_silently_fused_as_one_model(tiny_store):
    """Before: ``"A04": ["A01", "V01"]`` (V01 typed for A02) fused a video run as audio, without a word."""
    recipe = FusionRecipe.from_dict({"name": "typo", "families": {"A04": ["A01", "V01"], "V04": ["V02"]},
                                     "class_weights": {"select": {"A04": ["bus", "park", "tram"]}}})
    with pytest.warns(UserWarning, match="family 'A04' averages runs recorded as different kinds: "
                                         "A01 \\(audio\\), V01 \\(video\\)"):
        fuse(tiny_store, recipe, "fold1_evaluate")


def test_families_of_one_kind_each_fuse_without_a_warning(tiny_store, paper_recipe_dict):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fuse(tiny_store, FusionRecipe.from_dict(paper_recipe_dict), "fold1_evaluate")


def test_the_mixed_family_warning_is_one_line_on_the_command_line(tiny_store_path, tmp_path, capsys):
    path = tmp_path / "typo.json"
    path.write_text(json.dumps({"name": "typo", "families": {"A04": ["A01", "C04"]}}))
    assert main(["evaluate", "--store", str(tiny_store_path), "--recipe", str(path)]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "different kinds" in line]
    assert warned == ["fusion evaluate: warning: recipe 'typo': family 'A04' averages runs recorded as different "
                      "kinds: A01 (audio), C04 (clip); its runs are averaged as one model and its rules apply to "
                      "all of them (a run name mistyped?)"]


# ------------------------------------------------------------- the user's own prediction store
@pytest.mark.parametrize("inside", ["", "zarr.json"])
def test_a_submission_onto_the_users_prediction_store_is_refused_and_the_store_still_opens(
        tiny_store_path, tmp_path, paper_recipe_dict, inside):
    """Before: only the shared store was protected; ``--out mine.h5`` (the ``--predictions`` store)
    was replaced by the CSV, and every run predicted into it was lost."""
    from featurestore import open_store
    from featurestore.store import open_with_predictions
    from featurestore.store.shared import open_prediction_store
    from fusion.submit import submit_recipe

    mine = tmp_path / ("mine.h5" if not inside else "mine.zarr")
    with open_store(tiny_store_path) as shared:
        open_prediction_store(mine, shared, mode="a").close()
    out = mine / inside if inside else mine
    before = out.read_bytes()
    with open_with_predictions(tiny_store_path, mine) as both:
        with pytest.raises(ValueError, match=f"output file '{out}' is (the|inside the) prediction store"):
            submit_recipe(both, FusionRecipe.from_dict(paper_recipe_dict), "fold1_test", out)
    assert out.read_bytes() == before
    with open_with_predictions(tiny_store_path, mine) as both:
        assert both.predictions.n_clips == both.n_clips


# ------------------------------------------------------------------ heads classify --out
@pytest.mark.parametrize("kind", ["h5", "zarr"])
def test_heads_classify_refuses_an_out_onto_the_store_the_run_was_trained_on(tiny_store_path, tmp_path, kind, capsys):
    """Before: only the run directory was protected: ``--out store.h5`` replaced the whole store the
    run was trained on with the CSV (``--out store.zarr/zarr.json`` its root metadata)."""
    from featurestore import create_store
    from heads.classify import check_output
    from tests.fusion.conftest import _manifest

    if kind == "h5":
        store = tmp_path / "store.h5"
        create_store(store, _manifest()).close()
        out, said = store, "is the store"
    else:
        store, out, said = tiny_store_path, tiny_store_path / "zarr.json", "is inside the store"
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"head": "linear", "train": {"store": str(store)}}))
    before = out.read_bytes()
    with pytest.raises(ValueError, match=f"--out '{out}' {said} '{store}'"):
        check_output(out, run)
    assert out.read_bytes() == before
    other = tmp_path / "other.h5"
    with pytest.raises(ValueError, match="is the store"):  # a store given with --store
        check_output(other, run, store=other)
    from heads.cli import main as heads_main

    capsys.readouterr()
    assert heads_main(["classify", str(run), str(tmp_path / "x.wav"), "--out", str(other), "--store", str(other)]) == 2
    assert "is the store" in capsys.readouterr().err and not other.exists()
    assert check_output(tmp_path / "probs.csv", run) == tmp_path / "probs.csv"
    (run / "run.json").write_text("{not json")  # left to the Classifier to say
    assert check_output(tmp_path / "probs.csv", run) == tmp_path / "probs.csv"


# -------------------------------------------------------------------- submission file names
@pytest.mark.parametrize("template", ["{clip_id:.3}.wav", "{clip_id!r}.wav", "audio/{clip_id:>40}.wav",
                                      "{clip_id}-{clip_id:.2}.wav"])
def test_a_template_that_changes_the_clip_id_is_refused_before_rows_of_two_clips_share_a_name(
        template, tiny_store, paper_recipe_dict, tmp_path):
    """Before: ``{clip_id:.3}.wav`` passed the check and wrote ``air.wav`` for every airport clip
    (padding and ``!r`` wrote names the evaluation never matches)."""
    from fusion.submit import submit_recipe

    out = tmp_path / "s.csv"
    with pytest.raises(ValueError, match="changes the clip id with"):
        submit_recipe(tiny_store, FusionRecipe.from_dict(paper_recipe_dict), "fold1_test", out, template)
    assert not out.exists()


def test_two_recipes_of_one_name_given_to_the_viewer_are_refused_not_shown_as_one(tiny_store, tmp_path):
    """Before: a variant copied from E02 without renaming replaced E02's output under the name E02."""
    first, second = tmp_path / "E02.json", tmp_path / "E02_variant.json"
    first.write_text(json.dumps({"name": "E02", "families": {"V04": ["V01", "V02"]}}))
    second.write_text(json.dumps({"name": "E02", "families": {"V04": ["V01"]}}))
    with pytest.raises(RecipeError, match=f"recipes {first} and {second} are both named 'E02'"):
        outputs(tiny_store, [str(first), str(second)])
    second.write_text(json.dumps({"name": "E02-V01", "families": {"V04": ["V01"]}}))
    assert sorted(outputs(tiny_store, [str(first), str(second)])) == ["E02", "E02-V01"]


# ----------------------------------------------------------- equation (1) on stored float32 runs
def test_equation_1_puts_a_stored_0_2_in_the_0_06_band_as_the_paper_writes_it(tmp_path):
    """Before: a run storing 0.2 (float32, read back as 0.200000003) came out of equation (1) as 0.2,
    above the "0.06 < x <= 0.20 -> 0.06" edge, where the same 0.2 in float64 gave 0.06."""
    from featurestore import ClipRecord, Manifest, create_store

    classes = ["a", "b", "c", "d"]
    records = [ClipRecord(clip_id=f"clip-{i}", label=classes[i], city="x", location=f"L{i}",
                          splits=frozenset({"ev"})) for i in range(3)]
    store = create_store(tmp_path / "edges.zarr", Manifest("edges", classes, records, audio_segments=2,
                                                           video_frames=2))
    store.create_predictions("R", 2, {"head": "linear", "features": {}, "family": "audio"})
    stored = np.tile(np.array([0.2, 0.7, 0.06, 0.04], dtype=np.float32), (3, 2, 1))
    store.write_predictions("R", np.arange(3), stored)
    recipe = FusionRecipe.from_dict({"name": "edges", "families": {"X": ["R"]}, "eval_split": "ev",
                                     "renormalize_fused": False, "postprocess": {"method": "eq1"}})
    final = fuse(store, recipe).final
    store.close()
    # the paper's cases, by hand: 0.2 -> 0.06; 0.7 -> 0.7 (kept); 0.06 -> 0.001; 0.04 -> 0.001
    np.testing.assert_allclose(final, np.tile([0.06, 0.7, 0.001, 0.001], (3, 1)), rtol=0, atol=1e-7)


def test_equation_1_still_keeps_values_just_above_an_edge_and_maps_zero_and_tiny_values_to_0_001():
    from fusion.postprocess import clamp_eq1

    x = np.array([[0.2000001, 0.0600001, 0.7000001, 1e-50, 0.0, 1.0]])
    np.testing.assert_array_equal(clamp_eq1(x), [[0.2000001, 0.06, 0.99, 0.001, 0.001, 0.99]])


def test_a_viewer_recipe_fitted_on_clips_a_run_never_predicted_is_refused_when_the_viewer_starts(
        tiny_store_path, tmp_path):
    """Before: accepted at start; the fit, made on the first page, raised MissingFeatureError on every page."""
    import shutil

    from featurestore import open_store

    path = tmp_path / "s.zarr"
    shutil.copytree(tiny_store_path, path)
    with open_store(path, "a") as store:
        evaluate = store.rows(store.select(split="fold1_evaluate"))
        store.create_predictions("P", 2, {"head": "linear", "features": {}, "family": "video"})
        store.write_predictions("P", evaluate, np.full((len(evaluate), 2, 10), 0.1, np.float32))
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"name": "r", "families": {"V04": ["V01", "P"]},
                                  "calibration": {"method": "temperature", "fit_split": "fold1_val"}}))
    with open_store(path) as store:
        with pytest.raises(RecipeError, match="recipe 'r' fits on 'fold1_val', but run\\(s\\) \\['P'\\] have not "
                                              "predicted all its clips"):
            outputs(store, [str(recipe)])
