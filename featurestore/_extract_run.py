"""The pipeline proper: decode in worker processes, encode in the calling thread, write in a thread.

Three stages overlap:

1. a torch ``DataLoader`` whose worker processes decode and preprocess whole batch windows ahead
   of time (``prefetch_factor`` windows per worker);
2. the calling thread moves each window to the device and runs every encoder on it, filling the
   in-memory buffer of the window's block;
3. a writer thread takes finished blocks from a bounded queue and writes them, one
   ``write_rows`` call per feature set (data, then errors, then done flags).

So the device only waits for decoding when the workers are slower than it, and writing never
stalls encoding unless the queue is full (which bounds memory to a few blocks).
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader

from featurestore._extract_decode import DecodedBatch, collate, make_decoder
from featurestore._extract_plan import Plan, Target
from featurestore.store.store import FeatureStore

#: Finished blocks waiting for the writer; bounds memory to (this + 2) blocks of outputs.
WRITE_QUEUE_BLOCKS = 2
#: Batch windows each DataLoader worker decodes ahead.
PREFETCH_WINDOWS = 2
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
class _Block:
    """Outputs of one block being assembled: per target a buffer, the rows done and the failures."""

    start: int
    stop: int
    windows_left: int
    data: dict[int, np.ndarray] = field(default_factory=dict)
    ok: dict[int, np.ndarray] = field(default_factory=dict)
    errors: dict[int, dict[int, str]] = field(default_factory=dict)

    def buffer(self, j: int, target: Target) -> np.ndarray:
        if j not in self.data:
            n = self.stop - self.start
            self.data[j] = np.zeros((n, target.source.n_segments, *target.shape), dtype=target.dtype)
            self.ok[j] = np.zeros(n, dtype=bool)
        return self.data[j]


class _Writer(threading.Thread):
    """Writes finished blocks in the background; the first error stops it and is re-raised."""

    def __init__(self, store: FeatureStore, targets: list[Target], stats: RunStats):
        super().__init__(name="featurestore-extract-writer", daemon=True)
        self.store, self.targets, self.stats = store, targets, stats
        self.queue: queue.Queue[_Block | None] = queue.Queue(maxsize=WRITE_QUEUE_BLOCKS)
        self.error: BaseException | None = None
        self.lock = threading.Lock()

    def run(self) -> None:
        while True:
            block = self.queue.get()
            if block is None or self.error is not None:
                return
            try:
                t0 = time.perf_counter()
                self._write(block)
                with self.lock:
                    self.stats.add_seconds("write", time.perf_counter() - t0)
            except BaseException as err:  # re-raised in the encoding thread by check()
                self.error = err
                return

    def _write(self, block: _Block) -> None:
        for j in sorted(set(block.data) | set(block.errors)):
            target = self.targets[j]
            n = block.stop - block.start
            data = block.data.get(j)
            if data is None:
                data = np.zeros((n, target.source.n_segments, *target.shape), dtype=target.dtype)
            ok = block.ok.get(j, np.zeros(n, dtype=bool))
            old_done = self.store.done_mask(target.name)[block.start:block.stop]
            if old_done.any():  # rows finished earlier share these chunks: carry their data over
                old = self.store.read_rows(target.name, block.start, block.stop, check_done=False)
                data[old_done] = old[old_done]
            errors = block.errors.get(j, {})
            self.store.write_rows(target.name, block.start, data, done=old_done | ok, errors=errors)
            with self.lock:
                self.stats.written[target.name] = self.stats.written.get(target.name, 0) + int(ok.sum())
                if errors:
                    self.stats.failed.setdefault(target.name, {}).update(errors)

    def put(self, block: _Block) -> None:
        while True:  # wait for room, but notice a writer that died meanwhile
            self.check()
            try:
                self.queue.put(block, timeout=0.5)
                return
            except queue.Full:
                continue

    def check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"writing to {self.store.location} failed: {self.error}") from self.error

    def finish(self) -> None:
        """Write everything queued, stop the thread and re-raise its error if it had one."""
        if self.is_alive():
            self.queue.put(None)
            self.join()
        self.check()


def default_num_workers() -> int:
    """One decoding process per spare core (at least one, at most eight)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores - 1))


def run_blocks(plan: Plan, store: FeatureStore, blocks: list[tuple[int, int]], device: torch.device,
               num_workers: int, on_progress: Callable[[int], None] | None = None) -> RunStats:
    """Decode, encode and write the given blocks of ``plan`` into ``store``.

    Args:
        plan: the plan (targets with their encoders already on ``device``).
        store: the store, open for writing; only the writer thread touches it while this runs.
        blocks: ``(start, stop)`` row ranges, each a whole number of chunks of every target.
        device: where the encoders run.
        num_workers: decoding processes (0 decodes in this thread, as Dask tasks do).
        on_progress: called with the number of clips after each batch (progress bars).

    Returns:
        What was written and what failed, with per-stage seconds.
    """
    stats = RunStats()
    decoder, windows, per_block = make_decoder(plan, blocks)
    if not windows:
        return stats
    loader = DataLoader(decoder, batch_sampler=windows, collate_fn=collate, num_workers=num_workers,
                        prefetch_factor=PREFETCH_WINDOWS if num_workers else None,
                        pin_memory=device.type == "cuda")
    batches = iter(loader)  # workers are forked here, before the writer thread exists
    writer = _Writer(store, plan.targets, stats)
    writer.start()
    try:
        _encode_all(plan, batches, blocks, per_block, device, writer, stats, on_progress)
    finally:
        del batches  # shuts the worker processes down
        writer.finish()
    return stats


def _encode_all(plan: Plan, batches, blocks: list[tuple[int, int]], per_block: list[int],
                device: torch.device, writer: _Writer, stats: RunStats,
                on_progress: Callable[[int], None] | None) -> None:
    for (start, stop), n_windows in zip(blocks, per_block):
        if n_windows == 0:
            continue
        block = _Block(start, stop, n_windows)
        for _ in range(n_windows):
            t0 = time.perf_counter()
            batch = next(batches)
            stats.add_seconds("wait for input", time.perf_counter() - t0)
            _encode_batch(plan, batch, block, device, stats)
            writer.check()
            stats.clips += len(batch.rows)
            if on_progress is not None:
                on_progress(len(batch.rows))
        writer.put(block)


def _encode_batch(plan: Plan, batch: DecodedBatch, block: _Block, device: torch.device, stats: RunStats) -> None:
    """Run every encoder that has inputs in the batch and put the outputs into the block buffer."""
    for stage, value in batch.seconds.items():
        stats.add_seconds(stage, value)
    for j, (rows, x) in batch.inputs.items():
        target = plan.targets[j]
        t0 = time.perf_counter()
        out = _encode(target, x, device)
        stats.add_seconds(f"encode {target.name}", time.perf_counter() - t0)
        buf = block.buffer(j, target)
        offsets = rows - block.start
        buf[offsets] = out.reshape(len(rows), target.source.n_segments, *target.shape)
        block.ok[j][offsets] = True
    for j, errs in batch.errors.items():
        block.buffer(j, plan.targets[j])
        block.errors.setdefault(j, {}).update(errs)


def _encode(target: Target, x: torch.Tensor, device: torch.device) -> np.ndarray:
    """One encoder call; the cast to the stored dtype happens on the device (same rounding as numpy)."""
    out = target.encoder.encode(x.to(device, non_blocking=True))
    torch_dtype = _TORCH_DTYPES.get(target.dtype)
    if torch_dtype is not None:
        return out.to(torch_dtype).cpu().numpy()
    return out.float().cpu().numpy().astype(target.dtype)
