"""Extraction planning: which feature sets to fill, which rows still need work, in which blocks.

The plan is made once, in the process that starts the run, before any decoding (``make_plan``).
It fixes three things every later stage relies on:

* each feature set exists in the store with its provenance (same fingerprint -> resume into it,
  different -> ``FingerprintMismatchError`` unless ``overwrite``);
* the *block*: a run of rows that is a whole number of chunks of every feature set being written,
  so one writer (a thread, or a Dask task on another machine) owns each block outright;
* the *decode batches*: fixed row ranges of ``batch_size`` inside a block, holding the rows that
  need work for any encoder. (Encode batches, the rows one encoder call sees, are fixed per
  feature set, counted from each of its chunk starts, see ``pipeline._Lane``: as feature sets are
  written chunk by chunk, an interrupted-then-resumed run and a Dask run feed the encoders exactly
  the batches an uninterrupted run does, so CPU outputs are bit-identical.)
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featurestore.clip_table import ClipTable, joined_if_kept_by_path
from featurestore.datasets._common import resolve
from featurestore.manifest import Manifest
from featurestore.provenance import is_random_weights, runtime_info
from featurestore.store.layout import MAX_CHUNK_CLIPS, default_chunk_clips
from featurestore.store.store import FeatureStore

#: Longest time encoded rows wait in a partly filled chunk before they are committed (written and
#: marked done): what a kill can lose, whatever the chunk size (``extract(commit_seconds=)``).
DEFAULT_COMMIT_SECONDS = 60.0


@dataclass(frozen=True)
class Source:
    """One decoding of a clip that encoders share: audio at one rate, or frames.

    Attributes:
        kind: ``"audio"`` or ``"frames"``.
        n_segments: audio segments, or frames, per clip.
        sample_rate: audio rate in Hz (0 for frames).
        segment_seconds: audio segment length (0 for frames).
    """

    kind: str
    n_segments: int
    sample_rate: int = 0
    segment_seconds: float = 0.0
    #: frames read from this ``frames/<size>`` feature set of the store instead of decoded from
    #: the video files ('' = decode); ``from_fingerprint`` is that set's fingerprint.
    from_set: str = ""
    from_fingerprint: str = ""
    #: frames decoded by torchcodec (``extract(decoder="torchcodec")``) on ``decode_device`` ('': PyAV).
    decoder: str = ""
    decode_device: str = ""

    @property
    def key(self) -> str:
        if self.from_set:
            return f"stored:{self.from_set}"
        if self.kind == "audio":
            return f"audio@{self.sample_rate}"
        return f"frames@{self.n_segments}" + (f"/{self.decoder}" if self.decoder else "")

    def scheme(self) -> dict:
        """The segment scheme recorded in provenance (part of the fingerprint)."""
        if self.kind == "audio":
            return {"kind": "audio", "n_segments": self.n_segments, "segment_seconds": self.segment_seconds,
                    "sample_rate": self.sample_rate}
        scheme = {"kind": "frames", "n_frames": self.n_segments}
        if self.decode_device.startswith("cuda"):  # NVDEC's RGB differs from the CPU decoders' by a few levels
            scheme["decoder"] = f"{self.decoder}/cuda"
        return scheme


@dataclass
class Target:
    """One feature set this run fills.

    Attributes:
        name: feature set name in the store (the encoder's name, e.g. ``clip/ViT-B-32``).
        encoder: the encoder object (local runs) or None (a plan shipped to a Dask task).
        spec: the encoder's canonical spec (``clip/ViT-B-32@none``), used to rebuild it elsewhere.
        source: the decoding it reads.
        shape: per-segment output shape.
        dtype: stored dtype.
        chunk_clips: rows per chunk of the feature set.
        provenance: as stored (with runtime).
        todo: bool per store row: selected for this run and not done yet.
        skipped: number of selected rows already done before this run.
        options: the encoder's constructor options (``create_encoder(spec, **options)``), so that
            a Dask worker rebuilds the very encoder the driver planned with.
    """

    name: str
    encoder: object | None
    spec: str
    source: Source
    shape: tuple[int, ...]
    dtype: str
    chunk_clips: int
    provenance: dict = field(repr=False)
    todo: np.ndarray = field(repr=False)
    skipped: int = 0
    options: dict = field(default_factory=dict, repr=False)

    @property
    def random_weights(self) -> bool:
        return is_random_weights(self.provenance)


@dataclass
class Plan:
    """Everything the pipeline needs, independent of the process that runs it.

    Attributes:
        targets: the feature sets to fill (audio and video encoders).
        block_clips: rows per block (a multiple of every target's chunk_clips).
        n_rows: rows in the store.
        selected: bool per store row: the clips this run covers.
        audio_paths: absolute audio path per store row ('' where none).
        video_paths: absolute video path per store row ('' where none).
        clip_ids: clip id per store row.
        batch_size: clips per decode batch and per encode batch.
        commit_seconds: longest time encoded rows wait in a partly filled chunk before the chunk
            is written with them marked done (a kill loses at most this much encoding).
        frames_store: ``(location, backend, storage_options)`` of the store the decode workers
            read stored frames from (``extract(frames_from=)``), each opening it read-only itself;
            None when frames are decoded from the video files.
    """

    targets: list[Target]
    block_clips: int
    n_rows: int
    selected: np.ndarray
    audio_paths: list[str]
    video_paths: list[str]
    clip_ids: list[str]
    batch_size: int
    commit_seconds: float = DEFAULT_COMMIT_SECONDS
    frames_store: tuple[str, str, dict | None] | None = None
    _need: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def blocks(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of every block with at least one row that needs work."""
        need = self.needed_any()
        out = []
        for start in range(0, self.n_rows, self.block_clips):
            stop = min(start + self.block_clips, self.n_rows)
            if need[start:stop].any():
                out.append((start, stop))
        return out

    def needed_any(self) -> np.ndarray:
        """Rows that need work for at least one target.

        Computed once per plan: targets are never changed in place, and ``dataclasses.replace``
        (how a Dask task swaps in its own targets) makes a new plan without this cache.
        """
        if self._need is None:
            self._need = np.zeros(self.n_rows, dtype=bool)
            for target in self.targets:
                self._need |= target.todo
        return self._need

    def decode_batches(self, start: int, stop: int) -> list[np.ndarray]:
        """Rows needing work in each fixed decode batch of the block ``start:stop`` (empty ones dropped)."""
        need = self.needed_any()
        out = []
        for lo in range(start, stop, self.batch_size):
            rows = lo + np.flatnonzero(need[lo:min(lo + self.batch_size, stop)])
            if len(rows):
                out.append(rows)
        return out

    def sources(self) -> dict[str, Source]:
        return {t.source.key: t.source for t in self.targets}

    def n_todo_clips(self) -> int:
        return int(self.needed_any().sum())


# -------------------------------------------------------------------------------------- plan
def make_plan(store: FeatureStore, manifest: Manifest, rows: np.ndarray, selected: np.ndarray, encoders: list,
              device: str, batch_size: int, chunk_clips: int | Mapping[str, int] | None, overwrite: bool,
              commit_seconds: float = DEFAULT_COMMIT_SECONDS, stored: StoredFrames | None = None,
              decoder: str = "pyav") -> Plan:
    """The plan of a run: the targets (feature sets created or reopened, their rows to do), the
    block size and the absolute media path of every store row.

    Args:
        store: the store, open for writing, already indexing the manifest's clips.
        manifest: the dataset.
        rows: the store row of each of the manifest's clips.
        selected: bool per store row: the clips this run covers.
        encoders: the built encoders (text encoders are left out: they write class features).
        device: the device's name, for provenance.
        batch_size: clips per decode batch and per encode batch.
        chunk_clips: clips per chunk of new feature sets, one number or a dict by feature-set name.
        overwrite: replace feature sets made with another configuration.
        commit_seconds: see :attr:`Plan.commit_seconds`.
        stored: the checked ``frames_from`` set the image encoders read (``stored_frames``), or None.
        decoder: ``"pyav"`` or ``"torchcodec"`` (then on ``device``), for frames decoded from video.
    """
    check_commit_seconds(commit_seconds)
    if isinstance(chunk_clips, Mapping):
        unknown = sorted(set(chunk_clips) - {e.name for e in encoders})
        if unknown:
            raise ValueError(f"chunk_clips names {unknown} are not feature sets of this run "
                             f"({', '.join(e.name for e in encoders)})")
    targets = [prepare_target(store, e, source_for(e, manifest, stored, decoder, device), selected, device,
                              chunk_clips, overwrite) for e in encoders if e.modality != "text"]
    table = ClipTable.of(manifest.clips)  # (a manifest made from columns is one already: no record per clip)
    audio = _by_row(resolved_paths(table.audio, manifest.root), rows, store.n_clips)
    video = _by_row(resolved_paths(table.video, manifest.root), rows, store.n_clips)
    frames_store = None if stored is None else \
        (store.location, store.backend, store.open_args.get("storage_options"))
    return Plan(targets, block_size(targets), store.n_clips, selected, audio, video, store.clip_ids, batch_size,
                float(commit_seconds), frames_store)


def check_commit_seconds(value: object) -> None:
    """``commit_seconds`` must be a finite number of seconds > 0 (ValueError naming what was given)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"commit_seconds must be a number of seconds > 0, got {value!r}")


# ----------------------------------------------------------------------------------- sources
def source_for(encoder, manifest: Manifest, stored: StoredFrames | None = None, decoder: str = "pyav",
               device: str = "cpu") -> Source:
    """The decoding an encoder needs, checked against the dataset's segment scheme; with
    ``stored``, an image encoder's frames come from that feature set instead; with ``decoder``
    ``"torchcodec"``, frames are decoded by torchcodec on ``device``."""
    if encoder.modality == "audio":
        seconds = float(encoder.segment_seconds or manifest.segment_seconds)
        if not math.isclose(seconds, float(manifest.segment_seconds)):
            raise ValueError(f"encoder {encoder.spec} works on {seconds} s segments but dataset "
                             f"{manifest.name!r} is cut into {manifest.segment_seconds} s segments; "
                             f"configure the encoder with segment_seconds={manifest.segment_seconds}")
        if not encoder.sample_rate:
            raise ValueError(f"audio encoder {encoder.spec} declares no sample_rate; cannot decode for it")
        return Source("audio", int(manifest.audio_segments), int(encoder.sample_rate), seconds)
    if encoder.modality == "video":
        if stored is not None:
            return Source("frames", stored.n_frames, from_set=stored.name, from_fingerprint=stored.fingerprint)
        if decoder == "torchcodec":
            return Source("frames", int(manifest.video_frames), decoder=decoder, decode_device=device)
        return Source("frames", int(manifest.video_frames))
    raise ValueError(f"encoder {encoder.spec} has modality {encoder.modality!r}; expected audio or video")


def target_provenance(encoder, source: Source, device: str) -> dict:
    """Encoder provenance + segment scheme + runtime (runtime is outside the fingerprint)."""
    prov = dict(encoder.provenance())
    prov["segments"] = source.scheme()
    if source.from_set:  # never the fingerprint of features made from the MP4s (the frames were squashed)
        prov["frames_from"] = {"set": source.from_set, "fingerprint": source.from_fingerprint}
    prov["runtime"] = run_record(encoder, device)
    return prov


def run_record(encoder, device: str) -> dict:
    """The runtime section: versions, host, device and how the encoder was asked for (its spec as
    written and its options). Outside the fingerprint; a rerun asking the same with the same
    library versions can tell that it would rebuild this very encoder (``request.nothing_to_do``)."""
    record = {**runtime_info(), "device": device}
    request = getattr(encoder, "request", None)
    if request is not None:
        record["request"] = request
    return record


def encoder_options(encoder) -> dict:
    """The options ``create_encoder`` built the encoder with (none for an encoder built directly)."""
    request = getattr(encoder, "request", None) or {}
    return dict(request.get("options") or {})


# ----------------------------------------------------------------------------- stored frames
@dataclass(frozen=True)
class StoredFrames:
    """A ``frames/<size>`` feature set that image encoders read instead of decoding video
    (``extract(frames_from=)``), as checked by ``stored_frames``."""

    name: str
    fingerprint: str
    n_frames: int


def stored_frames(store: FeatureStore, name: str, manifest: Manifest, encoders: list,
                  selected_ids: list[str]) -> StoredFrames:
    """Check a ``frames_from`` request up front and describe the set; each refusal is one line.

    Refused: a set the store does not hold or that is not uint8 ``[3, S, S]`` frames; a frame count
    other than the dataset's (``--frames``); any encoder of the run other than an image encoder
    (its preprocessor has a ``batched`` step) or a text encoder; and selected clips the set has not
    done (named: a clip is never half made from stored frames and half from video).
    """
    from featurestore.errors import UnknownClipError, UnknownFeatureError

    where = f"--frames-from {name}: {store.location}"
    try:
        info = store.feature_info(name)
    except UnknownFeatureError:
        raise ValueError(f"{where} has no feature set {name!r}; extract it first "
                         f"(--encoders {name})") from None
    shape = tuple(int(s) for s in info.feature_shape)
    if str(info.dtype) != "uint8" or len(shape) != 3 or shape[0] != 3 or shape[1] != shape[2]:
        raise ValueError(f"{where}: {name!r} holds {info.dtype} {list(shape)} per frame, not stored frames "
                         f"(uint8 [3, S, S] from a frames/<size> encoder)")
    if info.n_segments != manifest.video_frames:
        raise ValueError(f"{where}: {name!r} holds {info.n_segments} frames per clip, this run asks for "
                         f"{manifest.video_frames} (--frames); extract {name} with that many frames")
    for encoder in encoders:
        if encoder.modality != "text" and not callable(getattr(encoder.preprocessor(), "batched", None)):
            raise ValueError(f"{where}: encoder {encoder.spec} is not an image encoder and cannot read stored "
                             f"frames; extract it in a run without --frames-from")
    try:
        rows = store.rows(selected_ids)
    except UnknownClipError as err:
        raise ValueError(f"{where}: {err}; extract {name} for those clips first") from None
    missing = [selected_ids[i] for i in np.flatnonzero(~store.done_mask(name)[rows])]
    if missing:
        raise ValueError(f"{where}: {name!r} is not done for {len(missing)} of the {len(rows)} selected clips "
                         f"(e.g. {', '.join(missing[:3])}); extract {name} for them first")
    return StoredFrames(name, info.fingerprint, int(info.n_segments))


# ------------------------------------------------------------------------------ feature sets
def check_targets(store: FeatureStore, manifest: Manifest, encoders: list, device: str, overwrite: bool,
                  stored: StoredFrames | None = None, decoder: str = "pyav") -> None:
    """Refuse a run before it changes anything: each feature set and class-feature set it would
    write must be absent, made with the same configuration, or ``overwrite``-n (the store's
    fingerprint rule). Runs before the manifest's clips are added to the index, so a refused
    run leaves the store exactly as it was."""
    for encoder in encoders:
        if encoder.modality == "text":
            store.has_class_features(encoder.name, text_provenance(encoder, manifest.classes, device), overwrite)
            continue
        source = source_for(encoder, manifest, stored, decoder, device)
        store.check_feature_set(encoder.name, source.n_segments, tuple(int(s) for s in encoder.output_shape),
                                target_provenance(encoder, source, device), overwrite)


def check_inputs(manifest: Manifest, encoders: list) -> None:
    """An encoder whose input no clip of the dataset has (frames from an audio-only manifest) is a
    mistake in the command, not a failure of every clip: refuse it by name before any work."""
    for encoder in encoders:
        if encoder.modality == "text":
            continue
        column = "audio" if encoder.modality == "audio" else "video"
        if len(manifest) and not manifest.has_media(column):
            where = f" ({manifest.root})" if manifest.root else ""
            raise ValueError(f"encoder {encoder.spec} needs {column} files, but dataset {manifest.name!r}{where} "
                             f"lists none for its {len(manifest)} clip(s); leave it out of --encoders")


def prepare_target(store: FeatureStore, encoder, source: Source, selected: np.ndarray, device: str,
                   chunk_clips: int | Mapping[str, int] | None, overwrite: bool) -> Target:
    """Create or reopen the encoder's feature set and work out which selected rows are not done."""
    shape = tuple(int(s) for s in encoder.output_shape)
    dtype = str(encoder.dtype)
    prov = target_provenance(encoder, source, device)
    asked = chunk_clips.get(encoder.name) if isinstance(chunk_clips, Mapping) else chunk_clips
    rows = int(asked or default_chunk_clips(source.n_segments, shape, dtype, store.n_clips))
    info = store.create_feature_set(encoder.name, source.n_segments, shape, prov, dtype=dtype,
                                    chunk_clips=rows, overwrite=overwrite,
                                    compressor=getattr(encoder, "compressor", None))  # frames: "zstd"
    done = store.done_mask(encoder.name)  # create_feature_set has just read it from the store
    todo = selected & ~done
    return Target(encoder.name, encoder, encoder.spec, source, shape, dtype, info.chunk_clips,
                  info.provenance, todo, skipped=int((selected & done).sum()), options=encoder_options(encoder))


def block_size(targets: list[Target]) -> int:
    """Least common multiple of the chunk sizes of the targets that have work."""
    sizes = [t.chunk_clips for t in targets if t.todo.any()] or [t.chunk_clips for t in targets] or [1]
    block = 1
    for size in sizes:
        block = block * size // math.gcd(block, size)
    if block > MAX_CHUNK_CLIPS:  # a block is whole chunks of every set: larger, they do not align well
        listing = ", ".join(f"{t.name}: {t.chunk_clips}" for t in targets)
        raise ValueError(f"the feature sets' chunk sizes ({listing}) have a common multiple of {block} clips, "
                         f"more than {MAX_CHUNK_CLIPS}; extract these encoders in separate runs")
    return block


# ------------------------------------------------------------------------------ class features
def text_provenance(encoder, classes: list[str], device: str) -> dict:
    """Provenance of a text encoder's class-prompt embeddings: the encoder's, plus the prompts."""
    prov = dict(encoder.provenance())
    prov["prompts"] = list(encoder.class_prompts(classes))
    prov["runtime"] = run_record(encoder, device)
    return prov


def write_text_features(store: FeatureStore, encoder, device: str, overwrite: bool) -> bool:
    """Class-prompt embeddings of a text encoder; returns False when identical ones already exist."""
    prov = text_provenance(encoder, store.classes, device)
    prompts = prov["prompts"]
    if store.has_class_features(encoder.name, prov, overwrite):
        return False
    data = encoder.encode_text(prompts)
    data = data.detach().float().cpu().numpy() if hasattr(data, "detach") else np.asarray(data, np.float32)
    store.write_class_features(encoder.name, data.astype(np.float32), prov, prompts, overwrite=overwrite)
    return True


# ------------------------------------------------------------------------------------ paths
def resolved_paths(paths: np.ndarray | None, root: Path | None) -> list[str]:
    """``resolve_path`` of each of ``paths`` (a ``ClipTable`` media column: None for no column), the
    usual case without a ``Path`` each: clean POSIX texts (``joined_if_kept_by_path``) are joined to
    the root's absolute path as text. At a million clips the per-clip ``Path``s and records took ~20 s
    of planning, before any clip was decoded."""
    if paths is None:
        return []
    given = paths.tolist()
    try:  # a Path's text is what str() of it gives, clean by construction
        texts = ["" if p is None else os.fspath(p) for p in given]
    except TypeError:  # neither a text nor a path: resolve_path words it
        texts = None
    if os.sep != "/" or texts is None or joined_if_kept_by_path(texts) is None:
        return [resolve_path(p, root) for p in given]
    base = str(Path(root).absolute() if root is not None else Path.cwd())
    prefix = "" if base == "/" else base
    return [p if not p or p.startswith("/") else f"{prefix}/{p}" for p in texts]


def _by_row(paths: list[str], rows: np.ndarray, n_rows: int) -> list[str]:
    """``paths[i]`` at store row ``rows[i]``, '' at the other rows (and everywhere without paths)."""
    if not paths:
        return [""] * n_rows
    column = np.full(n_rows, "", dtype=object)
    column[np.asarray(rows, dtype=np.intp)] = np.array(paths, dtype=object)
    return column.tolist()


def resolve_path(path, root: Path | None) -> str:
    """Absolute path of a manifest path, the very one ``check_files`` checked before the run
    (relative paths are joined to the dataset root, or to the working directory without one)."""
    if path is None or str(path) == "":
        return ""
    return str(resolve(Path(root) if root is not None else Path.cwd(), str(path)))
