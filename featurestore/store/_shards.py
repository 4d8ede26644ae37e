"""Zarr v3 shards read and written as bytes: inner chunks by byte range from a cached shard index.

A shard (``sharding_indexed`` codec, index at the end) is the inner chunks' encoded bytes one after
another, then an index of ``(offset, length)`` per inner chunk (``2**64 - 1`` twice: absent) sealed
with a crc32c. Each inner chunk here is ``bytes`` (little-endian), optionally ``zstd``, then its own
crc32c. zarr-python reads a random row through its whole codec pipeline, ~45x a numpy memmap; this
module reads only the ranges it needs (one read per run of adjacent inner chunks) from an index read
once per shard, and writes whole shards in one encode, so the store stays the standard format that
zarr-python reads (``tests/featurestore/test_sharding.py`` checks both directions).

A cached index can be stale (another process rewrote the shard): an inner chunk that then fails its
crc32c, or that the cached index says is absent, is read again with a fresh index before it is
called damaged. With no compression every inner chunk keeps its offset whatever is rewritten, so a
stale index still points at the right bytes.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import mmap
import os
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from stat import S_ISREG
from typing import Any, Iterator

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from featurestore.store._backend import ChunkFault
from featurestore.store._crc import RELEASES_GIL as CRC_RELEASES_GIL
from featurestore.store._crc import block_crcs
from featurestore.store._file_writes import replace_file

try:
    import resource
except ImportError:  # Windows
    resource = None

_ABSENT = np.uint64(2**64 - 1)
# Shards mapped at once per store: each map holds a file descriptor (CPython's mmap keeps one), so
# the least recently used are dropped beyond this (1,024 descriptors is a common limit).
MAX_MAPPED_SHARDS = 256
_CRC = 4  # bytes of a crc32c
# the crc32c of any bytes followed by their own crc32c (little-endian): one call checks a chunk whole
_RESIDUE = 0x48674BC7
_ZSTD_LEVEL = 3
# Linux 5.14+ (an older kernel refuses it: the shard stays mapped bare)
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else 0)
# a mapping is populated once it has served a read per this many bytes of its file (at least two)
_POPULATE_AFTER_BYTES = 4 << 20
# a batch with at least this many rows per shard touched copies them by one numpy gather per shard;
# fewer, by one slice of a map per row copied into place (1,024 random rows of 123 shards: 0.98 ms,
# where a gather per shard took 1.24 ms and slices joined into one bytes then copied 1.7-2.0 ms;
# equal at 2,048)
_ROWS_PER_SHARD_GATHER = 16


@dataclass(frozen=True)
class ShardLayout:
    """What reading and writing one sharded array's bytes needs (sharded along rows only)."""

    shard_rows: int
    inner_rows: int
    row_shape: tuple[int, ...]
    dtype: np.dtype  # little-endian
    zstd: bool
    fill: Any
    per_shard: int = 0  # inner chunks per shard
    inner_bytes: int = 0  # decoded bytes of one inner chunk
    index_bytes: int = 0  # bytes of a shard's index, its crc32c included

    def __post_init__(self) -> None:
        per_shard = self.shard_rows // self.inner_rows
        object.__setattr__(self, "per_shard", per_shard)
        object.__setattr__(self, "inner_bytes", self.inner_rows * int(np.prod(self.row_shape, dtype=np.int64))
                           * self.dtype.itemsize)
        object.__setattr__(self, "index_bytes", per_shard * 16 + _CRC)

    def whole_shards(self, start: int, n: int, n_rows: int) -> bool:
        """Whether rows ``start:start+n`` are whole shards (the last may end at the array's end)."""
        stop = start + n
        return n > 0 and start % self.shard_rows == 0 and (stop % self.shard_rows == 0 or stop == n_rows)

    @classmethod
    def of(cls, arr: zarr.Array) -> ShardLayout | None:
        """The layout of ``arr`` when it is sharded the way this module reads, else None (zarr reads it)."""
        codecs = arr.metadata.codecs if arr.metadata.zarr_format == 3 else ()
        if arr.shards is None or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return None
        sharding = codecs[0]
        inner = list(sharding.codecs)
        if (sharding.index_location.value != "end" or not _little_bytes(sharding.index_codecs[:1])
                or [type(c) for c in sharding.index_codecs[1:]] != [Crc32cCodec]
                or not _little_bytes(inner[:1]) or not inner[1:] or not isinstance(inner[-1], Crc32cCodec)
                or [type(c) for c in inner[1:-1]] not in ([], [ZstdCodec])
                or tuple(arr.shards[1:]) != tuple(arr.shape[1:]) or tuple(arr.chunks[1:]) != tuple(arr.shape[1:])
                or arr.dtype.kind not in "biuf"):
            return None
        return cls(int(arr.shards[0]), int(arr.chunks[0]), tuple(int(s) for s in arr.shape[1:]),
                   np.dtype(arr.dtype).newbyteorder("<"), len(inner) == 3, arr.metadata.fill_value)


def _little_bytes(codecs) -> bool:
    """Whether ``codecs`` is one ``bytes`` codec writing little-endian (or single bytes)."""
    if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
        return False
    endian = codecs[0].endian
    return endian is None or getattr(endian, "value", endian) == "little"


class ShardReader:
    """Inner chunks of sharded arrays by byte range; keeps each shard's index once read.

    Owned by one backend (one open store); ``forget`` drops the indexes of an array that changed.
    """

    def __init__(self, files_opened: list[int] | None = None) -> None:
        self._indexes: dict[tuple[str, int], np.ndarray | None] = {}
        self._arrays: dict[str, _ArrayMaps | None] = {}  # array -> its mapped shards (None: not mappable)
        self._maps: OrderedDict[tuple[str, int], _Mapped] = OrderedDict()  # (array, shard), least recently used first
        self._epochs: dict[str, int] = {}  # array -> how often its mappings were called into doubt
        self._lock = threading.RLock()
        self.bytes_read = 0  # shard bytes fetched (indexes and inner chunks), for tests and benchmarks
        # shard files mapped or read anew (where another writer's files may be met), counted in
        # the owner's one-element list (``ZarrBackend.fresh_reads``)
        self.files_opened = files_opened if files_opened is not None else [0]

    def forget(self, path: str) -> None:
        """Drop the cached indexes and mappings of the array at ``path`` and the arrays under it ('' : all)."""
        with self._lock:
            for cache in (self._indexes, self._maps, self._arrays):
                for key in [k for k in cache if under(k if isinstance(k, str) else k[0], path)]:
                    del cache[key]

    def revalidate(self, name: str) -> None:
        """The shard files of the array ``name`` may have been replaced (the store read done flags
        anew, or wrote shards): each mapping's file is checked (a ``stat``) before its next use."""
        with self._lock:
            self._epochs[name] = self._epochs.get(name, 0) + 1

    # ------------------------------------------------------------------- mapped random reads
    def gather(self, name: str, arr: zarr.Array, layout: ShardLayout, rows: np.ndarray,
               required: np.ndarray) -> np.ndarray | None:
        """Rows ``rows`` (any order) of a local, uncompressed sharded array through memory maps of
        its shards, or None where that does not apply (remote, zstd, a shard not laid out as this
        module writes it): then ``read`` serves them by inner chunk.

        A random batch costs what numpy fancy indexing of a memmap does, plus one crc32c per inner
        chunk the first time one of its rows is asked for (remembered per array, for as long as its
        shard's mapping lives) and a ``stat`` of each shard after a ``revalidate``: a shard replaced
        since it was mapped (another process rewrote it) is mapped again, so its new bytes are what
        is read. The work is a few numpy calls per batch plus one Python step per new inner chunk
        (its crc32c) and per row (a slice of its shard's map), never one per shard touched.
        ``required``: per row, it was written (an absent inner chunk holding one is ``ChunkFault``,
        missing).
        """
        rows = np.asarray(rows, dtype=np.int64)
        inner = rows // layout.inner_rows
        with self._lock:  # the state and the maps it holds as one (a ``forget`` in another thread waits)
            state = self._state(name, arr, layout)
            if state is None:
                return None
            out = np.empty((len(rows), *layout.row_shape), dtype=layout.dtype)
            done = self._collect(name, state, inner, rows - inner * layout.inner_rows, required, out)
        return out if done else None

    def chunk(self, name: str, arr: zarr.Array, layout: ShardLayout, chunk: int, required: bool) -> np.ndarray | None:
        """One inner chunk, ``[inner_rows, ...]``, as a read-only view of its shard's map (checked
        once, as ``gather`` checks), or None where the maps do not apply: a cold single ``get``
        with a few integer steps instead of a batch's array work. Absent and not ``required``:
        the fill value."""
        with self._lock:
            state = self._state(name, arr, layout)
            if state is None:
                return None
            shard, c = divmod(chunk, layout.per_shard)
            mapped = self._shard(name, state, shard, batch=False)
            if mapped is None:
                return None
            if c >= mapped.n_inner:
                if required:
                    raise ChunkFault(chunk, missing=True)
                return np.full((layout.inner_rows, *layout.row_shape), layout.fill, dtype=layout.dtype)
            if not state.checked[chunk]:
                start = c * mapped.chunk_bytes
                if google_crc32c.value(mapped.raw[start:start + mapped.chunk_bytes]) != _RESIDUE:
                    raise ChunkFault(chunk, missing=False, cause=ValueError("stored and computed crc32c checksums differ"))
                state.checked[chunk] = True
                self.bytes_read += mapped.chunk_bytes
            return mapped.grid[c]

    def chunk_grids(self, name: str, arr: zarr.Array, layout: ShardLayout,
                    chunks: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, np.ndarray] | None:
        """Inner chunks ``chunks`` (numbers, repeats allowed, each written) checked as ``gather``
        checks them, as read-only views of their shards' maps: ``(grids, where, local)``, chunk
        ``chunks[i]`` being ``grids[where[i]][local[i]]`` (``[inner rows, ...]``). None where the
        maps do not apply. For a caller that reads a few entries of each chunk, many times over (a
        binary search of the id lookup's blocks): numpy indexing of a view instead of a ``gather``
        per step."""
        chunks = np.asarray(chunks, dtype=np.int64)
        with self._lock:
            state = self._state(name, arr, layout)
            if state is None or not len(chunks):
                return None
            shards, where = _shard_groups(chunks // layout.per_shard)
            if len(shards) > max_mapped_shards():  # more maps than one call may hold: gather serves it
                return None
            got = self._checked_maps(name, state, chunks, shards, where, np.ones(len(chunks), dtype=bool))
            if got is None:
                return None
            maps, local, _ = got
            return [m.grid for m in maps], where, local

    def _state(self, name: str, arr: zarr.Array, layout: ShardLayout) -> _ArrayMaps | None:
        """What is mapped of the array ``name`` (None: not a local, uncompressed sharded array)."""
        if name not in self._arrays:
            folder = None if layout.zstd else local_file(arr, "")
            with self._lock:
                self._arrays[name] = None if folder is None else _ArrayMaps(arr, layout, folder)
        return self._arrays[name]

    def _collect(self, name: str, state: _ArrayMaps, inner: np.ndarray, within: np.ndarray, required: np.ndarray,
                 out: np.ndarray) -> bool:
        """Fill ``out`` with row ``within`` of inner chunk ``inner`` (per entry), each inner chunk
        checked the first time; False where a shard cannot be mapped."""
        layout = state.layout
        shards, where = _shard_groups(inner // layout.per_shard)
        bound = max_mapped_shards()
        if len(shards) > bound:  # the maps one call holds stay within the descriptor bound
            for low in range(0, len(shards), bound):
                part = np.flatnonzero((where >= low) & (where < low + bound))
                got = out[part]
                if not self._collect(name, state, inner[part], within[part], required[part], got):
                    return False
                out[part] = got
            return True
        got = self._checked_maps(name, state, inner, shards, where, required)
        if got is None:
            return False
        maps, local, absent = got
        some_absent = bool(absent.any())
        if some_absent:
            out[absent] = layout.fill
        if some_absent or len(shards) * _ROWS_PER_SHARD_GATHER <= len(inner):  # many per shard: numpy per shard
            items = out.reshape(len(out), -1).view(np.uint8)  # copied as bytes: a map's rows may be unaligned
            if len(maps) == 1:
                parts = [np.arange(len(inner))]
            else:
                order = np.argsort(where, kind="stable")
                parts = np.split(order, np.flatnonzero(np.diff(where[order])) + 1)
            for at, mapped in zip(parts, maps):
                at = at[~absent[at]]
                if len(at):
                    items[at] = mapped.rows[local[at], within[at]]
            return True
        # a few per shard (a random batch): one slice of a map per item, copied into place
        size = state.row_bytes
        starts = local * state.chunk_bytes + within * size
        views = [m.view for m in maps]
        into = memoryview(out.reshape(-1).view(np.uint8))
        for i, (s, o) in enumerate(zip(where.tolist(), starts.tolist())):
            into[i * size:(i + 1) * size] = views[s][o:o + size]
        return True

    def _checked_maps(self, name: str, state: _ArrayMaps, inner: np.ndarray, shards: np.ndarray,
                      where: np.ndarray, required: np.ndarray) -> tuple[list[_Mapped], np.ndarray, np.ndarray] | None:
        """The maps of ``shards`` (inner chunk ``inner[i]`` lies in ``shards[where[i]]``) for a batch
        read, with each chunk's number in its shard and whether it is absent; every present chunk
        checked the first time it is met. ChunkFault for an absent chunk that is ``required``; None
        where a shard cannot be mapped (the caller holds the lock)."""
        maps = [self._shard(name, state, shard, batch=True) for shard in shards.tolist()]
        if any(m is None for m in maps):
            return None
        local = inner - shards[where] * state.layout.per_shard
        absent = local >= np.array([m.n_inner for m in maps], dtype=np.int64)[where]
        if (absent & required).any():
            raise ChunkFault(int(inner[np.flatnonzero(absent & required)[0]]), missing=True)
        unchecked = ~(state.checked[inner] | absent)
        if unchecked.any():
            new, _, first = _groups(inner[unchecked])
            self._check(state, maps, where[unchecked][first], local[unchecked][first], new)
        return maps, local, absent

    def _check(self, state: _ArrayMaps, maps: list[_Mapped], where: np.ndarray, local: np.ndarray,
               numbers: np.ndarray) -> None:
        """Check the crc32c of new inner chunks (``numbers``; in shard ``maps[where]``, ``local`` in
        it): ChunkFault at the first that fails; those that pass are remembered. One call per chunk
        over its bytes and its stored crc32c together (``_RESIDUE``)."""
        length = state.chunk_bytes
        raws = [m.raw for m in maps]
        crc = google_crc32c.value
        sums = [crc(raws[s][o:o + length]) for s, o in zip(where.tolist(), (local * length).tolist())]
        bad = [i for i, value in enumerate(sums) if value != _RESIDUE]
        passed = numbers if not bad else numbers[:bad[0]]
        state.checked[passed] = True
        self.bytes_read += len(passed) * length
        if bad:
            raise ChunkFault(int(numbers[bad[0]]), missing=False,
                             cause=ValueError("stored and computed crc32c checksums differ"))

    def _shard(self, name: str, state: _ArrayMaps, shard: int, batch: bool) -> _Mapped | None:
        """The current mapping of shard ``shard`` (None: not in the uniform layout; one with no inner
        chunks when there is no such file). A mapping checked against its file since the array's
        last ``revalidate`` is used as it is; otherwise a ``stat`` tells whether the file is the one
        mapped (same inode, size and mtime), and a replaced file is mapped anew. A file cut short
        in place since it was mapped (``truncate``, ``cp`` over it) is never read through its map:
        a page past its new end is SIGBUS, which kills the process (see ``_Mapped.cut_short``)."""
        if shard >= len(state.maps):  # rows appended since the array was opened: read by inner chunk
            return None
        mapped, epoch = state.maps[shard], self._epochs.get(name, 0)
        if mapped is not None and mapped.epoch == epoch and not mapped.cut_short():
            if mapped.grid is not None:
                self._maps.move_to_end((name, shard))
                self._used_again(state, shard, mapped, batch)
            return mapped
        path = state.file(shard)
        try:
            if mapped is not None and mapped.grid is not None:  # mapped before: is it still that file?
                stat = os.stat(path)
                if mapped.identity == (stat.st_ino, stat.st_size, stat.st_mtime_ns):
                    mapped.epoch = epoch
                    self._used_again(state, shard, mapped, batch)
                    return mapped
            self.files_opened[0] += 1
            mapped = self._open(path, state.layout)
        except FileNotFoundError:
            mapped = _Mapped.absent()
        else:
            if mapped is None:
                return None
            self.bytes_read += state.layout.index_bytes
            self._maps[(name, shard)] = mapped
            self._maps.move_to_end((name, shard))
            self._unmap(len(self._maps) - max_mapped_shards())
        mapped.epoch = epoch
        state.put(shard, mapped)
        return mapped

    def _used_again(self, state: _ArrayMaps, shard: int, mapped: _Mapped, batch: bool) -> None:
        """A mapping served a read before: populated once it has served one read per
        ``_POPULATE_AFTER_BYTES`` of its file (at least two), where its array is (see :func:`populates`);
        once populated, the first batch read (``gather``, ``chunk_grids``: not a single ``get``, which
        checks one chunk and should not pay for a thousand) checks every inner chunk of it at once
        (see ``_check_shard``)."""
        if state.populate and not mapped.populated:
            mapped.uses += 1
            if mapped.uses >= max(2, mapped.identity[1] // _POPULATE_AFTER_BYTES):
                mapped.populate()
        if batch and mapped.populated and not mapped.checked_whole:
            self._check_shard(state, shard, mapped)

    def _check_shard(self, state: _ArrayMaps, shard: int, mapped: _Mapped) -> None:
        """Check the crc32c of every inner chunk of a shard in use that was not checked yet, in one
        pass over its (just populated) pages: a random read of a chunk checks it at ~1-2 us (a call,
        and a cache and TLB miss on its bytes), most of a random batch's cost while few are checked
        (1,000 of a million clips' 125,000 per batch of 1,024); one pass costs ~1.3 ms per 8 MiB,
        once per mapping. A chunk that fails is left unchecked, to be reported by the read that
        asks for it (or by ``verify``), never here."""
        mapped.checked_whole = True
        base, length = shard * state.layout.per_shard, mapped.chunk_bytes
        todo = np.flatnonzero(~state.checked[base:base + mapped.n_inner])
        if not len(todo):
            return
        raw, crc = mapped.raw, google_crc32c.value
        passed = [c for c in todo.tolist() if crc(raw[c * length:(c + 1) * length]) == _RESIDUE]
        state.checked[base + np.array(passed, dtype=np.int64)] = True
        self.bytes_read += len(todo) * length

    def _open(self, path: str, layout: ShardLayout) -> _Mapped | None:
        """``_Mapped.open``; out of file descriptors (the process's limit, another library's files),
        this reader's older maps are dropped (their descriptors close) and it is tried once more."""
        try:
            return _Mapped.open(path, layout)
        except OSError as err:
            if err.errno not in (errno.EMFILE, errno.ENFILE) or not self._maps:
                raise
        self._unmap(len(self._maps))
        return _Mapped.open(path, layout)

    def _unmap(self, n: int) -> None:
        """Drop the ``n`` least recently used maps: each map (and descriptor) goes with its last reference."""
        for _ in range(max(0, n)):
            (old_name, old_shard), _ = self._maps.popitem(last=False)
            old = self._arrays.get(old_name)
            if old is not None:
                old.drop(old_shard)

    # ------------------------------------------------------------------------------------ reads
    def read(self, name: str, arr: zarr.Array, layout: ShardLayout, chunks: np.ndarray,
             required: np.ndarray) -> list[np.ndarray]:
        """Inner chunks ``chunks`` of ``arr`` (at store path ``name``) decoded, in order (see
        ``Backend.read_chunks``)."""
        self.files_opened[0] += 1
        chunks = np.asarray(chunks, dtype=np.int64)
        required = np.asarray(required, dtype=bool)
        out: list[np.ndarray] = [None] * len(chunks)  # type: ignore[list-item]
        shard_of = chunks // layout.per_shard
        order = np.argsort(shard_of, kind="stable")
        bounds = (np.flatnonzero(np.diff(shard_of[order])) + 1).tolist()
        for a, b in zip([0, *bounds], [*bounds, len(chunks)]):
            at = order[a:b]
            blocks = self._read_shard(name, arr, layout, int(shard_of[at[0]]), chunks[at], required[at])
            for i, block in zip(at.tolist(), blocks):
                out[i] = block
        return out

    def _read_shard(self, name: str, arr: zarr.Array, layout: ShardLayout, shard: int, chunks: np.ndarray,
                    required: np.ndarray) -> list[np.ndarray]:
        """The inner chunks of one shard; with a cached index first, then (on doubt) a fresh one."""
        key = (name, shard)
        with self._lock:
            cached = key in self._indexes
            index = self._indexes.get(key)
        for fresh in ((False, True) if cached else (True,)):
            if fresh:
                index = self._read_index(arr, layout, shard, chunks[0])
                with self._lock:
                    self._indexes[key] = index
            try:
                return self._decode_chunks(arr, layout, shard, index, chunks, required)
            except ChunkFault:
                if fresh:
                    raise
        raise AssertionError("unreachable")  # the fresh attempt returns or raises

    def _decode_chunks(self, arr: zarr.Array, layout: ShardLayout, shard: int, index: np.ndarray | None,
                       chunks: np.ndarray, required: np.ndarray) -> list[np.ndarray]:
        n_rows = arr.shape[0]
        out: list[np.ndarray | None] = [None] * len(chunks)
        entries = None if index is None else index[chunks % layout.per_shard]
        absent = np.ones(len(chunks), dtype=bool) if entries is None else entries[:, 0] == _ABSENT
        if (absent & required).any():
            raise ChunkFault(int(chunks[np.flatnonzero(absent & required)[0]]), missing=True)
        for i in np.flatnonzero(absent).tolist():
            out[i] = np.full(_inner_shape(layout, int(chunks[i]), n_rows), layout.fill, dtype=layout.dtype)
        present = np.flatnonzero(~absent)
        if len(present):
            spans = entries[present]
            if (spans[:, 1] < _CRC).any():
                raise ChunkFault(int(chunks[present[np.argmax(spans[:, 1] < _CRC)]]), missing=False,
                                 cause=ValueError("index gives an inner chunk shorter than its checksum"))
            numbers = chunks.tolist()
            for i, body in zip(present.tolist(), self._fetch(arr, shard, spans, chunks[present])):
                out[i] = _decode(layout, body, numbers[i], n_rows)
        return out  # type: ignore[return-value]

    def _fetch(self, arr: zarr.Array, shard: int, spans: np.ndarray, chunks: np.ndarray) -> list[np.ndarray]:
        """The encoded bytes of each span ``(offset, length)``, one read per run of adjacent spans."""
        order_array = np.argsort(spans[:, 0], kind="stable")
        starts_array = spans[order_array, 0].astype(np.int64)
        ends_array = starts_array + spans[order_array, 1].astype(np.int64)
        breaks = (np.flatnonzero(starts_array[1:] != ends_array[:-1]) + 1).tolist()
        order, starts, ends = order_array.tolist(), starts_array.tolist(), ends_array.tolist()
        runs = [(starts[a], ends[b - 1], a, b) for a, b in zip([0, *breaks], [*breaks, len(starts)])]
        try:
            blobs = _read_ranges(arr, _shard_key(arr, shard), [(lo, hi) for lo, hi, _, _ in runs])
        except FileNotFoundError as err:  # the shard vanished since its index was read
            raise ChunkFault(int(chunks[0]), missing=True) from err
        except OSError as err:  # replaced by what cannot be read since
            raise ChunkFault(int(chunks[0]), missing=False, cause=err) from err
        out: list[np.ndarray] = [None] * len(spans)  # type: ignore[list-item]
        for (lo, hi, a, b), blob in zip(runs, blobs):
            self.bytes_read += len(blob)
            if len(blob) != hi - lo:
                raise ChunkFault(int(chunks[order[a]]), missing=False,
                                 cause=ValueError(f"shard holds {len(blob)} of bytes {lo}:{hi}"))
            data = np.frombuffer(blob, dtype=np.uint8)
            for j in range(a, b):
                out[order[j]] = data[starts[j] - lo:ends[j] - lo]
        return out

    def _read_index(self, arr: zarr.Array, layout: ShardLayout, shard: int, chunk: int) -> np.ndarray | None:
        """The shard's index checked against its crc32c; None when the shard file is absent."""
        try:
            blob = _read_suffix(arr, _shard_key(arr, shard), layout.index_bytes)
        except FileNotFoundError:
            return None
        except OSError as err:  # a folder in its place, no permission: the shard cannot be read
            raise ChunkFault(chunk, missing=False, cause=err) from err
        self.bytes_read += len(blob)
        body = np.frombuffer(blob, dtype=np.uint8)
        if len(blob) != layout.index_bytes or google_crc32c.value(body[:-_CRC]) != int.from_bytes(blob[-_CRC:], "little"):
            raise ChunkFault(chunk, missing=False, cause=ValueError(
                f"shard {shard}'s index fails its crc32c (or the shard is shorter than its index)"))
        return body[:-_CRC].view("<u8").reshape(layout.per_shard, 2)

    # ----------------------------------------------------------------------------------- writes
    def write(self, name: str, arr: zarr.Array, layout: ShardLayout, start: int, data: np.ndarray) -> None:
        """Write whole shards (``layout.whole_shards`` holds), each replacing its object at once.

        Local shards are written as zarr's local store writes them (a ``.partial`` temp file renamed
        into place: a kill never leaves a torn shard), without its event loop (~1-10 ms a call
        under load), one after another while the next one's checksums are computed on a worker
        thread (``_encoded_ahead``); remote ones in one batch of store writes. Where a local shard
        fails, those written before it are still recorded before the failure is raised.
        """
        blocks = [((start + lo) // layout.shard_rows, data[lo:lo + layout.shard_rows])
                  for lo in range(0, len(data), layout.shard_rows)]
        if local_file(arr, "") is None:
            shards = [(shard, *encode_shard(layout, block)) for shard, block in blocks]
            store, proto = arr.store_path.store, default_buffer_prototype()

            async def put() -> None:
                await asyncio.gather(*(store.set(_full_key(arr, _shard_key(arr, shard)), proto.buffer.from_bytes(blob))
                                       for shard, blob, _ in shards))

            sync(put())
            self._record(name, [(shard, index) for shard, _, index in shards])
            return
        shards: list[tuple[int, np.ndarray]] = []
        try:  # each written from views of ``data`` as it is encoded (its parts are not kept)
            with contextlib.closing(_encoded_ahead(layout, [b for _, b in blocks])) as encoded:  # a failed write
                for (shard, _), (parts, index) in zip(blocks, encoded):  # waits for the worker before raising
                    replace_file(local_file(arr, _shard_key(arr, shard)), parts)
                    shards.append((shard, index))
        finally:  # the shards written replace what was cached and mapped, even where a later one failed
            self._record(name, shards)

    def _record(self, name: str, indexes: list[tuple[int, np.ndarray]]) -> None:
        with self._lock:
            for shard, index in indexes:
                self._indexes[(name, shard)] = index
        self.revalidate(name)  # the files just written replace what is mapped


class _ArrayMaps:
    """The mapped shards of one local sharded array, and which of its inner chunks passed their
    crc32c (for as long as their shard's mapping lives: a shard mapped anew is checked anew)."""

    def __init__(self, arr: zarr.Array, layout: ShardLayout, folder: str):
        self.arr, self.layout, self.folder = arr, layout, folder
        n_shards = -(-int(arr.shape[0]) // layout.shard_rows)
        self.populate = populates(layout, int(arr.shape[0]))
        self.maps: list[_Mapped | None] = [None] * n_shards
        self.checked = np.zeros(n_shards * layout.per_shard, dtype=bool)
        self.chunk_bytes = layout.inner_bytes + _CRC
        self.row_bytes = layout.inner_bytes // layout.inner_rows
        self._files: dict[int, str] = {}

    def file(self, shard: int) -> str:
        path = self._files.get(shard)
        if path is None:
            path = self._files[shard] = os.path.join(self.folder, _shard_key(self.arr, shard))
        return path

    def put(self, shard: int, mapped: _Mapped) -> None:
        """``mapped`` is now shard ``shard``'s mapping; a new one has none of its chunks checked."""
        if self.maps[shard] is not mapped:
            self.maps[shard] = mapped
            per = self.layout.per_shard
            self.checked[shard * per:(shard + 1) * per] = False

    def drop(self, shard: int) -> None:
        self.maps[shard] = None


class _Mapped:
    """One shard file mapped read-only, in the uniform layout this module writes (every inner chunk
    present up to ``n_inner``, in order, uncompressed): its inner chunks are a strided view of the map."""

    def __init__(self, identity: tuple, grid: np.ndarray | None, n_inner: int, raw: np.ndarray | None,
                 view: memoryview | None, chunk_bytes: int, rows: np.ndarray | None = None,
                 mm: mmap.mmap | None = None):
        self.identity, self.grid, self.n_inner = identity, grid, n_inner
        self.raw, self.view, self.chunk_bytes = raw, view, chunk_bytes
        self.rows = rows  # [n_inner, inner rows, bytes a row] uint8: rows copied as bytes (a map's may be unaligned)
        self.epoch = -1  # the reader's revalidation count for its array when last checked against the file
        self.mm = mm  # the map itself (madvise)
        self.populated = False  # its pages mapped all at once (see populates)
        self.uses = 1  # reads served, counted until it is populated
        self.checked_whole = False  # every inner chunk checked in one pass (see ShardReader._check_shard)

    @classmethod
    def absent(cls) -> _Mapped:
        return cls((), None, 0, None, None, 0)

    def cut_short(self) -> bool:
        """Whether the file is now shorter than when it was mapped (cut in place: the store's own
        writers replace files, never cut them). Its map's pages past the new end would raise SIGBUS
        when read, killing the process instead of naming the damage; the file is then looked at anew
        (``ShardReader._shard``). One ``fstat`` of the map's own descriptor, ~0.5 us, per shard per
        read; a file cut between this check and the read a few microseconds later is not caught."""
        return self.mm is not None and self.mm.size() < self.identity[1]

    def populate(self) -> None:
        """Map every page of the shard now (``MADV_POPULATE_READ``), so that no read of it faults
        again; once per mapping, and a kernel that refuses it leaves the mapping as it was."""
        self.populated = True
        with contextlib.suppress(OSError, ValueError):
            self.mm.madvise(_MADV_POPULATE_READ)

    @classmethod
    def open(cls, path: str, layout: ShardLayout) -> _Mapped | None:
        """Map ``path``; None when its index fails its check or is not the uniform layout (the
        inner-chunk reader then reads it, and words any damage)."""
        fd = os.open(path, os.O_RDONLY)
        try:
            stat = os.fstat(fd)
            if stat.st_size < layout.index_bytes or not S_ISREG(stat.st_mode):  # a folder: not mappable
                return None
            mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        raw = np.frombuffer(mm, dtype=np.uint8)
        length = layout.inner_bytes + _CRC
        n_inner, extra = divmod(stat.st_size - layout.index_bytes, length)
        if extra or not is_uniform_index(layout, mm[-layout.index_bytes:], n_inner):  # known from the size
            return None
        view = memoryview(mm)
        body = raw[:n_inner * length].reshape(n_inner, length)[:, :layout.inner_bytes]
        grid = body.view(layout.dtype).reshape(n_inner, layout.inner_rows, *layout.row_shape)
        rows = body.reshape(n_inner, layout.inner_rows, -1)
        return cls((stat.st_ino, stat.st_size, stat.st_mtime_ns), grid, n_inner, raw, view, length, rows, mm)


def max_mapped_shards() -> int:
    """``MAX_MAPPED_SHARDS``, or a quarter of the process's file descriptor limit where that is lower
    (macOS's default soft limit is 256: 256 maps and a few files ran out, a bare OSError)."""
    if resource is None:  # Windows: no such limit
        return MAX_MAPPED_SHARDS
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return MAX_MAPPED_SHARDS
    return max(1, min(MAX_MAPPED_SHARDS, soft // 4))


def populates(layout: ShardLayout, n_rows: int) -> bool:
    """Whether the shards of an array of ``n_rows`` rows get all their pages mapped at once when
    they are in use (a mapping that has served a read per 4 MiB of its file, at least two: a batch
    or a single read after the one that mapped it), rather than page by page as reads touch them.

    A random read of a row of a shard mapped bare costs a page fault (~1-2 us; the kernel maps the
    cached pages around it) on top of reading it: about a third of a ``get_many`` of random ids and a
    fifth of a cold ``get`` at a million clips, until most pages have been touched (some hundred
    batches). Mapping all of a shard's pages costs ~0.1 ms a MiB from the page cache (the 24 MB id
    table of a million clips: ~1 ms), once per mapping: worth it for a store in use, not for a read
    or two per store object, hence after a few uses. It also pays only where the array's bytes fit in memory
    several times over (they end up cached, and every shard gets read); where they do not, it would
    read whole shards from disk for one row each, so a larger array (over a quarter of the physical
    memory) is never populated.
    """
    if not _MADV_POPULATE_READ:
        return False
    stored = n_rows * (layout.inner_bytes // layout.inner_rows)
    return stored <= _physical_memory() // 4


@functools.cache
def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on this platform: map bare
        return 0


def _encoded_ahead(layout: ShardLayout, blocks: list[np.ndarray]) -> Iterator[tuple[list, np.ndarray]]:
    """``shard_parts`` of each block in order, the next block's encoded in a worker thread while the
    caller writes the one it was given: its checksums release the GIL (``_crc``), so they run on
    another core while the caller's ``writev`` copies the previous shard into the page cache (a
    million-clip fill: 0.1-0.2 s faster on 2 cores). One block, compressed shards, or checksums that
    hold the GIL are encoded in the caller's thread (nothing would run beside them).

    Writing the shards themselves on two threads instead (each checksumming and writing whole
    shards) was measured slower: the fill alone took 0.51-0.54 s against 0.38-0.44 s this way
    (``bench_fill.py``, interleaved), two writers' copies into the page cache contending in the
    kernel (system time 0.41-0.46 s against 0.28-0.34 s)."""
    if len(blocks) < 2 or layout.zstd or not CRC_RELEASES_GIL:
        yield from (shard_parts(layout, block) for block in blocks)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="shard-encode") as pool:  # one per write: never forked
        ahead = pool.submit(shard_parts, layout, blocks[0])
        for following in [*blocks[1:], None]:
            current = ahead.result()
            if following is not None:
                ahead = pool.submit(shard_parts, layout, following)
            yield current


def encode_shard(layout: ShardLayout, block: np.ndarray) -> tuple[memoryview, np.ndarray]:
    """The bytes of a shard holding ``block`` (its first rows; the rest absent) and its index, in
    one buffer (for a store's ``set``; a local file is written from :func:`shard_parts`)."""
    parts, index = shard_parts(layout, block)
    return memoryview(b"".join(parts)), index


def shard_parts(layout: ShardLayout, block: np.ndarray) -> tuple[list, np.ndarray]:
    """The bytes of a shard holding ``block`` as buffers to write one after another, and its index.

    Uncompressed inner chunks are views of ``block`` itself, each followed by its crc32c, so a
    local shard goes from the caller's array to the file in one copy (``os.writev``) instead of being
    assembled first (a copy of every byte, and fresh pages for it: ~0.4 s a GB). The last inner
    chunk is padded with the fill value, as zarr-python pads edge chunks.
    """
    rows = len(block)
    n_inner = -(-rows // layout.inner_rows)
    whole = rows - rows % layout.inner_rows
    raw = np.ascontiguousarray(block[:whole], dtype=layout.dtype).view(np.uint8).reshape(
        whole // layout.inner_rows, layout.inner_bytes)
    chunks = list(raw)
    if whole < rows:  # the edge chunk, padded
        padded = np.full((layout.inner_rows, *layout.row_shape), layout.fill, dtype=layout.dtype)
        padded[:rows - whole] = block[whole:]
        chunks.append(padded.reshape(-1).view(np.uint8))
    if layout.zstd:
        zstd = numcodecs.Zstd(level=_ZSTD_LEVEL)
        chunks = [np.frombuffer(zstd.encode(chunk), dtype=np.uint8) for chunk in chunks]
        sums = _crc32c_bytes(chunks)
    else:  # the whole chunks' checksums in one pass over ``raw`` (other threads run meanwhile: _crc)
        sums = block_crcs(raw)
        if len(chunks) > len(raw):
            sums = np.concatenate([sums, _crc32c_bytes(chunks[len(raw):])])
    lengths = np.array([len(c) + _CRC for c in chunks], dtype=np.uint64) if layout.zstd \
        else np.full(n_inner, layout.inner_bytes + _CRC, dtype=np.uint64)
    ends = np.cumsum(lengths)
    index = np.full((layout.per_shard, 2), _ABSENT, dtype="<u8")
    index[:n_inner, 0] = ends - lengths
    index[:n_inner, 1] = lengths
    tail = np.empty(layout.index_bytes, dtype=np.uint8)
    tail[:-_CRC] = index.reshape(-1).view(np.uint8)
    tail[-_CRC:] = _crc32c_bytes([tail[:-_CRC]])[0]
    index.setflags(write=False)
    parts = [part for pair in zip(chunks, sums) for part in pair]
    parts.append(tail)
    return parts, index


def encode_inner_chunks(raw: np.ndarray, out: np.ndarray) -> None:
    """Uncompressed inner chunks ``raw`` (``[n, inner bytes]`` uint8) as stored, into ``out``
    (``[n, inner bytes + 4]``): each chunk's bytes, then its crc32c."""
    out[:, :-_CRC] = raw
    out[:, -_CRC:] = block_crcs(raw)


def _crc32c_bytes(chunks) -> np.ndarray:
    """``[n, 4]`` uint8: the crc32c of each of ``chunks`` (byte buffers) as stored after it (little-endian)."""
    return np.fromiter(map(google_crc32c.value, chunks), dtype="<u4", count=len(chunks)).view(np.uint8).reshape(-1, _CRC)


def is_uniform_index(layout: ShardLayout, tail: bytes, n_inner: int) -> bool:
    """Whether ``tail`` (a shard's last ``index_bytes``) is the intact index of the uniform layout with
    ``n_inner`` inner chunks: one compare with the index that layout implies (of bytes: a memoryview
    compares item by item, ~30 us for 8 KiB), then its crc32c."""
    return (n_inner <= layout.per_shard and tail[:-_CRC] == _uniform_index(layout.per_shard, layout.inner_bytes + _CRC,
                                                                           n_inner)
            and google_crc32c.value(tail) == _RESIDUE)


def _decode(layout: ShardLayout, body: np.ndarray, chunk: int, n_rows: int) -> np.ndarray:
    """One inner chunk's values from its encoded bytes; ChunkFault when its crc32c or size is wrong."""
    payload = body[:-_CRC]
    if google_crc32c.value(payload) != int.from_bytes(body[-_CRC:].tobytes(), "little"):
        raise ChunkFault(chunk, missing=False, cause=ValueError("stored and computed crc32c checksums differ"))
    try:
        raw = np.frombuffer(numcodecs.Zstd().decode(payload), dtype=np.uint8) if layout.zstd else payload
    except Exception as err:  # noqa: BLE001 - a frame that passes its crc32c but does not decode
        raise ChunkFault(chunk, missing=False, cause=err) from err
    if len(raw) != layout.inner_bytes:
        raise ChunkFault(chunk, missing=False, cause=ValueError(
            f"inner chunk holds {len(raw)} bytes, expected {layout.inner_bytes}"))
    shape = _inner_shape(layout, chunk, n_rows)
    return raw.view(layout.dtype).reshape((layout.inner_rows, *layout.row_shape))[:shape[0]]


@functools.lru_cache(maxsize=64)
def _uniform_index(per_shard: int, length: int, n_inner: int) -> bytes:
    """The index (without its crc32c) of a shard whose first ``n_inner`` inner chunks of ``length``
    bytes lie one after another from its start and the rest are absent: what ``encode_shard`` writes
    for uncompressed data."""
    index = np.full((per_shard, 2), _ABSENT, dtype="<u8")
    index[:n_inner, 0] = np.arange(n_inner, dtype=np.uint64) * np.uint64(length)
    index[:n_inner, 1] = length
    return index.tobytes()


def _shard_groups(shard_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct shards of a batch's chunks and each chunk's place among them; one shard (an id
    lookup's table at up to 2**20 clips) without a sort."""
    if (shard_of == shard_of[0]).all():
        return shard_of[:1], np.zeros(len(shard_of), dtype=np.int64)
    shards, where, _ = _groups(shard_of)
    return shards, where


def _groups(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True, return_index=True)`` (distinct values sorted, each
    value's place among them, where each first occurs) without ``np.unique``, whose first call
    imports ``numpy.ma`` (~90 ms in a fresh process: see ``_backend.distinct``)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.empty(len(values), dtype=bool)
    starts[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
    where = np.empty(len(values), dtype=np.int64)
    where[order] = np.cumsum(starts) - 1
    return ordered[starts], where, order[starts]


def under(key: str, path: str) -> bool:
    """Whether the array ``key`` is the one at ``path`` or under it ('': every array is)."""
    return not path or key == path or key.startswith(path + "/")


def _inner_shape(layout: ShardLayout, chunk: int, n_rows: int) -> tuple[int, ...]:
    rows = max(0, min(layout.inner_rows, n_rows - chunk * layout.inner_rows))
    return (rows, *layout.row_shape)


def _shard_key(arr: zarr.Array, shard: int) -> str:
    return arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))


def _full_key(arr: zarr.Array, key: str) -> str:
    prefix = arr.store_path.path
    return f"{prefix}/{key}" if prefix else key


def local_file(arr: zarr.Array, key: str) -> str | None:
    """The file of the stored object ``key`` of ``arr`` when the store is a local directory."""
    store = arr.store_path.store
    return os.path.join(str(store.root), _full_key(arr, key)) if isinstance(store, LocalStore) else None


def _read_ranges(arr: zarr.Array, key: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    """Bytes ``lo:hi`` of the stored object ``key`` of ``arr`` for each range; FileNotFoundError if absent."""
    path = local_file(arr, key)
    if path is not None:
        fd = os.open(path, os.O_RDONLY)
        try:
            return [os.pread(fd, hi - lo, lo) for lo, hi in ranges]
        finally:
            os.close(fd)
    store, full = arr.store_path.store, _full_key(arr, key)
    proto = default_buffer_prototype()

    async def fetch() -> list:
        return await asyncio.gather(*(store.get(full, proto, RangeByteRequest(lo, hi)) for lo, hi in ranges))

    buffers = sync(fetch())
    if any(b is None for b in buffers):
        raise FileNotFoundError(full)
    return [b.to_bytes() for b in buffers]


def _read_suffix(arr: zarr.Array, key: str, n: int) -> bytes:
    """The last ``n`` bytes of the stored object ``key`` (fewer if it is shorter); FileNotFoundError if absent."""
    path = local_file(arr, key)
    if path is not None:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            return os.pread(fd, min(n, size), max(0, size - n))
        finally:
            os.close(fd)
    full = _full_key(arr, key)
    buffer = sync(arr.store_path.store.get(full, default_buffer_prototype(), SuffixByteRequest(n)))
    if buffer is None:
        raise FileNotFoundError(full)
    return buffer.to_bytes()
