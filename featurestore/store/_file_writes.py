"""Files of a local store written whole: a temp file, renamed over the old one.

Every file the store writes itself (shards, plain chunks, ``zarr.json``) is replaced whole, as
zarr's local store replaces it: a kill never leaves a torn file under its name, only a ``.partial``
temp file beside it. Buffers go out by ``writev`` straight from the caller's arrays (no joined copy).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import uuid

_IOV_MAX = 1024  # buffers per writev (POSIX's minimum IOV_MAX is 16; Linux and macOS take 1,024)


def replace_file(path: str, parts: list) -> None:
    """Write ``path`` whole, the buffers ``parts`` one after another, through a temp file renamed
    over it (zarr's local store does the same)."""
    with replacing(path) as tmp:
        fd = _create(tmp)
        try:
            write_all(fd, parts)
        except OSError as err:  # writev names no file: "[Errno 28] No space left on device" alone
            raise OSError(err.errno, err.strerror, path) from err
        finally:
            os.close(fd)


def _create(path: str) -> int:
    """A new file at ``path``, open for writing; its folder is made only when the file cannot be
    created without it (a new array's first chunk, or a folder deleted since): a ``makedirs`` before
    every file was a ``mkdir`` that failed on the existing folder (493 calls to fill a million clips)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        return os.open(path, flags, 0o666)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return os.open(path, flags, 0o666)


def write_all(fd: int, parts: list) -> None:
    """Write ``parts`` (bytes, or 1-d uint8 arrays: ``len`` is their size) to ``fd`` in order:
    ``os.writev`` by ``_IOV_MAX`` at a time, a short write (disk full, a signal) finished from where
    it stopped."""
    for low in range(0, len(parts), _IOV_MAX):
        batch = parts[low:low + _IOV_MAX]
        written = os.writev(fd, batch)
        if written < sum(map(len, batch)):  # rare: the rest of this batch joined, until it is all out
            rest = memoryview(b"".join(batch))[written:]
            while len(rest):
                rest = rest[os.write(fd, rest):]


class _TempNames:
    """Names for temp files no other writer uses: a random token per process (drawn again in a
    forked child) and a counter (``next`` on it is one C call: safe across threads). A fresh
    ``uuid4`` per file was a ``getrandom`` call each, and with the next shard's checksums running on
    another thread each such call could wait for the GIL (~0.1 s of a million-clip fill)."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self.token, self.count = uuid.uuid4().hex, itertools.count()

    def __call__(self) -> str:
        return f"{self.token}{next(self.count):x}"


_temp_name = _TempNames()


@contextlib.contextmanager
def replacing(path: str):
    """A temp name beside ``path``, renamed over it when the block ends without error and removed
    otherwise: a kill or a failure never leaves a torn file under ``path``."""
    tmp = f"{path}.{_temp_name()}.partial"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
