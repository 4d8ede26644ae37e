"""Typed recipes: a value of the wrong type or out of range is refused when the recipe is loaded.

Each case is a real recipe file, read by `FusionRecipe.from_json` and by the ``fusion`` command line:
one line naming the file, the dotted key, the value and what was expected; exit 2; nothing written.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusion.cli import main
from fusion.recipe import Calibration, FusionRecipe, RecipeError, Replacement

# (what to change in the paper recipe, the words the one-line error must hold)
BAD = {
    "margin as a string": ({"replacement": {"source": "A04", "targets": ["V04"], "margin": "0.2"}},
                           ['replacement.margin: expected a valid number, got "0.2" (a string)']),
    "margin above one": ({"replacement": {"source": "A04", "targets": ["V04"], "margin": 1.5}},
                         ["replacement.margin: expected <= 1", "got 1.5"]),
    "negative margin": ({"replacement": {"source": "A04", "targets": ["V04"], "margin": -0.1}},
                        ["replacement.margin: expected >= 0", "got -0.1"]),
    "no targets": ({"replacement": {"source": "A04", "targets": []}},
                   ["replacement.targets: expected at least 1 item(s), got []"]),
    "a family without runs": ({"families": {"A04": ["A01"], "V04": []}},
                              ["families.V04: expected at least 1 item(s), got []"]),
    "a run that is not a string": ({"families": {"A04": ["A01", 2]}}, ["families.A04[1]: expected a valid string, got 2"]),
    "an empty split": ({"eval_split": ""}, ['eval_split: expected a string of at least 1 character(s), got ""']),
    "a boolean as a string": ({"renormalize_fused": "false"}, ['renormalize_fused: expected a valid boolean, got "false"']),
    "an unknown aggregation": ({"aggregation": "vote"}, ["aggregation: expected 'mean', 'geometric_mean'", '"vote"']),
    "negative cross_fit": ({"calibration": {"method": "temperature", "cross_fit": -1}},
                           ["calibration.cross_fit: expected >= 0, got -1"]),
    "an unknown postprocess": ({"postprocess": {"method": "eq2"}}, ["postprocess.method: expected 'eq1'", '"eq2"']),
    "a section that is not an object": ({"class_weights": ["A04"]}, ["class_weights: expected an object"]),
    "an unknown nested key": ({"replacement": {"source": "A04", "targets": ["V04"], "margn": 0.3}},
                              ["replacement: unknown key(s) ['margn']; allowed keys are ['margin', 'source', 'targets']"]),
}


def _write(tmp_path: Path, recipe: dict, change: dict) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**recipe, **change}))
    return path


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_value_is_refused_when_the_file_is_loaded(case, tmp_path, paper_recipe_dict):
    change, words = BAD[case]
    path = _write(tmp_path, paper_recipe_dict, change)
    with pytest.raises(RecipeError) as refused:
        FusionRecipe.from_json(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for word in words:
        assert word in message


def test_several_problems_are_named_in_one_line(tmp_path, paper_recipe_dict):
    path = _write(tmp_path, paper_recipe_dict, {"eval_split": 3, "metric_renormalize": "yes", "famlies": {}})
    with pytest.raises(RecipeError) as refused:
        FusionRecipe.from_json(path)
    message = str(refused.value)
    assert "\n" not in message
    assert "eval_split: expected a valid string, got 3 (an integer)" in message
    assert 'metric_renormalize: expected a valid boolean, got "yes" (a string)' in message
    assert "unknown key(s) ['famlies']" in message


def test_python_callers_get_the_same_checks(paper_recipe_dict):
    """Built in Python (evaluate builds its comparison calibrations), assigned, or replaced."""
    with pytest.raises(RecipeError, match=r"^Replacement: margin: expected a valid number, got \"0.2\" \(a string\)$"):
        Replacement("A04", ["V04"], margin="0.2")
    with pytest.raises(RecipeError, match="^Calibration: cross_fit must be 0"):
        Calibration("temperature", cross_fit=1)
    recipe = FusionRecipe.from_dict(paper_recipe_dict)
    with pytest.raises(RecipeError, match="^FusionRecipe: eval_split: expected a valid string, got 3"):
        recipe.eval_split = 3
    assert recipe.eval_split == "fold1_evaluate"
    recipe.metric_renormalize = False  # a good value is assigned as before
    assert FusionRecipe.from_json(recipe.to_json()) == recipe


def test_ints_stay_numbers_and_the_json_is_read_as_written(tmp_path, paper_recipe_dict):
    """A JSON 0 for a float field is a number (JSON has one number type); the file is not rewritten."""
    path = _write(tmp_path, paper_recipe_dict, {"replacement": {"source": "A04", "targets": ["V04"], "margin": 0}})
    before = path.read_bytes()
    assert FusionRecipe.from_json(path).replacement.margin == 0.0
    assert path.read_bytes() == before


@pytest.mark.parametrize("command", ["evaluate", "report", "submit"])
def test_cli_refuses_a_string_margin_in_one_line_and_writes_nothing(command, tiny_store_path, tmp_path,
                                                                    paper_recipe_dict, capsys):
    path = _write(tmp_path, paper_recipe_dict, BAD["margin as a string"][0])
    out = tmp_path / "out"
    argv = [command, "--store", str(tiny_store_path), "--recipe", str(path)]
    if command == "report":
        argv += ["--out", str(out)]
    elif command == "submit":
        argv += ["--out", str(out / "submission.csv"), "--split", "fold1_test"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f'fusion {command}: error: {path}: replacement.margin: expected a valid number, got "0.2" (a string)']
    assert "Traceback" not in captured.out + captured.err
    assert not out.exists()


def test_cli_refuses_a_negative_cross_fit_flag(tiny_store_path, tmp_path, paper_recipe_dict, capsys):
    path = _write(tmp_path, paper_recipe_dict, {"calibration": {"method": "temperature", "fit_split": "fold1_val"}})
    assert main(["evaluate", "--store", str(tiny_store_path), "--recipe", str(path), "--cross-fit", "-1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["fusion evaluate: error: Calibration: cross_fit: expected >= 0, got -1 (an integer)"]
