"""Plain (unsharded) Zarr v3 chunks of a local store read and written straight from and to their files.

Done flags, labels and the id lookup table are numeric arrays in plain chunks. zarr-python reads a
chunk through its async codec pipeline (~0.5 ms a call, several ms on a loaded machine), so a fresh
process reading a million clips' done mask (245 chunks) spent a tenth of a second there; reading the
files (crc32c, optional zstd, the bytes) costs a few microseconds a chunk. Only the layout the store
writes is read this way (default chunk keys, little-endian ``bytes``, optional ``zstd``, ``crc32c``);
anything else, and every remote store, goes through zarr. Writes of whole chunks (done flags, error
texts, index columns: numbers and vlen-utf8 strings) are encoded here and each file replaced whole,
as zarr's local store does (a temp file renamed into place); at a million clips zarr's pipeline spent
several seconds of a store's creation on them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, VLenUTF8Codec, ZstdCodec
from zarr.storage import LocalStore

from featurestore.store._crc import block_crcs
from featurestore.store._file_writes import replace_file

_CRC = 4


@dataclass(frozen=True)
class PlainLayout:
    """Where and how one local, unsharded array's chunks are stored: numbers, or (1-d) vlen-utf8 strings."""

    arr: zarr.Array
    folder: str
    chunk_shape: tuple[int, ...]
    dtype: np.dtype | None  # little-endian; None: strings
    zstd: bool
    fill: Any

    @classmethod
    def of(cls, arr: zarr.Array) -> PlainLayout | None:
        """The layout of ``arr`` when its chunk files can be read directly, else None."""
        store = arr.store_path.store
        codecs = list(arr.metadata.codecs) if arr.metadata.zarr_format == 3 else []
        if (isinstance(store, LocalStore) and arr.shards is None and arr.ndim == 1 and len(codecs) == 2
                and isinstance(codecs[0], VLenUTF8Codec) and isinstance(codecs[1], Crc32cCodec)):
            # error texts and index columns: zarr took ~30 ms for a 32,768-row chunk of error texts
            # that a partial commit reads (decoding the file: a few ms)
            return cls(arr, os.path.join(str(store.root), arr.store_path.path), (int(arr.chunks[0]),), None, False, "")
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
        rows = whole[start - first * per:stop - first * per]
        return rows if self.dtype is not None else np.asarray(rows.tolist(), dtype=str).reshape(len(rows))

    def _chunk(self, chunk: int) -> np.ndarray:
        try:
            with open(self.file(chunk), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return np.full(self.chunk_shape, self.fill, dtype=object if self.dtype is None else self.dtype)
        body = np.frombuffer(data, dtype=np.uint8)
        if len(data) < _CRC or google_crc32c.value(body[:-_CRC]) != int.from_bytes(data[-_CRC:], "little"):
            raise ValueError(f"chunk {chunk}: stored and computed crc32c checksums differ")
        if self.dtype is None:
            texts = _VLEN_UTF8.decode(body[:-_CRC])
            if len(texts) != self.chunk_shape[0]:
                raise ValueError(f"chunk {chunk} holds {len(texts)} strings, expected {self.chunk_shape[0]}")
            return texts
        raw = np.frombuffer(numcodecs.Zstd().decode(body[:-_CRC]), dtype=np.uint8) if self.zstd else body[:-_CRC]
        expected = int(np.prod(self.chunk_shape, dtype=np.int64)) * self.dtype.itemsize
        if len(raw) != expected:
            raise ValueError(f"chunk {chunk} holds {len(raw)} bytes, expected {expected}")
        return raw.view(self.dtype).reshape(self.chunk_shape)


_VLEN_UTF8 = numcodecs.VLenUTF8()


def vlen_utf8(texts: np.ndarray) -> bytes | bytearray:
    """``texts`` (object array of str) encoded as zarr's ``vlen-utf8`` codec encodes them: the count,
    then each text's length and bytes. A chunk of empty texts (the error texts of finished rows, a
    store's media paths without media) is the count and zeros, without encoding each text; a chunk of
    a few values repeated (cities, locations) encodes each value once (``_Encoded``: ~30% faster)."""
    if len(texts) and texts.strides[0] == 0:  # one text seen n times (a column a store has none of)
        return len(texts).to_bytes(4, "little") + _Encoded()[texts[0]] * len(texts)
    if not any(texts):
        return len(texts).to_bytes(4, "little") + bytes(4 * len(texts))
    sample = texts[:_SAMPLE].tolist()
    distinct = set(sample)
    if len(distinct) * 8 <= len(sample) and all(type(v) is str for v in distinct):
        return len(texts).to_bytes(4, "little") + b"".join(map(_Encoded().__getitem__, texts.tolist()))
    try:
        return _VLEN_UTF8.encode(texts)  # a bytearray (a copy into bytes cost 2 ms of 5 a 65,536-id chunk)
    except TypeError:  # numcodecs takes exact str only; zarr-python stores numpy's texts (np.str_) too
        return _VLEN_UTF8.encode(_plain_texts(texts))


def _plain_texts(texts: np.ndarray) -> np.ndarray:
    """``texts`` with each str of a subclass (numpy's ``str_``: a list of a numpy column's values) as a
    plain str, as zarr-python stores it; anything else is kept, for numcodecs to refuse as before."""
    return np.fromiter((str.__str__(t) if isinstance(t, str) else t for t in texts.tolist()),
                       dtype=object, count=len(texts))


_SAMPLE = 1024  # texts looked at to decide whether a chunk's values repeat


class _Encoded(dict):
    """str -> its length (4 bytes, little-endian) and UTF-8 bytes, as vlen-utf8 stores each text,
    encoded the first time a text is asked for. A str subclass (numpy's ``str_``) is encoded as its
    text, as zarr-python stores it; anything but a str is refused as numcodecs refuses it."""

    def __missing__(self, text: str) -> bytes:
        if not isinstance(text, str):
            raise TypeError(f"expected a str to encode, got {type(text).__name__} {text!r}")
        data = str.encode(text, "utf-8")
        self[text] = encoded = len(data).to_bytes(4, "little") + data
        return encoded


@dataclass(frozen=True)
class ChunkWriter:
    """Whole chunks of one local, unsharded, uncompressed array (numbers or vlen-utf8 strings)
    encoded as zarr-python encodes them (``bytes`` or ``vlen-utf8``, then ``crc32c``) and written
    file by file. Edge chunks are padded with the fill value, as zarr pads them."""

    arr: zarr.Array
    folder: str
    chunk_rows: int
    dtype: np.dtype | None  # little-endian; None: strings
    fill: Any

    @classmethod
    def of(cls, arr: zarr.Array) -> ChunkWriter | None:
        store = arr.store_path.store
        codecs = list(arr.metadata.codecs) if arr.metadata.zarr_format == 3 else []
        if (not isinstance(store, LocalStore) or arr.shards is not None or len(codecs) != 2
                or not isinstance(codecs[-1], Crc32cCodec) or tuple(arr.chunks[1:]) != tuple(arr.shape[1:])):
            return None
        if isinstance(codecs[0], VLenUTF8Codec) and arr.ndim == 1:
            dtype, fill = None, ""
        elif (isinstance(codecs[0], BytesCodec) and arr.dtype.kind in "biuf"
              and getattr(codecs[0].endian, "value", codecs[0].endian) in (None, "little")):
            dtype, fill = np.dtype(arr.dtype).newbyteorder("<"), arr.metadata.fill_value
        else:
            return None
        return cls(arr, os.path.join(str(store.root), arr.store_path.path), int(arr.chunks[0]), dtype, fill)

    def write(self, start: int, data: np.ndarray) -> bool:
        """Write rows ``start:start+len(data)`` when they are whole chunks (the last may end at the
        array's end); False where they are not (zarr writes them)."""
        stop, n_rows, per = start + len(data), self.arr.shape[0], self.chunk_rows
        if not len(data) or start % per or (stop % per and stop != n_rows) or stop > n_rows:
            return False
        for lo in range(0, len(data), per):  # one after another: see _write_chunk
            block = data[lo:lo + per]
            if len(block) < per:
                padded = np.full((per, *block.shape[1:]), self.fill, dtype=object if self.dtype is None else self.dtype)
                padded[:len(block)] = block
                block = padded
            body = vlen_utf8(np.asarray(block, dtype=object)) if self.dtype is None \
                else np.ascontiguousarray(block, dtype=self.dtype).reshape(-1).view(np.uint8)
            key = self.arr.metadata.encode_chunk_key(((start + lo) // per,) + (0,) * (self.arr.ndim - 1))
            _write_chunk(os.path.join(self.folder, key), body)
        return True


def _write_chunk(path: str, body: bytes | bytearray | np.ndarray) -> None:
    """``body`` (bytes, or a 1-d uint8 array: the caller's rows, not a copy) and its crc32c (zarr's
    ``crc32c`` codec) as the file ``path``, replaced whole.

    In the caller's thread: with the files written on threads while the next chunk was encoded, the
    encoding (strings) held the GIL that the writers waited for after each system call (a
    million-clip ``create_store`` took 0.59 s with writer threads and 0.54 s without, medians of 8
    interleaved), and done flags are 8 KiB files, too small for threads to gain anything."""
    replace_file(path, [body, block_crcs(np.frombuffer(body, dtype=np.uint8).reshape(1, -1))[0]])
