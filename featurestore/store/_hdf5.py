"""HDF5 backend (h5py): one file, fletcher32-checksummed chunks, for handing a finished store over.

HDF5 cannot put a checksum filter on variable-length strings, so string arrays are stored as
fixed-width UTF-8 bytes (width grows on demand) and keep their checksum. Attributes are stored as
JSON text so that nested provenance dicts survive unchanged.

Unlike Zarr, HDF5 keeps the file's structure (chunk indexes, object headers, the superblock's end of
file) in a cache and writes it when it flushes. So that finished rows survive a kill or a full disk:

- writable files keep no raw-data chunk cache: each chunk is written by the call that writes it, and a
  full disk fails that call, before the done flags that would publish it;
- every write starts from a flushed file, and the store's commit points (see
  ``_backend.is_commit_point``: a ``done`` array, the root's attributes) are flushed after the
  write too: what the flags publish is in the file before them, and then the flags are;
- stores are made with HDF5's file-space strategy "none": space freed when a rewritten compressed
  chunk moves is never handed out again, so no chunk lands where the file on disk still points;
- the first failed write abandons the file: its descriptor is pointed at a scratch file and the file
  is closed, so HDF5's dirty cache never reaches the disk (the file keeps its last flushed state,
  which opens and verifies) and no half-closed HDF5 object is left for the interpreter's exit (HDF5
  crashes there, SIGSEGV, on the objects of a file whose close failed). The error raised is an
  ``OSError`` with the cause's errno (``ENOSPC``, ``EFBIG``), which extraction reports in one line;
  every later call on this backend raises it again.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import h5py
import numpy as np

from featurestore.errors import StoreFormatError
from featurestore.store._backend import COMPRESSORS, STRING, ChunkFault, as_str_array, is_commit_point

_STRING_ATTR = "avscene_string_array"
# rows a writer writes whole, for datasets chunked finer (the HDF5 twin of a Zarr shard)
_CHUNK_ROWS_ATTR = "avscene_chunk_rows"
# Readers' raw-data chunk cache. Feature datasets have small chunks (~16 KiB, see store.py), so the
# cache needs many hash slots for its bytes (HDF5 advises ~100x the chunks that fit; h5py's default
# of 521 slots for 1 MiB was sized for 1 MiB chunks); decoded chunks are cached above the backend.
_READ_CACHE_BYTES = 4 * 2**20
_READ_CACHE_SLOTS = 25013  # a prime ~100 x the 256 chunks of 16 KiB that fit
_CONTIGUOUS_BLOCK_BYTES = 4 * 2**20  # read unchunked datasets (other tools' default) in blocks of this size
_ERRNO_IN_MESSAGE = re.compile(r"errno = (\d+)")  # HDF5 puts the system call's errno in its message text


class HDF5Backend:
    """One HDF5 file; datasets are chunked by whole row blocks and sealed with fletcher32."""

    kind = "hdf5"

    def __init__(self, location: str, mode: str):
        self.location = location
        self.read_only = mode == "r"
        self._failed: OSError | None = None  # the write that failed; the file is closed since
        h5mode = {"r": "r", "a": "a", "w": "w"}[mode]
        options = {"rdcc_nbytes": _READ_CACHE_BYTES, "rdcc_nslots": _READ_CACHE_SLOTS} if self.read_only \
            else {"rdcc_nbytes": 0}  # no chunk cache when writing (see above)
        if mode == "w":  # space freed by a rewrite is never handed out again (see ``write``)
            options["fs_strategy"] = "none"
        try:
            self._h5 = h5py.File(location, h5mode, **options)
        except (OSError, RuntimeError) as err:
            if self.read_only or _errno_of(err) is None:
                raise
            raise _os_error(err, location) from err  # creating on a full disk: the errno, for one line
        self._datasets: dict[str, h5py.Dataset] = {}  # h5py name lookups cost ~50 us each
        try:
            refuse_outside_storage(self._h5, location)
        except Exception:
            self._h5.close()
            raise

    @property
    def _file(self) -> h5py.File:
        """The open file; after a failed write, the error again (the file is closed)."""
        if self._failed is not None:
            raise OSError(self._failed.errno, f"closed after a failed write: {self._failed.strerror}",
                          self.location) from self._failed
        if not self._h5.id.valid:  # h5py answers a closed file's lookups as absent: "no feature set named ..."
            raise ValueError(f"{self.location}: the store is closed")
        return self._h5

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Run a change of the file; if HDF5 fails, abandon the file and raise an OSError with errno.

        h5py raises OSError or RuntimeError for failed file operations (lookups and bad arguments
        are KeyError/ValueError/TypeError, raised before anything is written, and pass through).
        """
        try:
            yield
        except (OSError, RuntimeError) as err:
            if self._failed is not None:  # already abandoned (raised by ``_file``)
                raise
            raise self._abandon(err) from err

    def _abandon(self, err: BaseException) -> OSError:
        """Mark the file failed and close it without writing to it again (see the module docstring)."""
        self._failed = _os_error(err, self.location)
        self._datasets.clear()
        _close_without_writing(self._h5)
        return self._failed

    def _commit(self) -> None:
        """Make everything written so far part of the file on disk (metadata included)."""
        self._file.flush()

    def _ds(self, path: str) -> h5py.Dataset:
        ds = self._datasets.get(path)
        if ds is None:
            ds = self._file[path]
            self._datasets[path] = ds
        return ds

    def forget(self, path: str) -> None:
        """Drop the dataset objects of ``path`` and those under it ('': all)."""
        self._datasets = {k: v for k, v in self._datasets.items()
                          if path and not (k == path or k.startswith(path + "/"))}

    def _node(self, path: str):
        return self._file[path] if path else self._file

    def exists(self, path: str) -> bool:
        return not path or path in self._file

    def is_array(self, path: str) -> bool:
        if path in self._datasets:
            return True
        if not path or path not in self._file or not isinstance(self._file[path], h5py.Dataset):
            return False
        self._ds(path)
        return True

    def children(self, path: str) -> list[str]:
        return sorted(self._node(path).keys())

    def get_attrs(self, path: str) -> dict[str, Any]:
        out = {}
        for key, value in self._node(path).attrs.items():
            if key in (_STRING_ATTR, _CHUNK_ROWS_ATTR):  # the backend's own, not the store's
                continue
            out[key] = json.loads(value) if isinstance(value, str) else value
        return out

    def read_attr(self, path: str, key: str) -> Any:
        return self.get_attrs(path).get(key)  # h5py reads attributes from the file each time

    def metadata_token(self, path: str) -> None:
        return None  # the file is held by one process: nobody else replaces a dataset meanwhile

    fresh_reads = 0  # (nothing to look at after a read: see ``metadata_token``)

    def set_attrs(self, path: str, attrs: dict[str, Any]) -> None:
        node = self._node(path)
        with self._writing():
            commit = is_commit_point(path, attrs=True)
            if commit:  # the index rows that n_clips publishes are in the file first
                self._commit()
            for key, value in attrs.items():
                node.attrs[key] = json.dumps(value)
            if commit:
                self._commit()

    def create_group(self, path: str) -> None:
        with self._writing():
            self._file.require_group(path)

    def create_array(self, path: str, shape, dtype: str, chunk_rows: int, fill_value,
                     compressor: str | None = None, inner_rows: int | None = None) -> None:
        with self._writing():
            self._create_array(path, shape, dtype, chunk_rows, fill_value, compressor, inner_rows)

    def _create_array(self, path: str, shape, dtype: str, chunk_rows: int, fill_value,
                      compressor: str | None, inner_rows: int | None = None) -> None:
        if path in self._file:
            del self._file[path]
        self.forget(path)
        is_str = dtype == STRING
        h5dtype = np.dtype("S16") if is_str else np.dtype(dtype)
        chunk_rows = max(1, chunk_rows)
        small = inner_rows is not None and 0 < inner_rows < chunk_rows and not is_str
        if small and chunk_rows % inner_rows:
            raise ValueError(f"{path}: chunks of {inner_rows} rows do not divide write blocks of {chunk_rows}")
        chunks = (inner_rows if small else chunk_rows,) + tuple(shape[1:])
        gzip = {"compression": "gzip", "shuffle": True} if COMPRESSORS[compressor] == "zstd" else {}
        ds = self._file.create_dataset(path, shape=tuple(shape), maxshape=(None,) + tuple(shape[1:]),
                                       dtype=h5dtype, chunks=chunks, fletcher32=True,
                                       fillvalue=b"" if is_str else fill_value, **gzip)
        if is_str:
            ds.attrs[_STRING_ATTR] = 1
        if small:
            ds.attrs[_CHUNK_ROWS_ATTR] = chunk_rows

    def _is_str(self, path: str) -> bool:
        return _STRING_ATTR in self._ds(path).attrs

    def shape(self, path: str) -> tuple[int, ...]:
        return tuple(self._ds(path).shape)

    def dtype(self, path: str) -> str:
        return STRING if self._is_str(path) else str(self._ds(path).dtype)

    def chunk_rows(self, path: str) -> int:
        ds = self._ds(path)
        if ds.chunks is not None and _CHUNK_ROWS_ATTR in ds.attrs:
            return int(ds.attrs[_CHUNK_ROWS_ATTR])
        return self.inner_rows(path)

    def inner_rows(self, path: str) -> int:
        ds = self._ds(path)
        if ds.chunks is None:  # contiguous, as other HDF5 tools write by default: read in ~4 MiB blocks
            per_row = max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64)))
            return max(1, min(max(1, ds.shape[0]), _CONTIGUOUS_BLOCK_BYTES // per_row))
        return int(ds.chunks[0])

    def compressor(self, path: str) -> str | None:
        # gzip is what this backend writes for "zstd" (HDF5 has no built-in zstd filter)
        return "zstd" if self._ds(path).compression else None

    def chunk_written(self, path: str, chunk: int) -> bool:
        per = self.chunk_rows(path)
        inner = self.inner_rows(path)
        stop = min(self._ds(path).shape[0], (chunk + 1) * per)
        return all(self._inner_written(path, c) for c in range(chunk * per // inner, -(-stop // inner)))

    def _inner_written(self, path: str, chunk: int) -> bool:
        ds = self._ds(path)
        if ds.chunks is None:
            return True  # contiguous storage is allocated whole
        coords = (chunk * ds.chunks[0],) + (0,) * (ds.ndim - 1)
        return ds.id.get_chunk_info_by_coord(coords).byte_offset is not None

    def read_chunks(self, path: str, chunks: np.ndarray, required: np.ndarray) -> list[np.ndarray]:
        per, n = self.inner_rows(path), self._ds(path).shape[0]
        numbers = np.asarray(chunks).tolist()
        for chunk, needed in zip(numbers, np.asarray(required).tolist()):
            if needed and not self._inner_written(path, chunk):
                raise ChunkFault(chunk, missing=True)
        if len(numbers) > 1 and numbers[-1] - numbers[0] == len(numbers) - 1:  # a run: one h5py read
            whole = self._read_or_none(path, numbers[0] * per, min(n, (numbers[-1] + 1) * per))
            if whole is not None:
                return np.split(whole, np.arange(per, len(whole), per)) if len(whole) > per else [whole]
        out = []
        for chunk in numbers:
            try:
                out.append(self.read(path, chunk * per, min(n, (chunk + 1) * per)))
            except Exception as err:  # fletcher32 and filter failures surface as OSError
                raise ChunkFault(chunk, missing=False, cause=err) from err
        return out

    def _read_or_none(self, path: str, start: int, stop: int) -> np.ndarray | None:
        """Rows ``start:stop`` in one read, or None when it fails: the caller reads chunk by chunk then,
        so that the damaged chunk can be named."""
        try:
            return self.read(path, start, stop)
        except Exception:  # noqa: BLE001 - fletcher32 and filter failures surface as OSError
            return None

    def revalidate(self, path: str) -> None:
        """Nothing to do: the HDF5 backend keeps no memory maps."""

    def gather(self, path: str, rows: np.ndarray, required: np.ndarray) -> np.ndarray | None:
        return None  # h5py reads by chunk (read_chunks) as fast as it reads anything

    def chunk(self, path: str, chunk: int, required: bool) -> np.ndarray | None:
        return None

    def chunk_grids(self, path: str, chunks: np.ndarray) -> None:
        return None

    def read(self, path: str, start: int, stop: int) -> np.ndarray:
        data = self._ds(path)[start:stop]
        return as_str_array(data) if self._is_str(path) else data

    def write(self, path: str, start: int, data: np.ndarray, changed: np.ndarray | None = None) -> None:
        # ``changed`` is not needed: HDF5 writes each chunk in place (rows of whole blocks)
        with self._writing():
            # Each write starts from a flushed file. HDF5 frees a chunk's old place when a rewrite
            # changes its size (compressed chunks) and, in files made by other tools (default
            # file-space strategy), may hand it to the next chunk it allocates, while the file on
            # disk still points there until the next flush: flushed first, the space freed by an
            # earlier write is no longer referenced. Stores made here never reuse freed space
            # (strategy "none"), which also covers a chunk reusing its own old place. For done
            # flags this flush is also what makes the values they publish durable before them.
            self._commit()
            if self._is_str(path):
                data = np.asarray([str(v).encode("utf-8") for v in np.asarray(data).ravel()])
                self._widen(path, data.dtype.itemsize)
            ds = self._ds(path)
            for lo, hi in _chunk_runs(ds, start, start + len(data)):
                if lo > start:
                    self._commit()  # the same between the chunks of one write (see above)
                ds[lo:hi] = data[lo - start:hi - start]
            if is_commit_point(path):
                self._commit()

    def _widen(self, path: str, width: int) -> None:
        """Rewrite a string dataset with a wider fixed width (rare: only the index and error texts)."""
        ds = self._ds(path)
        if ds.dtype.itemsize >= width:
            return
        old, rows, attrs = ds[...], self._growable(path).chunks[0], dict(ds.attrs)
        del self._file[path]
        self.forget(path)
        new = self._file.create_dataset(path, shape=old.shape, maxshape=(None,), dtype=np.dtype(f"S{width}"),
                                        chunks=(rows,), fletcher32=True, fillvalue=b"")
        new[...] = old
        new.attrs.update(attrs)

    def resize(self, path: str, n_rows: int) -> None:
        if n_rows != len(self._ds(path)):
            ds = self._growable(path)
            with self._writing():
                ds.resize(n_rows, axis=0)

    def _growable(self, path: str) -> h5py.Dataset:
        """The dataset at ``path``, refused in one line when HDF5 cannot resize it.

        Stores made by other HDF5 tools may hold contiguous (unchunked) datasets, which HDF5 can read
        but never grow or rewrite chunk-wise; `convert` rewrites such a store into a chunked one.
        """
        ds = self._ds(path)
        if ds.chunks is None or ds.maxshape[0] is not None:
            layout = "is not chunked" if ds.chunks is None else f"has a fixed maximum of {ds.maxshape[0]} rows"
            raise StoreFormatError(f"{self.location}: dataset {path} {layout}, so it cannot grow; "
                                   f"rewrite the store with `featurestore convert` first")
        return ds

    def delete(self, path: str) -> None:
        with self._writing():
            del self._file[path]
        self.forget(path)

    def close(self) -> None:
        """Close the file; a writable one is flushed first, and a failed flush abandons it (raised)."""
        self._datasets.clear()
        if self._failed is not None or not self._h5.id.valid:
            return  # abandoned files were closed when their write failed
        if self.read_only:
            self._h5.close()
            return
        with self._writing():
            self._commit()
            self._h5.close()


def _close_without_writing(file: h5py.File) -> None:
    """Close a file whose write failed so that nothing more is written to it; never raises.

    HDF5 still holds the failed chunk and dirty metadata: a close would write them (over the last
    flushed state, and the superblock's end of file past the real end: "truncated file" on the next
    open), and a close that fails leaves objects HDF5 crashes on at the interpreter's exit. So the
    file's descriptor is first pointed at a scratch in-memory file (``/dev/null`` without memfd):
    those writes land there and the close succeeds (under a file-size limit HDF5 cannot grow even
    the scratch file and reports that, which is swallowed; the real file is closed either way).
    """
    with contextlib.suppress(Exception):
        fd = file.id.get_vfd_handle()
        scratch = os.memfd_create("avscene-abandoned-hdf5") if hasattr(os, "memfd_create") \
            else os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(scratch, fd)
        finally:
            os.close(scratch)
    with contextlib.suppress(Exception):
        file.close()


def _chunk_runs(ds: h5py.Dataset, start: int, stop: int) -> list[tuple[int, int]]:
    """Row ranges to write one at a time: one per chunk for compressed datasets (a rewrite may move
    their chunks, see ``write``), else the whole range (fixed-size chunks are rewritten in place)."""
    if not ds.compression or ds.chunks is None:
        return [(start, stop)]
    per = ds.chunks[0]
    edges = [start, *range(start - start % per + per, stop, per), stop]
    return [(lo, hi) for lo, hi in zip(edges, edges[1:]) if hi > lo]


def _errno_of(err: BaseException) -> int | None:
    """The errno of a failed HDF5 call: h5py's own, else the one in HDF5's message text, else None."""
    if isinstance(err, OSError) and err.errno:
        return err.errno
    found = _ERRNO_IN_MESSAGE.search(str(err))
    return int(found.group(1)) if found and int(found.group(1)) else None


def _os_error(err: BaseException, location: str) -> OSError:
    """An OSError with the errno of ``err`` (EIO when HDF5 names none) and the file's name."""
    code = _errno_of(err)
    if code is None:
        return OSError(errno.EIO, f"HDF5 could not write the file ({str(err).splitlines()[0]})", location)
    return OSError(code, os.strerror(code), location)


def refuse_outside_storage(file: h5py.File, location: str) -> None:
    """Refuse a file whose data lives elsewhere: external storage, virtual datasets, external links.

    A store is data handed over by someone else. HDF5 lets a dataset point at raw bytes in another
    file (external storage), at datasets of other files (virtual datasets) or link out of the file;
    reading would show another file's bytes and writing would overwrite it. Soft links are refused
    too: the store never writes them, and they could alias one array as another.
    """
    def problem(name: str, link) -> str | None:  # a non-None return stops the visit
        if isinstance(link, (h5py.ExternalLink, h5py.SoftLink)):
            kind = "an external link" if isinstance(link, h5py.ExternalLink) else "a soft link"
            return f"{name} is {kind}; a feature store keeps all its data inside the file"
        obj = file.get(name)
        if isinstance(obj, h5py.Dataset):
            if obj.external:
                return f"dataset {name} uses external storage ({obj.external[0][0]!r})"
            if obj.is_virtual:
                return f"dataset {name} is a virtual dataset mapping other files"
        return None

    found = file.visititems_links(problem)
    if found:
        raise StoreFormatError(f"{location}: {found}; refusing to open it")
