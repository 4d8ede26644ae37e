"""Stored features -> torch batches, read in chunk-sized blocks.

The paper's training unit is one *segment* (a 1 s audio segment or one video frame) of one clip; a
clip-level view is also offered for prediction and validation (all segments of a clip together).
Several feature sets can be read together: the k arrays of one clip/segment arrive side by side, which
is what the late-fusion head needs (3 CLIP embeddings of the same frame).

Why blocks: a store is chunked by whole clips, and decoding a chunk is the expensive part of a read.
`StoreDataset` therefore reads contiguous row ranges with ``store.read_rows`` (each chunk decoded once
per epoch) and gathers consecutive blocks into *read groups*: a read group is the unit that is read
into memory at once and whose samples are shuffled together (``shuffle_buffer`` clips, rounded to
whole blocks; one block when not shuffling). Each epoch shuffles the order of the blocks, then the
samples inside each read group (seeded, per epoch), and reads the next read group in a background
thread while the current one is consumed. At most two read groups are ever in memory (the one being
cut into batches and the next one being read,
each read block by block into one preallocated array), so a store larger than RAM trains in bounded
memory; ``cache=True`` loads the selected rows once instead (fastest when they fit).

For a GPU: with ``keep_dtype`` batches keep the stored dtype (uint8 frames, float16 embeddings: a
quarter or half of float32's bytes to copy), with ``pin_memory`` they are cut straight into pinned
host memory, and `Batch.to` copies them to the device without blocking, then converts them to float32
there. Without ``keep_dtype`` (the default, for callers that feed a head themselves) stored float16 is
converted to float32 per batch on the host. `WorkerLoader` keeps its worker processes from epoch to
epoch and pins in the main process (the DataLoader's pinning thread).
"""
from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from featurestore._sigint import iter_loader
from featurestore.checks import is_int_in
from featurestore.errors import MissingFeatureError

Level = Literal["segment", "clip"]
_LEVELS = ("segment", "clip")


@dataclass
class Batch:
    """A batch of samples from one or more feature sets.

    Attributes:
        inputs: one tensor per feature set, ``[B, *shape]`` at segment level and
            ``[B, n_segments, *shape]`` at clip level: float32, or the stored dtype from a loader with
            ``keep_dtype`` (`to` converts on the device).
        labels: ``[B]`` int64 class indices (-1 where the store does not know the label).
        rows: ``[B]`` int64 store rows of the clips.
        segments: ``[B]`` int64 segment index (-1 at clip level).
    """

    inputs: list[torch.Tensor]
    labels: torch.Tensor
    rows: torch.Tensor
    segments: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as ``inputs, labels, rows, segments``."""
        return iter((self.inputs, self.labels, self.rows, self.segments))

    def to(self, device: torch.device | str) -> "Batch":
        """The same batch on ``device`` with float32 inputs (labels too; rows/segments stay on the CPU).

        Inputs travel in their dtype (non-blocking: from pinned memory the host does not wait) and
        are converted to float32 once there, so a uint8 frame costs a quarter of the copy.
        """
        return Batch([x.to(device, non_blocking=True).float() for x in self.inputs],
                     self.labels.to(device, non_blocking=True), self.rows, self.segments)

    def pin_memory(self) -> "Batch":
        """The batch in pinned host memory (the DataLoader's pinning thread calls this)."""
        return Batch([x.pin_memory() for x in self.inputs], self.labels.pin_memory(), self.rows, self.segments)


@dataclass
class _ReadGroup:
    """Samples of one read group (consecutive blocks of the epoch's block order), ready to be cut into batches (arrays keep the stored dtype)."""

    arrays: list[np.ndarray]  # per feature set: [n_samples, *shape]
    labels: np.ndarray
    rows: np.ndarray
    segments: np.ndarray
    order: np.ndarray  # sample order to emit


class StoreDataset(IterableDataset):
    """An iterable over one or more stored feature sets, by segment or by clip.

    Iterating yields single samples ``(inputs, label, row, segment)`` when ``batch_size`` is None
    (use it with a ``DataLoader(batch_size=...)``), or whole `Batch` objects when ``batch_size`` is set
    (use it directly, or with ``DataLoader(batch_size=None)``); the batched form is the fast one.

    Args:
        store: an open `FeatureStore` or a path/URL (opened read-only). With DataLoader workers
            each worker reopens the store (a read-only store pickles as its open arguments).
        features: one feature-set name or a list of them; all are returned together.
        split: keep the clips of this split (``store.select(split=...)``); a list means any of them.
        clip_ids: keep exactly these clips (instead of ``split``).
        level: ``"segment"`` (one sample per clip x segment) or ``"clip"``.
        batch_size: yield batches of this size (None: single samples).
        shuffle: shuffle blocks and, within read groups of ``shuffle_buffer`` clips, samples.
        seed: base seed of the shuffle; epoch ``e`` uses ``(seed, e)`` (see `set_epoch`).
        shuffle_buffer: clips per read group, the samples shuffled together (rounded to whole blocks).
        cache: load the selected rows into memory on first use instead of streaming.
        drop_last: drop the last incomplete batch.
        missing: ``"error"`` refuses selected clips whose features are not done (naming them);
            ``"skip"`` leaves them out (see `n_skipped`).
        require_labels: refuse clips whose label is unknown (-1); set it for training.
        prefetch: read the next read group in a background thread.
        block_clips: clips per block read (default: the feature sets' chunk size).
        keep_dtype: batches keep the stored dtype (uint8, float16); `Batch.to` converts on the device.
        pin_memory: cut batches into pinned host memory (for non-blocking copies to a CUDA device;
            needs one).
    """

    def __init__(self, store: Any, features: str | Sequence[str], *, split: str | Sequence[str] | None = None,
                 clip_ids: Sequence[str] | None = None, level: Level = "segment",
                 batch_size: int | None = None, shuffle: bool = False, seed: int = 0,
                 shuffle_buffer: int = 2048, cache: bool = False, drop_last: bool = False,
                 missing: Literal["error", "skip"] = "error", require_labels: bool = False,
                 prefetch: bool = True, block_clips: int | None = None, keep_dtype: bool = False,
                 pin_memory: bool = False):
        if level not in _LEVELS:
            raise ValueError(f"level must be one of {_LEVELS}, got {level!r}")
        if missing not in ("error", "skip"):
            raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}")
        _check_sizes(batch_size=batch_size, block_clips=block_clips, shuffle_buffer=shuffle_buffer, seed=seed)
        self._store = None if isinstance(store, (str, Path)) else store
        self._store_ref = str(store) if isinstance(store, (str, Path)) else None
        self.features = [features] if isinstance(features, str) else list(features)
        if not self.features:
            raise ValueError("features must name at least one feature set")
        self.level, self.batch_size, self.shuffle, self.seed = level, batch_size, shuffle, seed
        self.shuffle_buffer, self.cache, self.drop_last, self.prefetch = shuffle_buffer, cache, drop_last, prefetch
        self.keep_dtype, self.pin_memory = keep_dtype, pin_memory
        self.epoch = 0
        self._cached: list[np.ndarray] | None = None
        self.infos = [self.store.feature_info(name) for name in self.features]  # only these sets are read
        self.n_segments = [int(info.n_segments) for info in self.infos]
        self.feature_shapes = [tuple(int(s) for s in info.feature_shape) for info in self.infos]
        if level == "segment" and len(set(self.n_segments)) > 1:
            raise ValueError("segment level needs the same number of segments in every feature set; got "
                             + ", ".join(f"{n}={s}" for n, s in zip(self.features, self.n_segments)))
        self.rows, self.n_skipped = self._select_rows(split, clip_ids, missing)
        self.labels = np.asarray(self.store.labels, dtype=np.int64)[self.rows]
        if require_labels:
            self._check_labels()
        chunk = max(int(info.chunk_clips) for info in self.infos)
        self.block_clips = int(chunk if block_clips is None else block_clips)
        self.blocks = _make_blocks(self.rows, self.block_clips)

    # ----------------------------------------------------------------- setup
    @property
    def store(self) -> Any:
        """The open store (opened read-only on first use when a path was given)."""
        if self._store is None:
            from featurestore.store import open_store

            self._store = open_store(self._store_ref, mode="r")
        return self._store

    def __getstate__(self) -> dict:
        """Pickle for DataLoader workers: an open store travels as its open arguments (read-only
        stores only, see ``FeatureStore.__getstate__``) and the cache is dropped, not copied."""
        state = dict(self.__dict__)
        state["_cached"] = None
        if self._store_ref is not None:
            state["_store"] = None
        return state

    def _select_rows(self, split: Any, clip_ids: Sequence[str] | None, missing: str) -> tuple[np.ndarray, int]:
        store = self.store
        if clip_ids is not None and split is not None:
            raise ValueError("give either split or clip_ids, not both")
        if clip_ids is not None:
            rows = np.asarray(store.rows(clip_ids), dtype=np.int64)  # rows() refuses one str
            if len(np.unique(rows)) != len(rows):  # each clip is read once an epoch: a repeat was dropped silently
                seen: set[str] = set()
                twice = [c for c in clip_ids if c in seen or seen.add(c)]
                raise ValueError(f"clip_ids: {sorted(set(twice))[:3]} given more than once; each clip is read once "
                                 f"an epoch (give each id once)")
        elif split is not None:
            rows = np.asarray(store.rows(store.select(split=split)), dtype=np.int64)
        else:
            rows = np.arange(store.n_clips, dtype=np.int64)
        rows = np.unique(rows)
        done = np.ones(len(rows), dtype=bool)
        for name in self.features:
            ok = np.asarray(store.done_mask(name), dtype=bool)[rows]
            if missing == "error" and not ok.all():
                ids = store.clip_ids
                raise MissingFeatureError(name, [ids[r] for r in rows[~ok]])
            done &= ok
        return rows[done], int((~done).sum())

    def _check_labels(self) -> None:
        unknown = self.rows[self.labels < 0]
        if len(unknown):
            ids = self.store.clip_ids
            shown = ", ".join(ids[r] for r in unknown[:5])
            raise ValueError(f"{len(unknown)} selected clip(s) have no label (e.g. {shown}); training needs "
                             f"labelled clips: choose a labelled split")

    # ------------------------------------------------------------ iteration
    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of epoch ``epoch`` (the order depends only on ``(seed, epoch)``)."""
        self.epoch = int(epoch)

    @property
    def n_samples(self) -> int:
        """Samples per epoch: clips, times segments at segment level."""
        return len(self.rows) * (self.n_segments[0] if self.level == "segment" else 1)

    def __len__(self) -> int:
        if self.batch_size is None:
            return self.n_samples
        if self.drop_last:
            return self.n_samples // self.batch_size
        return math.ceil(self.n_samples / self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        rng = np.random.default_rng([self.seed, self.epoch])
        groups = self._read_group_plan(rng)
        rng = self._sample_rng(rng)
        if self.cache:
            self._load_cache()
        produce = (self._build_read_group(g, rng) for g in groups)
        source = prefetched(produce) if self.prefetch and not self.cache else produce
        batches = _batches(source, self.batch_size or 1, self.drop_last, _Cut(self.keep_dtype, self.pin_memory))
        if self.batch_size is not None:
            yield from batches
            return
        for batch in batches:
            yield [x[0] for x in batch.inputs], batch.labels[0], batch.rows[0], batch.segments[0]

    def _read_group_plan(self, rng: np.random.Generator) -> list[list[tuple[int, int, np.ndarray]]]:
        """Blocks grouped into read groups; shuffled when training, this worker's share in a DataLoader."""
        blocks = list(self.blocks)
        if self.shuffle:
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        per_group = max(1, self.shuffle_buffer // self.block_clips) if self.shuffle else 1
        groups = [blocks[i:i + per_group] for i in range(0, len(blocks), per_group)]
        worker = get_worker_info()
        if worker is not None:
            groups = groups[worker.id::worker.num_workers]
        return groups

    def _sample_rng(self, rng: np.random.Generator) -> np.random.Generator:
        """The generator of the in-group shuffles: ``rng`` itself (continued after the block order) in one
        process; in a DataLoader worker one of its own, seeded by ``(seed, epoch, worker id)``.

        Why: every worker shares the block order (so each takes its own share of it), but with the shared
        generator each worker then left it in the same state, and shuffled its first, second, ... read
        group by the very same permutation as every other worker did its own.
        """
        worker = get_worker_info()
        return rng if worker is None else np.random.default_rng([self.seed, self.epoch, worker.id])

    def _build_read_group(self, blocks: list[tuple[int, int, np.ndarray]],
                          rng: np.random.Generator) -> _ReadGroup:
        rows = np.concatenate([start + local for start, _, local in blocks])
        arrays = [self._fill(i, blocks, len(rows)) for i in range(len(self.features))]
        labels = self.labels[np.searchsorted(self.rows, rows)]
        if self.level == "segment":
            n_seg = self.n_segments[0]
            arrays = [a.reshape(len(rows) * n_seg, *a.shape[2:]) for a in arrays]
            segments = np.tile(np.arange(n_seg, dtype=np.int64), len(rows))
            rows, labels = np.repeat(rows, n_seg), np.repeat(labels, n_seg)
        else:
            segments = np.full(len(rows), -1, dtype=np.int64)
        order = rng.permutation(len(rows)) if self.shuffle else np.arange(len(rows))
        return _ReadGroup(arrays, labels, rows, segments, order)

    def _fill(self, i: int, blocks: list[tuple[int, int, np.ndarray]], n_rows: int) -> np.ndarray:
        """Feature set ``i`` of ``blocks``, read block by block into one array (no list of blocks
        plus a concatenated copy: a read group of stored frames is hundreds of MB)."""
        out = np.empty((n_rows, self.n_segments[i], *self.feature_shapes[i]), dtype=self.infos[i].dtype)
        pos = 0
        for start, stop, local in blocks:
            out[pos:pos + len(local)] = self._read(i, start, stop, local)
            pos += len(local)
        return out

    def _read(self, i: int, start: int, stop: int, local: np.ndarray) -> np.ndarray:
        """Rows ``start + local`` of feature set ``i``: one block read (or a slice of the cache)."""
        if self._cached is not None:
            pos = np.searchsorted(self.rows, start + local)
            return self._cached[i][pos]
        block = np.asarray(self.store.read_rows(self.features[i], start, stop, check_done=False))
        return block if len(local) == stop - start else block[local]

    def _load_cache(self) -> None:
        """Read every selected row once, block by block, into one array per feature set."""
        if self._cached is not None:
            return
        self._cached = [self._fill(i, self.blocks, len(self.rows)) for i in range(len(self.features))]


def _check_sizes(**values: Any) -> None:
    """Refuse a size or seed that is not a whole number in range, naming the argument: ``block_clips=0``
    read as the default, a negative one cut blocks of one row and shuffled nothing across them, and a
    float or string batch size failed at the first batch with a message naming no argument."""
    for name, value in values.items():
        low = 0 if name == "seed" else 1
        if value is None and name in ("batch_size", "block_clips"):
            continue
        if not is_int_in(value, low):
            raise ValueError(f"StoreDataset: {name} must be an integer >= {low}"
                             f"{' (or None)' if name in ('batch_size', 'block_clips') else ''}, got {value!r}")


def _make_blocks(rows: np.ndarray, block_clips: int) -> list[tuple[int, int, np.ndarray]]:
    """Group sorted rows by aligned block: ``(start, stop, rows - start)`` with the tightest read range."""
    if len(rows) == 0:
        return []
    block_ids = rows // block_clips
    cuts = np.flatnonzero(np.diff(block_ids)) + 1
    blocks = []
    for part in np.split(rows, cuts):
        start, stop = int(part[0]), int(part[-1]) + 1
        blocks.append((start, stop, part - start))
    return blocks


T = TypeVar("T")


def prefetched(groups: Iterator[T], depth: int = 1) -> Iterator[T]:
    """Build read groups (or any items) in a background thread (block decoding overlaps training), in order.

    At most ``depth`` read groups are built ahead of the one being consumed: the producer starts one
    only once the consumer has taken the previous one, and the consumer lets go of a read group
    before it asks for the next (see `_batches`). With ``depth=1`` that is two read groups in memory,
    whatever the number of read groups in an epoch.
    """
    q: queue.Queue = queue.Queue()
    slots = threading.Semaphore(depth)
    stop = threading.Event()
    end = object()

    def work() -> None:
        try:
            source = iter(groups)
            while True:
                while not slots.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                w = next(source, end)
                q.put(w)
                if w is end:
                    return
                del w  # the queue (then the consumer) holds the only reference
        except BaseException as exc:  # re-raised in the consumer
            q.put(exc)

    thread = threading.Thread(target=work, name="StoreDataset-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            slots.release()  # taken: the producer may read the next read group while this one is consumed
            yield item
            item = None
    finally:
        stop.set()
        slots.release()  # wake a producer waiting for a slot
        thread.join()


@dataclass(frozen=True)
class _Cut:
    """How batches are cut from read groups: in the stored dtype or float32, in pinned memory or not."""

    keep_dtype: bool = False
    pin: bool = False

    def take(self, w: _ReadGroup, idx: np.ndarray) -> Batch:
        """The samples ``idx`` of ``w``, gathered straight into the batch's tensors (inputs and labels,
        what goes to the device, pinned when asked; rows and segments stay on the host)."""
        inputs = [self._input(self._gather(a, idx)) for a in w.arrays]
        return Batch(inputs, self._gather(w.labels, idx), torch.from_numpy(w.rows[idx]),
                     torch.from_numpy(w.segments[idx]))

    def cat(self, a: Batch, b: Batch) -> Batch:
        inputs, labels = [self._cat(x, y) for x, y in zip(a.inputs, b.inputs)], self._cat(a.labels, b.labels)
        return Batch(inputs, labels, torch.cat([a.rows, b.rows]), torch.cat([a.segments, b.segments]))

    def _cat(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, y], out=self._empty((len(x) + len(y), *x.shape[1:]), x.dtype))

    def _gather(self, a: np.ndarray, idx: np.ndarray) -> torch.Tensor:
        out = self._empty((len(idx), *a.shape[1:]), torch.from_numpy(a[:0]).dtype)
        np.take(a, idx, axis=0, out=out.numpy(), mode="clip")  # idx is in range; "clip" is unbuffered
        return out

    def _empty(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self.pin)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.keep_dtype else x.float()


def _batches(groups: Iterator[_ReadGroup], batch_size: int, drop_last: bool, cut: _Cut = _Cut()) -> Iterator[Batch]:
    """Cut read groups into batches; a read group's leftover is joined to the start of the next one.

    A read group is dropped before the next one is asked for, so the two are never both held here.
    """
    carry: Batch | None = None
    source = iter(groups)
    while True:
        w = next(source, None)
        if w is None:
            break
        pos = 0
        if carry is not None:
            need = batch_size - len(carry)
            head = cut.take(w, w.order[:need])
            carry, pos = cut.cat(carry, head), need
            if len(carry) < batch_size:
                w = None
                continue
            yield carry
            carry = None
        n = len(w.order)
        while pos + batch_size <= n:
            yield cut.take(w, w.order[pos:pos + batch_size])
            pos += batch_size
        if pos < n:
            carry = cut.take(w, w.order[pos:])
        w = None
    if carry is not None and len(carry) and not drop_last:
        yield carry


class TensorBatches:
    """Seeded shuffled batches from tensors already in memory: the same `Batch` interface as `StoreDataset`.

    It is the in-memory reference the store loader is benchmarked against, and lets heads be trained
    on synthetic tensors without a store.

    Args:
        inputs: one tensor per feature set, all ``[N, *shape]`` (segment-level samples).
        labels: ``[N]`` class indices.
        batch_size: samples per batch.
        shuffle: reshuffle every epoch (order depends on ``(seed, epoch)`` only).
        rows: ``[N]`` store rows (default ``arange(N)``); segments: ``[N]`` (default -1).
    """

    def __init__(self, inputs: Sequence[torch.Tensor], labels: torch.Tensor, batch_size: int, *,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                 rows: torch.Tensor | None = None, segments: torch.Tensor | None = None):
        n = int(labels.shape[0])
        for i, x in enumerate(inputs):
            if int(x.shape[0]) != n:
                raise ValueError(f"input {i} has {x.shape[0]} samples, labels have {n}")
        for name, x in (("rows", rows), ("segments", segments)):  # shorter failed mid-epoch; longer misaligned
            if x is not None and tuple(x.shape) != (n,):
                raise ValueError(f"TensorBatches: {name} has shape {tuple(x.shape)}, expected ({n},): one per sample")
        if not is_int_in(batch_size, 1):
            raise ValueError(f"TensorBatches: batch_size must be an integer >= 1, got {batch_size!r}")
        self.inputs = [x.float() for x in inputs]
        self.labels = labels.long()
        self.rows = rows.long() if rows is not None else torch.arange(n)
        self.segments = segments.long() if segments is not None else torch.full((n,), -1, dtype=torch.long)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of epoch ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = int(self.labels.shape[0])
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        n = int(self.labels.shape[0])
        if self.shuffle:
            gen = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, self.epoch]).integers(2**62)))
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        stop = n - n % self.batch_size if self.drop_last else n
        for pos in range(0, stop, self.batch_size):
            idx = order[pos:pos + self.batch_size]
            yield Batch([x[idx] for x in self.inputs], self.labels[idx], self.rows[idx], self.segments[idx])


def _unchanged(batch: Any) -> Any:
    return batch


class WorkerLoader:
    """A `StoreDataset` read by DataLoader worker processes, keeping ``set_epoch``/``level``/``len``.

    Each worker reopens the store and builds every ``num_workers``-th read group; batches arrive in
    round-robin order, which is deterministic for a given ``num_workers``. Each worker shuffles inside its
    read groups with a generator of its own, seeded by ``(seed, epoch, worker id)``, and torch seeds its
    global generators (torch, random, numpy.random) with a draw of a generator seeded by ``(seed, epoch)``
    (the epoch its workers start in), plus the worker id: distinct per worker, the same on a rerun. Each worker cuts its own
    read groups into batches, so an epoch ends with up to one short batch per worker (with
    ``drop_last``: those samples are dropped, so up to ``num_workers - 1`` batches fewer than
    ``len``, which stays the single-process count).

    With ``persistent_workers`` (the default) the workers live from epoch to epoch instead of
    reopening the store every epoch; the epoch reaches them through a shared-memory counter, since
    each worker holds its own copy of the dataset. ``pin_memory`` pins batches in the main process.
    `close` ends the workers.
    """

    def __init__(self, dataset: StoreDataset, num_workers: int, *, pin_memory: bool = False,
                 persistent_workers: bool = True):
        if dataset.batch_size is None:
            raise ValueError("WorkerLoader needs a StoreDataset with batch_size set")
        self.dataset, self.num_workers = dataset, num_workers
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers and num_workers > 0
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._epoch.fill_(dataset.epoch)
        self._loader: Any = None

    @property
    def level(self) -> str:
        return self.dataset.level

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Batch]:
        from torch.utils.data import DataLoader

        if self._loader is None or not self.persistent_workers:
            # torch seeds each worker's torch, random and numpy.random with a draw of this generator + the worker
            # id; unseeded, that draw was a fresh random one per loader (no rerun of a seeded run drew alike)
            seed = int(np.random.default_rng([self.dataset.seed, self.dataset.epoch]).integers(2**62))
            generator = torch.Generator().manual_seed(seed)
            self._loader = DataLoader(_EpochFollower(self.dataset, self._epoch), batch_size=None,
                                      num_workers=self.num_workers, collate_fn=_unchanged, pin_memory=self.pin_memory,
                                      persistent_workers=self.persistent_workers, generator=generator)
        return iter_loader(self._loader)  # workers deaf to Ctrl-C; a Ctrl-C never lands mid-batch

    def close(self) -> None:
        """End the worker processes (they end with the loader otherwise)."""
        self._loader = None


class _EpochFollower(IterableDataset):
    """A dataset that takes its epoch from a shared-memory counter when an iteration starts (in a worker)."""

    def __init__(self, dataset: StoreDataset, epoch: torch.Tensor):
        self.dataset, self.epoch = dataset, epoch

    def __iter__(self) -> Iterator[Batch]:
        self.dataset.set_epoch(int(self.epoch))
        return iter(self.dataset)
