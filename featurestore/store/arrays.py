"""A store's groups and arrays by path: listing, checked reads and low-level writes over one backend.

This is the layer below the store's vocabulary (clips, feature sets, prediction runs): what
``verify`` walks and ``convert`` copies. Reads of rows that were written check that their chunks
are in storage and raise ``CorruptChunkError`` / ``MissingChunkError`` naming the array and rows;
writes are refused on a store opened read-only. Prefer the ``FeatureStore`` methods: writing here
bypasses the done flags, fingerprints and chunk alignment they keep.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from featurestore.errors import CorruptChunkError, MissingChunkError, ReadOnlyStoreError
from featurestore.store._backend import Backend, ChunkFault, join
from featurestore.store._remote import RemoteStoreError, is_remote, is_transport_error, remote_error


class StoreArrays:
    """The arrays and groups of one open store, addressed by '/'-separated paths.

    Attributes:
        strict: every written chunk is kept (schema version 2), so a missing chunk of written
            rows is damage; version 1 stores did not keep chunks of fill values.
    """

    def __init__(self, backend: Backend, strict: bool = True):
        self._backend = backend
        self.strict = strict

    @property
    def location(self) -> str:
        return self._backend.location

    @property
    def read_only(self) -> bool:
        return self._backend.read_only

    @property
    def backend(self) -> str:
        """``"zarr"`` or ``"hdf5"``."""
        return self._backend.kind

    # ------------------------------------------------------------------------------- listing
    def exists(self, path: str) -> bool:
        """Whether a group or array is at ``path`` ('' is the root)."""
        return self._backend.exists(path)

    def is_array(self, path: str) -> bool:
        return self._backend.is_array(path)

    def children(self, path: str) -> list[str]:
        """Names of the groups and arrays directly under the group at ``path``, sorted."""
        return self._backend.children(path)

    def arrays(self, path: str = "") -> list[str]:
        """Paths of every array under the group at ``path``, depth first, sorted per level."""
        out: list[str] = []
        for child in self.children(path):
            full = join(path, child)
            out += [full] if self.is_array(full) else self.arrays(full)
        return out

    def groups(self, path: str = "") -> list[str]:
        """Paths of every group under the group at ``path`` (not the group itself), parents first."""
        out: list[str] = []
        for child in self.children(path):
            full = join(path, child)
            if not self.is_array(full):
                out += [full] + self.groups(full)
        return out

    def groups_with(self, top: str, leaf: str) -> list[str]:
        """Names (relative to ``top``) of the possibly nested groups under ``top`` holding an array ``leaf``."""
        found: list[str] = []
        stack = [""]
        while stack:
            rel = stack.pop()
            path = join(top, rel)
            if not self.exists(path) or self.is_array(path):
                continue
            kids = self.children(path)
            if leaf in kids and self.is_array(join(path, leaf)):
                found.append(rel)
                continue
            stack.extend(join(rel, k) for k in kids)
        return sorted(found)

    # ---------------------------------------------------------------------------- describing
    def attrs(self, path: str) -> dict[str, Any]:
        """The JSON attributes of a group or array (a copy)."""
        return self._backend.get_attrs(path)

    def read_attr(self, path: str, key: str) -> Any:
        """One attribute of a group or array, read anew from storage (``attrs`` may be cached by
        the backend's node objects; this never is)."""
        return self._backend.read_attr(path, key)

    def metadata_token(self, path: str) -> Any:
        """Something that changes when the array's metadata file is written (None where the backend
        cannot tell cheaply): a reader's cue to look whether another writer replaced it."""
        return self._backend.metadata_token(path)

    def fresh_reads(self) -> int:
        """A count that grows with every read that met files anew (see ``Backend.fresh_reads``)."""
        return self._backend.fresh_reads

    def shape(self, path: str) -> tuple[int, ...]:
        return self._backend.shape(path)

    def dtype(self, path: str) -> str:
        """The numpy dtype name, or ``"str"`` for string arrays."""
        return self._backend.dtype(path)

    def chunk_rows(self, path: str) -> int:
        """Rows per chunk as writers see it: a shard of a sharded array (for unchunked HDF5 datasets:
        rows per ~4 MiB read block). Aligned writers own whole chunks."""
        return self._backend.chunk_rows(path)

    def inner_rows(self, path: str) -> int:
        """Rows per inner chunk, the unit decoded on its own (``chunk_rows`` unless sharded)."""
        return self._backend.inner_rows(path)

    def compressor(self, path: str) -> str | None:
        """``"zstd"`` when the array's chunks are compressed (gzip in HDF5), else None."""
        return self._backend.compressor(path)

    def chunk_written(self, path: str, chunk: int) -> bool:
        """Whether chunk number ``chunk`` is in storage (False: never written, or lost)."""
        try:
            return self._backend.chunk_written(path, chunk)
        except Exception as err:  # a HEAD request that failed says nothing of the chunk
            if self._failed_request(err):
                raise remote_error(self.location, err, f"looking up chunk {chunk} of {path}") from None
            raise

    def _failed_request(self, err: BaseException) -> bool:
        """Whether ``err`` is a request to object storage that failed, not damage of the data."""
        return is_transport_error(err, remote=is_remote(self.location))

    # --------------------------------------------------------------------------------- reads
    def read(self, path: str, start: int, stop: int, written: bool | np.ndarray = True) -> np.ndarray:
        """Rows ``start:stop``; damage raises ``CorruptChunkError`` naming array and rows.

        ``written``: these rows were written, so each of their chunks must be in storage (a missing
        one would read as fill values: zeros, "unknown" labels) or ``MissingChunkError`` is raised;
        or a bool per row (a chunk holding one written row must be there). Version 1 stores did not
        keep chunks of fill values, so there it is not checked.
        """
        if stop > start and (not isinstance(written, bool) or self.inner_rows(path) < self.chunk_rows(path)):
            return self._read_inner(path, start, stop, written)
        if written and self.strict:
            per = self.chunk_rows(path)
            for chunk in range(start // per, -(-stop // per)):
                if not self.chunk_written(path, chunk):
                    raise MissingChunkError(f"{self.location}:{path}", chunk * per,
                                            min(stop, (chunk + 1) * per))
        try:
            return self._backend.read(path, start, stop)
        except Exception as err:  # checksum and decode failures surface as codec errors
            raise self._corrupt_rows(path, start, stop, err) from err

    def _read_inner(self, path: str, start: int, stop: int, written: bool | np.ndarray) -> np.ndarray:
        """Rows ``start:stop`` read inner chunk by inner chunk (sharded arrays, per-row ``written``)."""
        per = self.inner_rows(path)
        first = start // per
        chunks = np.arange(first, -(-stop // per), dtype=np.int64)
        flags = np.zeros(len(chunks) * per, dtype=bool)
        flags[start - first * per:stop - first * per] = written
        blocks = self.read_chunks(path, chunks, flags.reshape(len(chunks), per).any(axis=1))
        whole = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
        return whole[start - first * per:stop - first * per]

    def gather(self, path: str, rows: np.ndarray, required: np.ndarray) -> np.ndarray | None:
        """Rows in any order by the backend's fastest path (memory-mapped shards), checked as
        ``read_chunks`` checks; None where there is none (``read_chunks`` then serves them)."""
        try:
            return self._backend.gather(path, rows, np.asarray(required, dtype=bool) & self.strict)
        except ChunkFault as fault:
            raise self._fault_error(path, fault) from fault.cause

    def chunk(self, path: str, chunk: int, required: bool) -> np.ndarray | None:
        """One inner chunk, ``[inner rows, ...]``, by the backend's fastest path (a cold single read:
        a read-only view of a memory map, checked as ``read_chunks`` checks; copy what is kept), or None."""
        try:
            return self._backend.chunk(path, chunk, required and self.strict)
        except ChunkFault as fault:
            raise self._fault_error(path, fault) from fault.cause

    def chunk_grids(self, path: str, chunks: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, np.ndarray] | None:
        """Inner chunks (each written) as read-only views of memory maps, checked as ``read_chunks``
        checks: ``(grids, where, local)``, chunk ``chunks[i]`` being ``grids[where[i]][local[i]]``;
        None where the backend has no maps, or in a store whose missing chunks are fill values."""
        if not self.strict:
            return None
        try:
            return self._backend.chunk_grids(path, chunks)
        except ChunkFault as fault:
            raise self._fault_error(path, fault) from fault.cause

    def forget(self, path: str = "") -> None:
        """Forget what is known of the arrays at and under ``path`` ('': all): another process may
        have replaced them (a feature set deleted and created again with another shape, dtype or
        chunking), and reading new files through the old metadata would call them damaged, or
        reinterpret their bytes."""
        self._backend.forget(path)

    def revalidate(self, path: str) -> None:
        """Files of ``path`` may have been replaced by another process (its done flags were read
        anew): ``gather`` checks what it keeps of them (memory maps) before using it again."""
        self._backend.revalidate(path)

    def _fault_error(self, path: str, fault: ChunkFault) -> CorruptChunkError | RemoteStoreError:
        per, n = self.inner_rows(path), self.shape(path)[0]
        start, stop = fault.chunk * per, min(n, (fault.chunk + 1) * per)
        if fault.cause is not None and self._failed_request(fault.cause):  # the request failed, not the data
            return remote_error(self.location, fault.cause, f"reading {path} rows {start}:{stop}")
        if fault.missing:
            return MissingChunkError(f"{self.location}:{path}", start, stop)
        return CorruptChunkError(f"{self.location}:{path}", start, stop, fault.cause)

    def read_chunks(self, path: str, chunks: np.ndarray, required: np.ndarray) -> list[np.ndarray]:
        """Inner chunks by number, each whole (the last cut to the array's end), in the order given.

        ``required`` (bool per chunk): the chunk holds written rows, so it must be in storage
        (``MissingChunkError`` naming its rows otherwise; with it not required, an absent chunk reads
        as fill values). A chunk failing its checksum raises ``CorruptChunkError`` naming its rows.
        """
        try:
            return self._backend.read_chunks(path, chunks, np.asarray(required, dtype=bool) & self.strict)
        except ChunkFault as fault:
            raise self._fault_error(path, fault) from fault.cause
        except Exception as err:  # a request that failed outside the checks (botocore: no endpoint)
            if self._failed_request(err):
                raise remote_error(self.location, err, f"reading {path}") from None
            raise

    def read_unchecked(self, path: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as the backend returns them: a decode failure propagates as it is
        and a missing chunk reads as fill values (``verify`` locates and words damage itself)."""
        return self._backend.read(path, start, stop)

    def _corrupt_rows(self, path: str, start: int, stop: int, err: Exception) -> CorruptChunkError | RemoteStoreError:
        """The error for a failed read, narrowed to the first chunk that fails on its own; a failed
        request (throttled, refused, no endpoint) says so instead of calling the data damaged."""
        if self._failed_request(err):
            return remote_error(self.location, err, f"reading {path} rows {start}:{stop}")
        per = self.chunk_rows(path)
        for chunk_start in range(start - start % per, stop, per):
            lo, hi = max(start, chunk_start), min(stop, chunk_start + per)
            try:
                self._backend.read(path, lo, hi)
            except Exception as chunk_err:  # noqa: BLE001 - the failure being located
                if self._failed_request(chunk_err):
                    return remote_error(self.location, chunk_err, f"reading {path} rows {lo}:{hi}")
                return CorruptChunkError(f"{self.location}:{path}", lo, hi, chunk_err)
        return CorruptChunkError(f"{self.location}:{path}", start, stop, err)

    # -------------------------------------------------------------------- low-level writes
    def require_writable(self) -> None:
        """Raise ``ReadOnlyStoreError`` when the store is open with mode 'r'."""
        if self.read_only:
            raise ReadOnlyStoreError(f"{self.location} is open read-only (mode='r'); open with mode='a'")

    def create_group(self, path: str) -> None:
        self.require_writable()
        self._backend.create_group(path)

    def create_array(self, path: str, shape: tuple[int, ...], dtype: str, chunk_rows: int, fill_value: Any,
                     compressor: str | None = None, inner_rows: int | None = None) -> None:
        """A new array (replacing one at ``path``), chunked by ``chunk_rows`` rows, checksummed;
        ``inner_rows`` (a divisor of ``chunk_rows``) shards it: each chunk of ``chunk_rows`` is then
        stored as inner chunks of ``inner_rows`` that are read and decoded on their own."""
        self.require_writable()
        if int(shape[0]) < 0 or any(int(s) < 1 for s in shape[1:]):  # zarr: a ZeroDivisionError at best
            raise ValueError(f"{self.location}:{path}: shape {tuple(shape)} has an empty or negative axis "
                             f"(each value needs at least one element)")
        self._backend.create_array(path, shape, dtype, chunk_rows, fill_value, compressor=compressor,
                                   inner_rows=inner_rows)

    def write(self, path: str, start: int, data: np.ndarray, changed: np.ndarray | None = None) -> None:
        """Write rows ``start:start+len(data)``; ``changed``: see ``Backend.write``."""
        self.require_writable()
        try:
            self._backend.write(path, start, data, changed=changed)
        except Exception as err:  # s3fs's error names neither the store nor the rows
            if self._failed_request(err):
                raise remote_error(self.location, err, f"writing {path} rows {start}:{start + len(data)}") from None
            raise

    def set_attrs(self, path: str, attrs: dict[str, Any]) -> None:
        """Add or replace these attributes in one update."""
        self.require_writable()
        self._backend.set_attrs(path, attrs)

    def resize(self, path: str, n_rows: int) -> None:
        self.require_writable()
        self._backend.resize(path, n_rows)

    def delete(self, path: str) -> None:
        """Remove the group or array at ``path`` with everything under it."""
        self.require_writable()
        self._backend.delete(path)
