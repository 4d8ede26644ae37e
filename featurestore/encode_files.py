"""Encode audio/video files that are in no store, exactly as extraction would have stored them.

A head trained on stored features can only classify a new recording if the recording goes through
the very encoders, segment layout and storage cast its features went through. Every feature set
records that (its provenance: the encoder spec with the weights' identity, the encoder config
including preprocessing, the segment scheme, the stored dtype), so :class:`FileEncoder` rebuilds each
encoder from it once and then encodes any number of files with extraction's own decoder
(``featurestore.extract.workers.ClipDecoder``: same decoding, segments, frame times and preprocessing) and its
own encode-and-cast step (``featurestore.extract.pipeline._encode``: float16 rounding on the device), in batches of
whole clips on ``device``.

Rebuilding is checked, not assumed: the rebuilt encoder's provenance must have the recorded
fingerprint, a checkpoint must have the recorded sha256 (a moved checkpoint is found again through
``checkpoints={name: path}``), and random-weights encoders rebuild from their recorded seed and say
so (``random_weights``).

Files are grouped into clips by stem: ``x.wav`` and ``x.mp4`` are the audio and video of clip ``x``
(:func:`featurestore.clip_files.group_files`, re-exported here).
"""
from __future__ import annotations

import contextlib
import gc
import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from featurestore._sigint import iter_loader
from featurestore.checks import is_int_in

from featurestore.extract.workers import WORKER_CHECK_S, ClipDecoder, DecodedBatch, Job, WatchedBatches, collate
from featurestore.extract.plan import Source
from featurestore.extract.errors import DecodeWorkerError
from featurestore.extract import pipeline as extract_pipeline
from featurestore.extract.pipeline import _encode as encode_and_cast
from featurestore.extract.pipeline import _loader_reason
from featurestore.clip_files import AUDIO_SUFFIXES, VIDEO_SUFFIXES, ClipFiles, FilesError, group_files
from featurestore.encoders import (
    Encoder, WeightsMismatchError, WeightsNotFoundError, create_encoder, file_sha256, parse_spec, resolve_device,
)
from featurestore.errors import FeatureStoreError
from featurestore.manifest import MAX_AUDIO_SEGMENTS, MAX_VIDEO_FRAMES
from featurestore.provenance import RUNTIME_KEY, fingerprint, is_random_weights, weights_identity

__all__ = ["AUDIO_SUFFIXES", "VIDEO_SUFFIXES", "ClipFiles", "EncodedFiles", "EncoderRebuildError", "FileEncoder",
           "FilesError", "group_files", "rebuild_encoder"]

DEFAULT_BATCH_CLIPS = 16  # extraction's default batch: the encoders see the same batch sizes
_CONFIG_ONLY = ("modality", "output_shape", "dtype")  # recorded config keys that are never options


class EncoderRebuildError(FeatureStoreError, ValueError):
    """The encoder recorded with a feature set cannot be rebuilt with the same configuration."""


# ------------------------------------------------------------------------------ rebuilding encoders
def rebuild_encoder(name: str, provenance: Mapping[str, Any], device: str | torch.device = "cpu",
                    checkpoint: str | Path | None = None) -> Encoder:
    """The encoder that made feature set ``name``, rebuilt from its recorded provenance and checked.

    Args:
        name: the feature set (for messages).
        provenance: as recorded with the feature set (``FeatureInfo.provenance``; runtime ignored).
        device: where the encoder runs.
        checkpoint: where the recorded checkpoint lies now, when it was moved (its sha256 must be
            the recorded one).

    Raises:
        WeightsNotFoundError: the recorded checkpoint is not there (and no ``checkpoint`` given),
            or pretrained weights are not in the local caches.
        WeightsMismatchError: the checkpoint's sha256 is not the one recorded.
        EncoderRebuildError: the rebuilt encoder's configuration differs from the recorded one.
    """
    _refuse_stored_frames(name, provenance)
    spec = _spec_to_build(name, provenance, checkpoint)
    options = recorded_options(provenance)
    encoder = create_encoder(spec, device, **options)
    differences = _differences(provenance, encoder)
    if differences and not options:
        retry = _options_from_config(provenance, encoder)
        if retry:  # a feature set made with encoder options (logmel n_mels=128): build with them
            with contextlib.suppress(TypeError, ValueError):  # those options do not fit: report the differences
                encoder = create_encoder(spec, device, **retry)
            differences = _differences(provenance, encoder)
    if differences:
        raise EncoderRebuildError(f"feature set {name!r}: rebuilding {spec} gives another configuration than the "
                                  f"one recorded with it ({'; '.join(differences[:4])}); it was made with other "
                                  f"encoder options or another version of the encoder")
    return encoder


def recorded_options(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The ``create_encoder`` options a feature set was made with, where its provenance records them
    (``options``, or the runtime section's ``request.options``, which extraction writes); else {}."""
    for where in (provenance, (provenance.get(RUNTIME_KEY) or {}).get("request") or {}):
        options = where.get("options") if isinstance(where, Mapping) else None
        if isinstance(options, Mapping) and options:
            return dict(options)
    return {}


def _refuse_stored_frames(name: str, provenance: Mapping[str, Any]) -> None:
    """A feature set encoded from a stored ``frames/<size>`` set (``extract(frames_from=)``) saw
    frames squashed to that size first; decoding a file would skip that step and give other
    features, so it is refused naming the reason (not as "other encoder options", which it is not)."""
    stored = provenance.get("frames_from")
    if not stored:
        return
    source = stored.get("set") if isinstance(stored, Mapping) else stored
    raise EncoderRebuildError(f"feature set {name!r} was encoded from the stored frames set {source!r} "
                              f"(extract frames_from=), not from video files: files outside a store cannot be "
                              f"encoded the same way; use a feature set extracted from the MP4s")


def _spec_to_build(name: str, provenance: Mapping[str, Any], checkpoint: str | Path | None) -> str:
    """The recorded spec, with a checkpoint's path checked (exists, same sha256) or replaced."""
    spec = provenance.get("encoder")
    if not isinstance(spec, str) or not spec:
        raise EncoderRebuildError(f"feature set {name!r} records no encoder spec in its provenance "
                                  f"(found {spec!r}); it was not made by extraction and cannot be rebuilt")
    weights = provenance.get("weights") or {}
    if weights.get("kind") != "file":
        return spec
    recorded = str(weights.get("sha256") or "")
    path = Path(checkpoint or weights.get("path") or "").expanduser()
    if not str(path) or not path.is_file():
        raise WeightsNotFoundError(
            f"feature set {name!r} was made with checkpoint {weights.get('path')} (sha256 {recorded[:12]}...), "
            f"which is not there{f' (nor at {checkpoint})' if checkpoint else ''}; say where it is now with "
            f"--checkpoint {name}=PATH (checkpoints={{{name!r}: PATH}})")
    found = file_sha256(path)
    if recorded and found != recorded:
        raise WeightsMismatchError(f"feature set {name!r} was made with a checkpoint of sha256 {recorded[:12]}..., "
                                   f"but {path} has sha256 {found[:12]}...: refusing to encode with other weights")
    return str(parse_spec(spec).with_weights(str(path.resolve())))


def _body(provenance: Mapping[str, Any]) -> dict:
    """What the fingerprint covers, as plain JSON data (so tuples and lists compare equal)."""
    body = {k: v for k, v in provenance.items() if k not in (RUNTIME_KEY, "segments", "options")}
    return json.loads(json.dumps(body, default=str))


def _differences(provenance: Mapping[str, Any], encoder: Encoder) -> list[str]:
    """Settings in which the rebuilt encoder differs from the recorded provenance (empty: same)."""
    built = encoder.provenance()
    recorded_fp = fingerprint({**_body(provenance), "segments": {}})
    if fingerprint({**_body(built), "segments": {}}) == recorded_fp:
        return []
    want, got = _body(provenance), _body(built)
    out = []
    for key in sorted(set(want.get("config", {})) | set(got.get("config", {}))):
        a, b = want.get("config", {}).get(key), got.get("config", {}).get(key)
        if a != b:
            out.append(f"config.{key}: recorded {a!r}, rebuilt {b!r}")
    for key in ("encoder", "weights"):
        if fingerprint({key: want.get(key)}) != fingerprint({key: got.get(key)}):
            out.append(f"{key}: recorded {want.get(key)!r}, rebuilt {got.get(key)!r}")
    return out or ["fingerprint"]


def _options_from_config(provenance: Mapping[str, Any], encoder: Encoder) -> dict[str, Any]:
    """Recorded config values that differ from the default build: the options of a feature set whose
    provenance does not record them (candidates; the rebuild is checked by fingerprint anyway)."""
    want = _body(provenance).get("config", {})
    got = _body(encoder.provenance()).get("config", {})
    return {k: v for k, v in want.items() if k in got and got[k] != v and k not in _CONFIG_ONLY}


# ------------------------------------------------------------------------------------ the encoder
@dataclass
class _Target:
    """One feature set to produce: its rebuilt encoder, decoding, stored dtype and shape.

    ``encoder`` and ``dtype`` are what extraction's ``_encode`` reads from its targets."""

    name: str
    encoder: Encoder
    source: Source
    dtype: str
    shape: tuple[int, ...]

    @property
    def spec(self) -> str:
        """The encoder's spec, as extraction's messages name it (``non_finite_message``)."""
        return str(self.encoder.spec)


@dataclass
class EncodedFiles:
    """What :meth:`FileEncoder.encode` produced.

    Attributes:
        clips: every clip given, in order.
        ok: bool per clip: every feature set was encoded.
        features: feature set -> ``[n_ok, n_segments, *shape]`` in the stored dtype (ok clips only).
        errors: clip name -> why it failed (decoding or preprocessing, naming the feature set).
        seconds: stage -> seconds (``decode audio``, ``decode frames``, ``preprocess``, ``encode <set>``).
    """

    clips: list[ClipFiles]
    ok: np.ndarray
    features: dict[str, np.ndarray]
    errors: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ok_clips(self) -> list[ClipFiles]:
        return [c for c, ok in zip(self.clips, self.ok) if ok]


class FileEncoder:
    """The encoders of some feature sets, rebuilt once, applied to files in batches of clips.

    Args:
        provenances: feature set name -> its recorded provenance (``FeatureInfo.provenance``,
            or a training run's copy of it).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda[:N]"``.
        checkpoints: feature set -> where its recorded checkpoint lies now (moved files).
        segments: audio segments per clip instead of the recorded count (clips of another length).
        frames: video frames per clip instead of the recorded count.
        batch_size: clips per encoder call (extraction's default, 16).
        num_workers: decoding processes (0: decode in this thread, best for a few files).

    Raises:
        What :func:`rebuild_encoder` raises, for the first feature set that cannot be rebuilt.
    """

    def __init__(self, provenances: Mapping[str, Mapping[str, Any]], device: str | torch.device = "auto", *,
                 checkpoints: Mapping[str, str | Path] | None = None, segments: int | None = None,
                 frames: int | None = None, batch_size: int = DEFAULT_BATCH_CLIPS, num_workers: int = 0):
        for label, value, low, high in (("batch_size", batch_size, 1, None), ("num_workers", num_workers, 0, None),
                                        ("segments", segments, 1, MAX_AUDIO_SEGMENTS),
                                        ("frames", frames, 1, MAX_VIDEO_FRAMES)):
            if value is not None and not is_int_in(value, low, high):
                raise ValueError(f"{label} must be an integer >= {low}{f' and <= {high}' if high else ''}, "
                                 f"got {value!r}")
        unknown = sorted(set(checkpoints or {}) - set(provenances))
        if unknown:
            raise ValueError(f"checkpoints given for {unknown}, which are not among the feature sets "
                             f"{sorted(provenances)}")
        self.device = resolve_device(device)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.provenances = {name: dict(prov) for name, prov in provenances.items()}
        self.targets = [self._target(name, prov, (checkpoints or {}).get(name), segments, frames)
                        for name, prov in self.provenances.items()]

    def _target(self, name: str, prov: dict, checkpoint, segments: int | None, frames: int | None) -> _Target:
        encoder = rebuild_encoder(name, prov, self.device, checkpoint)
        source = _source(name, prov, encoder, segments, frames)
        dtype = str((prov.get("config") or {}).get("dtype") or encoder.dtype)
        return _Target(name, encoder, source, dtype, tuple(int(s) for s in encoder.output_shape))

    # ----------------------------------------------------------------- what it is
    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    @property
    def random_weights(self) -> list[str]:
        """Feature sets whose encoder has random weights: their features carry no pretrained knowledge."""
        return [t.name for t in self.targets if is_random_weights(self.provenances[t.name])]

    @property
    def weights_identity(self) -> dict[str, str]:
        """Feature set -> ``openai``, ``file:ab12..``, ``RANDOM(seed=0)``, ``parameter-free``."""
        return {t.name: weights_identity(self.provenances[t.name]) for t in self.targets}

    def n_segments(self, name: str) -> int:
        """Segments (or frames) per clip that feature set ``name`` is encoded with."""
        return next(t.source.n_segments for t in self.targets if t.name == name)

    # ----------------------------------------------------------------- running
    def check_files(self, clips: Sequence[ClipFiles]) -> None:
        """Refuse, before any work, a clip without a file that one of the feature sets needs."""
        for clip in clips:
            for t in self.targets:
                kind = "audio" if t.source.kind == "audio" else "video"
                if getattr(clip, kind) is None:
                    example = f"{clip.name}.wav" if kind == "audio" else f"{clip.name}.mp4"
                    raise FilesError(f"clip {clip.name!r} ({clip.describe()}): feature set {t.name!r} ({t.encoder.spec}) "
                                     f"needs a{'n' if kind == 'audio' else ''} {kind} file and none was given "
                                     f"(give e.g. {example} beside it: files with one stem form one clip)")

    def encode(self, clips: Sequence[ClipFiles] | Iterable[str | Path], progress: bool = False) -> EncodedFiles:
        """Decode, preprocess and encode every clip, cast to each feature set's stored dtype.

        Args:
            clips: ClipFiles, or file paths (grouped by stem with :func:`group_files`).
            progress: show a progress bar over clips.

        Returns:
            The features of the clips that worked and the reason for each that did not (a file that
            cannot be decoded fails its clip, not the call).

        Raises:
            FilesError: files missing or of an unknown kind, or a clip lacking a needed modality.
            DecodeWorkerError: a decode worker died or could not hand a batch over (with
                ``num_workers`` > 0); one line, exit 1 in the command lines.
        """
        clips = list(clips)
        if not all(isinstance(c, ClipFiles) for c in clips):
            clips = group_files(clips)
        self.check_files(clips)
        n = len(clips)
        outputs = {t.name: np.zeros((n, t.source.n_segments, *t.shape), dtype=t.dtype) for t in self.targets}
        ok = np.ones(n, dtype=bool)
        errors: dict[str, str] = {}
        seconds: dict[str, float] = {}
        batches = self._batches(clips)
        with _decode_worker_errors(self.num_workers), tqdm(total=n, desc="encode", unit="clip",
                                                             disable=not progress) as bar:
            try:
                self._encode_batches(batches, clips, outputs, ok, errors, seconds, bar)
            finally:  # the decode workers stop here (torch may raise a dead worker's error in any line)
                batches.close()
        return EncodedFiles(clips, ok, {name: arr[ok] for name, arr in outputs.items()}, errors, seconds)

    def _encode_batches(self, batches: Iterator[DecodedBatch], clips: Sequence[ClipFiles],
                        outputs: dict[str, np.ndarray], ok: np.ndarray, errors: dict[str, str],
                        seconds: dict[str, float], bar: tqdm) -> None:
        """Encode every decoded batch into ``outputs`` (rows = clip indices), marking failed clips."""
        for batch in batches:
            _add_all(seconds, batch.seconds)
            for j, t in enumerate(self.targets):
                for row, message in batch.errors.get(j, {}).items():
                    ok[row] = False
                    errors.setdefault(clips[row].name, f"{t.name}: {message}")
                if j not in batch.inputs:
                    continue
                rows, x = batch.inputs[j]
                t0 = time.perf_counter()
                out, storable = encode_and_cast(t, x, self.device, len(rows))
                _add_all(seconds, {f"encode {t.name}": time.perf_counter() - t0})
                outputs[t.name][rows] = out.reshape(len(rows), t.source.n_segments, *t.shape)
                _refuse_unstorable(t, out, rows, storable, clips, ok, errors)
            bar.update(len(batch.rows))

    def _batches(self, clips: Sequence[ClipFiles]) -> Iterator[DecodedBatch]:
        """Decoded batches of ``batch_size`` clips, through extraction's decoder (rows = clip indices)."""
        sources = {t.source.key: t.source for t in self.targets}
        jobs = [Job(j, t.name, t.source.key, t.encoder.preprocessor(), t.source.n_segments)
                for j, t in enumerate(self.targets)]
        everything = tuple(range(len(jobs)))
        audio = [str(c.audio) if c.audio else "" for c in clips]
        video = [str(c.video) if c.video else "" for c in clips]
        decoder = ClipDecoder(sources, jobs, {row: everything for row in range(len(clips))}, audio, video)
        batches = [list(range(lo, min(lo + self.batch_size, len(clips)))) for lo in range(0, len(clips), self.batch_size)]
        if self.num_workers == 0 or len(batches) < 2:
            for rows in batches:
                yield collate([decoder[row] for row in rows])
            return
        loader = torch.utils.data.DataLoader(decoder, batch_sampler=batches, collate_fn=collate,
                                             num_workers=self.num_workers, prefetch_factor=2,
                                             timeout=min(WORKER_CHECK_S, extract_pipeline.DECODE_TIMEOUT_S))
        gc.collect()  # a PyAV object in a reference cycle must not be collected in a forked worker (crash)
        # a hung worker is an error after DECODE_TIMEOUT_S; a dead one within WORKER_CHECK_S
        loaded = WatchedBatches(iter_loader(loader), extract_pipeline.DECODE_TIMEOUT_S)  # workers deaf to Ctrl-C
        try:
            for batch in loaded:
                if batch.fatal:
                    raise _worker_stopped(batch.fatal)
                yield batch
        finally:  # shut the workers down now, not when the iterator is collected (see _Batches.close)
            if hasattr(loaded, "close"):
                loaded.close()


def _refuse_unstorable(target: _Target, out: np.ndarray, rows: np.ndarray, storable: np.ndarray,
                       clips: Sequence[ClipFiles], ok: np.ndarray, errors: dict[str, str]) -> None:
    """Fail the clips whose output an integer feature set cannot hold (NaN, or outside the dtype's
    range: the cast made them 0 or wrapped them, and extraction would not have stored them). Float
    sets keep their NaN, which ``heads.classify`` names as the features' fault."""
    if not np.issubdtype(np.dtype(target.dtype), np.integer) or storable.all():
        return
    message = extract_pipeline.non_finite_message(target, out)  # extraction's own words for the rows it refuses
    for row in rows[~storable]:
        ok[row] = False
        errors.setdefault(clips[row].name, f"{target.name}: {message}")


@contextlib.contextmanager
def _decode_worker_errors(num_workers: int) -> Iterator[None]:
    """A decode worker's death as one ``DecodeWorkerError`` line, wherever torch raises it: its
    SIGCHLD handler raises in whatever line the main thread is running (often the encoding, outside
    the loader's loop), and a batch from a dead worker fails to arrive as ConnectionError/EOFError."""
    try:
        yield
    except RuntimeError as err:  # torch's DataLoader: a worker died, or no batch within the timeout
        if not str(err).startswith("DataLoader"):
            raise
        raise _worker_stopped(_loader_reason(err)) from None
    except (ConnectionError, EOFError) as err:
        if not num_workers:
            raise
        raise _worker_stopped(f"a decoded batch could not be received ({type(err).__name__}): a decode worker "
                              f"died") from None


def _worker_stopped(reason: str) -> DecodeWorkerError:
    """One line (exit 1 in the CLIs): why, and that decoding in-process avoids the workers."""
    return DecodeWorkerError(f"encoding the files stopped: {reason}; nothing was returned for them; try again, "
                             f"or decode in this process (num_workers=0, --num-workers 0)")


def _source(name: str, prov: Mapping[str, Any], encoder: Encoder, segments: int | None,
            frames: int | None) -> Source:
    """The decoding the feature set was made with (its recorded segment scheme), counts overridable."""
    scheme = prov.get("segments") or {}
    if encoder.modality == "audio":
        n = segments or scheme.get("n_segments")
        seconds = scheme.get("segment_seconds") or encoder.segment_seconds
        rate = scheme.get("sample_rate") or encoder.sample_rate
        if not n or not seconds or not rate:
            raise EncoderRebuildError(f"feature set {name!r} records no audio segment scheme (found {scheme!r}); "
                                      f"pass segments= to say how many segments a clip has")
        return Source("audio", _bounded(name, "n_segments", n, MAX_AUDIO_SEGMENTS), int(rate), float(seconds))
    if encoder.modality == "video":
        n = frames or scheme.get("n_frames")
        if not n:
            raise EncoderRebuildError(f"feature set {name!r} records no frame count (found {scheme!r}); "
                                      f"pass frames= to say how many frames to take per clip")
        return Source("frames", _bounded(name, "n_frames", n, MAX_VIDEO_FRAMES))
    raise EncoderRebuildError(f"feature set {name!r}: encoder {encoder.spec} has modality {encoder.modality!r}; "
                              f"only audio and video feature sets are made from files")


def _bounded(name: str, key: str, value: Any, most: int) -> int:
    """A recorded count, checked before any array is sized by it (a provenance is read from a file)."""
    if not is_int_in(value, 1, most, whole_floats=True):
        raise EncoderRebuildError(f"feature set {name!r} records {key} {value!r}; "
                                  f"expected an integer from 1 to {most}")
    return int(value)


def _add_all(acc: dict[str, float], more: Mapping[str, float]) -> None:
    for key, value in more.items():
        acc[key] = acc.get(key, 0.0) + value
