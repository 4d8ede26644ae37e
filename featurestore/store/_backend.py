"""The tiny storage interface both backends implement.

Everything above it (index, feature sets, caching, validation) is backend-neutral, so the Zarr and
HDF5 stores cannot drift apart. Arrays are addressed by '/'-separated paths and always read and
written as row ranges along axis 0, which is how the store chunks them (whole clips per chunk).

An array has two row counts: ``chunk_rows``, the unit a writer writes whole (a Zarr shard, or a plain
chunk), and ``inner_rows``, the unit decoded on its own (a shard's inner chunk; equal to
``chunk_rows`` where the array is not sharded). Random reads fetch inner chunks (``read_chunks``);
aligned writers own whole ``chunk_rows`` blocks.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

STRING = "str"  # dtype marker for string arrays (vlen UTF-8 in Zarr, fixed-width UTF-8 bytes in HDF5)
# Lossless compression a feature set may ask for (the checksum is kept either way):
# None -> checksum only; "zstd" -> zstd + crc32c in Zarr, gzip + fletcher32 in HDF5.
COMPRESSORS = {None: None, "none": None, "zstd": "zstd"}


class Backend(Protocol):
    """What the store needs from a storage engine: groups with JSON attributes and chunked arrays."""

    kind: str  # "zarr" or "hdf5"
    read_only: bool
    location: str

    def exists(self, path: str) -> bool: ...
    def is_array(self, path: str) -> bool: ...
    def children(self, path: str) -> list[str]: ...
    def get_attrs(self, path: str) -> dict[str, Any]: ...
    def set_attrs(self, path: str, attrs: dict[str, Any]) -> None: ...  # one atomic update
    def create_group(self, path: str) -> None: ...
    def create_array(self, path: str, shape: tuple[int, ...], dtype: str, chunk_rows: int,
                     fill_value: Any, compressor: str | None = None, inner_rows: int | None = None) -> None: ...
    def compressor(self, path: str) -> str | None: ...
    def chunk_written(self, path: str, chunk: int) -> bool: ...  # False: never written, or deleted
    def shape(self, path: str) -> tuple[int, ...]: ...
    def dtype(self, path: str) -> str: ...
    # one attribute of a node read anew from storage (whatever was read of the node before): how a
    # reader tells that another writer replaced a group
    def read_attr(self, path: str, key: str) -> Any: ...
    # something that changes whenever the array's metadata file is written, cheaply (a stat), or
    # None where the backend cannot tell so (object storage; HDF5, which one process holds)
    def metadata_token(self, path: str) -> Any: ...
    # how many reads so far met files anew (not served by what is mapped already); any count that
    # grows with them. A reader compares it before and after a read to know whether to look
    fresh_reads: int
    def chunk_rows(self, path: str) -> int: ...  # the write unit
    def inner_rows(self, path: str) -> int: ...  # the decode unit (divides chunk_rows)
    # inner chunks by number, whole (the last one cut to the array's end); raises ChunkFault for a
    # chunk that fails its check, or is absent where ``required`` (absent elsewhere: fill values)
    def read_chunks(self, path: str, chunks: np.ndarray, required: np.ndarray) -> list[np.ndarray]: ...
    # rows in any order by the backend's fastest way, or None (then read_chunks serves them);
    # ``required`` per row as for read_chunks
    def gather(self, path: str, rows: np.ndarray, required: np.ndarray) -> np.ndarray | None: ...
    # one inner chunk by that fastest way (a read-only view: copy it), or None
    def chunk(self, path: str, chunk: int, required: bool) -> np.ndarray | None: ...
    # inner chunks (each written) as checked read-only views by that fastest way: (grids, where,
    # local), chunk i being grids[where[i]][local[i]]; or None
    def chunk_grids(self, path: str, chunks: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, np.ndarray] | None: ...
    # the files of ``path`` may have changed (done flags were read anew): what ``gather`` keeps of
    # them (memory maps) is checked against the files before its next use
    def revalidate(self, path: str) -> None: ...
    # drop the metadata, layouts and maps known of the arrays at and under ``path`` ('': all)
    def forget(self, path: str) -> None: ...
    def read(self, path: str, start: int, stop: int) -> np.ndarray: ...
    def write(self, path: str, start: int, data: np.ndarray, changed: np.ndarray | None = None) -> None:
        """Rows ``start:start+len(data)``. ``changed`` (bool per row): the other rows hold their stored
        bits already or are not done (never served), so a backend may write only these."""
    def resize(self, path: str, n_rows: int) -> None: ...
    def delete(self, path: str) -> None: ...
    def close(self) -> None: ...


class ChunkFault(Exception):
    """Inner chunk ``chunk`` of an array is absent (``missing``) or fails its check (``cause``).

    Backends raise it from ``read_chunks``; ``StoreArrays`` turns it into ``MissingChunkError`` /
    ``CorruptChunkError`` naming the chunk's rows.
    """

    def __init__(self, chunk: int, missing: bool, cause: BaseException | None = None):
        self.chunk, self.missing, self.cause = int(chunk), missing, cause
        super().__init__(f"inner chunk {chunk} {'is missing' if missing else f'failed: {cause}'}")


#: The array name whose writes publish rows (feature sets' and prediction runs' done flags).
DONE_ARRAY = "done"


def is_commit_point(path: str, attrs: bool = False) -> bool:
    """Whether writing ``path`` publishes work: a ``done`` array, or (``attrs``) the root's attributes.

    Done flags say "these rows' values are there", and the root's ``n_clips`` says "these index rows
    are there". A backend that buffers writes (HDF5) makes everything written before such a write
    durable first, and the write itself after; Zarr writes each chunk and attribute through.
    """
    return path == "" if attrs else path.rsplit("/", 1)[-1] == DONE_ARRAY


def join(*parts: str) -> str:
    """Join path parts with '/', ignoring empty parts."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def distinct(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values of a 1-d array: ``np.unique`` without its first call's import of
    ``numpy.ma`` (~90 ms in a fresh process, where a store's first ``get`` is timed)."""
    ordered = np.sort(values)
    return ordered[np.r_[True, ordered[1:] != ordered[:-1]]] if len(ordered) else ordered


def as_str_array(values: Any) -> np.ndarray:
    """Normalise what a backend returns for a string array to a numpy unicode array."""
    arr = np.asarray(values, dtype=object)
    out = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr.ravel()]
    return np.asarray(out, dtype=str).reshape(arr.shape) if out else np.zeros(arr.shape, dtype="<U1")


BACKENDS = ("zarr", "hdf5")
_HDF5_SUFFIXES = (".h5", ".hdf5")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def backend_for(location: str | os.PathLike, backend: str | None = None, *, new: bool = False) -> str:
    """The backend of the store at ``location``: ``"zarr"`` or ``"hdf5"``; the one place that decides.

    An existing store is recognised by what is there: a file with the HDF5 signature is HDF5, a
    directory is Zarr, whatever its name. Where nothing recognisable is (a new store), ``backend``
    decides when given, else the name: ``.h5``/``.hdf5`` is HDF5, anything else Zarr. URLs
    (``s3://``, ``memory://``) are Zarr unless ``backend`` says otherwise (which ``open_store``
    then refuses: HDF5 stores are local files).

    Args:
        location: a path or URL.
        backend: ``"zarr"``, ``"hdf5"`` or None (decide from the location).
        new: the location is about to be written anew (``open_store(..., "w")``, a conversion's
            destination), so what is there now does not count: ``backend`` or the name decides.

    Raises:
        ValueError: an unknown ``backend``, or one that contradicts the store found at ``location``.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use 'zarr' or 'hdf5'")
    text = os.fspath(location)
    found = None if new or "://" in text else _backend_found(Path(text))
    if found is not None:
        if backend is not None and backend != found:
            raise ValueError(f"{text} is a {'HDF5 file' if found == 'hdf5' else 'Zarr directory'}, "
                             f"not a {backend} store (backend={backend!r})")
        return found
    if backend is not None:
        return backend
    return "hdf5" if "://" not in text and text.lower().endswith(_HDF5_SUFFIXES) else "zarr"


def _backend_found(path: Path) -> str | None:
    """What is at ``path``: 'zarr' (a directory), 'hdf5' (a file with the HDF5 signature) or None."""
    if path.is_dir():
        return "zarr"
    if not path.is_file():
        return None
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            offset = 0  # the signature is at 0 or, after a user block, at 512, 1024, 2048, ...
            while offset + len(_HDF5_SIGNATURE) <= size:
                f.seek(offset)
                if f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
                    return "hdf5"
                offset = 512 if offset == 0 else offset * 2
    except OSError:
        return None
    return None


def open_backend(location: str, mode: str, backend: str | None, storage_options: dict | None) -> Backend:
    """Open the storage engine for a store: the backend chosen by :func:`backend_for`."""
    kind = backend_for(location, backend, new=mode == "w")
    if kind == "hdf5":
        from featurestore.store._hdf5 import HDF5Backend

        if "://" in location:
            raise ValueError(f"{location}: HDF5 stores must be local files; use a Zarr store for URLs")
        if mode == "r" and not Path(location).exists():
            raise FileNotFoundError(f"no feature store at {location}")
        return HDF5Backend(location, mode)
    from featurestore.store._zarr import ZarrBackend

    if mode == "r" and "://" not in location and not (Path(location) / "zarr.json").exists():
        raise FileNotFoundError(f"no feature store at {location} (no zarr.json there)")
    return ZarrBackend(location, mode, storage_options)
