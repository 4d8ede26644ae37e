"""HDF5 backend (h5py): one file, fletcher32-checksummed chunks, for handing a finished store over.

HDF5 cannot put a checksum filter on variable-length strings, so string arrays are stored as
fixed-width UTF-8 bytes (width grows on demand) and keep their checksum. Attributes are stored as
JSON text so that nested provenance dicts survive unchanged.
"""
from __future__ import annotations

import json
from typing import Any

import h5py
import numpy as np

from featurestore.errors import StoreFormatError
from featurestore.store._backend import COMPRESSORS, STRING, as_str_array

_STRING_ATTR = "avscene_string_array"
_CONTIGUOUS_BLOCK_BYTES = 4 * 2**20  # read unchunked datasets (other tools' default) in blocks of this size


class HDF5Backend:
    """One HDF5 file; datasets are chunked by whole row blocks and sealed with fletcher32."""

    kind = "hdf5"

    def __init__(self, location: str, mode: str):
        self.location = location
        self.read_only = mode == "r"
        h5mode = {"r": "r", "a": "a", "w": "w"}[mode]
        self._file = h5py.File(location, h5mode)
        self._datasets: dict[str, h5py.Dataset] = {}  # h5py name lookups cost ~50 us each
        try:
            refuse_outside_storage(self._file, location)
        except Exception:
            self._file.close()
            raise

    def _ds(self, path: str) -> h5py.Dataset:
        ds = self._datasets.get(path)
        if ds is None:
            ds = self._file[path]
            self._datasets[path] = ds
        return ds

    def _forget(self, path: str) -> None:
        self._datasets = {k: v for k, v in self._datasets.items()
                          if not (k == path or k.startswith(path + "/"))}

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
            if key == _STRING_ATTR:
                continue
            out[key] = json.loads(value) if isinstance(value, str) else value
        return out

    def set_attrs(self, path: str, attrs: dict[str, Any]) -> None:
        node = self._node(path)
        for key, value in attrs.items():
            node.attrs[key] = json.dumps(value)

    def create_group(self, path: str) -> None:
        self._file.require_group(path)

    def create_array(self, path: str, shape, dtype: str, chunk_rows: int, fill_value,
                     compressor: str | None = None) -> None:
        if path in self._file:
            del self._file[path]
        self._forget(path)
        is_str = dtype == STRING
        h5dtype = np.dtype("S16") if is_str else np.dtype(dtype)
        chunks = (max(1, chunk_rows),) + tuple(shape[1:])
        gzip = {"compression": "gzip", "shuffle": True} if COMPRESSORS[compressor] == "zstd" else {}
        ds = self._file.create_dataset(path, shape=tuple(shape), maxshape=(None,) + tuple(shape[1:]),
                                       dtype=h5dtype, chunks=chunks, fletcher32=True,
                                       fillvalue=b"" if is_str else fill_value, **gzip)
        if is_str:
            ds.attrs[_STRING_ATTR] = 1

    def _is_str(self, path: str) -> bool:
        return _STRING_ATTR in self._ds(path).attrs

    def shape(self, path: str) -> tuple[int, ...]:
        return tuple(self._ds(path).shape)

    def dtype(self, path: str) -> str:
        return STRING if self._is_str(path) else str(self._ds(path).dtype)

    def chunk_rows(self, path: str) -> int:
        ds = self._ds(path)
        if ds.chunks is None:  # contiguous, as other HDF5 tools write by default: read in ~4 MiB blocks
            per_row = max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64)))
            return max(1, min(max(1, ds.shape[0]), _CONTIGUOUS_BLOCK_BYTES // per_row))
        return int(ds.chunks[0])

    def compressor(self, path: str) -> str | None:
        # gzip is what this backend writes for "zstd" (HDF5 has no built-in zstd filter)
        return "zstd" if self._ds(path).compression else None

    def chunk_written(self, path: str, chunk: int) -> bool:
        ds = self._ds(path)
        if ds.chunks is None:
            return True  # contiguous storage is allocated whole
        coords = (chunk * ds.chunks[0],) + (0,) * (ds.ndim - 1)
        return ds.id.get_chunk_info_by_coord(coords).byte_offset is not None

    def read(self, path: str, start: int, stop: int) -> np.ndarray:
        data = self._ds(path)[start:stop]
        return as_str_array(data) if self._is_str(path) else data

    def write(self, path: str, start: int, data: np.ndarray) -> None:
        if self._is_str(path):
            data = np.asarray([str(v).encode("utf-8") for v in np.asarray(data).ravel()])
            self._widen(path, data.dtype.itemsize)
        self._ds(path)[start:start + len(data)] = data

    def _widen(self, path: str, width: int) -> None:
        """Rewrite a string dataset with a wider fixed width (rare: only the index and error texts)."""
        ds = self._ds(path)
        if ds.dtype.itemsize >= width:
            return
        old, rows, attrs = ds[...], self._growable(path).chunks[0], dict(ds.attrs)
        del self._file[path]
        self._forget(path)
        new = self._file.create_dataset(path, shape=old.shape, maxshape=(None,), dtype=np.dtype(f"S{width}"),
                                        chunks=(rows,), fletcher32=True, fillvalue=b"")
        new[...] = old
        new.attrs.update(attrs)

    def resize(self, path: str, n_rows: int) -> None:
        if n_rows != len(self._ds(path)):
            self._growable(path).resize(n_rows, axis=0)

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
        del self._file[path]
        self._forget(path)

    def close(self) -> None:
        self._datasets.clear()
        if self._file.id.valid:
            self._file.close()


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
