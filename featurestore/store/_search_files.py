"""Search's sidecar files: reached without following links, named by their bytes' sha256, checked before use.

The clip matrix and the faiss index of a feature set are caches kept in ``<store>.search/<set>/``
(see `featurestore.store.search`). A cache must never serve wrong neighbours, nor be a way to read,
write or delete files elsewhere, so:

* Every directory below the store's parent is opened relative to its parent with ``O_NOFOLLOW |
  O_DIRECTORY`` (the store's parent directory is the only path taken as given). A symbolic link (or
  a file) where a sidecar directory belongs is refused with `SidecarRefused`: nothing is read,
  written or deleted through it, and search answers from memory.
* Files are opened with ``O_NOFOLLOW`` and must be regular files. Cleaning removes directory
  entries (``unlink`` of a link removes the link, never what it points to).
* The faiss index is one file whose name carries the sha256 of its bytes: ``<key>-<sha256>.faiss``,
  given when it is written (temp file, hash, one rename, so a name never points at other bytes than
  those hashed). Loading compares the bytes with the name *before* any of them is decoded, and
  refuses files larger than the caller's bound: a flipped bit, a cut file or one edited by hand is
  `SidecarDamage`, rebuilt by the caller, never served.
* A name's sha256 says the bytes are whole, not whose they are: the faiss index and the ``.ids`` file
  end with a binding (`write_binding`: JSON of the key, feature set, data version and store they were
  built from, its length, a magic), inside the hashed bytes. Loading refuses a file without one or
  with one for another key, feature set or data version (`check_binding`): a sidecar of another
  store, feature set or data version copied in and renamed to this key is `SidecarDamage`, rebuilt,
  never served. (The clip matrix's manifest holds its key, which hashes the same things.)
* An IVF-flat faiss index also gets a ``.lists`` manifest, ``<key>-<its sha256>.lists``, written after
  the index file: the file's name and size, the crc32 of its head (everything before the lists'
  data) and of each inverted list. Loading through it checks the manifest and the head, then faiss
  maps the file (``IO_FLAG_MMAP``) and each list is checked (crc32, done rows, unit vectors) when a
  query first probes it (`CheckedLists`): a new process reads what its queries use, not the file.
* The clip matrix is a ``.npy`` (memory-mapped, never read whole) plus a JSON manifest written after
  it: ``<key>-<sha256>.json`` named by the manifest's own bytes, and ``<key>-<same sha256>.npy``.
  The manifest holds the matrix's shape, size, the crc32 of each 64 MiB block of its data and the
  done rows left out (non-finite values). Every open checks the manifest's sha256, the matrix's
  size and header (cheap); the block crc32s and unit lengths once per file per process (below),
  before the first answer. A flipped bit, a cut or a reordered matrix is damage like any other.
* What is decoded is bounded before it is allocated (headers against the store's done rows and
  dimension) and must be what the builders write: done store rows, each once, and unit vectors
  (`read_matrix`, `read_faiss`).

Hashing costs about one more read of the file, so it is done once per file per process: the process
remembers the files it has checked (or written) by (device, inode, size, mtime, ctime). A store
opened again in the same process does not check again, while any write to the file changes its ctime
(which no one can set back) and has it checked again. A warm query never touches the file at all,
except through the matrix's memory map (a matrix rewritten in place under a live process is caught
by the query-time cosine check only).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from featurestore.errors import FeatureStoreError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NAME = re.compile(r"([0-9a-f]{16})-([0-9a-f]{64})(\.[a-z]+)")
_VERIFIED: dict[tuple[int, ...], str] = {}  # file stamp -> the sha256 its bytes were found to have
STALE_TEMP_SECONDS = 3600  # a temp file older than this belongs to a search that was killed
HEADER_BYTES = 128  # the clip matrix's .npy header, padded to this length (numpy aligns data to 64 bytes)
CHECK_BLOCK_BYTES = 64 * 2**20  # the manifest holds the crc32 of every block of this many bytes of matrix data
MATRIX_FORMAT = "avscene-search-matrix/1"
UNIT_TOLERANCE = 2e-3  # squared lengths of stored unit vectors are 1 within float32 rounding, far below this


class SidecarRefused(OSError):
    """A sidecar directory is a symbolic link or not a directory: it is neither followed nor used."""


class SidecarDamage(FeatureStoreError):
    """A sidecar file whose bytes or contents are not what was written: rebuilt, never served."""


@dataclass
class SidecarDir:
    """An open sidecar directory (a file descriptor reached without following links)."""

    path: Path
    fd: int

    def close(self) -> None:
        os.close(self.fd)


@contextlib.contextmanager
def open_dir(base: Path, parts: Sequence[str]) -> Iterator[SidecarDir]:
    """Open (creating what is missing) ``base/parts[0]/parts[1]/...``, following no link below ``base``.

    Raises:
        SidecarRefused: a part is a symbolic link, not a directory, or ``.``/``..``/empty.
        OSError: the directory cannot be created (a read-only store directory, ...).
    """
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    path = base
    try:
        for part in parts:
            path = path / part
            child = _open_child(fd, part, path)
            os.close(fd)
            fd = child
        folder = SidecarDir(path, fd)
    except BaseException:
        os.close(fd)
        raise
    try:
        yield folder
    finally:
        folder.close()


def _open_child(parent: int, part: str, path: Path) -> int:
    """The directory ``part`` inside ``parent``, made when missing."""
    if part in ("", ".", "..") or "/" in part:
        raise SidecarRefused(errno.EINVAL, f"{part!r} is not a directory name", str(path))
    try:
        try:
            child = os.open(part, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o777, dir_fd=parent)
            child = os.open(part, _DIR_FLAGS, dir_fd=parent)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENOTDIR):
            raise SidecarRefused(err.errno, "a symbolic link or not a directory, so it is not used", str(path)) from err
        raise
    return child


def names(folder: SidecarDir, key: str, suffix: str) -> list[str]:
    """The entries that claim to hold ``key``'s ``suffix`` file (``<key>-<sha256><suffix>``)."""
    return sorted(n for n in os.listdir(folder.fd)
                  if (m := _NAME.fullmatch(n)) and m[1] == key and m[3] == suffix)


@contextlib.contextmanager
def open_checked(folder: SidecarDir, name: str, max_bytes: int) -> Iterator[BinaryIO]:
    """The file ``name``, its bytes checked against the sha256 in its name (once per process per file).

    Raises:
        SidecarDamage: a link or not a regular file, larger than ``max_bytes``, or other bytes than
            its name says.
    """
    digest = _NAME.fullmatch(name)[2]
    with _open_file(folder, name, "it") as f:
        info = os.fstat(f.fileno())
        if info.st_size > max_bytes:
            raise SidecarDamage(f"it holds {info.st_size} bytes, more than the {max_bytes} the feature set can need")
        if _VERIFIED.get(_stamp(info)) != digest:
            found = hashlib.file_digest(f, "sha256").hexdigest()
            if found != digest:
                raise SidecarDamage(f"its bytes hash to sha256 {found[:12]}..., its name says {digest[:12]}...")
            _VERIFIED[_stamp(info)] = digest
            f.seek(0)
        yield f


def save(folder: SidecarDir, key: str, suffix: str, write: Callable[[BinaryIO], object],
         origin: dict[str, str | None] | None = None) -> str:
    """Write a file with ``write(file)`` under a temp name, then rename it ``<key>-<sha256><suffix>``.

    With ``origin`` (what the file is built from), the file ends with its binding (`write_binding`).
    Returns the name. On any error the temp file is removed and the error raised.
    """
    tmp = f".{key}-{os.getpid()}{suffix}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=folder.fd)  # left by a killed process that had this pid
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=folder.fd)
    try:
        with os.fdopen(fd, "w+b") as f:
            write(f)
            if origin is not None:
                write_binding(f, key, origin)
            f.flush()
            f.seek(0)
            digest = hashlib.file_digest(f, "sha256").hexdigest()
            name = f"{key}-{digest}{suffix}"
            os.replace(tmp, name, src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
            _VERIFIED[_stamp(os.fstat(f.fileno()))] = digest  # after the rename, which changes ctime
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=folder.fd)
        raise
    return name


def remove(folder: SidecarDir, name: str) -> None:
    """Remove the entry ``name`` (a link itself, never its target); directories and errors are left."""
    with contextlib.suppress(OSError):
        if not stat.S_ISDIR(os.stat(name, dir_fd=folder.fd, follow_symlinks=False).st_mode):
            os.unlink(name, dir_fd=folder.fd)


def remove_others(folder: SidecarDir, suffix: str, keep: str | None) -> None:
    """Remove every ``*<suffix>`` entry but ``keep`` (older keys, damaged files, links put there), and
    temp files of that kind untouched for ``STALE_TEMP_SECONDS`` (left by a killed search; a live
    writer's temp file is younger, as every write updates its mtime)."""
    now = time.time()
    for name in os.listdir(folder.fd):
        if name.endswith(suffix) and name != keep:
            remove(folder, name)
        elif name.startswith(".") and name.endswith(f"{suffix}.tmp"):
            with contextlib.suppress(OSError):
                if now - os.stat(name, dir_fd=folder.fd, follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS:
                    remove(folder, name)


def _stamp(info: os.stat_result) -> tuple[int, ...]:
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


# ------------------------------------------------------------ binding a file to what it was built from
BIND_FORMAT = "avscene-search-binding/1"
BIND_MAGIC = b"avsbind1"  # the last 8 bytes of a bound file; the 8 before them: the binding's length
BIND_MAX_BYTES = 2**16
ORIGIN_FIELDS = ("feature_set", "data_version", "store")


def write_binding(f: BinaryIO, key: str, origin: dict[str, str | None]) -> None:
    """Append the binding to a file being written: its key and ``origin`` (the feature set, its data
    version and the store it is built from) as JSON, its length, `BIND_MAGIC`.

    The sha256 in a file's name says its bytes are whole, not whose they are: a file of another
    store, feature set or data version copied in and renamed to this key keeps a valid name. The
    binding is part of the hashed bytes, so it cannot be changed without the name, and it names the
    key, set and version the file was built for (`check_binding`). Readers of the file's own format
    (faiss, ``.npy``) stop before it.
    """
    text = json.dumps({"format": BIND_FORMAT, "key": key, **{k: origin.get(k) for k in ORIGIN_FIELDS}}).encode()
    f.write(text + len(text).to_bytes(8, "little") + BIND_MAGIC)


def check_binding(f: BinaryIO, name: str, origin: dict[str, str | None]) -> int:
    """Where the file's own data ends (its binding starts), when the binding says it was built for
    ``name``'s key from ``origin``'s feature set and data version; ``f`` is left at its start.

    Raises:
        SidecarDamage: no binding (a file copied or renamed by hand, or written before bindings), or
            one for another key, feature set or data version.
    """
    data_end, binding = read_binding(f)
    wanted = {"key": _NAME.fullmatch(name)[1], **{k: origin.get(k) for k in ORIGIN_FIELDS[:2]}}
    if any(binding[k] != v for k, v in wanted.items()):
        raise SidecarDamage(f"it was built from feature set {binding['feature_set']!r} (data version "
                            f"{binding['data_version']}, key {binding['key']}) of the store at {binding['store']}, "
                            f"not from {origin.get('feature_set')!r} (data version {origin.get('data_version')}, "
                            f"key {wanted['key']}) of {origin.get('store')}: copied or renamed by hand, never served")
    return data_end


def read_binding(f: BinaryIO) -> tuple[int, dict]:
    """(where the file's own data ends, its binding's fields); ``f`` is left at its start.

    Raises:
        SidecarDamage: the file does not end with a binding.
    """
    size = os.fstat(f.fileno()).st_size
    f.seek(max(0, size - 16))
    footer = f.read(16)
    length = int.from_bytes(footer[:8], "little") if len(footer) == 16 else -1
    if footer[8:] != BIND_MAGIC or not 0 < length <= min(BIND_MAX_BYTES, size - 16):
        raise SidecarDamage("it carries no binding to the store, feature set and data version it was built "
                            "from (copied or renamed by hand, or written before bindings): never served")
    f.seek(size - 16 - length)
    binding = _parse_binding(f.read(length))
    f.seek(0)
    return size - 16 - length, binding


def _parse_binding(text: bytes) -> dict:
    """The binding's fields, each a string."""
    try:
        binding = json.loads(text)
        fields = [binding[k] for k in ("format", "key", *ORIGIN_FIELDS)]
    except (ValueError, KeyError, TypeError) as err:
        raise SidecarDamage(f"its binding cannot be read ({type(err).__name__}: {err})") from err
    if fields[0] != BIND_FORMAT or not all(isinstance(v, str) for v in fields):
        raise SidecarDamage(f"its binding is not a {BIND_FORMAT} binding")
    return binding


# ------------------------------------------------------------------------- the clip matrix files
def manifest_matrix_name(manifest: str) -> str:
    """The ``.npy`` matrix file that belongs to the manifest ``<key>-<sha256>.json``."""
    return manifest.removesuffix(".json") + ".npy"


def write_matrix(folder: SidecarDir, key: str, n_max: int, dim: int, blocks: Iterable[np.ndarray],
                 left_out: Callable[[], list[int]]) -> tuple[str, np.ndarray]:
    """Stream ``blocks`` (``[m, dim]`` unit vectors, at most ``n_max`` rows in all) into a ``.npy``, then
    write its manifest; returns (the manifest's name, the matrix memory-mapped read-only).

    The vectors go to a temp file as they come (one pass, memory bounded by one block), the crc32 of
    every ``CHECK_BLOCK_BYTES`` of data computed on the way; the header is written first for
    ``n_max`` rows and rewritten in place (same length) for the rows that came. The manifest
    (shape, size, crc32s, the done rows ``left_out()`` names as not searchable) is named by its
    bytes' sha256; the matrix is renamed ``<key>-<that sha256>.npy`` first and the manifest last,
    so a manifest in place always has its whole matrix beside it. On any error no file is left.
    """
    tmp, manifest_tmp = f".{key}-{os.getpid()}.npy.tmp", f".{key}-{os.getpid()}.json.tmp"
    placed: list[str] = []
    try:
        with _create(folder, tmp) as f:
            f.write(_npy_header(n_max, dim))
            crc, n = _BlockCrc(CHECK_BLOCK_BYTES), 0
            for block in blocks:
                data = np.ascontiguousarray(block, dtype=np.float32)
                f.write(data)
                crc.update(memoryview(data).cast("B"))
                n += len(data)
            f.truncate(HEADER_BYTES + n * dim * 4)
            f.seek(0)
            f.write(_npy_header(n, dim))
            f.flush()
            text = json.dumps({"format": MATRIX_FORMAT, "key": key, "rows": n, "dim": dim,
                               "header_bytes": HEADER_BYTES, "size": HEADER_BYTES + n * dim * 4,
                               "block_bytes": CHECK_BLOCK_BYTES, "crc32": crc.finish(),
                               "left_out": left_out()}).encode()
            digest = hashlib.sha256(text).hexdigest()
            name = f"{key}-{digest}.json"
            os.replace(tmp, manifest_matrix_name(name), src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
            placed.append(manifest_matrix_name(name))
            _VERIFIED[_stamp(os.fstat(f.fileno()))] = digest  # after the rename, which changes ctime
            matrix = _map(f, n, dim)
        with _create(folder, manifest_tmp) as m:
            m.write(text)
        os.replace(manifest_tmp, name, src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
    except BaseException:
        for left in (tmp, manifest_tmp, *placed):
            with contextlib.suppress(OSError):
                os.unlink(left, dir_fd=folder.fd)
        raise
    return name, matrix


def read_matrix(folder: SidecarDir, name: str, done: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, unit clip vectors memory-mapped)`` of the manifest ``name`` and its ``.npy``.

    Every open checks the manifest's sha256 (a few KiB), the matrix file's size and header against
    it and against the store's done rows (nothing is mapped or allocated before). The crc32 of every
    block and the unit length of every vector are checked once per file per process (remembered
    like `open_checked`'s hashes), before the matrix is returned.

    Raises:
        SidecarDamage: any of these differs; a link or not a regular file.
        OSError: a file vanished (removed by another search meanwhile).
    """
    key, digest = _NAME.fullmatch(name).group(1, 2)
    with open_checked(folder, name, 2**16 + 24 * len(done)) as f:
        manifest = _parse_manifest(f.read(), dim, key)
    left_out = np.asarray(manifest["left_out"], dtype=np.int64)
    check_rows(left_out, done)
    searchable = done.copy()
    searchable[left_out] = False  # check_rows made sure these are done rows, each once
    rows = np.flatnonzero(searchable)
    if len(rows) != manifest["rows"]:
        raise SidecarDamage(f"its manifest counts {manifest['rows']} rows; the store has {len(rows)} done clips to search")
    with _open_file(folder, manifest_matrix_name(name)) as f:
        info = os.fstat(f.fileno())
        if info.st_size != manifest["size"]:
            raise SidecarDamage(f"its matrix file holds {info.st_size} bytes, its manifest says {manifest['size']}")
        _check_header(f, len(rows), dim)
        matrix = _map(f, len(rows), dim)
    if _VERIFIED.get(_stamp(info)) != digest:
        _check_blocks(matrix, manifest["crc32"], manifest["block_bytes"])
        _VERIFIED[_stamp(info)] = digest
    return rows, matrix


class _BlockCrc:
    """The crc32 of each ``block`` bytes of a stream fed in pieces of any size."""

    def __init__(self, block: int) -> None:
        self.block, self.crcs, self.crc, self.filled = block, [], 0, 0

    def update(self, data: memoryview) -> None:
        while len(data):
            take = min(len(data), self.block - self.filled)
            self.crc = zlib.crc32(data[:take], self.crc)
            self.filled += take
            data = data[take:]
            if self.filled == self.block:
                self.crcs.append(self.crc)
                self.crc, self.filled = 0, 0

    def finish(self) -> list[int]:
        return self.crcs + ([self.crc] if self.filled else [])


def _check_blocks(matrix: np.ndarray, crcs: list[int], block_bytes: int) -> None:
    """Every block's crc32 is the manifest's and every vector is a unit vector (a manifest forged to
    match forged bytes still cannot hold a vector that yields no cosine)."""
    data = memoryview(matrix.reshape(-1).view(np.uint8)) if matrix.size else memoryview(b"")
    if len(crcs) != -(-len(data) // block_bytes):
        raise SidecarDamage(f"its manifest has {len(crcs)} block checksums for {len(data)} bytes")
    for number, want in enumerate(crcs):
        found = zlib.crc32(data[number * block_bytes:(number + 1) * block_bytes])
        if found != want:
            raise SidecarDamage(f"block {number} of its matrix has crc32 {found:08x}, its manifest says {want:08x}")
    step = max(1, block_bytes // max(1, 4 * matrix.shape[1]))
    for start in range(0, len(matrix), step):
        check_unit(matrix[start:start + step])


def _parse_manifest(text: bytes, dim: int, key: str) -> dict:
    """The manifest's fields, each of the type and range the writer gives it, written for ``key`` (the
    key in its name: a manifest of other data renamed to this key keeps its sha256, not its key)."""
    try:
        manifest = json.loads(text)
        ints = {key: manifest[key] for key in ("rows", "dim", "header_bytes", "size", "block_bytes")}
        lists = [manifest["crc32"], manifest["left_out"]]
    except (ValueError, KeyError, TypeError) as err:
        raise SidecarDamage(f"its manifest cannot be read ({type(err).__name__}: {err})") from err
    if (manifest.get("format") != MATRIX_FORMAT or not all(type(v) is int and v >= 0 for v in ints.values())
            or not all(isinstance(v, list) and all(type(i) is int for i in v) for v in lists)):
        raise SidecarDamage(f"its manifest is not a {MATRIX_FORMAT} manifest")
    if manifest.get("key") != key:
        raise SidecarDamage(f"its manifest was written for key {str(manifest.get('key'))[:16]!r}, not {key!r}: "
                            f"another feature set's or store's matrix")
    if ints["dim"] != dim or ints["header_bytes"] != HEADER_BYTES or ints["block_bytes"] < 1:
        raise SidecarDamage(f"its manifest describes {ints['dim']}-value vectors after a {ints['header_bytes']}-byte "
                            f"header; the feature set's have {dim}")
    if ints["size"] != HEADER_BYTES + ints["rows"] * dim * 4:
        raise SidecarDamage(f"its manifest gives {ints['size']} bytes for {ints['rows']} rows of {dim}")
    return manifest


def _npy_header(n: int, dim: int) -> bytes:
    """A ``.npy`` 1.0 header for ``[n, dim]`` float32, always ``HEADER_BYTES`` long (so the row count
    can be rewritten in place once the stream is done)."""
    text = repr({"descr": "<f4", "fortran_order": False, "shape": (n, dim)})
    body = text.ljust(HEADER_BYTES - 11).encode("latin1") + b"\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


def _check_header(f: BinaryIO, n: int, dim: int) -> None:
    try:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f) if version == (1, 0) else (None, None, None)
    except (ValueError, EOFError) as err:
        raise SidecarDamage(f"its matrix file has no .npy header ({err})") from err
    if (shape, fortran, dtype, f.tell()) != ((n, dim), False, np.dtype("<f4"), HEADER_BYTES):
        raise SidecarDamage(f"its matrix file holds {dtype} {shape}; the manifest and the store say float32 {(n, dim)}")


def _map(f: BinaryIO, n: int, dim: int) -> np.ndarray:
    """The ``[n, dim]`` float32 data after the header, memory-mapped read-only (the map outlives ``f``)."""
    if n == 0:
        return np.empty((0, dim), dtype=np.float32)
    return np.memmap(f, dtype=np.float32, mode="r", offset=HEADER_BYTES, shape=(n, dim))


@contextlib.contextmanager
def _create(folder: SidecarDir, name: str) -> Iterator[BinaryIO]:
    """A new file ``name`` (a leftover of a killed process with our pid is replaced), never through a link."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=folder.fd)
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=folder.fd)
    with os.fdopen(fd, "w+b") as f:
        yield f


@contextlib.contextmanager
def _open_file(folder: SidecarDir, name: str, what: str = "its matrix file") -> Iterator[BinaryIO]:
    """The regular file ``name``, opened without following a link (`SidecarDamage` naming ``what`` otherwise)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder.fd)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise SidecarDamage(f"{what} is a symbolic link") from err
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SidecarDamage(f"{what} is not a regular file")
        yield f


def read_faiss(f: BinaryIO, done: np.ndarray, dim: int) -> Any:
    """A faiss index of the kinds search builds, holding done store rows (each once) as unit vectors.

    faiss allocates what the file's headers claim before it reads the values; the sha256 checked
    before (`open_checked`) means only a file made by hand with a matching name gets here with a
    false claim, and faiss's ``MemoryError``/``RuntimeError`` is then damage like any other.

    Raises:
        SidecarDamage: faiss cannot read it, or what it holds is not the store's done clips.
    """
    import faiss

    try:
        index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
    except (RuntimeError, MemoryError, ValueError) as err:
        raise SidecarDamage(f"faiss cannot read it ({type(err).__name__}: {str(err).strip()[:200]})") from err
    if index.d != dim or index.metric_type != faiss.METRIC_INNER_PRODUCT or index.ntotal > done.sum():
        raise SidecarDamage(f"it is an index of {index.ntotal} vectors of {index.d} (metric {index.metric_type}); "
                            f"the feature set has {int(done.sum())} done clips of {dim}")
    seen, count = np.zeros(len(done), dtype=bool), 0
    for ids, vectors in _faiss_contents(index, dim):
        check_rows(np.sort(ids), done)
        check_unit(vectors)
        seen[ids] = True
        count += len(ids)
    if count != index.ntotal or int(seen.sum()) != count:
        raise SidecarDamage(f"it holds {count} ids for {index.ntotal} vectors, {int(seen.sum())} of them distinct")
    return index


def write_faiss(f: BinaryIO, index: Any) -> None:
    """Write ``index`` to ``f``; an ``OSError`` of the file (a full disk) is raised as itself, not as the
    ``RuntimeError`` faiss makes of an exception in its writer."""
    import faiss

    failed: list[OSError] = []

    def write(data: bytes) -> int:
        try:
            return f.write(data)
        except OSError as err:
            failed.append(err)
            raise

    try:
        faiss.write_index(index, faiss.PyCallbackIOWriter(write))
    except RuntimeError:
        if failed:
            raise failed[0] from None
        raise


def _faiss_contents(index: Any, dim: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(ids, vectors)`` of a flat or IVF-flat index, viewed in place (no copy), list by list."""
    import faiss

    if isinstance(index, faiss.IndexIDMap2):
        flat, n = faiss.downcast_index(index.index), index.ntotal
        if not isinstance(flat, faiss.IndexFlat) or flat.ntotal != n or index.id_map.size() != n:
            raise SidecarDamage("its id map does not match its flat index")
        if n:
            yield (faiss.rev_swig_ptr(index.id_map.data(), n),
                   faiss.rev_swig_ptr(flat.get_xb(), n * dim).reshape(n, dim))
    elif isinstance(index, faiss.IndexIVFFlat):
        if index.quantizer.ntotal != index.nlist or not 1 <= index.nprobe <= index.nlist:
            raise SidecarDamage(f"its quantizer holds {index.quantizer.ntotal} of {index.nlist} lists "
                                f"(nprobe {index.nprobe})")
        lists = index.invlists
        for number in range(index.nlist):
            size = lists.list_size(number)
            if size:
                codes = faiss.rev_swig_ptr(lists.get_codes(number), size * dim * 4)
                yield faiss.rev_swig_ptr(lists.get_ids(number), size), codes.view(np.float32).reshape(size, dim)
    else:
        raise SidecarDamage(f"it is a {type(index).__name__}, not an index search builds")


def check_rows(rows: np.ndarray, done: np.ndarray) -> None:
    """Store rows of done clips, increasing (each once): what the builders write."""
    if len(rows) and (rows.min() < 0 or rows.max() >= len(done)):
        raise SidecarDamage(f"it names rows {rows.min()}..{rows.max()}, the store has {len(done)}")
    if len(rows) and not done[rows].all():
        raise SidecarDamage(f"it names {int((~done[rows]).sum())} rows whose clips are not done")
    if np.any(np.diff(rows) <= 0):
        raise SidecarDamage("its rows are not in store order, each once")


def check_unit(vectors: np.ndarray) -> None:
    """Every clip vector has length 1 (or 0: a clip whose mean is zero); none holds NaN."""
    norms = np.einsum("ij,ij->i", vectors, vectors)
    bad = ~((np.abs(norms - 1) <= UNIT_TOLERANCE) | (norms == 0))
    if bad.any():
        raise SidecarDamage(f"{int(bad.sum())} of its vectors are not unit vectors "
                            f"(one has squared length {float(norms[bad][0]):.3g})")


# ----------------------------------------------------------- IVF index files checked list by list
LISTS_FORMAT = "avscene-search-ivf-lists/2"  # /2: the lists end where the file's binding starts


@dataclass
class CheckedLists:
    """The promises of an IVF-flat index file's ``.lists`` manifest, checked list by list as queries
    first probe them (a query probes ``nprobe`` of ``nlist`` lists, so a new process reads and checks
    only those: at a million clips, about 1% of a 2 GiB file).

    Each list's bytes (vectors then ids, as faiss lays them out at the end of the file) must have the
    manifest's crc32, its ids must be done store rows (each once within the list) and its vectors
    unit vectors: what `read_faiss` checks for the whole file at once.
    """

    crcs: list[int]
    done: np.ndarray
    dim: int
    checked: set[int]

    def check(self, index: Any, lists: Iterable[int]) -> None:
        """Check the lists not checked before; `SidecarDamage` ("is damaged: list ...") naming the
        first that fails."""
        import faiss

        invlists = faiss.extract_index_ivf(index).invlists
        for number in sorted(set(int(i) for i in lists) - self.checked):
            vectors, ids = _list_arrays(invlists, number, self.dim)
            found = zlib.crc32(ids.view(np.uint8), zlib.crc32(vectors.view(np.uint8)))
            if found != self.crcs[number]:
                raise SidecarDamage(f"is damaged: list {number} of its index file has crc32 {found:08x}, its "
                                    f"manifest says {self.crcs[number]:08x}")
            try:
                check_rows(np.sort(ids), self.done)
                check_unit(vectors)
            except SidecarDamage as damage:
                raise SidecarDamage(f"is damaged: list {number} of its index file: {damage}") from None
            self.checked.add(number)


def _list_arrays(invlists: Any, number: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(vectors ``[size, dim]`` float32, ids) of one inverted list, viewed in place."""
    import faiss

    size = int(invlists.list_size(number))
    if not size:
        return np.empty((0, dim), dtype=np.float32), np.empty(0, dtype=np.int64)
    codes = faiss.rev_swig_ptr(invlists.get_codes(number), size * dim * 4)
    return codes.view(np.float32).reshape(size, dim), faiss.rev_swig_ptr(invlists.get_ids(number), size)


def write_lists_manifest(folder: SidecarDir, key: str, index: Any, faiss_name: str) -> str | None:
    """Write the ``.lists`` manifest of the IVF-flat index just saved as ``faiss_name``; its name
    (``<key>-<sha256 of the manifest>.lists``), or None when the index is not an IVF-flat one or the
    file is not laid out as this reader expects (then the whole-file sha256 check loads it).

    The manifest holds the file's name and size, the crc32 of its head (header, quantizer, list sizes:
    everything before the lists' data) and of each list's bytes. faiss writes an ``IndexIVFFlat``'s
    lists last, in order, each its vectors then its ids; that layout is confirmed here on the file
    (the first list's bytes) before a manifest promises it.
    """
    import faiss

    if not isinstance(index, faiss.IndexIVFFlat) or not os.path.isdir("/proc/self/fd"):
        return None  # the lazy reader maps the file by name through /proc/self/fd (Linux)
    dim, nlist = index.d, index.nlist
    sizes = [int(index.invlists.list_size(i)) for i in range(nlist)]
    crcs = []
    for number in range(nlist):
        vectors, ids = _list_arrays(index.invlists, number, dim)
        crcs.append(zlib.crc32(ids.view(np.uint8), zlib.crc32(vectors.view(np.uint8))))
    with _open_file(folder, faiss_name, "the index file") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            data_end, _ = read_binding(f)
        except SidecarDamage:
            return None
        data_start = data_end - sum(sizes) * (4 * dim + 8)
        head_crc = zlib.crc32(f.read(data_start)) if data_start > 0 else None
        first = next((i for i in range(nlist) if sizes[i]), None)
        if first is not None:
            f.seek(data_start)
            vectors, _ = _list_arrays(index.invlists, first, dim)
            if f.read(min(vectors.nbytes, 4096)) != vectors.reshape(-1).view(np.uint8)[:4096].tobytes():
                return None
    if head_crc is None:
        return None
    text = json.dumps({"format": LISTS_FORMAT, "faiss": faiss_name, "size": size, "dim": dim, "data_start": data_start,
                       "data_end": data_end, "head_crc32": head_crc, "sizes": sizes, "crc32": crcs})
    return save(folder, key, ".lists", lambda m: m.write(text.encode()))


def read_lists_manifest(folder: SidecarDir, name: str, done: np.ndarray, dim: int,
                        origin: dict[str, str | None]) -> tuple[Any, CheckedLists]:
    """The IVF-flat index a ``.lists`` manifest describes, its lists memory-mapped from the file, and the
    `CheckedLists` that checks each list on first use.

    Checked now: the manifest's sha256 (its name), the index file's size, its binding to ``origin``
    (`check_binding`) and the crc32 of its head
    (before faiss parses a byte of it), then the parsed index against the manifest and the store
    (kind, dimension, metric, list count and sizes, at most the done clips). Nothing of the lists'
    data is read here.

    Raises:
        SidecarDamage: any of these differs; a link or not a regular file.
        OSError: a file vanished (removed by another search meanwhile).
    """
    import faiss

    with open_checked(folder, name, 2**16 + 24 * len(done)) as f:
        manifest = _parse_lists_manifest(f.read(), dim, _NAME.fullmatch(name)[1])
    with _open_file(folder, manifest["faiss"], "its index file") as f:
        size = os.fstat(f.fileno()).st_size
        if size != manifest["size"] or not 0 < manifest["data_start"] <= size:
            raise SidecarDamage(f"its index file holds {size} bytes, its manifest says {manifest['size']}")
        if check_binding(f, manifest["faiss"], origin) != manifest["data_end"]:
            raise SidecarDamage(f"its index file's binding starts at another byte than its manifest's "
                                f"{manifest['data_end']}")
        found = zlib.crc32(f.read(manifest["data_start"]))
        if found != manifest["head_crc32"]:
            raise SidecarDamage(f"its index file's head has crc32 {found:08x}, its manifest says "
                                f"{manifest['head_crc32']:08x}")
        try:
            index = faiss.read_index(f"/proc/self/fd/{f.fileno()}", faiss.IO_FLAG_MMAP)
        except (RuntimeError, MemoryError, ValueError) as err:
            raise SidecarDamage(f"faiss cannot read it ({type(err).__name__}: {str(err).strip()[:200]})") from err
    sizes = manifest["sizes"]
    ok = (isinstance(index, faiss.IndexIVFFlat) and index.d == dim and index.metric_type == faiss.METRIC_INNER_PRODUCT
          and index.nlist == len(sizes) and index.quantizer.ntotal == index.nlist and 1 <= index.nprobe <= index.nlist
          and index.ntotal == sum(sizes) <= done.sum()
          and [int(index.invlists.list_size(i)) for i in range(index.nlist)] == sizes)
    if not ok:
        raise SidecarDamage(f"it is a {type(index).__name__} of {index.ntotal} vectors of {index.d}; its manifest "
                            f"describes an IVF-flat index of {sum(sizes)} vectors of {dim} in {len(sizes)} lists")
    return index, CheckedLists(manifest["crc32"], done, dim, set())


def _parse_lists_manifest(text: bytes, dim: int, key: str) -> dict:
    """The ``.lists`` manifest's fields, each of the type and range the writer gives it."""
    try:
        manifest = json.loads(text)
        ints = [manifest[k] for k in ("size", "dim", "data_start", "data_end", "head_crc32")]
        lists = [manifest["sizes"], manifest["crc32"]]
        target = _NAME.fullmatch(manifest["faiss"])
    except (ValueError, KeyError, TypeError) as err:
        raise SidecarDamage(f"its manifest cannot be read ({type(err).__name__}: {err})") from err
    if (manifest.get("format") != LISTS_FORMAT or not all(type(v) is int and v >= 0 for v in ints)
            or not all(isinstance(v, list) and all(type(i) is int and i >= 0 for i in v) for v in lists)
            or len(lists[0]) != len(lists[1]) or not target or target[1] != key or target[3] != ".faiss"):
        raise SidecarDamage(f"its manifest is not a {LISTS_FORMAT} manifest of this key's index file")
    if manifest["dim"] != dim:
        raise SidecarDamage(f"its manifest describes {manifest['dim']}-value vectors; the feature set's have {dim}")
    if manifest["data_start"] + sum(lists[0]) * (4 * dim + 8) != manifest["data_end"] or \
            not manifest["data_end"] < manifest["size"]:
        raise SidecarDamage(f"its manifest gives {manifest['size']} bytes for {sum(lists[0])} vectors of {dim}")
    return manifest


# ------------------------------------------------------------------------------- the ids file
def read_ids(f: BinaryIO, n: int, max_width: int, data_end: int) -> np.ndarray:
    """The ``[n]`` fixed-width bytes of a ``.ids`` sidecar (the store's ids in row order), its header
    checked against the store before anything is allocated; its data must end at ``data_end`` (where
    its binding starts).

    Raises:
        SidecarDamage: not a ``.npy`` of ``n`` byte strings of at most ``max_width`` bytes.
    """
    try:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f) if version == (1, 0) else (None, None, None)
    except (ValueError, EOFError) as err:
        raise SidecarDamage(f"it has no .npy header ({err})") from err
    if shape != (n,) or fortran or dtype is None or dtype.kind != "S" or not 0 < dtype.itemsize <= max_width:
        raise SidecarDamage(f"it holds {dtype} {shape}; the store has {n} ids of at most {max_width} bytes")
    if data_end - f.tell() != n * dtype.itemsize:
        raise SidecarDamage(f"it holds {data_end - f.tell()} bytes of ids, its header promises {n * dtype.itemsize}")
    data = f.read(n * dtype.itemsize)
    if len(data) != n * dtype.itemsize:
        raise SidecarDamage(f"it holds {len(data)} bytes of ids, its header promises {n * dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype)
