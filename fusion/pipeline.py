"""Run a fusion recipe against a store: read runs, aggregate, apply the rules, calibrate.

It reads an open store its caller passes in (:mod:`fusion.cli` opens it): prediction-run
attributes, labels, splits and locations here; segment probabilities in :mod:`fusion.aggregate`.
The other readers of a store are :mod:`fusion.runinfo` and :mod:`fusion.report` (run attributes,
feature sets) and :mod:`fusion.classify` (the runs and classes that classify new files). The
rules, the calibrators and the metrics it calls are pure numpy. Order of the steps, as in the paper:

1. every run's segment probabilities -> clip probabilities (:mod:`fusion.aggregate`);
2. equal-weight mean of the runs of each family (A04 = mean of A01-A03);
3. replacement of low-confidence video rows by audio rows;
4. class-wise fusion with selection and/or validation-confidence weights;
5. calibration fitted on ``calibration.fit_split`` (optional), then equation (1) (optional).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from featurestore.store.clips import check_id_sequence
from featurestore.store.shared import StoreWithPredictions
from fusion._validate import check_finite_rows
from fusion.aggregate import load_clip_probs
from fusion.calibration import ConfidenceWeights, check_disjoint, crossfit_apply, make_calibrator
from fusion.postprocess import clamp_eq1
from fusion.recipe import VAL_SPLIT_REF, Calibration, FusionRecipe, RecipeError
from fusion.rules import average_models, classwise_fuse, replace_low_confidence, selection_weights


@dataclass
class FamilyStage:
    """Probabilities of one set of clips up to (and including) the class-wise fusion."""

    clip_ids: list[str]
    run_probs: dict[str, np.ndarray]       # run -> [n, C] clip probabilities
    family_means: dict[str, np.ndarray]    # family -> mean of its runs (before replacement)
    family_probs: dict[str, np.ndarray]    # family -> after the replacement rule
    replaced: dict[str, np.ndarray]        # target family -> bool mask of replaced clips


@dataclass
class FusionOutput:
    """Everything a report needs about one recipe run on one split."""

    recipe: FusionRecipe
    split: str | None
    classes: list[str]
    labels: np.ndarray                     # int64, -1 where unknown
    stage: FamilyStage
    weights: np.ndarray                    # [n_families, n_classes] used by the fusion
    fused: np.ndarray                      # after class-wise fusion
    final: np.ndarray                      # after calibration and/or equation (1)
    calibration: dict | None = None        # what was fitted, on which split
    notes: list[str] = field(default_factory=list)
    # every FamilyStage read for this output (scored clips, fit splits), so comparison rows reuse them
    stages: dict[tuple[str, ...], FamilyStage] = field(default_factory=dict, repr=False)

    @property
    def clip_ids(self) -> list[str]:
        return self.stage.clip_ids


def resolve_split(store, recipe: FusionRecipe, split: str) -> str:
    """Turn ``@val_split`` into the validation split named by the recipe's runs, and check it exists."""
    if split == VAL_SPLIT_REF:
        attrs = store.prediction_runs()
        found = {attrs[r].get("val_split") for r in recipe.runs if r in attrs}
        if len(found) != 1 or None in found:
            raise RecipeError(f"recipe {recipe.name!r}: '{VAL_SPLIT_REF}' needs every run to record the same "
                              f"val_split; found {sorted(map(str, found))}")
        split = found.pop()
    if split not in store.splits():
        raise RecipeError(f"recipe {recipe.name!r}: split {split!r} is not in the store; splits are {store.splits()}")
    return split


def validate_recipe(store, recipe: FusionRecipe) -> None:
    """Check the recipe's runs and classes against the store; errors list what exists."""
    runs = store.prediction_runs()
    missing = [r for r in recipe.runs if r not in runs]
    if missing:
        raise RecipeError(f"recipe {recipe.name!r}: prediction run(s) {missing} are not in the store; "
                          f"runs there: {sorted(runs) or '(none)'}"
                          + ("" if isinstance(store, StoreWithPredictions) else
                             " (runs predicted into a store of your own are read with --predictions MINE)"))
    if recipe.class_weights:
        selection_weights(list(recipe.families), store.classes, recipe.class_weights.select)
    _warn_if_mixed_families(recipe, runs)


def _warn_if_mixed_families(recipe: FusionRecipe, runs: dict[str, dict]) -> None:
    """Warn when a family averages runs that record different kinds (``family`` attr: audio, video, clip).

    Why: a family is averaged as one model and the rules treat it as one modality (audio's class
    selection, the replacement of video rows by audio rows); ``"A04": ["A01", "A02", "V03"]`` (a
    run name mistyped) fuses a video run as audio, and nothing else would say so. A warning, not an
    error: a family mixing kinds on purpose stays possible.
    """
    for family, members in recipe.families.items():
        kinds = {run: str(runs[run]["family"]) for run in members if runs[run].get("family")}
        if len(set(kinds.values())) > 1:
            listed = ", ".join(f"{run} ({kind})" for run, kind in kinds.items())
            warnings.warn(f"recipe {recipe.name!r}: family {family!r} averages runs recorded as different kinds: "
                          f"{listed}; its runs are averaged as one model and its rules apply to all of them "
                          f"(a run name mistyped?)", stacklevel=3)


def labels_of(store, clip_ids: Sequence[str]) -> np.ndarray:
    """Labels (int64, -1 unknown) of ``clip_ids`` in that order."""
    return np.asarray(store.labels, dtype=np.int64)[store.rows(clip_ids)]


def family_stage(store, recipe: FusionRecipe, clip_ids: Sequence[str]) -> FamilyStage:
    """Steps 1-3: aggregated runs, family means, replacement rule."""
    ids = list(clip_ids)
    run_probs = {run: load_clip_probs(store, run, ids, recipe.aggregation) for run in recipe.runs}
    means = {fam: average_models([run_probs[r] for r in runs]) for fam, runs in recipe.families.items()}
    probs, replaced = dict(means), {}
    if recipe.replacement:
        rep = recipe.replacement
        for target in rep.targets:
            probs[target], replaced[target] = replace_low_confidence(means[target], means[rep.source], rep.margin)
    return FamilyStage(ids, run_probs, means, probs, replaced)


def _cached_stage(store, recipe: FusionRecipe, clip_ids: Sequence[str],
                  stages: dict[tuple[str, ...], FamilyStage] | None) -> FamilyStage:
    """:func:`family_stage`, reused from ``stages`` when these clips were read already.

    Each stage reads every run of the recipe from the store; the confidence weights, the recipe's
    calibration and evaluate's comparison rows often fit on the same split.
    """
    if stages is None:
        return family_stage(store, recipe, clip_ids)
    key = tuple(clip_ids)
    if key not in stages:
        stages[key] = family_stage(store, recipe, key)
    return stages[key]


def _weights(store, recipe: FusionRecipe, eval_ids: Sequence[str],
             stages: dict[tuple[str, ...], FamilyStage]) -> np.ndarray:
    """Step 4's family x class weights: selection mask times fitted confidence weights."""
    families, classes = list(recipe.families), store.classes
    spec = recipe.class_weights
    if spec is None:
        return np.ones((len(families), len(classes)))
    weights = selection_weights(families, classes, spec.select)
    if spec.confidence_fit_split:
        fit_split = resolve_split(store, recipe, spec.confidence_fit_split)
        fit_ids = store.select(split=fit_split)
        check_disjoint(fit_ids, eval_ids, f"class-wise confidence weights (fit split {fit_split!r})")
        fit = _cached_stage(store, recipe, fit_ids, stages)
        fitted = ConfidenceWeights().fit(fit_ids, fit.family_probs, labels_of(store, fit_ids))
        weights = weights * fitted.for_clips(eval_ids)
    return weights


def _fuse(recipe: FusionRecipe, stage: FamilyStage, weights: np.ndarray) -> np.ndarray:
    return classwise_fuse(stage.family_probs, weights, renormalize=recipe.renormalize_fused)


def calibrate(store, recipe: FusionRecipe, calib: Calibration, stage: FamilyStage, fused: np.ndarray,
              weights: np.ndarray, stages: dict[tuple[str, ...], FamilyStage] | None = None
              ) -> tuple[np.ndarray, dict]:
    """Fit ``calib`` on its fit split and apply it to ``fused``, never scoring a clip with its own fit.

    When the fit split and the scored clips are disjoint, one calibrator is fitted. When they
    overlap, ``calib.cross_fit`` >= 2 calibrates them by location-disjoint folds
    (:func:`fusion.calibration.crossfit_apply`); otherwise a ``LeakageError`` is raised.

    ``stages`` (a :attr:`FusionOutput.stages`) supplies, and collects, the fit split's stage.

    Returns:
        (calibrated probabilities, a description of the fit: method, split, parameters).
    """
    fit_split = resolve_split(store, recipe, calib.fit_split)
    fit_ids = store.select(split=fit_split)
    _warn_if_training_split(store, recipe, fit_split)
    overlap = bool(set(fit_ids) & set(stage.clip_ids))
    if overlap and calib.cross_fit < 2:
        check_disjoint(fit_ids, stage.clip_ids,
                       f"{calib.method} calibration (fit split {fit_split!r}; set calibration.cross_fit >= 2 "
                       f"to cross-fit by location)")
    fit_stage = _cached_stage(store, recipe, fit_ids, stages)
    if calib.method == "stacking" and calib.stack_on == "families":
        fit_x = np.concatenate(list(fit_stage.family_probs.values()), axis=1)
        apply_x = np.concatenate(list(stage.family_probs.values()), axis=1)
    else:
        fit_x, apply_x = _fuse(recipe, fit_stage, weights), fused
    fit_y = labels_of(store, fit_ids)
    base = {"method": calib.method, "fit_split": fit_split, "stack_on": calib.stack_on, "n_fit": len(fit_ids)}
    if overlap:
        out, folds = crossfit_apply(calib.method, len(store.classes), calib.params, calib.cross_fit,
                                    (fit_ids, fit_x, fit_y, _groups(store, fit_ids)),
                                    (stage.clip_ids, apply_x, _groups(store, stage.clip_ids)))
        return out, {**base, "cross_fit": calib.cross_fit, "folds": folds}
    calibrator = make_calibrator(calib.method, len(store.classes), **calib.params)
    calibrator.fit(fit_ids, fit_x, fit_y)
    return calibrator.apply(stage.clip_ids, apply_x), {**calibrator.describe(), **base}


def _groups(store, clip_ids: Sequence[str]) -> list[str]:
    """Recording location of each clip (the clip id itself where the location is unknown)."""
    locations = store.column("location")[store.rows(clip_ids)]
    return [str(loc) or cid for loc, cid in zip(locations, clip_ids)]


def _warn_if_training_split(store, recipe: FusionRecipe, fit_split: str) -> None:
    attrs = store.prediction_runs()
    trained = [r for r in recipe.runs if attrs.get(r, {}).get("train_split") == fit_split]
    if trained:
        warnings.warn(f"calibration is fitted on {fit_split!r}, the training split of runs {trained}: "
                      f"their predictions there are over-confident; prefer their validation split",
                      stacklevel=3)


def check_output(recipe: FusionRecipe, final: np.ndarray, clip_ids: Sequence[str]) -> None:
    """The last guard before a submission, a report or a classify answer: every probability is finite.

    The runs' inputs are checked when read; this catches a step that made a NaN from finite inputs.
    """
    check_finite_rows(final, list(clip_ids), f"the output of recipe {recipe.name!r} (runs {', '.join(recipe.runs)})")


def training_overlap(store, recipe: FusionRecipe, clip_ids: Sequence[str]) -> dict[str, int]:
    """Per run, how many of ``clip_ids`` are in that run's recorded training split (should be 0)."""
    attrs, wanted, found = store.prediction_runs(), set(clip_ids), {}
    for run in recipe.runs:
        train = attrs.get(run, {}).get("train_split")
        if train and train in store.splits():
            shared = len(wanted & set(store.select(split=train)))
            if shared:
                found[run] = shared
    return found


def clip_ids_for(store, recipe: FusionRecipe, split: str | None = None,
                 clip_ids: Sequence[str] | None = None) -> tuple[str | None, list[str]]:
    """The evaluated clips: explicit ids, else the given split, else the recipe's ``eval_split``.

    Explicit ids must be distinct and not come with a split (as ``StoreDataset`` asks): a repeated
    id would come back as a repeated row of every output, a submission with two rows for one clip,
    and a split beside them would be named in notes ("chose their best epoch on it") about clips
    that need not be in it.
    """
    if clip_ids is not None:
        return None, _distinct_ids(clip_ids, split)
    split = resolve_split(store, recipe, split or recipe.eval_split)
    ids = store.select(split=split)
    if not ids:
        raise RecipeError(f"split {split!r} has no clips in the store")
    return split, ids


def _distinct_ids(clip_ids: Sequence[str], split: str | None) -> list[str]:
    """``clip_ids`` as a list, refused when a single string, repeated or given with a split."""
    check_id_sequence("fuse", clip_ids)
    if split is not None:
        raise ValueError(f"fuse: give either split ({split!r}) or clip_ids, not both")
    ids = list(clip_ids)
    seen: set[str] = set()
    twice = [c for c in ids if c in seen or seen.add(c)]
    if twice:
        raise ValueError(f"fuse: clip_ids: {sorted(set(twice))[:3]} given more than once; each clip is fused "
                         f"once and gives one output row (give each id once)")
    return ids


def fuse(store, recipe: FusionRecipe, split: str | None = None,
         clip_ids: Sequence[str] | None = None) -> FusionOutput:
    """Run the whole recipe on a split (or explicit clip ids) and return every intermediate."""
    validate_recipe(store, recipe)
    split, ids = clip_ids_for(store, recipe, split, clip_ids)
    stage = family_stage(store, recipe, ids)
    stages = {tuple(ids): stage}
    weights = _weights(store, recipe, ids, stages)
    fused = _fuse(recipe, stage, weights)
    final, described = fused, None
    if recipe.calibration:
        final, described = calibrate(store, recipe, recipe.calibration, stage, fused, weights, stages)
    if recipe.postprocess:
        final = clamp_eq1(final, renormalize=recipe.postprocess.renormalize)
    check_output(recipe, final, ids)
    notes = [f"{n} clip(s) of this split are in the training split of run {r}"
             for r, n in training_overlap(store, recipe, ids).items()]
    attrs = store.prediction_runs()
    selected = [r for r in recipe.runs if split and attrs[r].get("val_split") == split]
    if selected:
        notes.append(f"runs {selected} chose their best epoch on {split!r} itself (as the paper did on fold1): "
                     f"scores on it are slightly optimistic")
    return FusionOutput(recipe, split, store.classes, labels_of(store, ids), stage, weights, fused,
                        final, described, notes, stages)
