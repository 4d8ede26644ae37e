"""Fused outputs for ``featurestore view``: the provider behind the ``featurestore.view_outputs`` entry point.

``featurestore`` never imports ``fusion``; the viewer finds this function through the entry point
group (pyproject.toml) and shows each recipe's fused output beside the stored runs (docs/view.md).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fusion.pipeline import fuse, validate_recipe
from fusion.recipe import FusionRecipe


def outputs(store: Any, recipes: Sequence[str]) -> dict[str, tuple[Callable, Callable]]:
    """``{recipe name: (score, covered)}`` for each recipe file: ``score(clip_ids)`` gives the fused
    (and calibrated / post-processed, as the recipe says) clip probabilities, ``covered()`` the rows
    where every run of the recipe is done.

    The recipe runs once, on first use, over every covered clip (its class weights and calibration
    are fitted on the splits the recipe names, as ``fusion evaluate`` does), and is kept.

    Raises:
        RecipeError: a recipe file that cannot be read, or runs it names that the store lacks.
    """
    out = {}
    for path in recipes:
        recipe = FusionRecipe.from_json(path)
        validate_recipe(store, recipe)
        out[recipe.name] = _output(store, recipe)
    return out


def _output(store: Any, recipe: FusionRecipe) -> tuple[Callable, Callable]:
    covered = np.logical_and.reduce([store.prediction_done(run) for run in recipe.runs])
    held: dict[str, Any] = {}

    def score(clip_ids: Sequence[str]) -> np.ndarray:
        if not held:
            result = fuse(store, recipe, clip_ids=store.index.ids_at(np.flatnonzero(covered)))
            held["row"] = {clip: i for i, clip in enumerate(result.clip_ids)}
            held["final"] = result.final
        return held["final"][[held["row"][clip] for clip in clip_ids]]

    return score, lambda: covered
