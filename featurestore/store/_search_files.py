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
* A file's name carries the sha256 of its bytes: ``<key>-<sha256><ext>``, given when it is written
  (temp file, hash, one rename, so a name never points at other bytes than those hashed). Loading
  compares the bytes with the name *before* any of them is decoded, and refuses files larger than
  the caller's bound: a flipped bit, a cut file or one edited by hand is `SidecarDamage`, rebuilt
  by the caller, never served.
* What is decoded is bounded before it is allocated (``.npy`` headers against the store's done
  rows and dimension) and must be what the builders write: done store rows, each once, and unit
  vectors (`read_matrix`, `read_faiss`).

Hashing costs about one more read of the file, so it is done once per file per process: the process
remembers the files it has checked (or written) by (device, inode, size, mtime, ctime). A store
opened again in the same process does not hash again, while any write to the file changes its ctime
(which no one can set back) and has it checked again. A warm query never touches the file at all.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from featurestore.errors import FeatureStoreError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NAME = re.compile(r"([0-9a-f]{16})-([0-9a-f]{64})(\.[a-z]+)")
_VERIFIED: dict[tuple[int, ...], str] = {}  # file stamp -> the sha256 its bytes were found to have
STALE_TEMP_SECONDS = 3600  # a temp file older than this belongs to a search that was killed
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
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder.fd)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise SidecarDamage("it is a symbolic link") from err
        raise
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SidecarDamage("it is not a regular file")
        if info.st_size > max_bytes:
            raise SidecarDamage(f"it holds {info.st_size} bytes, more than the {max_bytes} the feature set can need")
        if _VERIFIED.get(_stamp(info)) != digest:
            found = hashlib.file_digest(f, "sha256").hexdigest()
            if found != digest:
                raise SidecarDamage(f"its bytes hash to sha256 {found[:12]}..., its name says {digest[:12]}...")
            _VERIFIED[_stamp(info)] = digest
            f.seek(0)
        yield f


def save(folder: SidecarDir, key: str, suffix: str, write: Callable[[BinaryIO], object]) -> str:
    """Write a file with ``write(file)`` under a temp name, then rename it ``<key>-<sha256><suffix>``.

    Returns the name. On any error the temp file is removed and the error raised.
    """
    tmp = f".{key}-{os.getpid()}{suffix}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=folder.fd)  # left by a killed process that had this pid
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=folder.fd)
    try:
        with os.fdopen(fd, "w+b") as f:
            write(f)
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


# ------------------------------------------------------------------------- what a file may hold
def read_matrix(f: BinaryIO, done: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, unit clip vectors)`` of an ``.npz`` clip matrix, reading no more than the done rows fill.

    Raises:
        SidecarDamage: not a zip of ``rows.npy`` and ``matrix.npy``, headers that do not fit the store,
            rows that are not done store rows in order, or vectors that are not unit vectors.
    """
    n_done = int(done.sum())
    try:
        with zipfile.ZipFile(f) as z:
            rows = _read_npy(z, "rows.npy", np.int64, lambda shape: len(shape) == 1 and shape[0] <= n_done)
            matrix = _read_npy(z, "matrix.npy", np.float32, lambda shape: shape == (len(rows), dim))
    except (zipfile.BadZipFile, KeyError, ValueError, EOFError, OSError, zlib.error) as err:
        raise SidecarDamage(f"it cannot be read as a clip matrix ({type(err).__name__}: {err})") from err
    check_rows(rows, done)
    check_unit(matrix)
    return rows, matrix


def write_matrix(f: BinaryIO, rows: np.ndarray, matrix: np.ndarray) -> None:
    np.savez(f, rows=rows, matrix=matrix)


def _read_npy(z: zipfile.ZipFile, name: str, dtype: Any, fits: Callable[[tuple], bool]) -> np.ndarray:
    """One ``.npy`` member whose header passes ``fits(shape)``, read without trusting its size."""
    with z.open(name) as member:
        version = np.lib.format.read_magic(member)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise SidecarDamage(f"{name} is .npy format {version}, not 1.0 or 2.0")
        shape, fortran, found = read_header(member)
        if fortran or found != np.dtype(dtype) or not fits(shape):
            raise SidecarDamage(f"{name} holds {found} {shape}, which does not fit the store's done clips")
        out = np.empty(shape, dtype=dtype)
        filled = _read_into(member, memoryview(out).cast("B"))
    if filled != out.nbytes:
        raise SidecarDamage(f"{name} is cut short ({filled} of {out.nbytes} bytes)")
    return out


def _read_into(member: BinaryIO, view: memoryview) -> int:
    """Fill ``view`` from ``member`` in 4 MiB reads (one big ``read`` of a zip member copies it twice
    more); returns the bytes read."""
    filled = 0
    while filled < len(view):
        chunk = member.read(min(4 * 2**20, len(view) - filled))
        if not chunk:
            break
        view[filled:filled + len(chunk)] = chunk
        filled += len(chunk)
    return filled


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
