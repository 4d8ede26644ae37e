"""The pipeline proper: decode in worker processes, encode in the calling thread, write in a thread.

Three stages overlap:

1. a torch ``DataLoader`` whose worker processes decode and preprocess batches of clips ahead of
   time (``prefetch_factor`` batches per worker);
2. the calling thread hands each decoded batch to one *lane* per encoder; a lane encodes fixed
   batches of rows on the device and fills the buffer of the feature set's current chunk;
3. a writer thread (four on an accelerator, each owning every fourth block: ``_Writers``) takes
   finished chunks from a bounded queue and writes each with one ``write_rows`` call (data, then
   errors, then done flags). Every ``plan.commit_seconds`` the
   chunks still being filled are queued too, as copies holding the rows encoded so far, so a kill
   loses at most that much encoding whatever the chunk size (the full chunk is written again later;
   the rows done by then keep their stored bits and done flags).

A row whose encoder output holds a NaN or an infinity is a per-clip error ("non-finite output from
<encoder>") like a clip that cannot be decoded: never marked done, recorded with the failures.

So the device only waits for decoding when the workers are slower than it, writing never stalls
encoding unless the queue is full, and memory is bounded by an encode batch of inputs and a chunk
of outputs per encoder plus the queue, whatever the number of clips.

A run that cannot go on stops with one error and a consistent store: a failed write (disk full,
file-size limit) is a :class:`StoreWriteError` naming the rows; a decode worker that dies (killed,
out of shared memory) or hands over nothing for ``DECODE_TIMEOUT_S`` is a :class:`DecodeWorkerError`.
Either way the chunks finished before are written (or kept) and nothing else is marked done.
Ctrl-C is a KeyboardInterrupt in the calling thread only: the decode workers are forked deaf to
SIGINT and a decoded batch is never half-received (``featurestore._sigint``), so no worker prints.
"""
from __future__ import annotations

import concurrent.futures
import functools
import gc
import itertools
import os
import queue
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from featurestore._sigint import check_pending, iter_loader, raise_swallowed
from featurestore._sigint import join as join_thread
from featurestore.atomic_files import find_os_error
from featurestore.extract.buffer_pool import BufferPool, slots_per_worker
from featurestore.extract.errors import (
    DecodeWorkerError, ExtractionStopped, store_write_error,
)
from featurestore.extract.plan import Plan, Target
from featurestore.extract.transfers import (
    INFLIGHT_BATCHES, DeviceCopies, _Launched, cast_on_host, encode_unchanged, lane_device, launch,
    preprocess_unchanged,
)
from featurestore.extract.workers import (
    WORKER_CHECK_S, DecodedBatch, WatchedBatches, collate, make_decoder, preprocess_on_device,
)
from featurestore.store.store import FeatureStore

#: Finished chunks waiting for the writer (a chunk is ~4 MiB of one feature set by default).
WRITE_QUEUE_CHUNKS = 8
#: Batches each DataLoader worker decodes ahead.
PREFETCH_BATCHES = 2
#: Longest wait for one decoded batch before the run stops (a worker that lost a batch, or hangs).
DECODE_TIMEOUT_S = 600.0
#: Test hook: ``"KILL:10"`` makes the process send itself SIGKILL (its process group when it leads
#: one, so decode workers go too) once a write leaves >= 10 done rows summed over the run's feature
#: sets; ``"STOP:10"`` stops it (SIGSTOP) there. Tests kill a run at chosen points with it.
TEST_SIGNAL_ENV = "FEATURESTORE_TEST_SIGNAL_AT_DONE"
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class RunStats:
    """What a run (or one Dask task) did.

    Attributes:
        written: feature set -> rows newly marked done.
        failed: feature set -> {row: message} for rows that failed in this run.
        seconds: stage -> seconds (decode/preprocess summed over workers; encoders and write as
            spent; ``wait for input`` is time the device thread sat idle waiting for decoding).
        clips: clips that went through the pipeline.
    """

    written: dict[str, int] = field(default_factory=dict)
    failed: dict[str, dict[int, str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    clips: int = 0

    def add_seconds(self, stage: str, value: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + value

    def merge(self, other: RunStats) -> None:
        for name, n in other.written.items():
            self.written[name] = self.written.get(name, 0) + n
        for name, errs in other.failed.items():
            self.failed.setdefault(name, {}).update(errs)
        for stage, value in other.seconds.items():
            self.add_seconds(stage, value)
        self.clips += other.clips


@dataclass
class _Chunk:
    """Outputs of one chunk of one feature set being filled, and what is still missing."""

    target: int
    start: int
    stop: int
    data: np.ndarray
    ok: np.ndarray
    remaining: int
    errors: dict[int, str] = field(default_factory=dict)
    committed: int = 0  # rows handled (encoded or failed) when it was last committed partly

    def handled(self) -> int:
        """Rows of the chunk encoded or failed so far."""
        return int(self.ok.sum()) + len(self.errors)

    def snapshot(self) -> _Chunk:
        """A copy of what is filled now, for the writer to commit while filling goes on."""
        return _Chunk(self.target, self.start, self.stop, self.data.copy(), self.ok.copy(), self.remaining,
                      dict(self.errors))


class _Lane:
    """One encoder's path: collects decoded rows into fixed encode batches, encodes, fills chunks.

    Encode batches are ``batch_size`` rows at fixed positions counted from each chunk start of the
    feature set, restricted to the rows that need work. A resumed run (whose feature sets are done
    in whole encode batches: chunks, and partial commits made between batches) or a Dask task
    (which owns whole chunks) therefore encodes exactly the batches an uninterrupted run does, which
    keeps CPU outputs bit-identical. Memory is bounded by one encode batch of inputs and one chunk of
    outputs per encoder (a partial commit queues a copy of the chunk, in place of a full one).

    A lane given ``batched`` (the device half of an image encoder's preprocessing) receives uint8
    frames and runs ``batched`` on each encode batch on the device: one call per frame size in the
    batch (one in practice), never one per frame.
    """

    def __init__(self, j: int, target: Target, blocks: list[tuple[int, int]], batch_size: int, n_rows: int,
                 device: torch.device, writer: _Writers | None, stats: RunStats,
                 batched: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 copies: DeviceCopies | None = None):
        self.j, self.target, self.writer, self.stats = j, target, writer, stats
        self.device = lane_device(target, device)
        self.batched = batched
        self.copies = copies if copies is not None else DeviceCopies(self.device)
        self.inflight: deque[tuple[np.ndarray, _Launched]] = deque()  # encoded on the device, not back yet
        self.batches: deque[np.ndarray] = deque()  # encode batches, in row order
        self.chunk_need: dict[int, int] = {}
        per = target.chunk_clips
        for start, stop in blocks:
            for c in range(start, stop, per):
                c_stop = min(c + per, n_rows)
                rows = c + np.flatnonzero(target.todo[c:c_stop])
                if len(rows):
                    self.chunk_need[c] = len(rows)
                for lo in range(c, c_stop, batch_size):
                    batch = rows[(rows >= lo) & (rows < lo + batch_size)]
                    if len(batch):
                        self.batches.append(batch)
        self.pending: dict[int, tuple[torch.Tensor, int]] = {}  # row -> (batch tensor, index in batch)
        self.failed: set[int] = set()
        self.chunks: dict[int, _Chunk] = {}

    def add(self, rows: np.ndarray | None, x: torch.Tensor | None, errors: dict[int, str]) -> None:
        """Take a decoded batch's rows for this encoder (and its failures); encode the batches that are complete."""
        if rows is not None:
            for i, row in enumerate(rows):
                self.pending[int(row)] = (x, i)
        for row, message in errors.items():
            self.failed.add(int(row))
            chunk = self._chunk(int(row))
            chunk.errors[int(row)] = message
            self._handled(chunk, 1)
        while self.batches and all(int(r) in self.pending or int(r) in self.failed for r in self.batches[0]):
            self._encode(self.batches.popleft())

    def _encode(self, batch: np.ndarray) -> None:
        rows = np.array([r for r in batch if int(r) not in self.failed], dtype=np.int64)
        if not len(rows):
            return
        x = self._inputs(rows)
        t0 = time.perf_counter()
        if self.device.type == "cpu":
            self._fill(rows, *_encode(self.target, x, self.device, len(rows)))
        else:  # queued on the device; the outputs are taken INFLIGHT_BATCHES encode batches later
            self.inflight.append((rows, launch(self.target, x, len(rows))))
            self.drain(INFLIGHT_BATCHES)
        self.stats.add_seconds(f"encode {self.target.name}", time.perf_counter() - t0)

    def drain(self, keep: int = 0) -> None:
        """Take the outputs of all but the ``keep`` newest encode batches in flight (waiting for
        each one's event: the device has long finished them when ``keep`` > 0) into their chunks."""
        while len(self.inflight) > keep:
            rows, launched = self.inflight.popleft()
            self._fill(rows, *launched.result(self.target, len(rows)))

    def _fill(self, rows: np.ndarray, out: np.ndarray, finite: np.ndarray) -> None:
        """Put one encode batch's outputs (as stored) into their chunks; non-finite rows fail."""
        out = out.reshape(len(rows), self.target.source.n_segments, *self.target.shape)
        for i, row in enumerate(rows):
            chunk = self._chunk(int(row))
            if finite[i]:
                chunk.data[row - chunk.start] = out[i]
                chunk.ok[row - chunk.start] = True
            else:  # never stored as done: NaN would reach every model and output trained on it
                chunk.errors[int(row)] = non_finite_message(self.target, out[i])
            self._handled(chunk, 1)

    def _inputs(self, rows: np.ndarray) -> torch.Tensor:
        """The encode batch's input tensor, preprocessed on the device when the lane has ``batched``."""
        parts = [self.pending.pop(int(r)) for r in rows]
        n_seg = self.target.source.n_segments
        if self.batched is None:
            return self.copies.stack(parts, n_seg)
        t0 = time.perf_counter()
        by_size: dict[tuple[int, ...], list[int]] = {}
        for k, (t, _) in enumerate(parts):
            by_size.setdefault(tuple(t.shape[1:]), []).append(k)
        if len(by_size) == 1:
            x = preprocess_unchanged(self.target, self.batched, self.copies.stack(parts, n_seg))
        else:  # clips of several frame sizes: one call per size, outputs put back in row order
            x = None
            for ks in by_size.values():
                y = preprocess_unchanged(self.target, self.batched, self.copies.stack([parts[k] for k in ks], n_seg))
                if x is None:
                    x = torch.empty((len(parts) * n_seg, *y.shape[1:]), dtype=y.dtype, device=y.device)
                at = (torch.tensor(ks)[:, None] * n_seg + torch.arange(n_seg)).reshape(-1)
                x[at.to(y.device, non_blocking=True)] = y
        self.stats.add_seconds(f"preprocess {self.target.name}", time.perf_counter() - t0)
        return x

    def _chunk(self, row: int) -> _Chunk:
        per = self.target.chunk_clips
        start = row - row % per
        chunk = self.chunks.get(start)
        if chunk is None:
            stop = min(start + per, len(self.target.todo))
            t = self.target
            chunk = _Chunk(self.j, start, stop, np.zeros((stop - start, t.source.n_segments, *t.shape), t.dtype),
                           np.zeros(stop - start, dtype=bool), self.chunk_need[start])
            self.chunks[start] = chunk
        return chunk

    def _handled(self, chunk: _Chunk, n: int) -> None:
        chunk.remaining -= n
        if chunk.remaining == 0:
            del self.chunks[chunk.start]
            self.writer.put(chunk)

    def commit_partial(self) -> int:
        """Queue a copy of every chunk being filled that has rows handled since its last commit;
        returns how many were queued. Rows encoded so far are then written and marked done."""
        self.drain()
        queued = 0
        for chunk in list(self.chunks.values()):
            handled = chunk.handled()
            if handled > chunk.committed:
                self.writer.put(chunk.snapshot())
                chunk.committed = handled
                queued += 1
        return queued

    def check_finished(self) -> None:
        """Every encode batch encoded and every chunk handed to the writer (else a row never arrived)."""
        self.drain()
        if self.batches or self.chunks or self.pending:
            raise RuntimeError(f"{self.target.name}: {len(self.batches)} encode batches and {len(self.chunks)} chunks "
                               f"left unfinished after the last batch (rows {sorted(self.pending)[:5]} pending)")


class _Writer(threading.Thread):
    """Writes finished chunks in the background; the first error stops it and is re-raised.

    It counts into its own ``stats`` (merged by the caller after ``finish``), so no counter is
    shared between threads.
    """

    def __init__(self, store: FeatureStore, targets: list[Target]):
        super().__init__(name="featurestore-extract-writer", daemon=True)
        self.store, self.targets, self.stats = store, targets, RunStats()
        self.queue: queue.Queue[_Chunk | None] = queue.Queue(maxsize=WRITE_QUEUE_CHUNKS)
        self.error: BaseException | None = None
        self.test_signal = _test_signal()
        # (feature set, chunk start) -> (rows kept, values): rows finished before this run, see _rows_before
        self._before: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    def run(self) -> None:
        while True:
            chunk = self.queue.get()
            if chunk is None or self.error is not None:
                return
            try:
                t0 = time.perf_counter()
                self._write(chunk)
                self.stats.add_seconds("write", time.perf_counter() - t0)
            except BaseException as err:  # re-raised in the encoding thread by check()
                os_error = find_os_error(err)
                if os_error is not None:
                    name = self.targets[chunk.target].name
                    err = store_write_error(self.store.location, os_error,
                                            f"writing features/{name} rows {chunk.start}:{chunk.stop}")
                self.error = err
                return
            if self.test_signal is not None:
                self._maybe_signal(*self.test_signal)

    def _maybe_signal(self, sig: signal.Signals, at_done: int) -> None:
        if sum(int(self.store.done_mask(t.name).sum()) for t in self.targets) < at_done:
            return
        if sig == signal.SIGKILL and os.getpgrp() == os.getpid():
            os.killpg(os.getpid(), sig)
        os.kill(os.getpid(), sig)
        self.test_signal = None  # SIGSTOP: once continued, go on

    def _write(self, chunk: _Chunk) -> None:
        target = self.targets[chunk.target]
        old_done = self.store.done_mask(target.name)[chunk.start:chunk.stop]
        before = old_done & ~chunk.ok  # rows finished before this run (limit, retried failures): keep them
        if before.any():
            chunk.data[before] = self._rows_before(target.name, chunk, before)
        if chunk.remaining == 0:
            self._before.pop((target.name, chunk.start), None)
        # never clears a done flag. Done rows are written again with the bits stored: rows this run
        # encoded are in the chunk's data (those an earlier partial commit wrote included, so a partial
        # commit rereads nothing of its own), the others were just read; the store is told
        # (``unchanged``) so that it does not read them again to keep the data version
        self.store.write_rows(target.name, chunk.start, chunk.data, done=old_done | chunk.ok, errors=chunk.errors,
                              unchanged=old_done)
        newly = int((chunk.ok & ~old_done).sum())  # a partly committed chunk's earlier rows count once
        self.stats.written[target.name] = self.stats.written.get(target.name, 0) + newly
        if chunk.errors:
            self.stats.failed.setdefault(target.name, {}).update(chunk.errors)

    def _rows_before(self, name: str, chunk: _Chunk, before: np.ndarray) -> np.ndarray:
        """The stored values of a chunk's rows finished before this run (``before``), read once per
        chunk (the span that holds them) and kept until the chunk's last write: each later partial
        commit of the chunk would otherwise read them again."""
        key = (name, chunk.start)
        kept = self._before.get(key)
        if kept is None or (before & ~kept[0]).any():
            rows = np.flatnonzero(before)
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            values = np.empty_like(chunk.data)
            values[lo:hi] = self.store.read_rows(name, chunk.start + lo, chunk.start + hi, check_done=False)
            mask = np.zeros(len(before), dtype=bool)
            mask[lo:hi] = True
            kept = self._before[key] = (mask, values)
        return kept[1][before]

    def put(self, chunk: _Chunk) -> None:
        while True:  # wait for room, but notice a writer that died meanwhile
            self.check()
            try:
                self.queue.put(chunk, timeout=0.5)
                return
            except queue.Full:
                continue

    def check(self) -> None:
        check_pending()  # a Ctrl-C the writer thread took is raised here, in the waiting main thread
        if isinstance(self.error, ExtractionStopped):
            raise self.error
        if self.error is not None:
            raise RuntimeError(f"writing to {self.store.location} failed: {self.error}") from self.error

    def finish(self) -> None:
        """Write everything queued, stop the thread and re-raise its error if it had one."""
        if self.is_alive():
            self.queue.put(None)
            join_thread(self)
        self.check()


#: Most decode workers when the encoders run on the CPU: they share its cores with the encoding.
CPU_DEVICE_MAX_WORKERS = 8


#: Writer threads when the encoders run on an accelerator (each compresses and writes its blocks).
ACCELERATOR_WRITERS = 4


def default_writers(store: FeatureStore, device: torch.device) -> int:
    """Writer threads: one on the CPU (its cores encode) and for HDF5 (one writer per file), else
    ``ACCELERATOR_WRITERS``: compressing the chunks of a GPU's output is more than one core's work."""
    if device.type == "cpu" or store.backend == "hdf5":
        return 1
    return ACCELERATOR_WRITERS


class _Writers:
    """Several ``_Writer`` threads, each owning every n-th block: all chunks of a block (and every
    partial commit of a chunk, in order) go to one writer, which writes them through its own
    handle on the store, as Dask tasks do from their processes, so no chunk is written by two."""

    def __init__(self, store: FeatureStore, targets: list[Target], n: int, block_clips: int):
        from featurestore.store import open_store

        self.block_clips = block_clips
        self.extra = [open_store(store.location, "a", backend=store.backend,  # (repaired by the lock holder's open)
                                 storage_options=store.open_args.get("storage_options"), repair=False)
                      for _ in range(n - 1)]
        self.writers = [_Writer(handle, targets) for handle in [store, *self.extra]]

    @property
    def stats(self) -> RunStats:
        stats = RunStats()
        for writer in self.writers:
            stats.merge(writer.stats)
        return stats

    def start(self) -> None:
        for writer in self.writers:
            writer.start()

    def put(self, chunk: _Chunk) -> None:
        self.writers[(chunk.start // self.block_clips) % len(self.writers)].put(chunk)

    def check(self) -> None:
        for writer in self.writers:
            writer.check()

    def finish(self) -> None:
        """Every writer finished (see ``_finish_writer``), the extra handles closed and the caller's
        handle refreshed; the first error is raised once all have stopped."""
        first: BaseException | None = None
        for writer in self.writers:
            try:
                _finish_writer(writer)
            except BaseException as err:  # noqa: BLE001 - the others still finish; re-raised below
                first = first or err
        for handle in self.extra:
            handle.close()
        if self.extra:  # the caller's handle (an open store given to extract) cached done flags and
            try:        # data versions that the other handles' writes changed: see them as they are now
                self.writers[0].store.refresh()
            except Exception as err:  # noqa: BLE001 - a writer's error comes first
                first = first or err
        if first is not None:
            raise first


def default_num_workers(device: torch.device | None = None) -> int:
    """One decoding process per spare core (at least one). With the encoders on the CPU at most
    ``CPU_DEVICE_MAX_WORKERS`` (the encoding needs cores too); with an accelerator every spare core
    decodes, as decoding is what bounds the feed (~165-235 frames/s from eight workers against a
    GPU's thousands)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cap = CPU_DEVICE_MAX_WORKERS if device is None or device.type == "cpu" else cores
    return max(1, min(cap, cores - 1))


def run_blocks(plan: Plan, store: FeatureStore, blocks: list[tuple[int, int]], device: torch.device,
               num_workers: int, on_progress: Callable[[int], None] | None = None,
               decode_threads: int = 0) -> RunStats:
    """Decode, encode and write the given blocks of ``plan`` into ``store``.

    Args:
        plan: the plan (targets with their encoders already on ``device``).
        store: the store, open for writing; only the writer thread touches it while this runs.
        blocks: ``(start, stop)`` row ranges, each a whole number of chunks of every target.
        device: where the encoders run.
        num_workers: decoding processes (0: in this process, as Dask tasks do).
        decode_threads: with ``num_workers=0``, threads that decode the next batches while this
            one encodes (PyAV releases the GIL while it decodes); 0 decodes in this thread.
        on_progress: called with the number of clips after each decoded batch (progress bars).

    Returns:
        What was written and what failed, with per-stage seconds.
    """
    stats = RunStats()
    decoder, decode_batches = make_decoder(plan, blocks, preprocess_on_device(device))
    if not decode_batches:
        return stats
    slots = slots_per_worker()
    pool = BufferPool(num_workers, slots) if num_workers and slots else None  # made before the workers fork
    loader = DataLoader(decoder, batch_sampler=decode_batches, collate_fn=functools.partial(collate, pool=pool),
                        num_workers=num_workers,
                        prefetch_factor=PREFETCH_BATCHES if num_workers else None,
                        pin_memory=device.type == "cuda",
                        timeout=min(WORKER_CHECK_S, DECODE_TIMEOUT_S) if num_workers else 0)
    gc.collect()  # a PyAV object left in a reference cycle here must not be collected in a forked worker (crash)
    if num_workers == 0 and decode_threads > 0:
        batches = decode_in_threads(decoder, decode_batches, decode_threads)
    else:
        # workers are forked here (deaf to Ctrl-C), before the writer thread exists
        batches = WatchedBatches(iter_loader(loader), DECODE_TIMEOUT_S)
    writer = _Writers(store, plan.targets, default_writers(store, device), plan.block_clips)
    writer.start()
    try:
        try:
            copies = DeviceCopies(device)  # one device copy of each decoded tensor, whichever lanes read it
            lanes = [_Lane(j, t, blocks, plan.batch_size, plan.n_rows, device, writer, stats,
                           decoder.jobs[j].batched, copies if lane_device(t, device) == device else None)
                     for j, t in enumerate(plan.targets)]
            _encode_all(batches, len(decode_batches), lanes, writer, stats, on_progress,
                        _CommitClock(plan.commit_seconds))
        finally:
            try:
                if hasattr(batches, "close"):  # the worker processes (or decode threads) stop here
                    batches.close()
                del batches
                if pool is not None:
                    pool.close()
            finally:  # torch's SIGCHLD handler may raise a dead worker's error in any line above
                writer.finish()  # the chunks finished before a failure are still written
    except _WorkerFailed as err:
        raise _stopped(store, str(err)) from None
    except RuntimeError as err:  # torch's DataLoader: a worker died, or no batch within the timeout
        if not str(err).startswith("DataLoader"):
            raise
        raise _stopped(store, _loader_reason(err)) from None
    except (ConnectionError, EOFError) as err:  # a batch's shared memory from a worker that died
        if not num_workers:
            raise
        raise _stopped(store, f"a decoded batch could not be received ({type(err).__name__}): a decode worker "
                              f"died") from None
    stats.merge(writer.stats)
    return stats


def decode_in_threads(decoder, decode_batches: list[list[int]], threads: int):
    """Decoded batches in order, ``threads`` of them decoded ahead in a thread pool (bounded: at
    most ``2 * threads`` batches wait), so decoding overlaps encoding without worker processes."""
    def decode(rows: list[int]) -> DecodedBatch:
        return collate([decoder[row] for row in rows])

    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="featurestore-decode") as pool:
        ahead: deque[concurrent.futures.Future] = deque()
        todo = iter(decode_batches)
        try:
            for rows in itertools.islice(todo, 2 * threads):
                ahead.append(pool.submit(decode, rows))
            while ahead:
                batch = ahead.popleft().result()
                for rows in itertools.islice(todo, 1):
                    ahead.append(pool.submit(decode, rows))
                yield batch
        finally:
            for future in ahead:
                future.cancel()


def _finish_writer(writer: _Writer) -> None:
    """``writer.finish()``, waited out even when torch's SIGCHLD handler raises inside the join (a
    decode worker died meanwhile): the queued chunks are written first, then that error is raised,
    so the caller reports the dead worker in one line instead of a traceback from the join."""
    interrupted: RuntimeError | None = None
    while True:
        try:
            if interrupted is None:
                writer.finish()
            else:
                join_thread(writer)
                writer.check()
            break
        except RuntimeError as err:
            if not str(err).startswith("DataLoader"):
                raise
            interrupted = interrupted or err
    if interrupted is not None:
        raise interrupted


class _WorkerFailed(Exception):
    """A decode worker reported that it could not hand its batch over (message: why)."""


def _stopped(store: FeatureStore, reason: str) -> DecodeWorkerError:
    return DecodeWorkerError(f"{store.location}: extraction stopped: {reason}; the chunks finished before "
                             f"are in the store; rerun to resume")


def _loader_reason(err: RuntimeError) -> str:
    """torch's message on one line, in our words ('DataLoader worker (pid 12) is killed by signal: Killed.')."""
    text = " ".join(str(err).split()).rstrip(". ")
    text = text.replace("DataLoader worker", "a decode worker").replace(") is killed", ") was killed")
    text = re.sub(r"\(pid\(s\) (\d+)\)", r"(pid \1)", text)  # torch's other wording of one dead worker
    text = text.replace("DataLoader timed out", "no decoded batch arrived")
    if "no decoded batch arrived" in text:
        text += " (a decode worker hangs or lost its batch)"
    return text.split(". If ")[0].split(". Details")[0]


def _test_signal() -> tuple[signal.Signals, int] | None:
    """The ``TEST_SIGNAL_ENV`` hook's (signal, done rows), or None when unset."""
    value = os.environ.get(TEST_SIGNAL_ENV)
    if not value:
        return None
    name, _, at_done = value.partition(":")
    return signal.Signals[f"SIG{name.upper()}"], int(at_done)


class _CommitClock:
    """When the chunks being filled are due for a partial commit (every ``seconds``)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.last = time.monotonic()

    def due(self) -> bool:
        if time.monotonic() - self.last < self.seconds:
            return False
        self.last = time.monotonic()
        return True


def _encode_all(batches, n_batches: int, lanes: list[_Lane], writer: _Writers, stats: RunStats,
                on_progress: Callable[[int], None] | None, clock: _CommitClock) -> None:
    for _ in range(n_batches):
        t0 = time.perf_counter()
        batch: DecodedBatch = next(batches)
        stats.add_seconds("wait for input", time.perf_counter() - t0)
        if batch.fatal:
            raise _WorkerFailed(batch.fatal)
        for stage, value in batch.seconds.items():
            stats.add_seconds(stage, value)
        _prefetch(batch, lanes)
        for lane in lanes:
            lane.add(None, None, batch.errors.get(lane.j, {}))
            for rows, x in batch.groups(lane.j):  # one group, or one per frame size
                lane.add(rows, x, {})
            if clock.due():  # checked after each lane: one slow encoder does not hold the others' rows back
                for each in lanes:
                    each.commit_partial()
        _forget_taken(lanes)
        writer.check()
        raise_swallowed()  # a Ctrl-C taken inside a finalizer (the buffer pool's) and dropped there
        stats.clips += len(batch.rows)
        if on_progress is not None:
            on_progress(len(batch.rows))
    for lane in lanes:
        lane.check_finished()


def _prefetch(batch: DecodedBatch, lanes: list[_Lane]) -> None:
    """Start the device copies of a decoded batch's tensors that device lanes read (one per tensor)."""
    for lane in lanes:
        if lane.device.type != "cpu":
            for _, x in batch.groups(lane.j):
                lane.copies.prefetch(x)


def _forget_taken(lanes: list[_Lane]) -> None:
    """Drop the device copies no lane has rows of pending any more."""
    pending = {id(x) for lane in lanes for x, _ in lane.pending.values()}
    for lane in lanes:
        lane.copies.keep(pending)


def non_finite_message(target: Target, out: np.ndarray) -> str:
    """The per-clip error of an output holding NaN or infinity (counted as stored, after the cast),
    or, for an integer dtype, a value that it cannot hold (see ``cast_on_host``)."""
    if np.issubdtype(np.dtype(target.dtype), np.integer):
        info = np.iinfo(np.dtype(target.dtype))
        return (f"non-finite or out-of-range output from {target.spec}: NaN, infinity or a value outside "
                f"{info.min}..{info.max} cannot be stored as {target.dtype}")
    nan = int(np.isnan(out).sum())
    inf = int(np.isinf(out).sum())
    return f"non-finite output from {target.spec}: {nan} NaN and {inf} infinite of {out.size} values (as {target.dtype})"


def _encode(target: Target, x: torch.Tensor, device: torch.device, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """One encoder call: the outputs as stored, and which of the ``n_rows`` rows are all finite.

    The cast to the stored dtype happens on the device (same rounding as numpy); finiteness is
    judged after it, so a float16 overflow counts. On an accelerator the check runs there too (only
    ``n_rows`` flags come back); on the CPU numpy's is the faster one for float16.
    """
    out = encode_unchanged(target, x.to(device, non_blocking=True))
    torch_dtype = _TORCH_DTYPES.get(target.dtype)
    if torch_dtype is None:
        return cast_on_host(out.float().cpu().numpy(), target.dtype, n_rows)
    cast = out.to(torch_dtype)
    finite = finite_rows(cast, n_rows) if cast.device.type != "cpu" else None
    stored = cast.cpu().numpy()
    return stored, finite_rows(stored, n_rows) if finite is None else finite


def finite_rows(out: np.ndarray | torch.Tensor, n_rows: int) -> np.ndarray:
    """bool per row: every value of the row (``out`` holds ``n_rows`` rows, first axis) is finite."""
    if isinstance(out, torch.Tensor):
        return torch.isfinite(out.reshape(n_rows, -1)).all(dim=1).cpu().numpy()
    return np.isfinite(out.reshape(n_rows, -1)).all(axis=1)
