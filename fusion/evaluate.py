"""Score a recipe on a labelled split: every run, every family, the fused output and its variants.

The variants answer the question the paper leaves open - is equation (1) better than a calibrator
fitted on held-out data? - on the *same* evaluated clips: fused output as is, with equation (1),
with temperature scaling and with stacking (the last two fitted on a disjoint split).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fusion.metrics import Scores, score
from fusion.pipeline import FusionOutput, calibrate, fuse
from fusion.postprocess import clamp_eq1
from fusion.recipe import Calibration, FusionRecipe

FUSED, EQ1, TEMPERATURE, STACKING = "fused", "fused + eq. (1)", "fused + temperature", "fused + stacking"


@dataclass
class Evaluation:
    """Scores of one recipe on one split, by row name, plus the fusion output behind them."""

    output: FusionOutput
    runs: dict[str, Scores]
    families: dict[str, Scores]
    variants: dict[str, Scores]
    final: Scores
    final_variant: str | None                       # which variant equals the recipe's output
    variant_notes: dict[str, str] = field(default_factory=dict)
    variant_probs: dict[str, np.ndarray] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = self.output
        return {
            "recipe": out.recipe.name,
            "split": out.split,
            "n_clips": len(out.clip_ids),
            "metric": {"primary": "class-wise averaged log-loss", "renormalize": out.recipe.metric_renormalize},
            "final": self.final.to_dict(),
            "final_variant": self.final_variant,
            "calibration": out.calibration,
            "replaced": {k: int(v.sum()) for k, v in out.stage.replaced.items()},
            "runs": {k: v.to_dict() for k, v in self.runs.items()},
            "families": {k: v.to_dict() for k, v in self.families.items()},
            "variants": {k: v.to_dict() for k, v in self.variants.items()},
            "notes": out.notes,
        }


def _variant_probs(store, output: FusionOutput, calibration_split: str | None
                   ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    recipe = output.recipe
    probs = {FUSED: output.fused, EQ1: clamp_eq1(output.fused)}
    notes: dict[str, str] = {}
    split = calibration_split or (recipe.calibration.fit_split if recipe.calibration else None)
    if split is None:
        return probs, notes
    params = recipe.calibration.params if recipe.calibration else {}
    for name, method in ((TEMPERATURE, "temperature"), (STACKING, "stacking")):
        calib = Calibration(method=method, fit_split=split,
                            params=params if recipe.calibration and recipe.calibration.method == method else {})
        probs[name], described = calibrate(store, recipe, calib, output.stage, output.fused, output.weights)
        notes[name] = _describe(described)
    return probs, notes


def _describe(described: dict) -> str:
    if described["method"] == "temperature":
        return f"temperature T={described['temperature']:.3f} fitted on {described['fit_split']} ({described['n_fit']} clips)"
    return f"logistic regression on log-probs ({described['stack_on']}) fitted on {described['fit_split']} ({described['n_fit']} clips)"


def evaluate_recipe(store, recipe: FusionRecipe, split: str | None = None,
                    calibration_split: str | None = None) -> Evaluation:
    """Run ``recipe`` on ``split`` (default: the recipe's ``eval_split``) and score everything.

    Args:
        store: an open feature store holding the recipe's prediction runs.
        recipe: the fusion recipe.
        split: labelled split to score.
        calibration_split: fit split for the temperature/stacking comparison rows; defaults to the
            recipe's ``calibration.fit_split``; without either, those rows are left out.
    """
    output = fuse(store, recipe, split)
    renorm, classes, labels = recipe.metric_renormalize, output.classes, output.labels

    def scored(p: np.ndarray) -> Scores:
        return score(p, labels, classes, renormalize=renorm)

    variant_probs, notes = _variant_probs(store, output, calibration_split)
    variants = {name: scored(p) for name, p in variant_probs.items()}
    final_variant = next((n for n, p in variant_probs.items() if np.array_equal(p, output.final)), None)
    return Evaluation(
        output=output,
        runs={r: scored(p) for r, p in output.stage.run_probs.items()},
        families={f: scored(p) for f, p in output.stage.family_means.items()},
        variants=variants,
        final=scored(output.final),
        final_variant=final_variant,
        variant_notes=notes,
        variant_probs=variant_probs,
    )
