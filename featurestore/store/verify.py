"""Store verification: consistency of index and feature sets, and a read of every finished chunk.

Problems are returned as data (where, which rows, what is wrong) so that a user with 12,291 clips
learns *which* block to recompute, not just that something is off. Chunks holding no finished clip
are not read: a killed writer may have left them half-written, and they hold nothing yet.
"""
from __future__ import annotations

import json
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np

from featurestore.errors import CorruptChunkError, FeatureStoreError, MissingChunkError
from featurestore.provenance import fingerprint, fingerprint_matches
from featurestore.store._backend import join
from featurestore.store._remote import RemoteStoreError, is_remote, is_transport_error, remote_error
from featurestore.store.row_group import KINDS
from featurestore.store.verify_metadata import MetadataScan, scan_metadata

DEFAULT_THREADS = min(4, os.cpu_count() or 1)
_CRC = 4  # bytes of a crc32c
_ABSENT = np.uint64(2**64 - 1)  # a shard index's offset (and length) of an absent inner chunk
_IN_FLIGHT_PER_THREAD = 2  # chunks queued or being checked per thread: bounds verify's memory


@dataclass(frozen=True)
class Problem:
    """One inconsistency: ``where`` (array or group), ``rows`` (start, stop) or None, and ``what``."""

    where: str
    rows: tuple[int, int] | None
    what: str

    def __str__(self) -> str:
        span = f" rows {self.rows[0]}:{self.rows[1]}" if self.rows else ""
        return f"{self.where}{span}: {self.what}"


@dataclass
class VerifyReport:
    """The outcome of ``store.verify()``: problems plus counts of what was checked."""

    location: str
    problems: list[Problem] = field(default_factory=list)
    chunks_read: int = 0
    arrays_checked: int = 0
    leftovers: list[str] = field(default_factory=list)  # temp files of interrupted Zarr writes
    # arrays longer than the committed index: an append killed before its commit; not damage (the
    # rows are ignored, and the next writable open cuts them off)
    uncommitted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        state = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        extra = (f"; {len(self.leftovers)} temp file(s) left by interrupted writes (harmless; "
                 f"'featurestore verify --remove-leftovers' deletes them when no writer runs)"
                 if self.leftovers else "")
        if self.uncommitted:
            extra += (f"; {len(self.uncommitted)} array(s) hold rows of an append that never committed "
                      f"(ignored; removed when the store is next opened for writing)")
        return (f"verify {self.location}: {state}; {self.arrays_checked} arrays checked, "
                f"{self.chunks_read} chunks read{extra}")

    def to_dict(self) -> dict:
        return {"location": self.location, "ok": self.ok, "chunks_read": self.chunks_read,
                "arrays_checked": self.arrays_checked, "leftovers": self.leftovers,
                "uncommitted": self.uncommitted,
                "problems": [{"where": p.where, "rows": p.rows, "what": p.what} for p in self.problems]}


def verify_store(store, threads: int | None = None) -> VerifyReport:
    """Check ``store`` (a FeatureStore) and return a report; never raises for bad data.

    Every array is checked chunk by chunk, the index included: each chunk that holds written rows
    (every index row; feature and prediction rows marked done; anything stored for the rest) must
    be in storage and pass its checksum. Then the logical checks run on what could be read.
    ``threads`` (default ``DEFAULT_THREADS``) check Zarr chunks in parallel; the report is the same
    with any number. A damaged ``zarr.json`` is a problem naming the file; the arrays whose own
    metadata is whole are still checked (``verify_metadata.py``).
    """
    report = VerifyReport(store.location, leftovers=[str(p) for p in leftover_files(store.location)])
    scan = _metadata_scan(store, report)
    store.refresh()
    raw = _LocalZarrChunks(store.arrays.location) if store.arrays.backend == "zarr" else None
    damaged = _check_chunks(store, report, raw, DEFAULT_THREADS if threads is None else max(1, int(threads)),
                            store.arrays.arrays() if scan is None else scan.arrays)
    if scan is not None and scan.touches("index"):
        return report  # the index's arrays whose metadata is whole were read above
    try:
        n = _check_index(store, report, raw)
    except FeatureStoreError as err:
        if "index" not in damaged:
            report.problems.append(Problem("index", None, str(err)))
        return report
    for group in _row_groups(store, scan):
        _check_group(store, report, group, damaged, n, raw)
    report.problems += _groups_without_values(store, scan)
    report.problems += _unfinished_class_features(store, scan)
    return report


def unopenable_report(location: str) -> VerifyReport | None:
    """The report for a local Zarr store that does not open because metadata is damaged (its root
    ``zarr.json``, say): the damaged files as problems; None when none is (the open's error stands)."""
    scan = scan_metadata(os.path.abspath(location)) if "://" not in location else None
    if scan is None or not scan.damaged:
        return None
    return VerifyReport(location, _metadata_problems(scan))


def _metadata_scan(store, report: VerifyReport) -> MetadataScan | None:
    """The walk over a local Zarr store's metadata (its damaged files become problems; its arrays are
    the ones to check, listed without zarr reading every node again); None where the store is not
    local Zarr (the backend lists its arrays)."""
    scan = scan_metadata(store.arrays.location) if store.arrays.backend == "zarr" else None
    if scan is not None:
        report.problems += _metadata_problems(scan)
    return scan


def _metadata_problems(scan: MetadataScan) -> list[Problem]:
    """One problem per damaged ``zarr.json``, named by its file."""
    return [Problem(scan.file(node), None, what) for node, what in scan.damaged.items()]


def _row_groups(store, scan: MetadataScan | None) -> list:
    """The feature sets and prediction runs to check: all of them, or, with damaged metadata, those
    the walk found whose own metadata (group and arrays) is whole."""
    if scan is None or not scan.damaged:
        return store.row_groups()
    groups = []
    for kind in KINDS:
        top, leaf = kind.top + "/", "/" + kind.leaf
        names = [path[len(top):-len(leaf)] for path in scan.arrays if path.startswith(top) and path.endswith(leaf)]
        groups += [store.row_group(kind, name) for name in names if not scan.touches(join(kind.top, name))]
    return groups


def leftover_files(location: str) -> list[Path]:
    """Temp files (``*.partial``) that a killed Zarr writer left in a local store directory.

    Zarr writes every chunk to a temp file and renames it into place, so a kill leaves at most such
    files, never a torn chunk. They hold nothing the store reads; zarr warns about them when it
    lists a group. Deleting one while a writer runs would break that writer's rename.
    """
    root = Path(location)
    if "://" in location or not root.is_dir():
        return []
    return sorted(root.rglob("*.partial"))


def remove_leftovers(report: VerifyReport) -> int:
    """Delete the temp files a report found; only safe while no process writes to the store."""
    for path in report.leftovers:
        Path(path).unlink(missing_ok=True)
    return len(report.leftovers)


def _check_chunks(store, report: VerifyReport, raw: "_LocalZarrChunks | None", threads: int,
                  paths: list[str]) -> set[str]:
    """Read every chunk of every array (of ``paths``) that should hold data; returns the damaged array paths.

    Chunks are checked by a pool of threads (reading, checksums and the value checks release the
    GIL), at most ``_IN_FLIGHT_PER_THREAD`` per thread at a time so memory stays a few chunks
    whatever the store's size; outcomes are recorded in chunk order, so the report reads the same
    with any number of threads.
    """
    arrays = store.arrays
    damaged: set[str] = set()
    outcomes = _in_order(lambda chunk: _read_chunk(arrays, raw, chunk), _chunks(store, report, raw, paths),
                         threads if arrays.backend == "zarr" else 1)  # h5py serialises every call anyway
    for outcome in outcomes:
        _record(store, report, outcome, damaged)
    if any(p.startswith("index/") for p in damaged):
        damaged.add("index")
    return damaged


@dataclass(frozen=True)
class _Chunk:
    """One chunk to check: rows ``start:stop`` of ``path``; ``done`` masks the rows whose values
    are checked (None: not checked); ``needed``: its rows were written, so it must be in storage."""

    path: str
    number: int
    start: int
    stop: int
    needed: bool
    done: np.ndarray | None


@dataclass
class _Outcome:
    chunk: _Chunk
    missing: bool = False
    error: Exception | None = None
    findings: list[tuple[tuple[int, int], str]] = field(default_factory=list)


def _chunks(store, report: VerifyReport, raw: "_LocalZarrChunks | None", paths: list[str]):
    """The chunks to check, array by array in storage order (counts the arrays in ``report``)."""
    arrays = store.arrays
    n = _rows_or_none(store)
    for path in paths:
        report.arrays_checked += 1
        rows = arrays.shape(path)[0] if n is None or not _is_row_array(path) else min(n, arrays.shape(path)[0])
        required = _required_rows(arrays, raw, path, rows)
        leaf = path.rpartition("/")[2]
        checked = required is not None and leaf in ("data", "probs")
        per = arrays.chunk_rows(path)
        for start in range(0, rows, per):
            stop = min(rows, start + per)
            needed = required is None or bool(required[start:stop].any())
            if not needed and leaf in ("data", "probs"):
                continue  # no finished row: a killed writer may have left it half-written (HDF5)
            yield _Chunk(path, start // per, start, stop, needed, required[start:stop] if checked else None)


def _in_order(work, items, threads: int):
    """``map(work, items)`` on ``threads`` threads with a bounded window, results in item order."""
    if threads <= 1:
        yield from map(work, items)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="verify") as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(work, item))
            if len(window) >= threads * _IN_FLIGHT_PER_THREAD:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _read_chunk(arrays, raw: "_LocalZarrChunks | None", chunk: _Chunk) -> _Outcome:
    """Check one chunk: in storage, checksum, and the values of its done rows; never raises.

    The fast path checks local Zarr chunks from their files; where it finds anything wrong (or
    cannot tell) the chunk is read through the backend, which decides and words the error as
    every other read does.
    """
    fast = raw.layout(chunk.path) if raw is not None else None
    block = _BACKEND
    if fast is not None:
        try:
            block = raw.read(fast, chunk)
        except Exception:  # noqa: BLE001 - a failed check, or a chunk the fast path cannot judge
            block = _BACKEND
    if block is _NO_FILE:
        if not chunk.needed:  # absent and not required (an error-text chunk of a clean fill): no finding
            return _Outcome(chunk, missing=True)
        block = _BACKEND  # required: the backend's own test decides whether it is missing
    try:
        if block is _BACKEND:
            if not arrays.chunk_written(chunk.path, chunk.number):
                return _Outcome(chunk, missing=True)
            block = _read_backend(arrays, chunk)
        if chunk.done is None:
            return _Outcome(chunk)
        if block is None:  # a string chunk whose checksum the fast path checked
            block = arrays.read_unchecked(chunk.path, chunk.start, chunk.stop)
    except RemoteStoreError:  # a failed request says nothing of the data: the check cannot finish
        raise
    except Exception as err:  # noqa: BLE001 - any decode failure is a finding
        if is_transport_error(err, remote=is_remote(arrays.location)):
            raise remote_error(arrays.location, err, f"reading {chunk.path} rows {chunk.start}:{chunk.stop}") from None
        return _Outcome(chunk, error=err)
    leaf = chunk.path.rpartition("/")[2]
    if isinstance(block, _ShardRows):
        if block.grouped.dtype.kind != "f":
            return _Outcome(chunk)  # integers (stored frames): no value to judge
        if leaf != "probs":  # judged where the rows lie in the file's bytes, not copied together
            finite = block.finite_rows()
            done = finite if chunk.done.all() else finite[chunk.done]
            return _Outcome(chunk, findings=_finite_findings(chunk.start, done))
        block = block.rows()
    values = block if chunk.done.all() else block[chunk.done]
    return _Outcome(chunk, findings=_value_findings(chunk.start, values, leaf))


def _read_backend(arrays, chunk: _Chunk) -> np.ndarray:
    """The chunk through the backend. A sharded one is read by inner chunk, each checked against its
    own crc32c and required where it holds a written row (zarr would read an absent one as zeros),
    so a ``CorruptChunkError`` names the inner chunk's rows."""
    if arrays.inner_rows(chunk.path) == arrays.chunk_rows(chunk.path):
        return arrays.read_unchecked(chunk.path, chunk.start, chunk.stop)
    written = chunk.done if chunk.done is not None else np.full(chunk.stop - chunk.start, chunk.needed)
    return arrays.read(chunk.path, chunk.start, chunk.stop, written=written)


def _record(store, report: VerifyReport, outcome: _Outcome, damaged: set[str]) -> None:
    chunk = outcome.chunk
    path, span = chunk.path, (chunk.start, chunk.stop)
    if isinstance(outcome.error, CorruptChunkError):  # an inner chunk of a shard, named by its rows
        span = (outcome.error.start, outcome.error.stop)
        what = ("inner chunk missing from its shard (deleted or lost) although its rows were written"
                if isinstance(outcome.error, MissingChunkError)
                else str(CorruptChunkError(path, *span, outcome.error.__cause__ or outcome.error)))
        report.chunks_read += 1
        report.problems.append(Problem(path, span, what + _clip_span(store, path, *span)))
        damaged.add(path)
        return
    if outcome.missing:
        if chunk.needed and store.arrays.strict:
            report.problems.append(Problem(path, span, "chunk missing from storage (deleted or lost) although "
                                                       "its rows were written"
                                           + _clip_span(store, path, *span)))
            damaged.add(path)
        return
    report.chunks_read += 1
    if outcome.error is not None:
        report.problems.append(Problem(path, span, str(CorruptChunkError(path, *span, outcome.error))
                                       + _clip_span(store, path, *span)))
        damaged.add(path)
        return
    report.problems += [Problem(path, rows, what) for rows, what in outcome.findings]


class _RawChunkError(Exception):
    """A chunk's bytes failed a check of the fast path; the backend's read then decides."""


_BACKEND = object()  # a chunk to read through the backend
_NO_FILE = object()  # the fast path found no file for the chunk


@dataclass(frozen=True)
class _ShardRows:
    """Rows ``0:n`` of a shard as a view of its file's bytes grouped by inner chunk, ``[k, rows per
    inner chunk, values per row]``: each inner chunk ends in its crc32c, so the rows are not one
    array without a copy of the shard (a quarter of the fast path's time), and are judged in place."""

    grouped: np.ndarray
    n: int
    row_shape: tuple[int, ...]

    def finite_rows(self) -> np.ndarray:
        return _finite_last(self.grouped).reshape(-1)[:self.n]

    def rows(self) -> np.ndarray:
        return self.grouped.reshape(-1, *self.row_shape)[:self.n]


@dataclass(frozen=True)
class _Layout:
    """What the fast path needs of a Zarr v3 array's metadata (for a sharded array: the shard's
    ``chunk_shape``, and its inner chunks' rows and codecs)."""

    folder: Path
    rows: int
    separator: str
    ndim: int
    chunk_shape: tuple[int, ...]
    dtype: np.dtype | None  # None: strings (only the checksum is checked here)
    zstd: bool
    inner_rows: int = 0  # rows per inner chunk of a shard; 0: not sharded
    index_bytes: int = 0  # bytes of a shard's index at its end, its crc32c included

    @property
    def inner_bytes(self) -> int:
        """Decoded bytes of one inner chunk."""
        return self.inner_rows * int(np.prod(self.chunk_shape[1:], dtype=np.int64)) * self.dtype.itemsize


class _LocalZarrChunks:
    """Checks chunks of a local Zarr v3 store from their files: crc32c over the bytes, the length,
    and the values without zarr's per-call machinery (~2 ms a chunk on a loaded machine), strings
    without building Python strings. A shard (feature data) is read in one piece: its index's
    crc32c, then each inner chunk's, its values a view of the file's bytes where the inner chunks
    lie back to back uncompressed (as the store writes them). Arrays in any other layout (other
    codecs, a shard index at the start) return no layout and are read through the backend.
    """

    def __init__(self, location: str):
        root = Path(location)
        self._root = None if "://" in location or not root.is_dir() else root
        self._layouts: dict[str, _Layout | None] = {}
        self._columns: dict[tuple[str, int], np.ndarray] = {}  # numeric columns read whole, by (path, rows)
        self._zstd = numcodecs.Zstd()
        self._vlen = numcodecs.VLenUTF8()  # what zarr's vlen-utf8 codec decodes with
        self._buffers = threading.local()  # per thread: the bytes of the shard being checked

    def layout(self, path: str) -> _Layout | None:
        if self._root is None:
            return None
        if path not in self._layouts:
            try:
                self._layouts[path] = _parse_layout(self._root / path)
            except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
                self._layouts[path] = None
        return self._layouts[path]

    def read(self, layout: _Layout, chunk: _Chunk):
        """The chunk's values (rows ``start:stop``), None for strings (checksum checked, not
        decoded), ``_NO_FILE`` when there is no such file."""
        try:
            data = self._shard_file(layout, chunk.number) if layout.inner_rows else self._file(layout, chunk.number)
        except FileNotFoundError:
            return _NO_FILE
        if layout.inner_rows:
            return self._shard_values(layout, data, chunk.stop - chunk.start)
        body = self._checked(layout, data)
        if layout.dtype is None:
            return None
        return self._values(layout, body)[:chunk.stop - chunk.start]

    def column(self, path: str, stop: int, absent_is_empty: bool = False) -> np.ndarray | None:
        """Rows ``0:stop`` of a one-dimensional array (strings as an object array), or None where
        anything is unusual (no fast layout, a chunk missing or failing its check, too few rows).

        Numeric columns are kept for the rest of the run: a set's done flags are asked for by the
        chunk pass (which rows must be stored) and again by the set's own checks."""
        if (path, stop) in self._columns:
            return self._columns[(path, stop)]
        layout = self.layout(path)
        if layout is None or layout.inner_rows or layout.ndim != 1 or not 0 < stop <= layout.rows:
            return None
        per = layout.chunk_shape[0]
        try:
            parts = [self._decoded(layout, number, absent_is_empty) for number in range(-(-stop // per))]
        except Exception:  # noqa: BLE001 - the backend reads it and reports what it finds
            return None
        values = np.concatenate(parts)[:stop]
        if layout.dtype is not None:
            values.setflags(write=False)
            self._columns[(path, stop)] = values
        return values

    @staticmethod
    def _file(layout: _Layout, number: int) -> bytes:
        """The bytes of chunk (or shard) file ``number``; FileNotFoundError when there is none."""
        key = layout.separator.join(["c", str(number)] + ["0"] * (layout.ndim - 1))
        return (layout.folder / key).read_bytes()

    def _shard_file(self, layout: _Layout, number: int) -> np.ndarray:
        """The bytes of shard file ``number`` in this thread's buffer, valid until its next call:
        a fresh 32 MiB ``bytes`` per shard costs a page fault per 4 KiB (a sixth of the check)."""
        key = layout.separator.join(["c", str(number)] + ["0"] * (layout.ndim - 1))
        with open(layout.folder / key, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            buffer = getattr(self._buffers, "bytes", None)
            if buffer is None or len(buffer) < size:
                buffer = self._buffers.bytes = np.empty(max(size, 2 * len(buffer) if buffer is not None else 0),
                                                        np.uint8)
            got = f.readinto(memoryview(buffer)[:size])
        return buffer[:got]

    def _checked(self, layout: _Layout, data: bytes | np.ndarray) -> np.ndarray:
        """A chunk's bytes checked against their crc32c (and decompressed); raises when it fails."""
        body = np.frombuffer(data, np.uint8)[:-_CRC]
        if len(data) < _CRC or google_crc32c.value(body) != int.from_bytes(bytes(data[-_CRC:]), "little"):
            raise _RawChunkError("stored and computed crc32c checksums differ")
        return np.frombuffer(self._zstd.decode(body), np.uint8) if layout.zstd else body

    def _shard_values(self, layout: _Layout, data: np.ndarray, n: int) -> _ShardRows:
        """Rows ``0:n`` of a shard, every inner chunk holding them checked against its crc32c.

        Raises ``_RawChunkError`` for anything but a whole shard (index or inner chunk failing its
        crc32c, an inner chunk absent or out of place): the backend then reads it inner chunk by
        inner chunk and names the damaged one's rows, and whether an absent one was required.
        """
        raw = np.frombuffer(data, np.uint8)
        end = len(raw) - layout.index_bytes
        if end < 0:
            raise _RawChunkError("shard shorter than its index")
        tail = raw[end:]
        if google_crc32c.value(tail[:-_CRC]) != int.from_bytes(tail[-_CRC:].tobytes(), "little"):
            raise _RawChunkError("shard index fails its crc32c")
        k = -(-n // layout.inner_rows)  # inner chunks holding rows 0:n
        spans = tail[:-_CRC].view("<u8").reshape(-1, 2)[:k]
        if (spans[:, 0] == _ABSENT).any() or (spans[:, 0] + spans[:, 1] > end).any():
            raise _RawChunkError("an inner chunk is absent or beyond the shard's data")
        length = layout.inner_bytes + _CRC
        if not layout.zstd and (spans[:, 1] == length).all() \
                and (spans[:, 0] == np.arange(k, dtype=np.uint64) * np.uint64(length)).all():
            payload = _checked_rows(raw[:k * length].reshape(k, length))  # back to back, as written
        else:
            payload = np.stack([self._inner(layout, raw[lo:lo + size]) for lo, size in spans.tolist()])
        return _ShardRows(payload.view(layout.dtype).reshape(k, layout.inner_rows, -1), n, layout.chunk_shape[1:])

    def _inner(self, layout: _Layout, body: np.ndarray) -> np.ndarray:
        """One inner chunk's decoded bytes (checked, decompressed, of the right length)."""
        decoded = self._checked(layout, body)
        if len(decoded) != layout.inner_bytes:
            raise _RawChunkError(f"inner chunk holds {len(decoded)} bytes, expected {layout.inner_bytes}")
        return decoded

    def _values(self, layout: _Layout, body: np.ndarray) -> np.ndarray:
        if len(body) != int(np.prod(layout.chunk_shape)) * layout.dtype.itemsize:
            raise _RawChunkError(f"chunk holds {len(body)} bytes, expected {layout.chunk_shape} "
                                 f"{layout.dtype}")
        return body.view(layout.dtype).reshape(layout.chunk_shape)

    def _decoded(self, layout: _Layout, number: int, absent_is_empty: bool = False) -> np.ndarray:
        """Chunk ``number`` decoded; ``absent_is_empty``: a string chunk with no file is empty texts
        (error texts: a fill without failures writes none), as the backend reads it."""
        try:
            data = self._file(layout, number)
        except FileNotFoundError:
            if absent_is_empty and layout.dtype is None:
                return np.full(layout.chunk_shape, "", dtype=object)
            raise
        body = self._checked(layout, data)
        if layout.dtype is not None:
            return self._values(layout, body)
        texts = self._vlen.decode(body)
        if texts.shape != layout.chunk_shape:
            raise _RawChunkError(f"chunk holds {texts.shape} strings, expected {layout.chunk_shape}")
        return texts


def _parse_layout(folder: Path) -> _Layout | None:
    """The layout of the array in ``folder`` when the fast path knows it: regular chunks, default
    chunk keys, codecs bytes (little-endian) or vlen-utf8, then optional zstd, then crc32c; or
    shards along rows (``sharding_indexed``, index at the end: bytes + crc32c) of inner chunks
    coded that way."""
    meta = json.loads((folder / "zarr.json").read_text())
    keys = meta["chunk_key_encoding"]
    if (meta.get("zarr_format") != 3 or meta["chunk_grid"]["name"] != "regular" or keys["name"] != "default"
            or meta.get("storage_transformers")):
        return None
    shape = tuple(int(s) for s in meta["chunk_grid"]["configuration"]["chunk_shape"])
    common = dict(folder=folder, rows=int(meta["shape"][0]), separator=keys.get("configuration", {}).get("separator", "/"),
                  ndim=len(meta["shape"]), chunk_shape=shape)
    if [c["name"] if isinstance(c, dict) else c for c in meta["codecs"]] == ["sharding_indexed"]:
        return _parse_shards(meta["codecs"][0]["configuration"], meta["data_type"], common)
    coded = _chunk_codecs(meta["codecs"], meta["data_type"])
    return None if coded is None else _Layout(**common, dtype=coded[0], zstd=coded[1])


def _parse_shards(config: dict, data_type: str, common: dict) -> _Layout | None:
    """The layout of a sharded numeric array the fast path reads (sharded along rows only)."""
    shard, inner = common["chunk_shape"], tuple(int(s) for s in config["chunk_shape"])
    coded = _chunk_codecs(config["codecs"], data_type)
    index = _chunk_codecs(config["index_codecs"], "uint64")
    if (coded is None or coded[0] is None or index != (np.dtype("<u8"), False)
            or config.get("index_location", "end") != "end"
            or inner[1:] != shard[1:] or not 0 < inner[0] <= shard[0] or shard[0] % inner[0]):
        return None
    return _Layout(**common, dtype=coded[0], zstd=coded[1], inner_rows=inner[0],
                   index_bytes=shard[0] // inner[0] * 16 + _CRC)


def _chunk_codecs(codecs: list, data_type: str) -> tuple[np.dtype | None, bool] | None:
    """``(dtype, zstd)`` of a chunk coded bytes (little-endian) or vlen-utf8 (dtype None), optional
    zstd, crc32c; None for any other codecs."""
    names = [c["name"] if isinstance(c, dict) else c for c in codecs]
    if not names or names[-1] != "crc32c" or names[1:-1] not in ([], ["zstd"]):
        return None
    zstd = names[1:-1] == ["zstd"]
    if names[0] == "vlen-utf8" and data_type == "string":
        return None, zstd
    if names[0] != "bytes" or data_type in ("string", "bytes"):
        return None
    dtype = np.dtype(data_type)
    first = codecs[0] if isinstance(codecs[0], dict) else {}
    if dtype.itemsize > 1 and (first.get("configuration") or {}).get("endian", "little") != "little":
        return None
    return dtype.newbyteorder("<"), zstd


def _checked_rows(body: np.ndarray) -> np.ndarray:
    """The payloads of ``body``'s rows (each an inner chunk: its bytes, then their crc32c), every
    crc32c checked; raises ``_RawChunkError`` when one differs."""
    payload = body[:, :-_CRC]
    stored = np.ascontiguousarray(body[:, -_CRC:]).view("<u4").reshape(-1)
    computed = np.fromiter(map(google_crc32c.value, payload), dtype="<u4", count=len(body))
    if not np.array_equal(stored, computed):
        raise _RawChunkError("stored and computed crc32c checksums differ")
    return payload


def _clip_span(store, path: str, start: int, stop: int) -> str:
    """' (clips A .. B)' for a damaged chunk of a feature set or prediction run, when the index reads."""
    if not path.startswith(("features/", "predictions/")):
        return ""
    stop = min(stop, store.n_clips)
    if stop <= start:
        return ""
    try:
        first, last = store.index.ids_at([start, stop - 1])  # only the id chunks that hold them
    except Exception:  # noqa: BLE001 - the index's own damage is reported on its own
        return ""
    return f" (clips {first} .. {last})"


def _rows_or_none(store) -> int | None:
    try:
        return store.committed_rows
    except Exception:  # noqa: BLE001 - reported by the index checks
        return None


def _is_row_array(path: str) -> bool:
    return path.startswith(("index/", "features/", "predictions/"))


def _required_rows(arrays, raw: "_LocalZarrChunks | None", path: str, rows: int) -> np.ndarray | None:
    """Which rows of ``path`` must be in storage: None for all, else a mask (done rows).

    Feature data and prediction probabilities are required where their clip is done; done flags
    and error texts are not (a missing chunk there reads as "not done, no error": the rows are
    recomputed, nothing is served wrong). Index and class-feature arrays: every row.
    """
    group, _, leaf = path.rpartition("/")
    if path.startswith("index/") or path.startswith("class_features/"):
        return None
    if leaf in ("done", "errors"):
        return np.zeros(rows, dtype=bool)
    if leaf in ("data", "probs"):
        try:
            if arrays.is_array(join(group, "done")):
                return _column(arrays, raw, join(group, "done"), rows).astype(bool)
        except Exception:  # noqa: BLE001 - the done array's own damage (data or metadata) is reported on its own
            return None
    return None


def _check_index(store, report: VerifyReport, raw: "_LocalZarrChunks | None") -> int:
    """Lengths of the index columns, unique non-empty clip ids, labels in range; returns the clips.

    Clip ids and labels are read from their chunk files where the fast path can (decoding ~20x
    faster than building the store's index); anything it cannot read goes through the store.
    """
    arrays = store.arrays
    fast = _fast_index(store, raw)
    n = len(fast[0]) if fast else store.n_clips
    classes = store.classes
    for column in store.columns():
        _check_length(report, f"index/{column}", arrays.shape(f"index/{column}")[0], n)
    ids = fast[0] if fast else store.clip_ids
    unique = set(ids)
    if len(unique) != len(ids):
        report.problems.append(Problem("index/clip_id", None, "clip ids are not unique"))
    if "" in unique:
        report.problems.append(Problem("index/clip_id", None, "empty clip id(s)"))
    labels = fast[1] if fast else store.labels
    bad = np.flatnonzero((labels < -1) | (labels >= len(classes)))
    if len(bad):
        report.problems.append(Problem("index/label", (int(bad[0]), int(bad[-1]) + 1),
                                       f"{len(bad)} label(s) outside -1..{len(classes) - 1}"))
    if len(ids) == n:
        _check_lookup(store, report, ids)
    return n


def _check_lookup(store, report: VerifyReport, ids: list[str]) -> None:
    """A persisted id -> row lookup that is whole (its checksums pass) but sends ids to wrong rows."""
    try:
        problem = store.index.lookup_problem(ids)
    except CorruptChunkError:  # a damaged lookup chunk: the chunk pass reports it, naming the rows
        return
    if problem:
        report.problems.append(Problem("index/lookup", None, problem))


def _fast_index(store, raw: "_LocalZarrChunks | None") -> tuple[list[str], np.ndarray] | None:
    """Clip ids and labels of the committed rows read from their files, or None (read by the store)."""
    if raw is None:
        return None
    try:
        n = store.committed_rows
    except Exception:  # noqa: BLE001 - the store's own read reports it
        return None
    ids, labels = raw.column("index/clip_id", n), raw.column("index/label", n)
    if ids is None or labels is None:
        return None
    return ids.tolist(), labels


def _unfinished_class_features(store, scan: MetadataScan | None) -> list[Problem]:
    """Class-feature sets whose write never finished (still marked ``writing``): reads refuse them,
    the store does not list them, and only this says why (a missing chunk may say it too)."""
    from featurestore.store.class_features import WRITING

    problems = []
    for name in store.arrays.groups_with("class_features", "data"):
        path = join("class_features", name)
        if not (scan is not None and scan.touches(path)) and store.arrays.attrs(path).get(WRITING):
            problems.append(Problem(path, None, f"class feature set {name!r} is unfinished: its writer stopped "
                                                f"before recording what made its values; write it again "
                                                f"(featurestore extract with its cliptext encoder)"))
    return problems


def _groups_without_values(store, scan: MetadataScan | None) -> list[Problem]:
    """Feature sets and prediction runs whose value array is gone (its ``zarr.json`` deleted) while
    their done flags remain: the store no longer lists them, so nothing else would tell."""
    problems = []
    for kind in KINDS:
        if scan is not None:  # the metadata walk's arrays (listing through zarr would read damaged nodes)
            top, known = kind.top + "/", set(scan.arrays)
            names = [p[len(top):-len("/done")] for p in scan.arrays if p.startswith(top) and p.endswith("/done")]
            listed = {name for name in names if join(kind.top, name, kind.leaf) in known}
        else:
            names = store.arrays.groups_with(kind.top, "done")
            listed = set(store.arrays.groups_with(kind.top, kind.leaf))
        for name in names:
            path = join(kind.top, name)
            if name not in listed and not (scan is not None and scan.touches(path)):
                problems.append(Problem(join(path, kind.leaf), None, f"{kind.noun} {name!r} has its done flags but "
                                        f"no {kind.leaf} array (deleted?); the store no longer lists it: rerunning "
                                        f"the extraction or prediction replaces it"))
    return problems


def _check_group(store, report: VerifyReport, group, damaged: set[str], n: int,
                 raw: "_LocalZarrChunks | None") -> None:
    """Logical checks of a feature set or prediction run (a ``RowGroup``): lengths, attributes,
    done/error overlap.

    (The values of finished rows are checked while their chunks are read, in ``_check_chunks``.)
    """
    arrays = store.arrays
    absent = group.missing_arrays()
    if absent:
        report.problems.append(Problem(group.path, None, f"unfinished creation ({', '.join(absent)} missing); "
                                                         f"rerunning the extraction or prediction replaces it"))
        return
    parts = group.array_paths
    if not all([_check_length(report, part, arrays.shape(part)[0], n) for part in parts[:2]]):
        return
    if group.kind.with_errors:
        _check_feature_attrs(report, group)
    if {group.done_path, group.errors_path} & damaged:
        return
    done = _column(arrays, raw, group.done_path, n).astype(bool)
    if group.kind.with_errors:
        texts = _column(arrays, raw, group.errors_path, n, absent_is_empty=True)
        both = np.flatnonzero(done & (texts != ""))
        if len(both):
            report.problems.append(Problem(group.errors_path, (int(both[0]), int(both[-1]) + 1),
                                           f"{len(both)} clip(s) marked done but also failed"))


def _column(arrays, raw: "_LocalZarrChunks | None", path: str, n: int, absent_is_empty: bool = False) -> np.ndarray:
    """Rows ``0:n`` of a one-dimensional array: from its files where the fast path can, else through
    the backend (where a missing chunk reads as fill values). ``absent_is_empty``: see ``column``."""
    values = raw.column(path, n, absent_is_empty) if raw is not None else None
    return arrays.read_unchecked(path, 0, n) if values is None else values


def _check_length(report: VerifyReport, path: str, length: int, n: int) -> bool:
    """Fewer rows than the index is damage; more are rows of an append that never committed."""
    if length < n:
        report.problems.append(Problem(path, None, f"has {length} rows, index has {n} clips"))
        return False
    if length > n:
        report.uncommitted.append(path)
    return True


def _check_feature_attrs(report: VerifyReport, group) -> None:
    attrs, where = group.attrs, group.path
    prov = attrs.get("provenance")
    if not isinstance(prov, dict):
        report.problems.append(Problem(where, None, "no provenance attribute"))
        return
    if not fingerprint_matches(attrs.get("fingerprint"), prov):
        report.problems.append(Problem(where, None, f"fingerprint {attrs.get('fingerprint')!r} does not "
                                                     f"match its provenance ({fingerprint(prov)!r})"))
    shape = group.shape
    if list(shape[2:]) != list(attrs.get("feature_shape", [])) or shape[1] != attrs.get("n_segments"):
        report.problems.append(Problem(where, None, f"data shape {shape} disagrees with attributes "
                                                     f"n_segments={attrs.get('n_segments')}, "
                                                     f"feature_shape={attrs.get('feature_shape')}"))


def _value_findings(start: int, values: np.ndarray, leaf: str) -> list[tuple[tuple[int, int], str]]:
    """NaN/Inf in finished rows (and probabilities outside [0, 1]) as (rows, what) findings."""
    if values.dtype.kind != "f" or not values.size:
        return []
    found = _finite_findings(start, _finite_rows(values))
    if leaf == "probs" and ((values < 0) | (values > 1)).any():
        found.append(((start, start + len(values)), "probabilities outside [0, 1]"))
    return found


def _finite_findings(start: int, finite: np.ndarray) -> list[tuple[tuple[int, int], str]]:
    """A finding for finished rows (``finite``: one flag each) holding NaN or Inf, if any do."""
    if finite.all():
        return []
    return [((start, start + len(finite)), f"{int((~finite).sum())} finished clip(s) hold NaN or Inf")]


def _finite_rows(values: np.ndarray) -> np.ndarray:
    """Per row: every value finite."""
    return _finite_last(values.reshape(len(values), -1))


def _finite_last(values: np.ndarray) -> np.ndarray:
    """Whether every value along the last axis is finite. float16 is tested on its exponent bits
    (all ones: Inf or NaN), exactly what ``np.isfinite`` answers and ~20x faster, since numpy
    widens float16 for it."""
    if values.dtype == np.float16:
        return ((values.view(np.uint16) & 0x7C00) != 0x7C00).all(axis=-1)
    return np.isfinite(values).all(axis=-1)
