"""Zarr v3 backend: a directory (or any fsspec URL) with crc32c-checksummed chunks.

Every array is written with ``write_empty_chunks=True``: zarr's default skips (and deletes) chunks
that hold only the fill value, which would make a deleted chunk file indistinguishable from a
chunk of fill values. With every written chunk on disk, a missing chunk is always damage, and the
store can refuse to serve it (``chunk_written``) instead of returning zeros.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

from featurestore.store._backend import COMPRESSORS, STRING, as_str_array

_CONFIG = {"write_empty_chunks": True}
#: URL schemes whose fsspec filesystem comes with one of avscene's extras.
_EXTRAS = {"s3": "s3", "s3a": "s3"}


def _missing_filesystem(location: str, err: ImportError) -> str:
    """One line for a URL whose fsspec filesystem is not installed: which package, which extra."""
    scheme = location.split("://")[0]
    fix = f"pip install 'avscene[{_EXTRAS[scheme]}]'" if scheme in _EXTRAS else "install it"
    return f"{location}: {scheme}:// URLs need a filesystem package that is not installed ({err}); {fix}"


class ZarrBackend:
    """Zarr v3 group; chunks are whole blocks of rows, each sealed with a crc32c checksum."""

    kind = "zarr"

    def __init__(self, location: str, mode: str, storage_options: dict | None = None):
        self.location = location
        self.read_only = mode == "r"
        options = dict(storage_options or {})
        if location.split("://")[0] in ("file", "local"):
            # object stores need no directories; fsspec's local filesystem does, and only
            # creates them when asked to
            options.setdefault("auto_mkdir", True)
        kwargs = {"storage_options": options} if options and "://" in location else {}
        try:
            self._root = zarr.open_group(location, mode=mode, zarr_format=3, **kwargs)
        except ImportError as err:  # fsspec names the missing package (s3fs, gcsfs) in a traceback
            raise ValueError(_missing_filesystem(location, err)) from None
        self._arrays: dict[str, zarr.Array] = {}

    def _node(self, path: str):
        return self._root[path] if path else self._root

    def _array(self, path: str) -> zarr.Array:
        arr = self._arrays.get(path)
        if arr is None:
            arr = self._root[path].with_config(_CONFIG)
            self._arrays[path] = arr
        return arr

    def exists(self, path: str) -> bool:
        if not path:
            return True
        try:
            self._root[path]
        except KeyError:
            return False
        return True

    def is_array(self, path: str) -> bool:
        # Looking a node up costs a metadata read (~0.3 ms): remember arrays once found, so that
        # the name check in every ``store.get`` stays a dict lookup.
        if path in self._arrays:
            return True
        if not path:
            return False
        try:
            node = self._root[path]
        except KeyError:
            return False
        if isinstance(node, zarr.Array):
            self._arrays[path] = node.with_config(_CONFIG)
            return True
        return False

    def children(self, path: str) -> list[str]:
        node = self._node(path)
        return sorted(name for name, _ in node.members(max_depth=0))

    def get_attrs(self, path: str) -> dict[str, Any]:
        return dict(self._node(path).attrs)

    def set_attrs(self, path: str, attrs: dict[str, Any]) -> None:
        # One metadata write for all keys: ``attrs.update`` rewrites zarr.json once per key, so a
        # kill in between would leave a half-described group (e.g. a fingerprint without a shape).
        self._node(path).update_attributes(dict(attrs))

    def create_group(self, path: str) -> None:
        if not self.exists(path):
            self._root.require_group(path)

    def create_array(self, path: str, shape, dtype: str, chunk_rows: int, fill_value,
                     compressor: str | None = None) -> None:
        chunks = (max(1, chunk_rows),) + tuple(shape[1:])
        zdtype = str if dtype == STRING else np.dtype(dtype)
        self._arrays.pop(path, None)
        codecs = [ZstdCodec(level=3)] if COMPRESSORS[compressor] == "zstd" else []
        self._root.create_array(path, shape=tuple(shape), chunks=chunks, dtype=zdtype,
                                fill_value="" if dtype == STRING else fill_value,
                                compressors=[*codecs, Crc32cCodec()], overwrite=True, config=_CONFIG)

    def compressor(self, path: str) -> str | None:
        names = [type(c).__name__ for c in self._array(path).compressors]
        return "zstd" if "ZstdCodec" in names else None

    def chunk_written(self, path: str, chunk: int) -> bool:
        arr = self._array(path)
        coords = (chunk,) + (0,) * (arr.ndim - 1)
        key = arr.metadata.encode_chunk_key(coords)
        return bool(sync((arr.store_path / key).exists()))

    def shape(self, path: str) -> tuple[int, ...]:
        return tuple(self._array(path).shape)

    def dtype(self, path: str) -> str:
        dt = self._array(path).dtype
        return STRING if dt.kind in "OTU" else str(dt)

    def chunk_rows(self, path: str) -> int:
        return int(self._array(path).chunks[0])

    def read(self, path: str, start: int, stop: int) -> np.ndarray:
        arr = self._array(path)
        data = arr[start:stop]
        return as_str_array(data) if arr.dtype.kind in "OTU" else np.asarray(data)

    def write(self, path: str, start: int, data: np.ndarray) -> None:
        arr = self._array(path)
        if arr.dtype.kind in "OTU":
            data = np.asarray(data, dtype=object)
        arr[start:start + len(data)] = data

    def resize(self, path: str, n_rows: int) -> None:
        arr = self._array(path)
        arr.resize((n_rows,) + tuple(arr.shape[1:]))

    def delete(self, path: str) -> None:
        self._arrays = {k: v for k, v in self._arrays.items() if not (k == path or k.startswith(path + "/"))}
        parent, _, name = path.rpartition("/")
        del self._node(parent)[name]

    def close(self) -> None:
        self._arrays.clear()
