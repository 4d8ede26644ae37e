"""Rows fusion reads, fuses and reports are what they claim to be: stored rows are probability
distributions, each requested clip is one output row, the comparison rows equal what the recipe
really outputs, and a class selection cannot silently drop a family or a class.

Bugs these tests caught (each test says which):
- the "fused + eq. (1)" row of ``evaluate`` ignored ``postprocess.renormalize``: its numbers were
  not those of the recipe's output (``fuse``/``submit``) for that very recipe;
- ``fuse(..., clip_ids=[a, a])`` returned two rows for clip ``a`` (a submission with a clip twice);
- stored rows that are not distributions (scaled, sigmoid scores, zeros) were fused as probabilities;
- a family selected for no class (``"A04": []``) was read and silently counted for nothing;
- the median of segments that disagree could be a row of zeros, fused and scored as one.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featurestore import ClipRecord, Manifest, create_store
from featurestore.errors import MissingFeatureError
from fusion.evaluate import EQ1, FUSED, evaluate_recipe
from fusion.metrics import score
from fusion.pipeline import fuse
from fusion.postprocess import clamp_eq1
from fusion.recipe import FusionRecipe
from fusion.rules import selection_weights
from fusion.submission import read_submission
from fusion.submit import submit_recipe

CLASSES = ["park", "bus", "tram", "metro"]
SEG = 3
ATTRS = {"head": "embedding_mlp", "head_config": {}, "features": {}, "family": "audio"}
IDS = [f"c{i}" for i in range(6)]
RECIPE = {"name": "rows", "families": {"A04": ["A01"], "V04": ["V01"]}, "eval_split": "ev"}


def _store(path: Path, runs: dict[str, np.ndarray], rows: np.ndarray | None = None):
    """A store of six labelled clips (split ``ev``) holding ``runs`` ([6, SEG, 4] each) at ``rows``."""
    clips = [ClipRecord(clip_id=cid, label=CLASSES[i % 4], city="c", location=f"L{i % 3}", splits=frozenset({"ev"}))
             for i, cid in enumerate(IDS)]
    store = create_store(path, Manifest("rows", CLASSES, clips, audio_segments=SEG, video_frames=SEG))
    rows = np.arange(len(IDS)) if rows is None else rows
    for run, probs in runs.items():
        store.create_predictions(run, SEG, ATTRS)
        store.write_predictions(run, rows, probs[rows].astype(np.float32))
    return store


def _softmax(seed: int) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(0.0, 2.0, size=(len(IDS), SEG, len(CLASSES)))
    e = np.exp(logits)
    return e / e.sum(axis=2, keepdims=True)


# --------------------------------------------------------------------- 1. the eq. (1) comparison row
def test_eq1_row_is_the_recipe_output_when_postprocess_renormalizes(tiny_store, paper_recipe_dict, tmp_path):
    """Before: the row clamped without rescaling, so its log-loss was not the recipe's output's."""
    recipe = FusionRecipe.from_dict({**paper_recipe_dict, "postprocess": {"method": "eq1", "renormalize": True}})
    ev = evaluate_recipe(tiny_store, recipe, "fold1_evaluate")
    out = fuse(tiny_store, recipe, "fold1_evaluate")
    np.testing.assert_array_equal(ev.variant_probs[EQ1], out.final)
    np.testing.assert_allclose(ev.variant_probs[EQ1].sum(axis=1), 1.0)
    assert ev.final_variant == EQ1
    expected = score(out.final, out.labels, tiny_store.classes, renormalize=recipe.metric_renormalize)
    assert ev.variants[EQ1].logloss == pytest.approx(expected.logloss)
    assert "rescaled" in ev.variant_notes[EQ1]
    # what submit writes for that recipe is the row's probabilities, clip by clip
    sub = submit_recipe(tiny_store, recipe, "fold1_evaluate", tmp_path / "s.csv")
    assert sub[1] == len(out.clip_ids)
    written = read_submission(tmp_path / "s.csv", tiny_store.classes)
    assert written.filenames == [f"audio/{c}.wav" for c in out.clip_ids]
    np.testing.assert_allclose(written.probs, ev.variant_probs[EQ1], atol=1e-6)


def test_eq1_row_without_postprocess_is_the_papers_equation(tiny_store, paper_recipe_dict):
    recipe = FusionRecipe.from_dict({**paper_recipe_dict, "postprocess": None})
    ev = evaluate_recipe(tiny_store, recipe, "fold1_evaluate")
    np.testing.assert_array_equal(ev.variant_probs[EQ1], clamp_eq1(ev.variant_probs[FUSED]))
    assert ev.final_variant == FUSED and EQ1 not in ev.variant_notes


# ----------------------------------------------------------------------------- 2. explicit clip ids
def test_fuse_refuses_a_repeated_clip_id_naming_it(tiny_store, paper_recipe_dict):
    """Before: two identical rows for the clip, silently."""
    recipe = FusionRecipe.from_dict(paper_recipe_dict)
    a, b = tiny_store.select(split="fold1_evaluate")[:2]
    with pytest.raises(ValueError, match=rf"clip_ids: \['{a}'\] given more than once"):
        fuse(tiny_store, recipe, clip_ids=[a, b, a])
    assert fuse(tiny_store, recipe, clip_ids=[b, a]).clip_ids == [b, a]  # distinct ids, in the given order


def test_fuse_refuses_clip_ids_given_with_a_split(tiny_store, paper_recipe_dict):
    """Before: the split was kept and named in the notes about clips that need not be in it."""
    clip = tiny_store.select(split="fold1_train")[0]
    with pytest.raises(ValueError, match=r"give either split \('fold1_evaluate'\) or clip_ids, not both"):
        fuse(tiny_store, FusionRecipe.from_dict(paper_recipe_dict), "fold1_evaluate", clip_ids=[clip])


def test_fuse_refuses_one_string_as_clip_ids(tiny_store, paper_recipe_dict):
    clip = tiny_store.select(split="fold1_evaluate")[0]
    with pytest.raises(TypeError, match="expected a list of clip ids"):
        fuse(tiny_store, FusionRecipe.from_dict(paper_recipe_dict), clip_ids=clip)


# -------------------------------------------------------------- 3. stored rows must be distributions
def _spoiled(kind: str) -> np.ndarray:
    probs = _softmax(1)
    if kind == "scaled":
        probs[2] *= 0.8                       # values in [0, 1], rows summing to 0.8
    elif kind == "sigmoid":
        probs[2, 1] = 1 / (1 + np.exp(-np.array([0.3, -1.0, 2.0, 0.1])))  # one segment of sigmoid scores
    elif kind == "zeros":
        probs[2, 0] = 0.0                     # a segment never filled in
    return probs


@pytest.mark.parametrize("kind", ["scaled", "sigmoid", "zeros"])
def test_stored_rows_that_are_not_distributions_are_refused_naming_run_and_clip(tmp_path, kind):
    """Before: every one of them was fused and scored as probabilities (renormalised on the way)."""
    with _store(tmp_path / "s.zarr", {"A01": _softmax(0), "V01": _spoiled(kind)}) as store:
        with pytest.raises(ValueError, match=r"prediction run 'V01' holds rows that are not probability "
                                             r"distributions .* for 1 clip\(s\): c2; first: clip 'c2' segment"):
            fuse(store, FusionRecipe.from_dict(RECIPE), "ev")


def test_float32_and_half_precision_softmax_rows_are_accepted(tmp_path):
    """The tolerance refuses mistakes, not rounding: a float16 softmax cast to float32 is a distribution."""
    half = _softmax(1).astype(np.float16).astype(np.float32)
    assert np.abs(half.sum(axis=2) - 1).max() > 1e-5  # really off by more than float32 rounding
    with _store(tmp_path / "s.zarr", {"A01": _softmax(0), "V01": half}) as store:
        out = fuse(store, FusionRecipe.from_dict(RECIPE), "ev")
    assert out.final.shape == (len(IDS), len(CLASSES))


def test_median_that_is_zero_for_every_class_is_refused(tmp_path):
    """Three segments sure of three different classes: the median is 0 everywhere. Before: that zero
    row was fused as the run's answer (renormalising a zero row leaves it zero)."""
    probs = _softmax(1)
    probs[4] = np.eye(len(CLASSES))[:SEG]
    with _store(tmp_path / "s.zarr", {"A01": _softmax(0), "V01": probs}) as store:
        with pytest.raises(ValueError, match=r"prediction run 'V01': the median of the segments is 0 for every "
                                             r"class for 1 clip\(s\): c4"):
            fuse(store, FusionRecipe.from_dict({**RECIPE, "aggregation": "median"}), "ev")


def test_runs_over_different_clip_sets_are_refused_not_filled(tmp_path):
    """Not a fault (checked): a run that did not predict some evaluated clips raises the store's error."""
    with _store(tmp_path / "s.zarr", {"A01": _softmax(0)}) as store:
        store.create_predictions("V01", SEG, ATTRS)
        store.write_predictions("V01", np.arange(4), _softmax(1)[:4].astype(np.float32))
        with pytest.raises(MissingFeatureError):
            fuse(store, FusionRecipe.from_dict(RECIPE), "ev")


# ------------------------------------------------------------------------------- 4. class selection
def test_a_family_selected_for_no_class_is_refused(tiny_store, paper_recipe_dict):
    """Before: ``"A04": []`` gave A04 zero weight everywhere; its runs were read and ignored."""
    recipe = FusionRecipe.from_dict({**paper_recipe_dict, "class_weights": {"select": {"A04": []}}})
    with pytest.raises(ValueError, match="class selection for 'A04' is empty"):
        fuse(tiny_store, recipe, "fold1_evaluate")


def test_a_selection_leaving_a_class_to_no_family_names_the_classes():
    """Before: refused only when fusing, by column index (``class columns [2, 3]``), not by name."""
    with pytest.raises(ValueError, match=r"leaves classes \['tram', 'metro'\] with no family"):
        selection_weights(["A04", "V04"], CLASSES, {"A04": ["park"], "V04": ["bus"]})
