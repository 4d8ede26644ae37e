"""Output files written whole or not at all: a temp name beside the target, then one rename.

Every file a command hands to a person or another tool (a submission, a report, a classify CSV, a
run's JSON and weights) goes through here, so that a full disk, a file-size limit or a kill mid-write
leaves the previous good file in place and no half-written one under the final name. The temp file
is created with the process's umask (unlike ``tempfile.mkstemp``'s 0600), so a teammate who could
read the old file can read the new one.

An ``OSError`` while writing or renaming becomes an :class:`OutputWriteError` naming the file and,
for the common cases, the cause in words ("disk full", "file-size limit"); the temp file is removed.
"""
from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from featurestore.errors import FeatureStoreError

__all__ = ["OutputWriteError", "atomic_path", "atomic_save", "atomic_write", "atomic_write_bytes", "atomic_write_text",
           "describe_os_error", "find_os_error"]


class OutputWriteError(FeatureStoreError, OSError):
    """An output file could not be written; the previous file under its name (if any) is unchanged."""


def describe_os_error(err: OSError) -> str:
    """A few words for an OSError: 'disk full', 'file-size limit reached', else its strerror."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk full"
    if err.errno == errno.EFBIG:
        return "file-size limit reached"
    if err.errno == errno.EROFS:
        return "read-only file system"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return err.strerror or type(err).__name__


def find_os_error(err: BaseException | None) -> OSError | None:
    """The OSError with an errno in ``err`` or its causes/contexts (libraries wrap them), or None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno is not None:
            return err
        err = err.__cause__ or err.__context__
    return None


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block ends without error, rename it onto ``path``.

    For writers that want a file name (``savefig``, safetensors' ``save_file``). The temp file is
    removed on any error; ``OSError`` becomes :class:`OutputWriteError` naming ``path``.
    """
    final = Path(path)
    tmp = _temp_name(final)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final)
    except OSError as err:
        _remove_quietly(tmp)
        if isinstance(err, OutputWriteError):
            raise
        raise OutputWriteError(f"could not write {final}: {describe_os_error(err)}; "
                               f"the previous file (if any) is unchanged") from err
    except BaseException:
        _remove_quietly(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """``open(path, mode)`` that publishes the file only when the block ends without error."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write opens files for writing ('w' or 'wb'), not {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` whole or not at all; returns the path."""
    with atomic_write(path, "w", encoding=encoding) as handle:
        handle.write(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` whole or not at all; returns the path."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_save(path: str | os.PathLike, save: Callable[[Path], object]) -> Path:
    """Call ``save(temp_path)`` and publish its file under ``path`` (for libraries that take a name)."""
    with atomic_path(path) as tmp:
        save(tmp)
    return Path(path)


def _fsync_file(path: Path) -> None:
    """Flush a finished temp file to disk, so a crash after the rename cannot leave it empty."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
