"""Recipes: JSON round trip, strict keys, the shipped recipe files."""
from __future__ import annotations

from pathlib import Path

import pytest

from fusion.recipe import Calibration, FusionRecipe, RecipeError

RECIPES = Path(__file__).resolve().parents[2] / "scripts" / "recipes" / "fusion"


def test_round_trip(tmp_path, paper_recipe_dict):
    recipe = FusionRecipe.from_dict(paper_recipe_dict)
    assert recipe.replacement.margin == 0.2 and recipe.class_weights.select == {"A04": ["bus", "park", "tram"]}
    path = tmp_path / "r.json"
    recipe.to_json(path)
    again = FusionRecipe.from_json(path)
    assert again == recipe
    assert FusionRecipe.from_json(recipe.to_json()) == recipe  # JSON text works too
    assert recipe.runs == ["A01", "A02", "V01", "V02", "C04"]


def test_unknown_key_lists_the_allowed_ones(paper_recipe_dict):
    with pytest.raises(RecipeError, match=r"unknown key\(s\) \['famlies'\]; allowed keys are .*'families'"):
        FusionRecipe.from_dict({**paper_recipe_dict, "famlies": {}})
    bad = {**paper_recipe_dict, "replacement": {"source": "A04", "targets": ["V04"], "margn": 0.3}}
    with pytest.raises(RecipeError, match=r"recipe: replacement: unknown key\(s\) \['margn'\]; allowed keys are \['margin', 'source', 'targets'\]"):
        FusionRecipe.from_dict(bad)


def test_semantic_errors(paper_recipe_dict):
    with pytest.raises(RecipeError, match="replacement names unknown families \\['X04'\\]"):
        FusionRecipe.from_dict({**paper_recipe_dict, "replacement": {"source": "X04", "targets": ["V04"]}})
    with pytest.raises(RecipeError, match="replacement.targets holds its own source 'A04'"):
        FusionRecipe.from_dict({**paper_recipe_dict, "replacement": {"source": "A04", "targets": ["V04", "A04"]}})
    with pytest.raises(RecipeError, match="aggregation: expected 'mean', .* got \"vote\""):
        FusionRecipe.from_dict({**paper_recipe_dict, "aggregation": "vote"})
    with pytest.raises(RecipeError, match="calibration.method: expected 'temperature' or 'stacking', got \"platt\""):
        FusionRecipe.from_dict({**paper_recipe_dict, "calibration": {"method": "platt"}})
    with pytest.raises(RecipeError, match="missing required key\\(s\\) \\['families'\\]"):
        FusionRecipe.from_dict({"name": "x"})
    with pytest.raises(RecipeError, match="cross_fit must be 0"):
        FusionRecipe("x", {"A": ["a"]}, calibration=Calibration("temperature", cross_fit=1))


def test_bad_files(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        FusionRecipe.from_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RecipeError, match="not valid JSON"):
        FusionRecipe.from_json(tmp_path / "bad.json")


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.json")), ids=lambda p: p.name)
def test_shipped_recipes_parse(path):
    recipe = FusionRecipe.from_json(path)
    assert recipe.families and all(recipe.families.values())


def test_shipped_paper_recipes_say_what_the_paper_does():
    e01 = FusionRecipe.from_json(RECIPES / "E01.json")
    e02 = FusionRecipe.from_json(RECIPES / "E02.json")
    assert e01.families == {"A04": ["A01", "A02", "A03"], "V04": ["V01", "V02", "V03"], "C04": ["C04"]}
    assert e01.postprocess is None and e02.postprocess.method == "eq1"
    assert e02.class_weights.select == {"A04": ["bus", "park", "tram"]}
    assert (e02.replacement.source, e02.replacement.targets, e02.replacement.margin) == ("A04", ["V04", "C04"], 0.2)
