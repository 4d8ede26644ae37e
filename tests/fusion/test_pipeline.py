"""End to end on a tiny real store: fuse, evaluate, leakage guards, reports, submissions, CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from fusion import cli
from fusion.aggregate import aggregate_segments, load_clip_probs
from fusion.calibration import LeakageError
from fusion.evaluate import EQ1, FUSED, STACKING, TEMPERATURE, evaluate_recipe
from fusion.metrics import score
from fusion.pipeline import fuse
from fusion.postprocess import clamp_eq1
from fusion.recipe import FusionRecipe, RecipeError
from fusion.report import write_report
from fusion.rules import classwise_fuse, replace_low_confidence, selection_weights
from fusion.submission import read_submission
from fusion.submit import submit_recipe


def test_load_clip_probs_is_the_mean_of_stored_segments(tiny_store):
    ids = tiny_store.select(split="fold1_evaluate")[:5]
    stored = tiny_store.get_predictions("V01", ids)
    assert stored.shape == (5, 12, 10)
    np.testing.assert_allclose(load_clip_probs(tiny_store, "V01", ids), stored.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(load_clip_probs(tiny_store, "V01", ids, "max"), aggregate_segments(stored, "max"))


def test_fuse_reproduces_the_rules_step_by_step(tiny_store, paper_recipe_dict):
    recipe = FusionRecipe.from_dict(paper_recipe_dict)
    out = fuse(tiny_store, recipe, "fold1_evaluate")
    ids = tiny_store.select(split="fold1_evaluate")
    assert out.clip_ids == ids and len(ids) == 40
    mean = {r: tiny_store.get_predictions(r, ids).mean(axis=1) for r in recipe.runs}
    a04 = (mean["A01"] + mean["A02"]) / 2
    v04, _ = replace_low_confidence((mean["V01"] + mean["V02"]) / 2, a04, 0.2)
    c04, _ = replace_low_confidence(mean["C04"], a04, 0.2)
    w = selection_weights(["A04", "V04", "C04"], tiny_store.classes, {"A04": ["bus", "park", "tram"]})
    expected = clamp_eq1(classwise_fuse({"A04": a04, "V04": v04, "C04": c04}, w))
    np.testing.assert_allclose(out.final, expected, rtol=1e-6)
    assert sum(int(m.sum()) for m in out.stage.replaced.values()) > 0  # night clips were replaced
    np.testing.assert_array_equal(out.labels, np.asarray(tiny_store.labels)[tiny_store.rows(ids)])


def test_unknown_run_lists_the_runs_in_the_store(tiny_store, paper_recipe_dict):
    recipe = FusionRecipe.from_dict({**paper_recipe_dict, "families": {"A04": ["A01", "A03"], "V04": ["V01"], "C04": ["C04"]}})
    with pytest.raises(RecipeError, match=r"run\(s\) \['A03'\] are not in the store; runs there: \['A01', 'A02', 'C04', 'V01', 'V02'\]"):
        fuse(tiny_store, recipe, "fold1_evaluate")


def test_unknown_split_lists_the_splits(tiny_store, paper_recipe_dict):
    with pytest.raises(RecipeError, match="split 'fold9' is not in the store; splits are .*fold1_val"):
        fuse(tiny_store, FusionRecipe.from_dict(paper_recipe_dict), "fold9")


def test_evaluate_scores_every_row_on_the_same_clips(tiny_store, paper_recipe_dict):
    recipe = FusionRecipe.from_dict({**paper_recipe_dict, "postprocess": None,
                                     "calibration": {"method": "temperature", "fit_split": "fold1_val"}})
    ev = evaluate_recipe(tiny_store, recipe, "fold1_evaluate")
    assert set(ev.runs) == {"A01", "A02", "V01", "V02", "C04"}
    assert set(ev.variants) == {FUSED, EQ1, TEMPERATURE, STACKING}
    assert ev.final_variant == TEMPERATURE  # the recipe's own output is the temperature row
    assert ev.output.calibration["fit_split"] == "fold1_val"
    # eq. (1) row equals scoring the clamped fused output by hand
    expected = score(clamp_eq1(ev.output.fused), ev.output.labels, tiny_store.classes)
    assert ev.variants[EQ1].logloss == pytest.approx(expected.logloss)
    # temperature keeps the decisions: same accuracy as the fused output
    assert ev.variants[TEMPERATURE].accuracy == ev.variants[FUSED].accuracy
    assert all(s.n_clips == 40 for s in ev.variants.values())
    json.dumps(ev.to_dict())  # JSON-ready
    # calibration followed by eq. (1) is none of the comparison rows: reported as its own output
    both = FusionRecipe.from_dict({**paper_recipe_dict, "calibration": {"method": "temperature", "fit_split": "fold1_val"}})
    ev_both = evaluate_recipe(tiny_store, both, "fold1_evaluate")
    assert ev_both.final_variant is None
    np.testing.assert_allclose(ev_both.output.final, clamp_eq1(ev.variant_probs[TEMPERATURE]))


def test_calibrating_on_the_scored_split_is_refused(tiny_store, paper_recipe_dict):
    recipe = FusionRecipe.from_dict({**paper_recipe_dict, "calibration": {"method": "temperature", "fit_split": "fold1_evaluate"}})
    with pytest.raises(LeakageError, match="overlap in 40 clip"):
        fuse(tiny_store, recipe, "fold1_evaluate")
    # @val_split resolves to the runs' val_split (fold1_val), which is disjoint: accepted
    ok = FusionRecipe.from_dict({**paper_recipe_dict, "calibration": {"method": "temperature"}})
    assert fuse(tiny_store, ok, "fold1_evaluate").calibration["fit_split"] == "fold1_val"


def test_cross_fit_never_scores_a_clip_with_its_own_fit(tiny_store, paper_recipe_dict, monkeypatch):
    from fusion import calibration

    fitted: list[set[str]] = []
    original = calibration.TemperatureScaling.fit

    def spy(self, clip_ids, probs, labels):
        fitted.append(set(clip_ids))
        return original(self, clip_ids, probs, labels)

    monkeypatch.setattr(calibration.TemperatureScaling, "fit", spy)
    recipe = FusionRecipe.from_dict({**paper_recipe_dict, "calibration": {
        "method": "temperature", "fit_split": "fold1_evaluate", "cross_fit": 3}})
    out = fuse(tiny_store, recipe, "fold1_evaluate")
    folds = out.calibration["folds"]
    assert len(folds) == 3 == len(fitted) and sum(f["n_scored"] for f in folds) == 40
    locations = dict(zip(tiny_store.clip_ids, tiny_store.column("location")))
    scored_by_fold = [set() for _ in range(3)]
    for k, fit_ids in enumerate(fitted):
        # every clip not in this fit was scored by it, and no location is on both sides
        scored_by_fold[k] = set(out.clip_ids) - fit_ids
        assert {locations[c] for c in fit_ids}.isdisjoint({locations[c] for c in scored_by_fold[k]})
    assert set().union(*scored_by_fold) == set(out.clip_ids)


def test_report_files_and_random_weights_flag(tiny_store, paper_recipe_dict, tmp_path):
    recipe = FusionRecipe.from_dict(paper_recipe_dict)
    report = write_report(tiny_store, recipe, tmp_path / "rep", "fold1_evaluate", calibration_split="fold1_val")
    for path in (report.markdown, report.confusion_png, report.reliability_png, report.metrics_json):
        assert path.is_file() and path.stat().st_size > 0
    assert report.confusion_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.markdown.read_text()
    assert text.startswith("> **WARNING: RANDOM WEIGHTS.**") and "timm/test_vit" in text.splitlines()[0]
    table = [line for line in text.splitlines() if line.startswith("| V01 |")]
    assert len(table) == 1 and "RANDOM weights (timm/test_vit)" in table[0]
    assert "RANDOM" not in next(line for line in text.splitlines() if line.startswith("| C04 |"))
    assert "| A04 | A01, A02's models |" in text and "Ensemble of A01, A02" in text
    for name in (FUSED, EQ1, TEMPERATURE, STACKING):
        assert f"| E02-tiny: {name} |" in text
    assert "**recipe output**" in next(line for line in text.splitlines() if line.startswith(f"| E02-tiny: {EQ1} |"))
    weights = text[text.index("## Encoder weights"):]
    assert "| timm/test_vit | video | RANDOM(seed=0) | **RANDOM** |" in weights
    assert "| clip/ViT-B-32 | video | openai | no |" in weights
    assert "| logmel | audio |" in weights
    metrics = json.loads(report.metrics_json.read_text())
    assert metrics["final"]["logloss"] == pytest.approx(report.evaluation.final.logloss)
    assert metrics["weights"]["V01"]["random"] == ["timm/test_vit"]


def test_evaluate_reads_each_run_once_per_split(tiny_store, paper_recipe_dict, monkeypatch):
    """Confidence weights, the recipe's calibration and both comparison rows fit on fold1_val: one read."""
    reads = []
    real = type(tiny_store).get_predictions
    monkeypatch.setattr(tiny_store, "get_predictions",
                        lambda run, ids=None: reads.append((run, tuple(ids))) or real(tiny_store, run, ids))
    recipe = FusionRecipe.from_dict({**paper_recipe_dict, "calibration": {"method": "temperature"},
                                     "class_weights": {"confidence_fit_split": "fold1_val"}})
    ev = evaluate_recipe(tiny_store, recipe, "fold1_evaluate", calibration_split="fold1_val")
    splits = [tuple(tiny_store.select(split=s)) for s in ("fold1_evaluate", "fold1_val")]
    assert sorted(reads) == sorted((run, ids) for run in recipe.runs for ids in splits)
    assert ev.output.calibration["fit_split"] == "fold1_val" and set(ev.variants) == {FUSED, EQ1, TEMPERATURE, STACKING}


def test_report_reads_the_feature_sets_once(tiny_store, paper_recipe_dict, tmp_path, monkeypatch):
    """feature_sets() reads every done mask: one report must not call it once per run."""
    calls = []
    real = type(tiny_store).feature_sets
    monkeypatch.setattr(tiny_store, "feature_sets", lambda: calls.append(1) or real(tiny_store))
    recipe = FusionRecipe.from_dict(paper_recipe_dict)
    report = write_report(tiny_store, recipe, tmp_path / "rep", "fold1_evaluate", calibration_split="fold1_val")
    assert len(calls) == 1
    assert "| timm/test_vit | video | RANDOM(seed=0) | **RANDOM** |" in report.markdown.read_text()


def test_submission_round_trip(tiny_store, paper_recipe_dict, tmp_path):
    recipe = FusionRecipe.from_dict(paper_recipe_dict)
    path, n = submit_recipe(tiny_store, recipe, "fold1_test", tmp_path / "sub" / "out.csv")
    ids = tiny_store.select(split="fold1_test")
    assert n == len(ids) == 8
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == ["filename", "scene_label", *tiny_store.classes]
    sub = read_submission(path, tiny_store.classes)
    assert sub.filenames == [f"audio/{i}.wav" for i in ids]
    expected = fuse(tiny_store, recipe, "fold1_test").final
    np.testing.assert_allclose(sub.probs, expected, rtol=1e-7)
    assert sub.scene_labels == [tiny_store.classes[k] for k in expected.argmax(axis=1)]
    assert np.all((sub.probs >= 0.001) & (sub.probs <= 0.99))  # eq. (1) was applied


def test_cli_evaluate_json_report_submit_runs(tiny_store_path, paper_recipe_dict, tmp_path, capsys):
    recipe_path = tmp_path / "r.json"
    FusionRecipe.from_dict(paper_recipe_dict).to_json(recipe_path)
    common = ["--store", str(tiny_store_path), "--recipe", str(recipe_path)]
    assert cli.main(["evaluate", *common, "--split", "fold1_evaluate", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["split"] == "fold1_evaluate" and data["n_clips"] == 40 and data["final_variant"] == EQ1
    assert cli.main(["evaluate", *common]) == 0  # the recipe's eval_split by default
    assert "recipe output" in capsys.readouterr().out
    assert cli.main(["report", *common, "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").is_file()
    assert cli.main(["submit", *common, "--split", "fold1_test", "--out", str(tmp_path / "s.csv"),
                     "--filename-template", "{clip_id}.wav"]) == 0
    assert read_submission(tmp_path / "s.csv").filenames[0].endswith(".wav")
    assert cli.main(["runs", "--store", str(tiny_store_path)]) == 0
    assert "V01: embedding_mlp" in capsys.readouterr().out


def test_cli_errors_are_one_line_and_name_what_exists(tiny_store_path, paper_recipe_dict, tmp_path, capsys):
    bad = {**paper_recipe_dict, "families": {"A04": ["A09"], "V04": ["V01"], "C04": ["C04"]}}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    assert cli.main(["evaluate", "--store", str(tiny_store_path), "--recipe", str(path)]) == 2
    err = capsys.readouterr().err
    assert "A09" in err and "runs there: ['A01', 'A02', 'C04', 'V01', 'V02']" in err


def test_cross_fit_option_is_checked_like_the_recipe_field(tiny_store, tiny_store_path, paper_recipe_dict,
                                                          tmp_path, capsys):
    recipe = FusionRecipe.from_dict(paper_recipe_dict)
    with pytest.raises(RecipeError, match="cross_fit must be 0 \\(off\\) or >= 2, found 1"):
        evaluate_recipe(tiny_store, recipe, "fold1_evaluate", calibration_split="fold1_val", cross_fit=1)
    path = tmp_path / "r.json"
    FusionRecipe.from_dict({**paper_recipe_dict, "calibration": {"method": "temperature"}}).to_json(path)
    assert cli.main(["evaluate", "--store", str(tiny_store_path), "--recipe", str(path), "--cross-fit", "1"]) == 2
    assert "cross_fit must be 0 (off) or >= 2, found 1" in capsys.readouterr().err


def test_python_dash_m_fusion_help():
    done = subprocess.run([sys.executable, "-m", "fusion", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "evaluate" in done.stdout and "submit" in done.stdout


def test_confidence_weights_fitted_on_validation_only(tiny_store, paper_recipe_dict):
    recipe = FusionRecipe.from_dict({**paper_recipe_dict, "class_weights": {
        "select": {"A04": ["bus", "park", "tram"]}, "confidence_fit_split": "fold1_val"}})
    out = fuse(tiny_store, recipe, "fold1_evaluate")
    mask = selection_weights(["A04", "V04", "C04"], tiny_store.classes, {"A04": ["bus", "park", "tram"]})
    assert np.all(out.weights[mask == 0] == 0) and np.all((out.weights[mask == 1] > 0) & (out.weights[mask == 1] < 1))
    leaky = FusionRecipe.from_dict({**paper_recipe_dict, "class_weights": {"confidence_fit_split": "fold1_evaluate"}})
    with pytest.raises(LeakageError, match="class-wise confidence weights"):
        fuse(tiny_store, leaky, "fold1_evaluate")


def test_unlabelled_split_cannot_be_scored_but_can_be_submitted(tiny_store, paper_recipe_dict):
    recipe = FusionRecipe.from_dict(paper_recipe_dict)
    with pytest.raises(ValueError, match="unlabelled split"):
        evaluate_recipe(tiny_store, recipe, "fold1_test")
    assert fuse(tiny_store, recipe, "fold1_test").final.shape == (8, 10)
