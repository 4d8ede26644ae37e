"""Extraction: run every encoder once over a dataset, into a feature store, resumably.

``extract(dataset, store, encoders)`` decodes each clip once per source in DataLoader worker
processes (audio once per sample rate, frames once), runs each encoder's preprocessor there,
encodes batches on the device and writes blocks of whole chunks from a writer thread, so the three
overlap. A rerun skips clips already done; a killed run loses at most the blocks in flight; a clip
that cannot be decoded is recorded in the store and the summary while the others go on; the same
pipeline runs as tasks on a Dask cluster (``scheduler=``). One run writes a store at a time (a
writer lock beside the store, ``featurestore.store.lock``); a write that fails for lack of room
stops the run with one line naming the store and the rows. See docs/extraction.md.

The command line ``featurestore extract DATASET STORE ...`` is built with the other commands in
``featurestore/cli.py``; ``python -m featurestore.extract`` is the same command.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from featurestore._sigint import kept
from featurestore.atomic_files import find_os_error
from featurestore.checks import is_int_in
from featurestore.errors import UnknownClipError
from featurestore.extract.errors import (
    NO_ROOM, DecodeWorkerError, ExtractionInterrupted, ExtractionStopped, SchedulerError, StoreWriteError,
    hdf5_with_dask, store_write_error,
)
from featurestore.extract.plan import (
    DEFAULT_COMMIT_SECONDS, Plan, check_commit_seconds, check_inputs, check_targets, make_plan,
    stored_frames, write_text_features,
)
from featurestore.extract.request import EncoderRequest, build, nothing_to_do, requests
from featurestore.extract.summary import ExtractSummary, FeatureSetSummary, fill_summary
from featurestore.manifest import Manifest
from featurestore.provenance import is_random_weights
from featurestore.store import FeatureStore, backend_for, create_store, open_store
from featurestore.store.layout import MAX_CHUNK_CLIPS
from featurestore.store.lock import StoreLockedError, writer_lock

__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_ENCODERS", "DecodeWorkerError", "ExtractSummary", "ExtractionInterrupted",
           "FeatureSetSummary", "SchedulerError", "StoreLockedError", "StoreWriteError", "extract"]

#: The paper's encoders: log-mel for the audio CNNs, RegNetX-6.4GF frames (Table 5: 24.60M), three CLIP image encoders.
DEFAULT_ENCODERS = "logmel,timm/regnetx_064,clip/RN50x4,clip/RN101,clip/ViT-B-32"
#: Clips per batch: None picks ``default_batch_size`` for the device the encoders run on.
DEFAULT_BATCH_SIZE: int | None = None
#: Clips per batch on the CPU (an encoder call sees 16 x 12 frames).
CPU_BATCH_CLIPS = 16
#: Frames per encode batch aimed at on an accelerator: a GPU is only busy with hundreds of frames
#: per call (a ViT-B/32 call on 192 frames is launch overhead, on 768 it is compute).
ACCELERATOR_BATCH_FRAMES = 768


def default_batch_size(device: Any, frames_per_clip: int) -> int:
    """Clips per batch: ``CPU_BATCH_CLIPS`` on the CPU, else about ``ACCELERATOR_BATCH_FRAMES``
    frames' worth (never fewer clips than on the CPU)."""
    if getattr(device, "type", str(device)) == "cpu":
        return CPU_BATCH_CLIPS
    return max(CPU_BATCH_CLIPS, ACCELERATOR_BATCH_FRAMES // max(1, int(frames_per_clip)))


def extract(dataset: str | Path | Manifest, store: str | Path | FeatureStore,
            encoders: str | Sequence | Mapping = DEFAULT_ENCODERS, device: str = "auto",
            batch_size: int | None = DEFAULT_BATCH_SIZE, num_workers: int | None = None, frames: int | None = None,
            limit: int | None = None, overwrite: bool = False, scheduler=None, progress: bool = True,
            backend: str | None = None, chunk_clips: int | Mapping[str, int] | None = None,
            segments: int | None = None, allow_outside_root: bool = False,
            encoder_options: Mapping[str, Mapping[str, Any]] | None = None,
            classes: Sequence[str] | None = None, commit_seconds: float = DEFAULT_COMMIT_SECONDS,
            frames_from: str | None = None, decoder: str = "pyav") -> ExtractSummary:
    """Extract features of a dataset's clips into a store; resumable, with per-clip errors.

    Args:
        dataset: a dataset directory (read with ``featurestore.datasets.open_dataset``) or a Manifest.
        store: a store path/URL (created from the dataset when missing) or an open writable store.
        encoders: comma-separated specs ``[NAME=]family[/model][@weights]``
            (``"logmel,vit_random=clip/ViT-B-32@none"``), a list of specs/encoders, or a mapping
            ``{feature set name: spec or encoder}``. ``NAME`` is the feature set the encoder fills
            (default: the spec without its weights), so two weight choices of one encoder can share
            a store. Text encoders (``cliptext/...``) write class-prompt embeddings.
        encoder_options: constructor options per encoder, keyed by feature-set name or spec:
            ``{"logmel": {"n_mels": 128}}`` (``--encoder-option logmel.n_mels=128``); they are part
            of the feature set's configuration and fingerprint.
        classes: the class order for the store, e.g. for a manifest without labels
            (``clip_id,audio,video``); every labelled clip's label must be one of them.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda[:N]"``. With a scheduler it is
            resolved on each Dask worker.
        batch_size: clips per batch (an encoder call sees ``batch_size * segments`` items); None:
            16 on the CPU, about 768 frames' worth on an accelerator (``default_batch_size``).
        num_workers: decoding processes (default: one per spare core, at most 8 when encoding on the
            CPU; 0 = in this thread).
        frames: video frames per clip, overriding the dataset's ``video_frames``.
        segments: audio segments per clip, overriding the dataset's ``audio_segments`` (a clip of
            another length is an error for that clip: see ``featurestore.decode``).
        limit: only the first ``limit`` clips of the dataset (the store still indexes all of them).
        overwrite: replace feature sets whose configuration differs instead of refusing.
        scheduler: a Dask scheduler address, ``distributed.Client`` or cluster: run as Dask tasks.
        progress: show a progress bar and print the summary line and failures.
        backend: ``"zarr"`` or ``"hdf5"`` when the store's name does not say.
        chunk_clips: clips per chunk of newly created feature sets, one number for all or a dict by
            feature set name (default: the store's ~4 MiB per chunk rounded down to a power of two,
            so that the chunks of all feature sets align). Existing feature sets keep theirs.
        allow_outside_root: accept manifest paths that are absolute or lead outside the dataset
            root (refused by default, before any work).
        commit_seconds: longest time encoded clips wait in a partly filled chunk before they are
            written and marked done (``--commit-every``): what a kill can lose, whatever the chunk size.
        frames_from: a ``frames/<size>`` feature set of the store (``--frames-from frames/224``):
            the image encoders read its stored uint8 frames instead of decoding the video files,
            which are then neither checked nor opened. Recorded in each feature set's provenance
            (the set's name and fingerprint), so these features never share a fingerprint with
            features made from the MP4s (the stored frames were squashed to a square). Refused up
            front: a missing set, another frame count, an encoder that is not an image or text
            encoder, selected clips the set has not done (named).
        decoder: ``"pyav"`` (default) or ``"torchcodec"`` (``--decoder``, the ``avscene[torchcodec]``
            extra): frames decoded by torchcodec on the encoders' device, NVDEC on a GPU (then in
            threads of this process, and recorded in the fingerprint: its RGB differs by a few levels),
            FFmpeg's CPU decoders otherwise (the PyAV path's frames bit for bit on MP4/MOV/Matroska;
            other containers are a per-clip decode error). See ``featurestore.decode.torchcodec_video``.

    A rerun with nothing left to do (every selected clip done by the same request under the same
    library versions) is told from the store alone and returns before any encoder is built.

    Returns:
        An ExtractSummary (its ``exit_code`` is 1 when some clip failed).

    Raises:
        MissingFilesError: files listed by the dataset are missing (all of them are named).
        FingerprintMismatchError: a feature set exists with another configuration (see ``overwrite``).
        StoreLockedError: another process is writing the store (its pid, host and the lock file are named).
        SchedulerError: nothing at the ``scheduler`` address greets like a Dask scheduler within
            Dask's connect timeout (``distributed.comm.timeouts.connect``).
        ExtractionInterrupted: Ctrl-C (a KeyboardInterrupt saying how many clips the store kept).
        StoreWriteError: the store could not be written (disk full, file-size limit); the rows
            finished before are kept and a rerun resumes.
        DecodeWorkerError: a decode worker died or could not hand a batch over; a rerun resumes.
        ExtractionStopped: with a scheduler, a Dask worker could not run its task (no store, or not
            this one, at the location there; an encoder it cannot build or that gives another
            fingerprint), or the workers wrote into another store at the location (``check_written``).
        ValueError: bad arguments, or encoders whose chunk sizes do not align.

    A run refused after it created a new store (a bad scheduler, an encoder that does not fit the
    dataset, chunk sizes that do not align...) removes that store: a refusal leaves nothing new.
    """
    t_start = time.perf_counter()
    _check_arguments(batch_size, num_workers, frames, limit, chunk_clips, segments)
    check_commit_seconds(commit_seconds)
    _check_decoder(decoder)
    asked = requests(encoders, encoder_options)
    manifest = _load_manifest(dataset, frames, segments, allow_outside_root, classes)
    selected_ids = manifest.clip_ids[:limit] if limit else manifest.clip_ids
    if frames_from is None:  # stored frames: no media file is read
        _check_files(manifest.subset(selected_ids) if limit else manifest)
    location = store.location if isinstance(store, FeatureStore) else str(store)
    if scheduler is not None:
        _check_dask_backend(store, backend)
    new_dirs = _missing_dirs(location)  # made for the lock file and the store; removed again if left empty
    with _no_room(location, "writing its lock file"):
        options = store.open_args.get("storage_options") if isinstance(store, FeatureStore) else None
        lock = writer_lock(location, storage_options=options).acquire()  # refused at once while another run writes
    try:
        summary = _already_done(store, manifest, selected_ids, asked, overwrite, backend, frames_from, decoder)
        if summary is None:
            summary = _run(store, manifest, selected_ids, asked, _RunOptions(
                device, batch_size, num_workers, overwrite, scheduler, progress, backend, chunk_clips,
                commit_seconds, frames_from, decoder))
    except ExtractionInterrupted:
        raise
    except KeyboardInterrupt:
        raise ExtractionInterrupted(f"no clip was extracted into {location} yet; rerun the same command to "
                                    f"start") from None
    finally:
        lock.release()
        _remove_empty(new_dirs)
    summary.wall_seconds = time.perf_counter() - t_start
    if progress:
        print(summary.line())
        for line in summary.failure_lines():
            print(line)
    return summary


def _already_done(store: str | Path | FeatureStore, manifest: Manifest, selected_ids: list[str],
                  asked: list[EncoderRequest], overwrite: bool, backend: str | None,
                  frames_from: str | None = None, decoder: str = "pyav") -> ExtractSummary | None:
    """The summary of a run with nothing left to do, told from an existing store without building
    any encoder (``request.nothing_to_do``), else None."""
    if isinstance(store, FeatureStore):
        return nothing_to_do(store, manifest, selected_ids, asked, overwrite, frames_from, decoder)
    location = str(store)
    local = location.removeprefix("file://")
    if overwrite or ("://" not in local and not Path(local).exists()):
        return None
    try:
        fs = open_store(location, "r", backend=backend)
    except Exception:  # noqa: BLE001 - no store at that URL yet (or unreadable): the full run decides and says why
        return None
    with fs:
        return nothing_to_do(fs, manifest, selected_ids, asked, overwrite, frames_from, decoder)


def _run(store: str | Path | FeatureStore, manifest: Manifest, selected_ids: list[str],
         asked: list[EncoderRequest], opt: _RunOptions) -> ExtractSummary:
    """Connect to the scheduler, build the encoders, open (or create) the store and extract; the
    caller holds the lock.

    Everything that can refuse the run happens before the pipeline starts; a store this run created
    is removed when the run is refused (or interrupted) before then, so a refusal leaves nothing."""
    location = store.location if isinstance(store, FeatureStore) else str(store)
    with contextlib.ExitStack() as stack:
        client = _connect(opt.scheduler, stack)  # before the store exists: a bad scheduler leaves nothing
        dev = _resolve_device(opt.device if opt.scheduler is None else "cpu")  # Dask: resolved on each worker
        if opt.batch_size is None:
            opt = replace(opt, batch_size=default_batch_size(dev, manifest.video_frames or 1))
        built = build(asked, dev)
        if opt.frames_from is None:  # stored frames need no media files
            check_inputs(manifest, built)
        with _no_room(location, "creating the store"):
            fs, owned, created = _open_store(store, manifest, opt.backend)
        try:
            with _no_room(location, "adding clips to the index or creating feature sets"):
                summary, plan = _prepare(fs, manifest, selected_ids, built, dev, opt)
        except BaseException:
            if owned:
                fs.close()
            if created:
                _remove_created(created)
            raise
        try:
            with _no_room(location, "writing features"):
                return _execute(fs, summary, plan, dev, opt, client)
        except KeyboardInterrupt:
            raise _interrupted(fs, plan) from None
        finally:
            if owned:
                fs.close()


def _connect(scheduler: Any, stack: contextlib.ExitStack) -> Any:
    """The Dask client of a ``scheduler=`` run (closed by ``stack``), None for a local run."""
    if scheduler is None:
        return None
    from featurestore.extract.dask import connect

    return connect(scheduler, stack)


def _check_dask_backend(store: str | Path | FeatureStore, backend: str | None) -> None:
    """Dask tasks write from several processes, which HDF5 cannot take: refused before the lock."""
    location = store.location if isinstance(store, FeatureStore) else str(store)
    kind = store.backend if isinstance(store, FeatureStore) else backend_for(location, backend)
    if kind == "hdf5":
        raise hdf5_with_dask(location)


@dataclass(frozen=True)
class _RunOptions:
    """How one extraction runs, as given to ``extract`` (documented there)."""

    device: str  # as asked ("auto", "cuda"...): Dask workers resolve it themselves
    batch_size: int | None  # None until the device is known (default_batch_size)
    num_workers: int | None
    overwrite: bool
    scheduler: Any
    progress: bool
    backend: str | None
    chunk_clips: int | Mapping[str, int] | None
    commit_seconds: float = DEFAULT_COMMIT_SECONDS
    frames_from: str | None = None
    decoder: str = "pyav"


def _prepare(fs: FeatureStore, manifest: Manifest, selected_ids: list[str], built: list, dev,
             opt: _RunOptions) -> tuple[ExtractSummary, Plan]:
    """Check the targets, index the clips, write class features and plan: every refusal of a run
    that found an open store happens here, before any clip is extracted."""
    stored = None if opt.frames_from is None else \
        stored_frames(fs, opt.frames_from, manifest, built, selected_ids)
    check_targets(fs, manifest, built, str(dev), opt.overwrite, stored, opt.decoder)
    rows = _ensure_clips(fs, manifest)
    selected = np.zeros(fs.n_clips, dtype=bool)
    selected[rows[:len(selected_ids)]] = True
    summary = ExtractSummary(fs.location, str(dev) if opt.scheduler is None else "dask",
                             clips_selected=len(selected_ids))
    for enc in (e for e in built if e.modality == "text"):
        summary.class_features[enc.name] = "written" if write_text_features(fs, enc, str(dev), opt.overwrite) \
            else "unchanged"
    plan = make_plan(fs, manifest, rows, selected, built, str(dev), opt.batch_size, opt.chunk_clips, opt.overwrite,
                     opt.commit_seconds, stored, opt.decoder)
    summary.random_weights = [e.name for e in built if is_random_weights(e.provenance())]
    return summary, plan


def _execute(fs: FeatureStore, summary: ExtractSummary, plan: Plan, dev, opt: _RunOptions,
             client: Any) -> ExtractSummary:
    """Run the pipeline over the plan's blocks (here, or as Dask tasks on ``client``) and count."""
    t_pipeline = time.perf_counter()
    from featurestore.extract.pipeline import default_num_workers, run_blocks
    from featurestore.extract.workers import decodes_on_device

    with _ProgressBar(plan.n_todo_clips(), opt.progress) as bar, kept():  # a Ctrl-C Python dropped still stops
        if client is None:
            workers = default_num_workers(dev) if opt.num_workers is None else opt.num_workers
            threads = 0
            if decodes_on_device(plan):  # torchcodec on CUDA: decoded in threads here (see decodes_on_device)
                workers, threads = 0, max(1, workers)
            stats = run_blocks(plan, fs, plan.blocks(), dev, workers, bar.update, decode_threads=threads)
        else:
            from featurestore.extract.dask import StoreRef, check_written, run_distributed

            ref = StoreRef(fs.location, fs.backend, fs.open_args.get("storage_options"))
            stats, summary.device = run_distributed(plan, ref, client, opt.device, bar.update)
            fs.refresh()
            check_written(plan, fs, stats)  # the workers wrote into this very store, not a copy of it
    summary.pipeline_seconds = time.perf_counter() - t_pipeline
    fill_summary(summary, plan, stats, fs.clip_ids)
    return summary


def _interrupted(fs: FeatureStore, plan: Plan) -> ExtractionInterrupted:
    """What Ctrl-C leaves: the selected clips done in every feature set of the run, read back from
    the store after the pipeline wrote what it had finished."""
    try:
        fs.refresh()
        done = plan.selected.copy()
        for target in plan.targets:
            done &= fs.done_mask(target.name, refresh=True)
        before = plan.selected & ~plan.needed_any()
        kept = f"{int(done.sum())} of {int(plan.selected.sum())} clips done and kept in {fs.location} " \
               f"({int((done & ~before).sum())} by this run)"
    except Exception as err:  # noqa: BLE001 - the count is a courtesy; the interrupt must still be one line
        kept = f"the clips finished before are kept in {fs.location} (not counted: {type(err).__name__})"
    return ExtractionInterrupted(f"{kept}; rerun the same command to resume")


# ------------------------------------------------------------------------------- arguments
def _check_arguments(batch_size: int, num_workers: int | None, frames: int | None, limit: int | None,
                     chunk_clips: int | Mapping[str, int] | None, segments: int | None = None) -> None:
    checks = [("batch_size", batch_size, 1), ("num_workers", num_workers, 0), ("frames", frames, 1),
              ("limit", limit, 1), ("segments", segments, 1)]
    if isinstance(chunk_clips, Mapping):
        checks += [(f"chunk_clips[{name!r}]", value, 1) for name, value in chunk_clips.items()]
    else:
        checks.append(("chunk_clips", chunk_clips, 1))
    for name, value, low in checks:
        if value is not None and not is_int_in(value, low):
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    for name, value, _ in checks:
        if name.startswith("chunk_clips") and value is not None and value > MAX_CHUNK_CLIPS:
            raise ValueError(f"{name} must be at most {MAX_CHUNK_CLIPS} clips (a block of whole chunks of every "
                             f"feature set is the unit of work), got {value}")


def _check_decoder(decoder: str) -> None:
    """An unknown decoder, or torchcodec where it cannot run, refused in one line before any work."""
    if decoder != "pyav":
        from featurestore.decode.torchcodec_video import check_decoder

        check_decoder(decoder)


def _load_manifest(dataset: str | Path | Manifest, frames: int | None, segments: int | None = None,
                   allow_outside_root: bool = False, classes: Sequence[str] | None = None) -> Manifest:
    if isinstance(dataset, Manifest):
        manifest = dataset if classes is None else dataset.with_classes(classes)
    else:
        from featurestore.datasets import open_dataset

        manifest = open_dataset(dataset, allow_outside_root=allow_outside_root, classes=classes)
    if len(manifest) == 0:
        raise ValueError(f"dataset {manifest.name!r} lists no clips")
    if segments:
        manifest = replace(manifest, audio_segments=int(segments))
    return replace(manifest, video_frames=int(frames)) if frames else manifest


def _check_files(manifest: Manifest) -> None:
    """Every missing file at once, before any work (``MissingFilesError`` lists them all)."""
    from featurestore.datasets import check_files

    check_files(manifest)


def _resolve_device(device: str):
    from featurestore.encoders import resolve_device

    return resolve_device(device)


# ------------------------------------------------------------------------------------- store
def _open_store(store: str | Path | FeatureStore, manifest: Manifest,
                backend: str | None) -> tuple[FeatureStore, bool, Path | None]:
    """An open writable store, whether this call opened it (and must close it), and its path when
    this call created it (a refused run removes it)."""
    if isinstance(store, FeatureStore):
        if store.mode == "r":
            raise ValueError(f"{store.location} is open read-only; extraction needs mode 'a'")
        return store, False, None
    location = str(store)
    if "://" not in location and not Path(location).exists():
        return _create_atomically(Path(location), manifest, backend), True, Path(location)
    return open_store(location, "a", backend=backend), True, None


def _create_atomically(path: Path, manifest: Manifest, backend: str | None) -> FeatureStore:
    """Build a new store beside its final path and rename it into place, so a run killed while the
    index is being written leaves no half-made store where the rerun would find it.

    The caller holds the store's writer lock, so no other process creates it now: temp stores left
    by killed creators (any pid) are removed: only this name's, ``.<name>.creating-<pid>``, the name
    escaped (a name holding ``[ab]`` would match another store's) and the pid all digits (the temp
    store of a store named ``<name>.creating-x`` is not this one's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.creating-"
    for old in path.parent.glob(glob.escape(prefix) + "*"):
        if old.name[len(prefix):].isdigit():
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    kind = backend_for(path, backend, new=True)
    try:
        create_store(tmp, manifest, backend=kind).close()
        os.replace(tmp, path)
    except BaseException:
        _remove_created(tmp)  # a full disk or Ctrl-C while creating: no half-made temp store left
        raise
    return open_store(path, "a", backend=kind)


def _missing_dirs(location: str) -> list[Path]:
    """The directories above a local store that do not exist yet, deepest first."""
    local = location.removeprefix("file://")
    if "://" in local:
        return []
    missing = []
    for parent in Path(local).absolute().parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def _remove_empty(dirs: list[Path]) -> None:
    """Remove the directories this run made that hold nothing (a refused run); a run that made its
    store leaves them, as ``rmdir`` removes only empty directories."""
    for path in dirs:
        try:
            path.rmdir()
        except OSError:
            return  # not empty (the store is there, or someone else's files): keep it and those above


def _remove_created(path: Path) -> None:
    """Remove a store this run created (the caller holds its lock, so no one else uses it)."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


@contextlib.contextmanager
def _no_room(location: str, doing: str) -> Iterator[None]:
    """An OSError for lack of room (disk full, quota, file-size limit) becomes a StoreWriteError."""
    try:
        yield
    except ExtractionStopped:
        raise
    except Exception as err:  # the store's libraries may wrap the OSError
        os_error = find_os_error(err)
        if os_error is None or os_error.errno not in NO_ROOM:
            raise
        raise store_write_error(location, os_error, doing) from None


def _ensure_clips(fs: FeatureStore, manifest: Manifest) -> np.ndarray:
    """Store rows of the manifest's clips, adding clips the store does not index yet (and the
    manifest's classes to a store made without any, see ``_adopt_classes``).

    The usual case, every clip indexed already (a new store, a resumed run), is answered by the
    index's id -> row lookup; the whole id column is decoded only when some clip is new."""
    try:
        rows = fs.rows(manifest.clip_ids)
    except UnknownClipError:
        rows = None
    if rows is not None:
        if manifest.classes and not fs.classes:
            _adopt_classes(fs, manifest)
        else:
            _check_indexed(fs, manifest, manifest.clip_ids, rows)
        return rows
    known = set(fs.clip_ids)
    new = [c for c in manifest.clip_ids if c not in known]
    old = [c for c in manifest.clip_ids if c in known]
    if old:
        _check_indexed(fs, manifest, old, fs.rows(old))
    if known:
        print(f"adding {len(new)} clips of {manifest.name!r} to the index of {fs.location}", file=sys.stderr)
    fs.append_clips(manifest.subset(new))
    return fs.rows(manifest.clip_ids)


def _check_indexed(fs: FeatureStore, manifest: Manifest, clip_ids: list[str], rows: np.ndarray) -> None:
    """Refuse a manifest that gives clips already indexed another label, or puts them in or out of a
    split the store has: the index keeps what the dataset that added them said, so a relabelled or
    re-split dataset extracted into the same store was trained and scored on the old labels and
    splits without a word. A manifest without labels (evaluation data) or without a split says
    nothing about them and is not compared there."""
    by_id = {c.clip_id: c for c in manifest.clips}
    records = [by_id[c] for c in clip_ids]
    classes = {name: i for i, name in enumerate(fs.classes)}
    want = np.fromiter((-2 if r.label is None else classes.get(r.label, -3) for r in records), np.int64, len(records))
    if (want != -2).any():
        stored = np.asarray(fs.labels)[rows]
        wrong = np.flatnonzero((want != -2) & (want != stored))
        if len(wrong):
            i = int(wrong[0])
            had = fs.classes[stored[i]] if 0 <= stored[i] < len(fs.classes) else None
            _refuse_reindex(fs, manifest, records[i].clip_id, f"label {records[i].label!r}", f"label {had!r}")
    named = {s for r in records for s in r.splits}
    for split in sorted(named & set(fs.splits())):
        listed = np.fromiter((split in r.splits for r in records), bool, len(records))
        member = np.asarray(fs.column(f"split/{split}"))[rows].astype(bool)
        wrong = np.flatnonzero(listed != member)
        if len(wrong):
            i = int(wrong[0])
            _refuse_reindex(fs, manifest, records[i].clip_id, f"{'in' if listed[i] else 'not in'} split {split!r}",
                            f"{'in' if member[i] else 'not in'} it")


def _refuse_reindex(fs: FeatureStore, manifest: Manifest, clip_id: str, says: str, has: str) -> None:
    raise ValueError(f"dataset {manifest.name!r} gives clip {clip_id!r} {says}, but {fs.location} has it {has} "
                     f"(from the dataset that added it): the index keeps a clip's label and splits, so "
                     f"extract a relabelled or re-split dataset into a new store")


def _adopt_classes(fs: FeatureStore, manifest: Manifest) -> None:
    """``extract --classes`` on a store made from the same unlabelled clips: give it the classes.

    Labels cannot be added to indexed clips, so a manifest that labels them is refused."""
    labelled = [c.clip_id for c in manifest.clips if c.label is not None]
    if labelled:
        raise ValueError(f"{fs.location} was made without classes and its clips have no labels; dataset "
                         f"{manifest.name!r} labels {len(labelled)} of them (e.g. {labelled[0]!r}): extract "
                         f"into a new store to keep the labels")
    fs.set_classes(manifest.classes)
    print(f"{fs.location}: classes set to {', '.join(manifest.classes)}", file=sys.stderr)


# ---------------------------------------------------------------------------------- progress
class _ProgressBar:
    """tqdm over clips (clips/s and ETA), or a no-op when progress is off."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.bar = total, enabled, None

    def __enter__(self) -> _ProgressBar:
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, unit="clip", desc="extract", file=sys.stderr, smoothing=0.1)
        return self

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
