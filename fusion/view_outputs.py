"""Fused outputs for ``featurestore view``: the provider behind the ``featurestore.view_outputs`` entry point.

``featurestore`` never imports ``fusion``; the viewer finds this function through the entry point
group (pyproject.toml) and shows each recipe's fused output beside the stored runs (docs/view.md).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fusion.pipeline import fuse, resolve_split, validate_recipe
from fusion.recipe import FusionRecipe, RecipeError


def outputs(store: Any, recipes: Sequence[str]) -> dict[str, tuple[Callable, Callable]]:
    """``{recipe name: (score, covered)}`` for each recipe file: ``score(clip_ids)`` gives the fused
    (and calibrated / post-processed, as the recipe says) clip probabilities, ``covered()`` the rows
    where every run of the recipe is done.

    The recipe runs once, on first use, over every covered clip (its class weights and calibration
    are fitted on the splits the recipe names, as ``fusion evaluate`` does), and is kept. The clips a
    fit is made on cannot be scored by it (a ``LeakageError`` in ``fusion evaluate``): those of the
    ``confidence_fit_split``, and those of ``calibration.fit_split`` unless the recipe cross-fits,
    are not covered (the viewer shows no fused output for them) instead of failing every page.

    Raises:
        RecipeError: a recipe file that cannot be read, runs or splits it names that the store lacks, or
            two recipes of one name (the second would replace the first's output without a word).
    """
    out, files = {}, {}
    for path in recipes:
        recipe = FusionRecipe.from_json(path)
        if recipe.name in files:  # a variant copied from a recipe, its name not changed
            raise RecipeError(f"recipes {files[recipe.name]} and {path} are both named {recipe.name!r}; the viewer "
                              f"shows each output under its recipe's name: give one another \"name\"")
        validate_recipe(store, recipe)
        out[recipe.name], files[recipe.name] = _output(store, recipe), path
    return out


def fit_splits(store: Any, recipe: FusionRecipe) -> dict[str, bool]:
    """The splits the recipe fits on -> whether their own clips can be scored (cross-fitted) or not."""
    found: dict[str, bool] = {}
    if recipe.class_weights and recipe.class_weights.confidence_fit_split:
        found[resolve_split(store, recipe, recipe.class_weights.confidence_fit_split)] = False
    if recipe.calibration:
        split = resolve_split(store, recipe, recipe.calibration.fit_split)
        found[split] = found.get(split, True) and recipe.calibration.cross_fit >= 2
    return found


def covered_rows(store: Any, recipe: FusionRecipe) -> np.ndarray:
    """Bool ``[n_clips]``: the clips the viewer can show the recipe's output for.

    Those every run of the recipe predicted, less the clips of a split it fits on without
    cross-fitting (they would be scored by their own fit).

    Raises:
        RecipeError: a run lacks predictions for clips of a fit split: the fit, made on first use,
            would fail on every page; said when the viewer starts instead.
    """
    done = np.logical_and.reduce([store.prediction_done(run) for run in recipe.runs])
    covered = done.copy()
    for split, scorable in fit_splits(store, recipe).items():
        rows = store.rows(store.select(split=split))
        lacking = [run for run in recipe.runs if not store.prediction_done(run)[rows].all()]
        if lacking:
            raise RecipeError(f"recipe {recipe.name!r} fits on {split!r}, but run(s) {lacking} have not predicted "
                              f"all its clips: run heads predict for them first")
        if not scorable:
            covered[rows] = False
    return covered


def _output(store: Any, recipe: FusionRecipe) -> tuple[Callable, Callable]:
    covered = covered_rows(store, recipe)
    held: dict[str, Any] = {}

    def score(clip_ids: Sequence[str]) -> np.ndarray:
        if not held:
            result = fuse(store, recipe, clip_ids=store.index.ids_at(np.flatnonzero(covered)))
            held["row"] = {clip: i for i, clip in enumerate(result.clip_ids)}
            held["final"] = result.final
        return held["final"][[held["row"][clip] for clip in clip_ids]]

    return score, lambda: covered
