"""What the decode workers run, the CPU side of extraction: decode each clip once per source, run
every encoder's preprocessor, stack the clips of a decode batch per encoder.

Image encoders whose preprocessor has a ``batched`` step (``FramePreprocessor``: every ``clip/`` and
``timm/`` encoder) are not preprocessed here: the workers hand over the decoded frames as they are,
``uint8 [n * K, H, W, 3]``, one tensor per source shared by all those encoders, and the encode lane
resizes, crops and normalises each encode batch on the encoder's device (``Job.batched``). That is
``H x W x 3`` bytes per frame through shared memory, against ``3 x h x w x 4`` per encoder before.
Clips of different frame sizes in one decode batch are stacked per size (``DecodedBatch.extra``).
That is the path when the encoders run on an accelerator; on the CPU the workers keep preprocessing
(``PREPROCESS_ON_DEVICE``): there the "device" is the one encoding thread, which would then resize
what several workers resized in parallel, and a 720p frame is 4.6x the bytes of a float 224 crop.
The outputs are the same bit for bit either way.

This runs inside DataLoader worker processes. Everything here is plain picklable data (paths,
frozen source descriptions, the encoders' model-free preprocessors): a worker never receives a model,
a store or an open file, and opens each media file itself. With ``extract(frames_from=)`` a frames
source is read from a ``frames/<size>`` feature set instead (``Source.from_set``): each worker opens
the store read-only itself and hands the stored ``[K, 3, S, S]`` frames over as ``[K, S, S, 3]``,
what decoding would give, so the image encoders' preprocessing is unchanged and no video is opened.

A clip that fails to decode is not an exception here but a per-encoder error message carried in the
batch, so one broken file costs one row, not the run.

In a worker, ``collate`` moves the batch into shared memory itself, into buffers the worker reuses
from batch to batch (``featurestore.extract.buffer_pool``). Otherwise the DataLoader's queue
would do it in a background thread whose errors are only printed, and the batch would be lost
while the main process waited for it for ever (``/dev/shm`` full, a file-size limit). A batch that
cannot be shared is replaced by one that carries only the reason (``DecodedBatch.fatal``), which
the main process turns into an error that stops the run. Pickling the batch into the queue can still
fail in the queue's thread (out of file descriptors: each shared tensor is passed as a duplicated
descriptor); the standard library prints that and drops the batch, which left the main process and
the workers idle in ``Queue.get`` until ``DECODE_TIMEOUT_S``. A worker therefore replaces such a batch
by a fatal one too (``_guard_queue_thread``).

The main process must notice a decode worker that dies within seconds. torch's SIGCHLD handler
raises the death in whatever line the main thread runs; when that line is inside a finalizer or a
``__del__`` (the buffer pool frees its slots from one), Python prints the error and drops it, and a
DataLoader made with ``timeout=`` checks its workers only once that timeout has passed (600 s).
:class:`WatchedBatches` waits ``DECODE_TIMEOUT_S`` in ``WORKER_CHECK_S`` slices, and torch checks
every worker at the end of each slice.
"""
from __future__ import annotations

import math
import multiprocessing.queues
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from featurestore.decode import DecodeError, load_audio_segments, sample_frames
from featurestore.encoders._preprocess import as_uint8_frames
from featurestore.extract import buffer_pool
from featurestore.extract.plan import Plan, Source

#: While the main process waits for a decoded batch, how often it checks that every decode worker
#: is alive: the DataLoader's ``timeout`` (``DECODE_TIMEOUT_S`` is the whole wait, counted by
#: :class:`WatchedBatches`).
WORKER_CHECK_S = 2.0


@dataclass(frozen=True)
class Job:
    """What a worker does for one encoder: which source it reads and how to preprocess it."""

    index: int
    name: str
    source: str
    preprocess: Callable[[np.ndarray], torch.Tensor]
    n_segments: int
    #: The device half of the preprocessing (``uint8 [N, H, W, 3]`` -> model input), run by the
    #: encode lane once per encode batch; None when ``preprocess`` does all of it in the worker.
    batched: Callable[[torch.Tensor], torch.Tensor] | None = None


#: Where image encoders' frames are resized, cropped and normalised: True on the encoder's device
#: (the workers hand over uint8 frames), False in the decode workers, None: on the device unless it
#: is the CPU (see the module docstring). Tests set True to run the device path on the CPU.
PREPROCESS_ON_DEVICE: bool | None = None


def preprocess_on_device(device: torch.device) -> bool:
    """Whether extraction on ``device`` hands uint8 frames to the encoders (``PREPROCESS_ON_DEVICE``)."""
    return device.type != "cpu" if PREPROCESS_ON_DEVICE is None else bool(PREPROCESS_ON_DEVICE)


def decodes_on_device(plan: Plan) -> bool:
    """Whether some source is decoded on an accelerator (torchcodec on CUDA). Then decoding runs in
    threads of the main process (``run_blocks(num_workers=0, decode_threads=)``): a forked
    DataLoader worker cannot use the CUDA context its parent made, and the frames stay on the device."""
    return any(s.decoder and s.decode_device not in ("", "cpu") for s in plan.sources().values())


def make_job(index: int, name: str, source: str, preprocessor: Callable, n_segments: int,
             on_device: bool = True) -> Job:
    """The job of one encoder. With ``on_device``, a preprocessor with a ``batched`` step runs that
    step on the device and leaves the workers only ``as_uint8_frames`` (shared by all such jobs of a
    source); otherwise the workers run the whole preprocessor."""
    batched = getattr(preprocessor, "batched", None)
    if on_device and callable(batched):
        return Job(index, name, source, as_uint8_frames, n_segments, batched)
    return Job(index, name, source, preprocessor, n_segments)


@dataclass
class ClipResult:
    """One decoded clip: per-job input tensors or error messages, plus stage times; ``frames``: the
    jobs whose input is the decoded uint8 frames (their size may differ from clip to clip)."""

    row: int
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    frames: set[int] = field(default_factory=set)


@dataclass
class DecodedBatch:
    """The clips of one decode batch, stacked per job for the device.

    Attributes:
        rows: every store row of the batch that was decoded.
        inputs: job index -> (rows that succeeded, ``[n_ok * n_segments, ...]`` tensor); for a job
            handed uint8 frames of several sizes, the rows of the first size.
        extra: job index -> further (rows, tensor) groups, one per other frame size (usually empty).
        errors: job index -> {row: message}.
        seconds: stage -> seconds spent in the worker (decode per source, preprocess per job).
        fatal: why the worker could not hand this batch over ('' when it could); the run stops.
    """

    rows: np.ndarray
    inputs: dict[int, tuple[np.ndarray, torch.Tensor]]
    errors: dict[int, dict[int, str]]
    seconds: dict[str, float]
    fatal: str = ""
    extra: dict[int, list[tuple[np.ndarray, torch.Tensor]]] = field(default_factory=dict)
    #: The tensors stacked into slots of a ``BufferPool`` (tensor, slot) and that pool's key: on
    #: arrival in the main process each slot is freed again once its tensor is let go.
    pooled: list[tuple[torch.Tensor, int]] = field(default_factory=list)
    pool_key: int = 0

    def __setstate__(self, state: dict) -> None:
        """Unpickled in the main process: hand the pooled tensors to their pool (see buffer_pool)."""
        pooled = state.pop("pooled", [])
        self.__dict__.update(state, pooled=[])  # no reference kept here: the lanes' ones decide
        buffer_pool.received(state.get("pool_key", 0), pooled)

    def groups(self, job: int) -> list[tuple[np.ndarray, torch.Tensor]]:
        """Every (rows, tensor) group of ``job``: ``inputs``' one, then ``extra``'s."""
        first = [self.inputs[job]] if job in self.inputs else []
        return first + self.extra.get(job, [])

    def pin_memory(self) -> DecodedBatch:
        """Called by the DataLoader's pin-memory thread when extracting on CUDA."""
        done: dict[int, torch.Tensor] = {}  # jobs sharing one tensor share its pinned copy

        def pin(group: tuple[np.ndarray, torch.Tensor]) -> tuple[np.ndarray, torch.Tensor]:
            rows, x = group
            if id(x) not in done:
                done[id(x)] = x.pin_memory()
            return rows, done[id(x)]

        pinned = {j: pin(group) for j, group in self.inputs.items()}
        extra = {j: [pin(group) for group in groups] for j, groups in self.extra.items()}
        return DecodedBatch(self.rows, pinned, self.errors, self.seconds, self.fatal, extra)


class ClipDecoder(Dataset):
    """Map-style dataset over store rows: item ``row`` -> :class:`ClipResult`.

    Args:
        sources: source key -> Source.
        jobs: one per encoder, in target order.
        needs: row -> indices of the jobs that need that row.
        audio_paths: absolute audio path per store row.
        video_paths: absolute video path per store row.
        frames_store: ``(location, backend, storage_options)`` of the store that sources with a
            ``from_set`` are read from (``Plan.frames_store``).
    """

    def __init__(self, sources: dict[str, Source], jobs: Sequence[Job], needs: dict[int, tuple[int, ...]],
                 audio_paths: Sequence[str], video_paths: Sequence[str],
                 frames_store: tuple[str, str, dict | None] | None = None):
        self.sources = dict(sources)
        self.jobs = list(jobs)
        self.needs = dict(needs)
        self.paths = {row: (audio_paths[row], video_paths[row]) for row in self.needs}
        self.frames_store = frames_store
        self._store: tuple[int, object] | None = None  # (pid, read-only store): opened by each process itself
        self._store_lock = threading.Lock()  # decode threads (a Dask task's) open it once between them

    def __getstate__(self) -> dict:
        # a store handle never travels to another process; a lock cannot
        return {**self.__dict__, "_store": None, "_store_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _store_lock=threading.Lock())

    def __len__(self) -> int:
        return len(self.needs)

    def __getitem__(self, row: int) -> ClipResult:
        result = ClipResult(int(row))
        wanted = [self.jobs[j] for j in self.needs[row]]
        decoded: dict[str, np.ndarray | str] = {}
        shared: dict[tuple, torch.Tensor] = {}  # encoders with equal preprocessors share one tensor
        for key in dict.fromkeys(job.source for job in wanted):
            t0 = time.perf_counter()
            decoded[key] = self._decode(self.sources[key], row)
            source = self.sources[key]
            stage = f"decode {source.kind} from {source.from_set}" if source.from_set else f"decode {source.kind}"
            _add(result.seconds, stage, time.perf_counter() - t0)
        for job in wanted:
            value = decoded[job.source]
            if isinstance(value, str):
                result.errors[job.index] = value
                continue
            if job.batched is not None:
                result.frames.add(job.index)
            key = _share_key(job)
            if key is not None and key in shared:
                result.inputs[job.index] = shared[key]
                continue
            t0 = time.perf_counter()
            try:
                result.inputs[job.index] = self._job_input(job, value, row)
            except ValueError as err:  # preprocessors validate their input with ValueError
                result.errors[job.index] = f"preprocessing for {job.name} failed: {err}"
            else:
                if key is not None:
                    shared[key] = result.inputs[job.index]
            _add(result.seconds, "preprocess", time.perf_counter() - t0)
        return result

    def _decode(self, source: Source, row: int) -> np.ndarray | torch.Tensor | str:
        """The decoded array (torchcodec's frames: a tensor, on the GPU when it decodes there), or the
        error message when the file cannot be decoded."""
        if source.from_set:
            return self._stored(source, row)
        audio, video = self.paths[row]
        path = audio if source.kind == "audio" else video
        if not path:  # named as the manifest's column is ("video"), not the source kind ("frames")
            return f"no {'audio' if source.kind == 'audio' else 'video'} file listed for this clip"
        try:
            if source.kind == "audio":
                return load_audio_segments(path, source.sample_rate, source.n_segments, source.segment_seconds)
            if source.decoder == "torchcodec":
                from featurestore.decode.torchcodec_video import sample_frames_torchcodec

                return sample_frames_torchcodec(path, source.n_segments, source.decode_device or "cpu")
            return sample_frames(path, source.n_segments)
        except DecodeError as err:
            return f"decode failed: {err}"

    def _stored(self, source: Source, row: int) -> np.ndarray | str:
        """The frames of ``row`` from the ``frames/<size>`` set, as ``uint8 [K, S, S, 3]`` (decoding's
        layout), or the error message when they cannot be read."""
        try:
            frames = self._frames_source().read_rows(source.from_set, row, row + 1)[0]
        except Exception as err:  # noqa: BLE001 - a damaged chunk fails this clip, not the run
            return f"reading stored frames {source.from_set} failed: {' '.join(str(err).split())}"
        return np.ascontiguousarray(frames.transpose(0, 2, 3, 1))

    def _frames_source(self):
        """This process's read-only handle on the store (a forked worker opens its own)."""
        with self._store_lock:
            if self._store is None or self._store[0] != os.getpid():
                from featurestore.store import open_store

                location, backend, storage_options = self.frames_store
                self._store = (os.getpid(), open_store(location, "r", backend=backend,
                                                       storage_options=storage_options))
        return self._store[1]

    @classmethod
    def _job_input(cls, job: Job, value: np.ndarray | torch.Tensor, row: int) -> torch.Tensor:
        """What ``job`` reads: torchcodec's frame tensor is already the uint8 ``[K, H, W, 3]`` that
        ``as_uint8_frames`` hands over (left where it was decoded, the GPU's memory included); a
        preprocessor that runs here gets it as the array decoding gives."""
        if isinstance(value, torch.Tensor):
            if job.batched is not None:
                return value
            value = value.cpu().numpy()
        return cls._preprocess(job, value, row)

    @staticmethod
    def _preprocess(job: Job, value: np.ndarray, row: int) -> torch.Tensor:
        x = job.preprocess(value)
        if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[0] != job.n_segments:
            found = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise RuntimeError(f"preprocessor of {job.name} returned {found} for row {row}; expected a tensor "
                             f"with {job.n_segments} segments on its first axis")
        return x


def collate(results: list[ClipResult], pool: buffer_pool.BufferPool | None = None) -> DecodedBatch:
    """Stack the clips of a decode batch per job (runs in the worker, so the main thread only encodes);
    in a worker, into a reused slot of ``pool`` when one is free (``functools.partial(collate, pool=)``)."""
    rows = np.array([r.row for r in results], dtype=np.int64)
    jobs = sorted({j for r in results for j in (*r.inputs, *r.errors)})
    inputs: dict[int, tuple[np.ndarray, torch.Tensor]] = {}
    extra: dict[int, list[tuple[np.ndarray, torch.Tensor]]] = {}
    errors: dict[int, dict[int, str]] = {}
    seconds: dict[str, float] = {}
    for r in results:
        for stage, value in r.seconds.items():
            _add(seconds, stage, value)
    stacked: dict[tuple[int, ...], tuple[np.ndarray, torch.Tensor]] = {}
    info = torch.utils.data.get_worker_info()
    share = _Sharer(pool, info.id) if info is not None else None
    if info is not None:
        _guard_queue_thread()
    for j in jobs:
        groups = []
        ok_results = [r for r in results if j in r.inputs]
        if any(j in r.frames for r in ok_results):
            by_shape = _by_shape(ok_results, j)
        else:  # preprocessed inputs have one shape; a plugin's odd one fails in torch.cat, as it should
            by_shape = [ok_results] if ok_results else []
        for ok in by_shape:
            parts = tuple(id(r.inputs[j]) for r in ok)  # same tensors (shared preprocessing): stack once
            if parts not in stacked:
                try:
                    x = _cat([r.inputs[j] for r in ok], share)
                except _ShareFailed as err:
                    return DecodedBatch(rows, {}, {}, seconds, fatal=(
                        f"decode worker (pid {os.getpid()}) could not pass rows {rows.min()}..{rows.max()} to "
                        f"the main process through shared memory (/dev/shm full or a file-size limit?): {err}"))
                stacked[parts] = (np.array([r.row for r in ok], dtype=np.int64), x)
            groups.append(stacked[parts])
        if groups:
            inputs[j] = groups[0]
        if len(groups) > 1:
            extra[j] = groups[1:]
        failed = {r.row: r.errors[j] for r in results if j in r.errors}
        if failed:
            errors[j] = failed
    pooled = share.pooled if share is not None else []
    return DecodedBatch(rows, inputs, errors, seconds, extra=extra, pooled=pooled,
                        pool_key=pool.key if pool is not None else 0)


_ON_QUEUE_ERROR = multiprocessing.queues.Queue._on_queue_feeder_error  # the standard library's: print
_GUARDED_PID = 0  # the process whose queues carry lost batches to the main process as fatal ones


def _guard_queue_thread() -> None:
    """In a decode worker, before its first batch is queued: a batch its queue thread cannot send is
    replaced by a fatal one (``_lost_in_queue``) instead of being printed and dropped (the main
    process would wait ``DECODE_TIMEOUT_S`` for it). Set on the class, in this worker process only:
    torch makes the queue and starts its thread at the first ``put``, after this."""
    global _GUARDED_PID
    if _GUARDED_PID != os.getpid():
        _GUARDED_PID = os.getpid()
        multiprocessing.queues.Queue._on_queue_feeder_error = _lost_in_queue


def _lost_in_queue(queue: multiprocessing.queues.Queue, err: Exception, obj: object) -> None:
    """``Queue._on_queue_feeder_error`` of a decode worker (bound: ``queue`` is the queue): ``obj``
    could not be sent. A decoded batch goes out again as a fatal one naming ``err``; anything else
    (bytes half sent, or a fatal batch that failed too) ends this worker after the usual traceback,
    so the main process reports a dead worker within seconds rather than waiting for the batch."""
    replaced = _as_fatal(obj, err)
    if replaced is None:
        _ON_QUEUE_ERROR(err, obj)
        os._exit(1)
    queue.put(replaced)


def _as_fatal(obj: object, err: Exception) -> tuple | None:
    """``obj`` (the DataLoader's ``(index, data)``, ``data`` a batch or a tuple holding one) with its
    batch replaced by a fatal one naming ``err``; None when ``obj`` is not such a thing."""
    if not (isinstance(obj, tuple) and len(obj) == 2):
        return None
    index, data = obj
    parts = data if isinstance(data, tuple) else (data,)
    batches = [part for part in parts if isinstance(part, DecodedBatch)]
    if len(batches) != 1 or batches[0].fatal:
        return None
    lost = batches[0]
    fatal = DecodedBatch(lost.rows, {}, {}, lost.seconds, fatal=(
        f"decode worker (pid {os.getpid()}) could not send rows {lost.rows.min()}..{lost.rows.max()} to the main "
        f"process ({type(err).__name__}: {' '.join(str(err).split())})"))
    parts = tuple(fatal if part is lost else part for part in parts)
    return index, parts if isinstance(data, tuple) else fatal


class WatchedBatches:
    """The batches of a DataLoader iterator made with ``timeout=WORKER_CHECK_S``, each waited for up
    to ``total_s``: torch checks that every worker is alive at the end of each ``WORKER_CHECK_S``
    wait (a dead one: "DataLoader worker (pid(s) N) exited unexpectedly"), and after ``total_s``
    without the batch this raises torch's own "DataLoader timed out after ``total_s`` seconds".
    A single ``timeout=total_s`` wait noticed a death only through SIGCHLD (see the module doc).

    Args:
        batches: the loader's iterator (``featurestore._sigint.iter_loader``'s), made with a
            DataLoader ``timeout`` of ``WORKER_CHECK_S`` (or less).
        total_s: the longest wait for one batch (``pipeline.DECODE_TIMEOUT_S``).
    """

    def __init__(self, batches: Iterator[DecodedBatch], total_s: float):
        self.batches, self.total_s = batches, total_s

    def __iter__(self) -> WatchedBatches:
        return self

    def __next__(self) -> DecodedBatch:
        start = time.monotonic()
        while True:
            try:
                return next(self.batches)
            except RuntimeError as err:  # a torch timeout leaves its iterator as it was: asked again
                if not str(err).startswith("DataLoader timed out"):
                    raise
                if time.monotonic() - start >= self.total_s:
                    raise RuntimeError(f"DataLoader timed out after {self.total_s} seconds") from None

    def close(self) -> None:
        """Shut the workers down now (``_sigint._Batches.close``)."""
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()


class _ShareFailed(Exception):
    """Shared memory for a stacked tensor could not be had (message: why, on one line)."""


class _Sharer:
    """How a worker puts stacked tensors into shared memory: a free slot of ``pool`` (then the
    tensor is listed in ``pooled``), else fresh shared memory."""

    def __init__(self, pool: buffer_pool.BufferPool | None, worker: int):
        self.pool, self.worker = pool, worker
        self.pooled: list[tuple[torch.Tensor, int]] = []


def _cat(tensors: list[torch.Tensor], share: _Sharer | None) -> torch.Tensor:
    """``torch.cat``; in a worker (``share``) straight into shared memory: a reused pool slot when
    one is free (no fresh pages to fault in: most of the hand-over's cost for uint8 frames, 2.76 MB
    per 720p frame), else new shared memory as torch's default collate does (one copy either way)."""
    if share is None:
        return torch.cat(tensors)
    first = tensors[0]
    shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
    try:
        if share.pool is not None:
            got = share.pool.stack(tensors, share.worker)
            if got is not None:
                share.pooled.append(got)
                return got[0]
        storage = first._typed_storage()._new_shared(math.prod(shape), device=first.device)
    except (OSError, RuntimeError) as err:
        raise _ShareFailed(" ".join(str(err).split())) from err
    return torch.cat(tensors, out=first.new(storage).resize_(shape))


def _by_shape(results: list[ClipResult], job: int) -> list[list[ClipResult]]:
    """The clips of a frames job grouped by frame shape (uint8 frames of several sizes cannot be
    stacked), in order of first appearance."""
    groups: dict[tuple[int, ...], list[ClipResult]] = {}
    for r in results:
        groups.setdefault(tuple(r.inputs[job].shape[1:]), []).append(r)
    return list(groups.values())


def make_decoder(plan: Plan, blocks: list[tuple[int, int]],
                 on_device: bool = False) -> tuple[ClipDecoder, list[list[int]]]:
    """The dataset and its decode batches (lists of rows, in row order) for the given blocks;
    ``on_device``: image encoders' frames go to the device as uint8 (see ``make_job``)."""
    sources = plan.sources()
    jobs = [make_job(i, t.name, t.source.key, t.encoder.preprocessor(), t.source.n_segments, on_device)
            for i, t in enumerate(plan.targets)]
    needs: dict[int, tuple[int, ...]] = {}
    batches: list[list[int]] = []
    for start, stop in blocks:
        for rows in plan.decode_batches(start, stop):
            batches.append([int(r) for r in rows])
            for r in rows:
                needs[int(r)] = tuple(i for i, t in enumerate(plan.targets) if t.todo[r])
    return ClipDecoder(sources, jobs, needs, plan.audio_paths, plan.video_paths, plan.frames_store), batches


def _share_key(job: Job) -> tuple | None:
    """Jobs on the same source whose preprocessors compare equal get one tensor (None: not hashable)."""
    try:
        hash(job.preprocess)
    except TypeError:
        return None
    return (job.source, job.preprocess)


def _add(acc: dict[str, float], key: str, value: float) -> None:
    acc[key] = acc.get(key, 0.0) + value
