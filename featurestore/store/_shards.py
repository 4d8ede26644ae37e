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
import os
import threading
from dataclasses import dataclass
from typing import Any

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

_ABSENT = np.uint64(2**64 - 1)
_CRC = 4  # bytes of a crc32c
_ZSTD_LEVEL = 3


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

    def __init__(self) -> None:
        self._indexes: dict[tuple[str, int], np.ndarray | None] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0  # shard bytes fetched (indexes and inner chunks), for tests and benchmarks

    def forget(self, path: str) -> None:
        """Drop the cached indexes of the array at ``path`` and the arrays under it ('' : all)."""
        with self._lock:
            for key in [k for k in self._indexes if not path or k[0] == path or k[0].startswith(path + "/")]:
                del self._indexes[key]

    # ------------------------------------------------------------------------------------ reads
    def read(self, name: str, arr: zarr.Array, layout: ShardLayout, chunks: np.ndarray,
             required: np.ndarray) -> list[np.ndarray]:
        """Inner chunks ``chunks`` of ``arr`` (at store path ``name``) decoded, in order (see
        ``Backend.read_chunks``)."""
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
        self.bytes_read += len(blob)
        body = np.frombuffer(blob, dtype=np.uint8)
        if len(blob) != layout.index_bytes or google_crc32c.value(body[:-_CRC]) != int.from_bytes(blob[-_CRC:], "little"):
            raise ChunkFault(chunk, missing=False, cause=ValueError(
                f"shard {shard}'s index fails its crc32c (or the shard is shorter than its index)"))
        return body[:-_CRC].view("<u8").reshape(layout.per_shard, 2)

    # ----------------------------------------------------------------------------------- writes
    def write(self, name: str, arr: zarr.Array, layout: ShardLayout, start: int, data: np.ndarray) -> None:
        """Write whole shards (``layout.whole_shards`` holds), each in one store write."""
        for lo in range(0, len(data), layout.shard_rows):
            shard = (start + lo) // layout.shard_rows
            blob, index = encode_shard(layout, data[lo:lo + layout.shard_rows])
            key = _shard_key(arr, shard)
            sync(arr.store_path.store.set(_full_key(arr, key), default_buffer_prototype().buffer.from_bytes(blob)))
            with self._lock:
                self._indexes[(name, shard)] = index


def encode_shard(layout: ShardLayout, block: np.ndarray) -> tuple[bytes, np.ndarray]:
    """The bytes of a shard holding ``block`` (its first rows; the rest absent) and its index.

    The last inner chunk is padded with the fill value, as zarr-python pads edge chunks.
    """
    rows = len(block)
    n_inner = -(-rows // layout.inner_rows)
    padded = np.full((n_inner * layout.inner_rows, *layout.row_shape), layout.fill, dtype=layout.dtype)
    padded[:rows] = block
    raw = padded.reshape(n_inner, -1).view(np.uint8)
    raw.setflags(write=False)
    zstd = numcodecs.Zstd(level=_ZSTD_LEVEL) if layout.zstd else None
    bodies = [zstd.encode(row) if zstd else row for row in raw]
    lengths = np.array([len(b) + _CRC for b in bodies], dtype=np.uint64)
    index = np.full((layout.per_shard, 2), _ABSENT, dtype="<u8")
    index[:n_inner, 1] = lengths
    index[:n_inner, 0] = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.uint64)
    parts: list[bytes] = []
    for body in bodies:
        body = np.frombuffer(body, dtype=np.uint8) if isinstance(body, bytes) else body
        parts += [body.tobytes(), google_crc32c.value(body).to_bytes(_CRC, "little")]
    index_bytes = index.tobytes()
    ro = np.frombuffer(index_bytes, dtype=np.uint8)
    parts += [index_bytes, google_crc32c.value(ro).to_bytes(_CRC, "little")]
    index.setflags(write=False)
    return b"".join(parts), index


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


def _inner_shape(layout: ShardLayout, chunk: int, n_rows: int) -> tuple[int, ...]:
    rows = max(0, min(layout.inner_rows, n_rows - chunk * layout.inner_rows))
    return (rows, *layout.row_shape)


def _shard_key(arr: zarr.Array, shard: int) -> str:
    return arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))


def _full_key(arr: zarr.Array, key: str) -> str:
    prefix = arr.store_path.path
    return f"{prefix}/{key}" if prefix else key


def _local_file(arr: zarr.Array, key: str) -> str | None:
    store = arr.store_path.store
    return os.path.join(str(store.root), _full_key(arr, key)) if isinstance(store, LocalStore) else None


def _read_ranges(arr: zarr.Array, key: str, ranges: list[tuple[int, int]]) -> list[bytes]:
    """Bytes ``lo:hi`` of the stored object ``key`` of ``arr`` for each range; FileNotFoundError if absent."""
    path = _local_file(arr, key)
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
    path = _local_file(arr, key)
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
