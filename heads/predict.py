"""Prediction: run a trained head over a store and write ``predictions/<run>/probs`` back into it.

Probabilities are written per clip and segment, ``[n_clips, n_segments, n_classes]``, so fusion can
aggregate segments however it likes. The run's attributes say what produced them: the head and its
config, the feature sets with their fingerprints, the splits, the ensemble family, and whether any
weights involved were random (so no report presents a random-weights result as a real one).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from featurestore.encoders import resolve_device
from featurestore.provenance import is_random_weights
from featurestore.torchdata import StoreDataset
from heads._registry import Head, create_head, head_class
from heads.checkpoint import load_weights, read_json, run_file
from heads.errors import FeatureFingerprintError
from heads.evaluate import clip_outputs
from heads.train import class_features_fingerprint

FLUSH_CLIPS = 4096


@dataclass
class PredictResult:
    """What `predict` wrote."""

    run: str
    n_clips: int
    n_skipped: int
    n_segments: int
    attrs: dict


def load_head(run_dir: str | Path, device: str | torch.device = "cpu", weights: str = "best") -> tuple[Head, dict]:
    """A trained head (eval mode) and its ``run.json``.

    Args:
        run_dir: a directory written by `heads.train`.
        device: where to put the head (``"auto"``, ``"cpu"``, ``"cuda[:N]"`` or a torch.device).
        weights: ``"best"`` (best epoch by validation accuracy) or ``"last"`` (last completed epoch).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").exists():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a training run directory (no run.json)")
    info = read_json(run_dir / "run.json")
    head = create_head(info["head"], **head_class(info["head"]).loading_config(info["head_config"]))
    if weights == "best":
        path = run_dir / "best.safetensors"
    elif weights == "last":
        path = run_file(run_dir, read_json(run_dir / "state.json")["checkpoint"])
    else:
        raise ValueError(f"weights must be 'best' or 'last', got {weights!r}")
    state, _ = load_weights(path)
    head.load_state_dict(state)
    return head.to(resolve_device(device)).eval(), info


def check_fingerprints(store: Any, info: dict, run_dir: str | Path) -> dict[str, Any]:
    """Refuse feature sets (and class features) whose fingerprint differs from the ones trained on.

    Returns:
        The store's ``FeatureInfo`` of each feature set the head was trained on, by name.
    """
    sets = {name: store.feature_info(name) for name in info["features"]}  # raises UnknownFeatureError
    for name, trained in info["features"].items():
        if sets[name].fingerprint != trained:
            raise FeatureFingerprintError(str(run_dir), name, trained, sets[name].fingerprint)
    for name, trained in (info.get("class_features") or {}).items():
        if name in store.class_feature_sets():
            attrs = store.get_class_features(name)[1]
            found = class_features_fingerprint(attrs)
            if found != trained:
                raise FeatureFingerprintError(str(run_dir), name, trained, found)
    return sets


def class_order(run_classes: list[str] | None, store_classes: list[str], run_dir: str | Path) -> np.ndarray | None:
    """Columns of the head's output in the store's class order, matched by name.

    Returns:
        ``order`` such that ``probs[..., order]`` lists the store's classes in the store's order, or
        None when the orders already agree (or the run predates recording its classes).

    Raises:
        ValueError: the run's class names and the store's are not the same set, or neither the
            run nor the store has classes (a store from a manifest without labels takes the
            run's, see ``_predict``; a run too old to record them cannot give them).
    """
    if not store_classes and not run_classes:
        raise ValueError(f"the store has no classes (made from a manifest without labels) and run {str(run_dir)!r} "
                         f"does not record the classes it was trained on; extract with --classes A,B,C "
                         f"(extract(..., classes=[...])) to give the store its classes")
    if run_classes is None or list(run_classes) == list(store_classes):
        return None
    run, stored = list(run_classes), list(store_classes)
    if sorted(run) != sorted(stored) or len(set(run)) != len(run):
        only_run = sorted(set(run) - set(stored))
        only_store = sorted(set(stored) - set(run))
        raise ValueError(f"run {str(run_dir)!r} was trained on classes {run} but the store has {stored}"
                         f" (only in the run: {only_run or 'none'}; only in the store: {only_store or 'none'})")
    position = {name: i for i, name in enumerate(run)}
    return np.asarray([position[name] for name in stored], dtype=np.int64)


def prediction_attrs(info: dict, family: str | None = None) -> dict:
    """The attributes fusion reads from ``predictions/<run>``."""
    train = info.get("train", {})
    feature_info = info.get("feature_info", {})
    backbone = info.get("backbone_weights")
    random = any(v.get("random_weights") for v in feature_info.values()) or \
        is_random_weights({"weights": backbone})
    return {
        "head": info["head"],
        "head_config": info["head_config"],
        "features": {name: info["features"][name] for name in train.get("features", info["features"])},
        "class_features": dict(info.get("class_features") or {}),
        "train_split": train.get("train_split"),
        "val_split": train.get("val_split"),
        "family": family or train.get("family") or _family(info),
        "random_weights": bool(random),
        "weights_identity": {name: v.get("weights_identity") for name, v in feature_info.items()},
        "backbone_weights": backbone,
    }


def _family(info: dict) -> str:
    """Ensemble family from the head and its input feature sets: audio, clip or video."""
    default = head_class(info["head"]).default_family
    if default:
        return default
    kinds = set()
    for name in info["train"]["features"]:
        meta = info.get("feature_info", {}).get(name, {})
        encoder = str(meta.get("encoder") or name)
        if encoder.startswith("clip/"):
            kinds.add("clip")
        elif meta.get("modality") == "audio" or encoder.startswith("logmel"):
            kinds.add("audio")
        else:
            kinds.add("video")
    return kinds.pop() if len(kinds) == 1 else "+".join(sorted(kinds))


def predict(store: Any, run_dir: str | Path, *, name: str | None = None, split: str | list[str] | None = None,
            batch_size: int | None = None, device: str = "auto", overwrite: bool = False,
            family: str | None = None, weights: str = "best", progress: bool = True) -> PredictResult:
    """Run the head trained in ``run_dir`` over the store and write ``predictions/<name>/probs``.

    Args:
        store: an open store (mode ``"a"``) or the path of an existing store (opened with mode ``"a"``).
        run_dir: the training run directory.
        name: prediction run name (default: the run directory's name).
        split: predict only this split's clips (default: every clip whose features are done).
        batch_size: clips per forward pass (default: about 4 training batches of segments).
        overwrite: replace an existing prediction run of that name.
        family: ensemble family recorded in the attrs (default: the training config's, else derived).
        weights: ``"best"`` or ``"last"`` checkpoint.
    """
    own = isinstance(store, (str, Path))
    if own:
        from featurestore.store import open_store

        open_store(store, mode="r").close()  # mode "a" would create a missing store: a typo must fail instead
        store = open_store(store, mode="a")
    try:
        return _predict(store, Path(run_dir), name or Path(run_dir).name, split, batch_size, device,
                        overwrite, family, weights, progress)
    finally:
        if own:
            store.close()


def _predict(store: Any, run_dir: Path, name: str, split: Any, batch_size: int | None, device: str,
             overwrite: bool, family: str | None, weights: str, progress: bool) -> PredictResult:
    dev = resolve_device(device)
    head, info = load_head(run_dir, dev, weights)
    sets = check_fingerprints(store, info, run_dir)
    if not store.classes and info.get("classes"):
        store.set_classes(info["classes"])  # a store of unlabelled clips takes the classes the head predicts
    order = class_order(info.get("classes"), store.classes, run_dir)
    features = list(info["train"]["features"])  # the head's input order (the JSON dict is key-sorted)
    segments = {sets[f].n_segments for f in features}
    if len(segments) != 1:
        raise ValueError(f"feature sets {features} have different segment counts {sorted(segments)}; "
                         f"a head predicts one row per segment, so they must match")
    n_segments = segments.pop()
    clips = batch_size or max(1, 4 * head.default_batch_size // n_segments)
    data = StoreDataset(store, features, split=split, level="clip", batch_size=clips, missing="skip")
    attrs = prediction_attrs(info, family)
    # absolute, so that `fusion classify` finds the run from any working directory
    attrs.update({"run_dir": str(run_dir.resolve()), "weights": weights, "n_segments": n_segments})
    store.create_predictions(name, n_segments, attrs, overwrite=overwrite)
    rows, probs, written = [], [], 0
    with tqdm(total=len(data.rows), desc=f"predict {name}", unit="clip", disable=not progress) as bar:
        for out in clip_outputs(head, data, dev):
            rows.append(out.rows)
            probs.append(out.probs if order is None else out.probs[..., order])
            bar.update(len(out.rows))
            if sum(len(r) for r in rows) >= FLUSH_CLIPS:
                written += _flush(store, name, rows, probs)
        written += _flush(store, name, rows, probs)
    line = f"predict {name}: wrote {written} clip(s) x {n_segments} segment(s) to predictions/{name}" \
        + (f"; skipped {data.n_skipped} clip(s) whose features are not done" if data.n_skipped else "")
    tqdm.write(line, file=sys.stderr)  # stderr: stdout holds only the command's result (--json)
    return PredictResult(name, written, data.n_skipped, n_segments, attrs)


def _flush(store: Any, name: str, rows: list[np.ndarray], probs: list[np.ndarray]) -> int:
    if not rows:
        return 0
    r, p = np.concatenate(rows), np.concatenate(probs)
    store.write_predictions(name, r, p)
    rows.clear()
    probs.clear()
    return len(r)
