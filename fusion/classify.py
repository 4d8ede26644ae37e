"""``fusion classify``: a recipe's fusion of new recordings, with everything fitted on the store.

For files that are in no store, each run of the recipe is asked for its segment probabilities, and
those go through the same steps ``fusion evaluate`` and ``fusion submit`` apply to stored runs
(:mod:`fusion.pipeline`): segment aggregation, family means and the replacement rule
(``family_stage``), selection masks and confidence weights fitted on the store (``_weights``),
class-wise fusion, calibration fitted on the store's fit split (``calibrate``) and equation (1).

Why a subprocess per run: fusion never imports ``heads`` (dependencies point ``heads ->
featurestore`` and ``fusion -> featurestore`` only; fusion reads predictions, it does not run
models). A prediction run records the training run it came from (its attrs ``run_dir`` and
``weights``), so for each run fusion calls ``python -m heads classify RUN_DIR FILE... --json`` with
the same interpreter and reads its JSON: per clip the segment probabilities, in the run's class
order, which are mapped onto the store's classes by name. The run directory must still hold the head
that made the stored predictions (same feature fingerprints), else fusion refuses.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.atomic_files import atomic_write
from featurestore.clip_files import ClipFiles, group_files
from fusion._validate import NonFiniteProbabilitiesError, name_some
from fusion.pipeline import _fuse, _weights, calibrate, check_output, family_stage, validate_recipe
from fusion.postprocess import clamp_eq1
from fusion.recipe import FusionRecipe, RecipeError
from fusion.runinfo import describe_runs


class ClassifyError(ValueError):
    """A run of the recipe could not classify the files (its run directory, or heads' own error)."""


@dataclass
class RunProbs:
    """One run's answer for the files: segment probabilities in the store's class order.

    Attributes:
        run: prediction run name in the store.
        run_dir: the training run directory that was asked.
        segment_probs: clip name -> float32 ``[n_segments, n_classes]``.
        errors: clip name -> why the run could not classify it.
        seconds: how long the subprocess took (loading, encoding and the head).
    """

    run: str
    run_dir: str
    segment_probs: dict[str, np.ndarray]
    errors: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class FusedFiles:
    """The recipe's output for new files.

    Attributes:
        recipe: the recipe's name.
        classes: the store's classes, the order of every probability vector.
        clips: the clips every run classified, in the order given.
        probs: float ``[n_clips, n_classes]``: the recipe's final output (after calibration / eq. (1)).
        runs: run -> the run directory that classified the files.
        random_weights: run -> its inputs with random weights (empty lists are left out).
        errors: clip name -> why it is not in the output.
        calibration: what was fitted on the store, or None.
    """

    recipe: str
    classes: list[str]
    clips: list[ClipFiles]
    probs: np.ndarray
    runs: dict[str, str]
    random_weights: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    calibration: dict | None = None

    def top(self) -> list[tuple[str, float]]:
        best = self.probs.argmax(axis=1) if len(self.probs) else np.zeros(0, dtype=int)
        return [(self.classes[int(i)], float(self.probs[k, i])) for k, i in enumerate(best)]

    @property
    def exit_code(self) -> int:
        return 1 if self.errors else 0

    def to_dict(self) -> dict[str, Any]:
        clips = [{"clip": c.name, "files": [str(f) for f in c.files], "top_class": label, "probability": p,
                  "probs": [float(v) for v in probs]}
                 for c, (label, p), probs in zip(self.clips, self.top(), self.probs)]
        return {"recipe": self.recipe, "classes": list(self.classes), "runs": dict(self.runs),
                "random_weights": dict(self.random_weights), "calibration": self.calibration,
                "clips": clips, "errors": dict(self.errors)}

    def write_csv(self, path: str | Path) -> Path:
        """``clip,files,top_class,probability,<class>...`` (the columns ``heads classify --out`` writes).

        Written to a temp name and renamed: a full disk leaves the previous file as it was
        (``OutputWriteError`` naming the file).
        """
        path = Path(path)
        with atomic_write(path, "w", newline="", encoding="utf-8") as f:  # clip names are file stems: any letters
            out = csv.writer(f)
            out.writerow(["clip", "files", "top_class", "probability", *self.classes])
            for clip, (label, p), probs in zip(self.clips, self.top(), self.probs):
                # .8g: a float32 probability whole (%.6f wrote a calibrated 1e-9 as 0.000000)
                out.writerow([clip.name, clip.describe(), label, f"{p:.8g}", *(f"{v:.8g}" for v in probs)])
        return path


#: What the fitted steps call a new clip: ``/`` is in no clip id (``manifest.check_clip_id``), so a
#: file named like a stored clip is never taken for it (a leakage refusal, or a location looked up).
NEW_CLIP = "new file/"


class _NewClips:
    """New clips' segment probabilities, read the way the pipeline reads a store's predictions."""

    def __init__(self, runs: Mapping[str, RunProbs]):
        self.runs = runs

    def get_predictions(self, run: str, clip_ids: Sequence[str]) -> np.ndarray:
        return np.stack([self.runs[run].segment_probs[c] for c in clip_ids])


def classify_files(store, recipe: FusionRecipe, files: Iterable[str | Path], device: str = "auto",
                   run_dirs: Mapping[str, str | Path] | None = None, progress: bool = True) -> FusedFiles:
    """Fuse the recipe's runs on files that are in no store, fitting on ``store`` as the recipe says.

    Args:
        store: the open store holding the recipe's prediction runs (and its fit splits).
        recipe: the fusion recipe.
        files: audio and/or video files; files sharing a stem form one clip.
        device: passed to ``heads classify`` (``auto``, ``cpu``, ``cuda[:N]``).
        run_dirs: run -> training run directory, overriding the run's recorded ``run_dir``.
        progress: one line per run on stderr.

    Raises:
        FilesError: missing files or unknown kinds (before any run is asked).
        RecipeError: a run is not in the store, or records no run directory.
        ClassifyError: a run directory is gone or holds another head, or heads refused the files.
        NonFiniteProbabilitiesError: a run's answer, or the fused output, holds a NaN or an infinity.
    """
    validate_recipe(store, recipe)
    clips = group_files(files)
    attrs = store.prediction_runs()
    unknown = sorted(set(run_dirs or {}) - set(recipe.runs))
    if unknown:
        raise RecipeError(f"run directories given for {unknown}, which are not runs of recipe {recipe.name!r} "
                          f"({recipe.runs})")
    answers = {}
    for run in recipe.runs:
        answers[run] = ask_heads(run, attrs[run], clips, store.classes, device, (run_dirs or {}).get(run))
        if progress:
            a = answers[run]
            print(f"fusion classify: run {run} ({a.run_dir}): {len(a.segment_probs)} clip(s) in {a.seconds:.1f} s"
                  + (f", {len(a.errors)} failed" if a.errors else ""), file=sys.stderr)
    errors: dict[str, str] = {}
    for run, answer in answers.items():
        for name, message in answer.errors.items():
            errors.setdefault(name, f"run {run}: {message}")
    ok = [c for c in clips if all(c.name in a.segment_probs for a in answers.values())]
    for clip in clips:
        if clip not in ok and clip.name not in errors:
            errors[clip.name] = "not classified by every run of the recipe"
    probs, described = fuse_new_clips(store, recipe, [c.name for c in ok], answers)
    random = {run: info.random_features for run, info in describe_runs(store, recipe.runs).items()
              if info.random_features}
    return FusedFiles(recipe.name, list(store.classes), ok, probs, {r: a.run_dir for r, a in answers.items()},
                      random, errors, described)


def fuse_new_clips(store, recipe: FusionRecipe, names: Sequence[str],
                   answers: Mapping[str, RunProbs]) -> tuple[np.ndarray, dict | None]:
    """The recipe's final probabilities for new clips (the steps of :func:`fusion.pipeline.fuse`).

    Everything fitted (confidence weights, calibration) is fitted on the store's clips; the new
    clips only pass through, even a file named like a clip of a fit split: its answer is a
    prediction, never scored, so there is nothing to leak (and it is not that stored clip).
    """
    if not names:
        return np.zeros((0, len(store.classes))), None
    stage = family_stage(_NewClips(answers), recipe, list(names))  # (its errors name the files' clips)
    stage = replace(stage, clip_ids=[NEW_CLIP + name for name in names])  # for the fitted steps
    stages: dict = {}  # the fit splits' stages, read from the store
    weights = _weights(store, recipe, stage.clip_ids, stages)
    fused = _fuse(recipe, stage, weights)
    final, described = fused, None
    if recipe.calibration:
        final, described = calibrate(store, recipe, recipe.calibration, stage, fused, weights, stages)
    if recipe.postprocess:
        final = clamp_eq1(final, renormalize=recipe.postprocess.renormalize)
    check_output(recipe, final, names)
    return final, described


def ask_heads(run: str, attrs: Mapping[str, Any], clips: Sequence[ClipFiles], classes: Sequence[str],
              device: str = "auto", run_dir: str | Path | None = None) -> RunProbs:
    """Run ``python -m heads classify RUN_DIR FILE... --json`` for one prediction run and check its answer.

    Raises:
        RecipeError: the run records no run directory (it was not written by ``heads predict``).
        ClassifyError: the directory is gone, heads refused (its one-line error is quoted), or the
            directory now holds a head trained on other features, or on other classes.
        NonFiniteProbabilitiesError: the answer holds a NaN or infinity for some clips (:func:`read_answer`).
    """
    where = run_dir or attrs.get("run_dir")
    if not where:
        raise RecipeError(f"prediction run {run!r} records no run_dir (it was not written by 'heads predict'); "
                          f"give it with --run-dir {run}=PATH")
    if not Path(where).is_dir():
        raise ClassifyError(f"prediction run {run!r} was made by the training run {where}, which is not there; "
                            f"give its new place with --run-dir {run}=PATH")
    files = [str(f) for c in clips for f in c.files]
    command = [sys.executable, "-m", "heads", "classify", str(where), *files, "--json", "--quiet",
               "--device", device, "--weights", str(attrs.get("weights") or "best")]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    answer = _json_object(done.stdout)
    if done.returncode not in (0, 1) or answer is None:
        raise ClassifyError(_failure(run, where, done))
    return read_answer(run, where, attrs, answer, classes, seconds)


def _json_object(text: str) -> dict | None:
    """The JSON object printed, or None: exit code 1 is also heads' answer with failed files, and
    only a JSON answer tells it from a crash."""
    try:
        answer = json.loads(text)
    except ValueError:
        return None
    return answer if isinstance(answer, dict) else None


def _failure(run: str, where: str | Path, done: subprocess.CompletedProcess) -> str:
    """One line for a ``heads classify`` that gave no answer: its one-line error when it printed one,
    else the last lines of its stderr (a crash's traceback ends with the exception)."""
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if "error:" in line), None)
    if reason is None:
        reason = "heads classify printed no answer" + (f"; its stderr ends: {' | '.join(lines[-3:])}"
                                                         if lines else " and nothing on stderr")
    return f"run {run!r} ({where}): {reason} (exit code {done.returncode})"


def read_answer(run: str, where: str | Path, attrs: Mapping[str, Any], answer: Mapping[str, Any],
                classes: Sequence[str], seconds: float = 0.0) -> RunProbs:
    """Check the answer ``heads classify --json`` printed (parsed) and map its probabilities onto ``classes``.

    Raises:
        ClassifyError: the answer comes from another head (other features, weights or classes).
        NonFiniteProbabilitiesError: it holds a NaN or an infinity for some clips (named): a
            diverged head; fusing it would print and write ``nan``.
    """
    _check_answer(run, where, attrs, answer, classes)
    order = [answer["classes"].index(name) for name in classes]
    probs = {c["clip"]: np.asarray(c["segment_probs"], dtype=np.float32)[:, order] for c in answer["clips"]}
    bad = [name for name, p in probs.items() if not np.isfinite(p).all()]
    if bad:
        raise NonFiniteProbabilitiesError(f"the answer of run {run!r} ({where}) holds non-finite probabilities "
                                          f"(NaN/inf) for {len(bad)} clip(s): {name_some(bad)}; nothing was written")
    return RunProbs(run, str(where), probs, dict(answer.get("errors") or {}), seconds)


def _check_answer(run: str, where: str | Path, attrs: Mapping[str, Any], answer: Mapping[str, Any],
                  classes: Sequence[str]) -> None:
    """The answering head must be the one behind the stored run: same features, same weights file
    (its sha256, recorded by ``heads predict``), same classes."""
    recorded = dict(attrs.get("features") or {})
    if recorded and dict(answer.get("features") or {}) != recorded:
        raise ClassifyError(f"run {run!r}: {where} now holds a head trained on feature sets "
                            f"{answer.get('features')}, but predictions/{run} were made from {recorded}; "
                            f"predict again or point --run-dir {run}=PATH at the run that made them")
    recorded_sha = attrs.get("weights_sha256")
    if recorded_sha and answer.get("weights_sha256") != recorded_sha:
        raise ClassifyError(f"run {run!r}: {where} now holds other {answer.get('weights') or 'best'} weights "
                            f"(sha256 {str(answer.get('weights_sha256'))[:12]}...) than the ones predictions/{run} "
                            f"were made with ({recorded_sha[:12]}...): trained again since? predict again, or point "
                            f"--run-dir {run}=PATH at the run that made them")
    if sorted(answer.get("classes") or []) != sorted(classes):
        raise ClassifyError(f"run {run!r}: {where} classifies into {answer.get('classes')}, the store has "
                            f"{list(classes)}")
