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


def _variant_probs(store, output: FusionOutput, calibration_split: str | None, cross_fit: int | None
                   ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    recipe = output.recipe
    probs = {FUSED: output.fused, EQ1: eq1_row(output.fused, recipe)}
    notes: dict[str, str] = {}
    if recipe.postprocess and recipe.postprocess.renormalize:
        notes[EQ1] = ("post-processing of equation (1), rows rescaled to sum to one "
                      "(the recipe's postprocess.renormalize)")
    own = recipe.calibration
    split = calibration_split or (own.fit_split if own else None)
    if split is None:
        return probs, notes
    folds = cross_fit if cross_fit is not None else (own.cross_fit if own else 0)
    for name, method in ((TEMPERATURE, "temperature"), (STACKING, "stacking")):
        same = own is not None and own.method == method
        calib = Calibration(method=method, fit_split=split, cross_fit=folds,
                            stack_on=own.stack_on if same else "fused", params=own.params if same else {})
        probs[name], described = calibrate(store, recipe, calib, output.stage, output.fused, output.weights,
                                           output.stages)
        notes[name] = describe_calibration(described)
    return probs, notes


def eq1_row(fused: np.ndarray, recipe: FusionRecipe) -> np.ndarray:
    """The "fused + eq. (1)" row: equation (1) exactly as the recipe's ``postprocess`` applies it.

    Why: with ``postprocess.renormalize: true`` the recipe's output (what ``fuse`` and ``submit``
    give) is the clamped rows rescaled; a row that clamped without rescaling would report numbers no
    command produces. A recipe without ``postprocess`` gets the paper's equation (no rescaling).
    """
    renormalize = recipe.postprocess.renormalize if recipe.postprocess else False
    return clamp_eq1(fused, renormalize=renormalize)


def describe_calibration(described: dict) -> str:
    """One line for a report: what was fitted, on what, and how."""
    where = f"{described['fit_split']} ({described['n_fit']} clips)"
    if "folds" in described:
        where = f"{described['cross_fit']} location-disjoint folds of {where}"
    if described["method"] == "temperature":
        temps = [f["temperature"] for f in described.get("folds", [])] or [described["temperature"]]
        t = f"T={temps[0]:.3f}" if len(temps) == 1 else f"T={min(temps):.3f}..{max(temps):.3f}"
        return f"temperature scaling {t} fitted on {where}"
    return f"logistic regression on log-probs ({described['stack_on']}) fitted on {where}"


def evaluate_recipe(store, recipe: FusionRecipe, split: str | None = None,
                    calibration_split: str | None = None, cross_fit: int | None = None) -> Evaluation:
    """Run ``recipe`` on ``split`` (default: the recipe's ``eval_split``) and score everything.

    Args:
        store: an open feature store holding the recipe's prediction runs.
        recipe: the fusion recipe.
        split: labelled split to score.
        calibration_split: fit split for the temperature/stacking comparison rows; defaults to the
            recipe's ``calibration.fit_split``; without either, those rows are left out.
        cross_fit: folds for those rows when their fit split overlaps ``split`` (default: the
            recipe's ``calibration.cross_fit``; 0 makes an overlap a ``LeakageError``).
    """
    output = fuse(store, recipe, split)
    renorm, classes, labels = recipe.metric_renormalize, output.classes, output.labels

    def scored(p: np.ndarray) -> Scores:
        return score(p, labels, classes, renormalize=renorm)

    variant_probs, notes = _variant_probs(store, output, calibration_split, cross_fit)
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
