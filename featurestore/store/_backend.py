"""The tiny storage interface both backends implement.

Everything above it (index, feature sets, caching, validation) is backend-neutral, so the Zarr and
HDF5 stores cannot drift apart. Arrays are addressed by '/'-separated paths and always read and
written as row ranges along axis 0, which is how the store chunks them (whole clips per chunk).
"""
from __future__ import annotations

from typing import Any, Protocol

import numpy as np

STRING = "str"  # dtype marker for string arrays (vlen UTF-8 in Zarr, fixed-width UTF-8 bytes in HDF5)
# Lossless compression a feature set may ask for (the checksum is kept either way):
# None -> checksum only; "zstd" -> zstd + crc32c in Zarr, gzip + fletcher32 in HDF5.
COMPRESSORS = {None: None, "none": None, "zstd": "zstd"}


class Backend(Protocol):
    """What the store needs from a storage engine: groups with JSON attributes and chunked arrays."""

    read_only: bool
    location: str

    def exists(self, path: str) -> bool: ...
    def is_array(self, path: str) -> bool: ...
    def children(self, path: str) -> list[str]: ...
    def get_attrs(self, path: str) -> dict[str, Any]: ...
    def set_attrs(self, path: str, attrs: dict[str, Any]) -> None: ...  # one atomic update
    def create_group(self, path: str) -> None: ...
    def create_array(self, path: str, shape: tuple[int, ...], dtype: str, chunk_rows: int,
                     fill_value: Any, compressor: str | None = None) -> None: ...
    def compressor(self, path: str) -> str | None: ...
    def chunk_written(self, path: str, chunk: int) -> bool: ...  # False: never written, or deleted
    def shape(self, path: str) -> tuple[int, ...]: ...
    def dtype(self, path: str) -> str: ...
    def chunk_rows(self, path: str) -> int: ...
    def read(self, path: str, start: int, stop: int) -> np.ndarray: ...
    def write(self, path: str, start: int, data: np.ndarray) -> None: ...
    def resize(self, path: str, n_rows: int) -> None: ...
    def delete(self, path: str) -> None: ...
    def close(self) -> None: ...


def join(*parts: str) -> str:
    """Join path parts with '/', ignoring empty parts."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def as_str_array(values: Any) -> np.ndarray:
    """Normalise what a backend returns for a string array to a numpy unicode array."""
    arr = np.asarray(values, dtype=object)
    out = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr.ravel()]
    return np.asarray(out, dtype=str).reshape(arr.shape) if out else np.zeros(arr.shape, dtype="<U1")
