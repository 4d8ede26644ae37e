"""Plain (unsharded) Zarr v3 chunks of a local store read straight from their files.

Done flags, labels and the id lookup table are numeric arrays in plain chunks. zarr-python reads a
chunk through its async codec pipeline (~0.5 ms a call, several ms on a loaded machine), so a fresh
process reading a million clips' done mask (245 chunks) spent a tenth of a second there; reading the
files (crc32c, optional zstd, the bytes) costs a few microseconds a chunk. Only the layout the store
writes is read this way (default chunk keys, little-endian ``bytes``, optional ``zstd``, ``crc32c``);
anything else, and every remote store, goes through zarr.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
from zarr.storage import LocalStore

_CRC = 4


@dataclass(frozen=True)
class PlainLayout:
    """Where and how one local, unsharded numeric array's chunks are stored."""

    arr: zarr.Array
    folder: str
    chunk_shape: tuple[int, ...]
    dtype: np.dtype  # little-endian
    zstd: bool
    fill: Any

    @classmethod
    def of(cls, arr: zarr.Array) -> PlainLayout | None:
        """The layout of ``arr`` when its chunk files can be read directly, else None."""
        store = arr.store_path.store
        codecs = list(arr.metadata.codecs) if arr.metadata.zarr_format == 3 else []
        if (not isinstance(store, LocalStore) or arr.shards is not None or len(codecs) < 2
                or not isinstance(codecs[0], BytesCodec) or not isinstance(codecs[-1], Crc32cCodec)
                or [type(c) for c in codecs[1:-1]] not in ([], [ZstdCodec])
                or getattr(codecs[0].endian, "value", codecs[0].endian) not in (None, "little")
                or arr.dtype.kind not in "biuf" or tuple(arr.chunks[1:]) != tuple(arr.shape[1:])):
            return None
        folder = os.path.join(str(store.root), arr.store_path.path)
        return cls(arr, folder, tuple(int(c) for c in arr.chunks), np.dtype(arr.dtype).newbyteorder("<"),
                   len(codecs) == 3, arr.metadata.fill_value)

    def file(self, chunk: int) -> str:
        return os.path.join(self.folder, self.arr.metadata.encode_chunk_key((chunk,) + (0,) * (len(self.chunk_shape) - 1)))

    def exists(self, chunk: int) -> bool:
        return os.path.exists(self.file(chunk))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``; an absent chunk reads as fill values (as zarr reads it), a chunk that
        fails its crc32c or has the wrong size raises ValueError."""
        per = self.chunk_shape[0]
        first = start // per
        parts = [self._chunk(c) for c in range(first, -(-stop // per))]
        whole = np.concatenate(parts) if len(parts) > 1 else parts[0].copy()  # writable, as zarr's
        return whole[start - first * per:stop - first * per]

    def _chunk(self, chunk: int) -> np.ndarray:
        try:
            with open(self.file(chunk), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return np.full(self.chunk_shape, self.fill, dtype=self.dtype)
        body = np.frombuffer(data, dtype=np.uint8)
        if len(data) < _CRC or google_crc32c.value(body[:-_CRC]) != int.from_bytes(data[-_CRC:], "little"):
            raise ValueError(f"chunk {chunk}: stored and computed crc32c checksums differ")
        raw = np.frombuffer(numcodecs.Zstd().decode(body[:-_CRC]), dtype=np.uint8) if self.zstd else body[:-_CRC]
        expected = int(np.prod(self.chunk_shape, dtype=np.int64)) * self.dtype.itemsize
        if len(raw) != expected:
            raise ValueError(f"chunk {chunk} holds {len(raw)} bytes, expected {expected}")
        return raw.view(self.dtype).reshape(self.chunk_shape)
