"""Classify new recordings with a trained run: files -> the run's encoders -> the head -> probabilities.

``Classifier(run_dir)`` loads the head once and rebuilds, once, the encoders that made its training
features (``featurestore.encode_files.FileEncoder``, from the provenance recorded with each feature
set: spec and weights identity, preprocessing, segment layout, stored dtype). ``classify(files)`` then
decodes and encodes the files exactly as extraction would have stored them (same segments and
frames, same cast to float16), runs the head per segment (``TrainedHead.predict_proba``) and averages
the segments per clip, as ``heads predict`` followed by fusion's default aggregation (``mean``) does.

Files form clips by stem: ``x.wav x.mp4`` is one clip ``x`` with audio and video; a clip lacking a
modality that one of the run's feature sets needs is refused in one line naming the file and the
feature set. A file that cannot be decoded fails its clip only (exit code 1 on the command line),
and so does a clip whose features or probabilities hold NaN or infinity: no non-finite probability
is ever printed or written. Sizes given by the caller (segments, frames, batch size, workers) are
checked against :data:`LIMITS` before anything is allocated; the CSV is written atomically
(``featurestore.atomic_files``: the previous file stays if the disk is full).

Where the provenance comes from: runs record a copy of it in ``run.json`` (``feature_provenance``);
older runs are read from a store holding the same feature sets (``store=``, else the store the run was
trained on). Either way it must have the fingerprint the run was trained with.
"""
from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featurestore.atomic_files import atomic_write
from featurestore.checks import is_int_in, non_finite_rows
from featurestore.clip_files import AUDIO_SUFFIXES, VIDEO_SUFFIXES
from featurestore.manifest import MAX_AUDIO_SEGMENTS, MAX_VIDEO_FRAMES
from featurestore.encode_files import DEFAULT_BATCH_CLIPS, ClipFiles, FileEncoder, group_files
from featurestore.provenance import file_sha256, fingerprint, fingerprint_matches, is_random_weights, weights_identity
from heads.checkpoint import CheckpointError, read_json
from heads.errors import FeatureFingerprintError
from heads.trained import TrainedHead, weights_path

#: (lowest, highest) value accepted for each size a caller gives, checked before anything is
#: allocated; segments and frames take the dataset readers' maxima (featurestore.manifest).
LIMITS: dict[str, tuple[int, int]] = {"segments": (1, MAX_AUDIO_SEGMENTS), "frames": (1, MAX_VIDEO_FRAMES),
                                      "batch_size": (1, 1024), "num_workers": (0, 64)}


def check_sizes(sizes: Mapping[str, Any], names: Mapping[str, str] | None = None) -> None:
    """Refuse a size outside :data:`LIMITS` (None means "as recorded"), naming it as ``names`` says.

    Raises:
        ValueError: ``<name> must be an integer from LOW to HIGH, got VALUE``.
    """
    for key, value in sizes.items():
        if value is None:
            continue
        low, high = LIMITS[key]
        if not is_int_in(value, low, high):
            raise ValueError(f"{(names or {}).get(key, key)} must be an integer from {low} to {high}, got {value!r}")


def check_output(path: str | Path, run_dir: str | Path, store: str | Path | None = None) -> Path:
    """``--out`` as a CSV to write, refused before any model is built when it is a directory, has an
    audio or video ending (``--out a.wav b.wav`` takes a recording for the flag's value, and would
    replace it by the CSV), lies in the run directory (it would overwrite the run's own files), or is
    (or lies in) the local store the run was trained on, or ``store`` (``--out store.h5`` would
    replace the features of every run with the CSV).

    Raises:
        ValueError: naming the path and what is wrong with it.
    """
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a directory; expected a CSV file name such as "
                         f"{str(out / 'probs.csv')!r}")
    if out.suffix.lower() in AUDIO_SUFFIXES + VIDEO_SUFFIXES:
        raise ValueError(f"--out {str(out)!r} names an audio or video file; the output is a CSV: give a .csv name "
                         f"(was a recording meant as an input?)")
    run = Path(run_dir).resolve()
    if run == out.resolve() or run in out.resolve().parents:
        raise ValueError(f"--out {str(out)!r} lies in the run directory {str(run_dir)!r}; write the CSV elsewhere")
    for location in filter(None, (_training_store(run_dir), store)):
        local = str(location).removeprefix("file://")
        if "://" in local:
            continue  # a remote store: no local file to damage
        kept = Path(local).resolve()
        if kept == out.resolve() or kept in out.resolve().parents:
            raise ValueError(f"--out {str(out)!r} is {'the store' if kept == out.resolve() else 'inside the store'} "
                             f"{str(location)!r} (the run's features); writing the CSV there would damage it: "
                             f"write it elsewhere")
    return out


def _training_store(run_dir: str | Path) -> str | None:
    """The store the run was trained on, as ``run.json`` records it (``train.store``), or None.

    Read here, before the head is loaded, only to keep ``--out`` off it; a ``run.json`` that cannot
    be read is left to :class:`Classifier`, which says what is wrong with it.
    """
    try:
        info = read_json(Path(run_dir) / "run.json")
    except (OSError, CheckpointError):
        return None
    train = info.get("train") if isinstance(info, dict) else None
    store = train.get("store") if isinstance(train, dict) else None
    return store if isinstance(store, str) and store else None


@dataclass
class ClassifyResult:
    """Probabilities of the clips that worked, and why the others did not.

    Attributes:
        run_dir: the run that classified them.
        classes: class names, in the order of every probability vector.
        clips: the classified clips, in the order given.
        segment_probs: float32 ``[n_clips, n_segments, n_classes]``, per segment (frame) softmax.
        errors: clip name -> why it could not be classified (a file that does not decode).
        features: feature set -> fingerprint the run was trained on.
        weights_identity: feature set -> ``openai``, ``file:ab12..``, ``RANDOM(seed=0)``...
        random_weights: feature sets (and ``backbone:<name>``) whose weights are random: such
            probabilities carry no pretrained knowledge.
        weights: the run's ``best`` or ``last`` checkpoint.
        weights_sha256: the sha256 of that checkpoint's file, as ``heads predict`` records it with
            a prediction run (so fusion can tell the head behind stored predictions from another).
    """

    run_dir: str
    classes: list[str]
    clips: list[ClipFiles]
    segment_probs: np.ndarray
    errors: dict[str, str] = field(default_factory=dict)
    features: dict[str, str] = field(default_factory=dict)
    weights_identity: dict[str, str] = field(default_factory=dict)
    random_weights: list[str] = field(default_factory=list)
    weights: str = "best"
    weights_sha256: str = ""

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.clips]

    @property
    def probs(self) -> np.ndarray:
        """Clip probabilities ``[n_clips, n_classes]``: the mean over segments (fusion's ``mean``)."""
        if self.segment_probs.shape[0] == 0:
            return np.zeros((0, len(self.classes)), np.float32)
        return self.segment_probs.mean(axis=1)

    def top(self) -> list[tuple[str, float]]:
        """``(class, probability)`` of each clip's most probable class."""
        probs = self.probs
        best = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
        return [(self.classes[int(i)], float(probs[k, i])) for k, i in enumerate(best)]

    @property
    def exit_code(self) -> int:
        """0 when every clip was classified, 1 when some failed."""
        return 1 if self.errors else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the run, the classes, per clip its files, top class, clip and segment probabilities."""
        clips = []
        for clip, (label, p), probs, seg in zip(self.clips, self.top(), self.probs, self.segment_probs):
            clips.append({"clip": clip.name, "files": [str(f) for f in clip.files], "top_class": label,
                          "probability": p, "probs": probs.tolist(), "segment_probs": seg.tolist()})
        return {"run_dir": self.run_dir, "weights": self.weights, "weights_sha256": self.weights_sha256,
                "classes": list(self.classes),
                "features": dict(self.features), "weights_identity": dict(self.weights_identity),
                "random_weights": list(self.random_weights), "clips": clips, "errors": dict(self.errors)}

    def write_csv(self, path: str | Path) -> Path:
        """``clip,files,top_class,probability,<class>...``: one row per classified clip, written atomically.

        Raises:
            OutputWriteError: the file could not be written (disk full...); a previous file is kept.
        """
        path = Path(path)
        # OutputWriteError if it cannot (the old file stays); UTF-8 whatever the locale: names are file stems
        with atomic_write(path, "w", newline="", encoding="utf-8") as f:
            out = csv.writer(f)
            out.writerow(["clip", "files", "top_class", "probability", *self.classes])
            for clip, (label, p), probs in zip(self.clips, self.top(), self.probs):
                # .8g: a float32 probability whole (%.6f wrote a calibrated 1e-9 as 0.000000)
                out.writerow([clip.name, clip.describe(), label, f"{p:.8g}", *(f"{v:.8g}" for v in probs)])
        return path


class Classifier:
    """A trained run ready to classify files: its head and its encoders, each built once.

    Args:
        run_dir: a directory written by ``heads.train``.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda[:N]"``; head and encoders.
        weights: the run's ``"best"`` or ``"last"`` checkpoint.
        store: a store (path or open) to read the feature sets' provenance from, for runs that
            did not record it (default: the store the run was trained on).
        checkpoints: feature set -> where its encoder checkpoint lies now, when it was moved.
        segments: audio segments per clip instead of the training features' count.
        frames: video frames per clip instead of the training features' count.
        batch_size: clips per encoder call.
        num_workers: decoding processes (0: decode in this process).

    Raises:
        FeatureFingerprintError: the recorded provenance does not have the fingerprint the run was
            trained with; and what ``FileEncoder`` raises (checkpoint missing or with another sha256,
            an encoder that rebuilds differently).
    """

    def __init__(self, run_dir: str | Path, device: str | torch.device = "auto", *, weights: str = "best",
                 store: Any = None, checkpoints: Mapping[str, str | Path] | None = None,
                 segments: int | None = None, frames: int | None = None,
                 batch_size: int = DEFAULT_BATCH_CLIPS, num_workers: int = 0):
        check_sizes({"segments": segments, "frames": frames, "batch_size": batch_size, "num_workers": num_workers})
        self.trained = TrainedHead.load(run_dir, device, weights)
        self.weights_sha256 = file_sha256(weights_path(self.trained.run_dir, weights))
        provenances, store_classes = run_provenance(self.trained, store)
        self.classes = self.trained.classes or store_classes
        self.encoder = FileEncoder(provenances, self.trained.device, checkpoints=checkpoints, segments=segments,
                                   frames=frames, batch_size=batch_size, num_workers=num_workers)

    @property
    def random_weights(self) -> list[str]:
        """Feature sets, and the head's own backbone, whose weights are random."""
        backbone = self.trained.info.get("backbone_weights")
        extra = [f"backbone:{self.trained.info['head_config'].get('backbone', self.trained.info['head'])}"] \
            if backbone and is_random_weights({"weights": backbone}) else []
        return self.encoder.random_weights + extra

    def classify(self, files: Iterable[str | Path] | Sequence[ClipFiles], progress: bool = False) -> ClassifyResult:
        """Classify clips given as file paths (grouped by stem) or as ``ClipFiles``.

        Raises:
            FilesError: a file is missing or of an unknown kind, or a clip lacks a modality the
                run's feature sets need (before any work).
        """
        items = list(files)
        clips = items if items and all(isinstance(c, ClipFiles) for c in items) else group_files(items)
        encoded = self.encoder.encode(clips, progress=progress)
        classified, errors = encoded.ok_clips, dict(encoded.errors)
        if encoded.ok.any():
            segment_probs = self.trained.predict_proba(encoded.features)
            bad = non_finite_clips(encoded.features, segment_probs)
            errors.update({classified[i].name: message for i, message in bad.items()})
            keep = [i for i in range(len(classified)) if i not in bad]
            classified, segment_probs = [classified[i] for i in keep], segment_probs[keep]
        else:
            segment_probs = np.zeros((0, 0, len(self.classes)), np.float32)
        identity = dict(self.encoder.weights_identity)
        backbone = self.trained.info.get("backbone_weights")
        if backbone:
            identity["backbone"] = weights_identity({"weights": backbone})
        return ClassifyResult(str(self.trained.run_dir), list(self.classes), classified, segment_probs,
                              errors, dict(self.trained.info["features"]), identity,
                              self.random_weights, self.trained.weights, self.weights_sha256)


def non_finite_clips(features: Mapping[str, np.ndarray], segment_probs: np.ndarray) -> dict[int, str]:
    """Clip index -> why its probabilities must not be shown: NaN or infinity in its features or output."""
    bad: dict[int, str] = {}
    for name, values in features.items():
        for i in np.flatnonzero(non_finite_rows(values)):
            bad.setdefault(int(i), f"{name}: the features hold NaN or infinity (samples out of range in the file?)")
    for i in np.flatnonzero(non_finite_rows(segment_probs)):
        bad.setdefault(int(i), "the head gave NaN or infinite probabilities (are the run's weights finite?)")
    return bad


def classify(run_dir: str | Path, files: Iterable[str | Path] | Sequence[ClipFiles], device: str = "auto",
             progress: bool = False, **options: Any) -> ClassifyResult:
    """Classify files with the run in ``run_dir`` (``Classifier(run_dir, device, **options).classify(files)``).

    Building a :class:`Classifier` loads the head and builds the encoders; keep one to classify
    many batches of files.
    """
    return Classifier(run_dir, device, **options).classify(files, progress=progress)


def run_provenance(trained: TrainedHead, store: Any = None) -> tuple[dict[str, dict], list[str] | None]:
    """The provenance of each input feature set of the run, checked against the trained fingerprints.

    Returns:
        (feature set -> provenance, the store's classes when a store was read, else None).
    """
    info, names = trained.info, trained.features
    recorded = info.get("feature_provenance") or {}
    classes = None
    if store is None and all(name in recorded for name in names):
        provenances = {name: dict(recorded[name]) for name in names}
    else:
        provenances, classes = _from_store(store if store is not None else info["train"].get("store"), names,
                                           trained.run_dir)
    for name in names:
        trained_fp = info["features"][name]
        if not fingerprint_matches(trained_fp, provenances[name]):
            raise FeatureFingerprintError(str(trained.run_dir), name, trained_fp, fingerprint(provenances[name]))
    return provenances, classes


def _from_store(store: Any, names: list[str], run_dir: Path) -> tuple[dict[str, dict], list[str]]:
    if store is None or store == "":
        raise ValueError(f"run {str(run_dir)!r} records neither its feature sets' provenance nor a store to "
                         f"read it from; pass --store (store=) with the feature sets {names}")
    if isinstance(store, (str, Path)):
        from featurestore.store import open_store

        with open_store(store, mode="r") as opened:
            return _from_store(opened, names, run_dir)
    return {name: dict(store.feature_info(name).provenance) for name in names}, list(store.classes)
