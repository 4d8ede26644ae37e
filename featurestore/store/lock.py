"""The writer lock of a store: one extraction at a time per store, readers never wait.

``writer_lock(location)`` takes an exclusive ``flock`` on ``<store>.lock``, a file beside the store
(beside a ``.zarr`` directory or an ``.h5`` file, so Zarr never sees a foreign file inside its
hierarchy). The kernel holds the lock for as long as the process lives and drops it when the
process dies, however it dies (``kill -9`` included), so a lock file left by a killed writer is
never mistaken for a running one: the next writer takes it over and says so. The file holds JSON
(pid, host, start time, command) only to name the holder in the refusal message.

* A second writer is refused at once with :class:`StoreLockedError` naming the running process and
  the lock file; it never waits.
* The lock is taken before a new store is created, so two processes creating the same store are
  serialised: the second is refused; nothing is created twice.
* Processes forked while the lock is held (decode workers) close their copy of the descriptor, so
  only the process that took the lock holds it; ``exec``'d children never inherit it.
* Readers (``open_store(..., "r")``) take no lock.
* Remote fsspec URLs (``s3://``, ``memory://``...) get no lock (``writer_lock`` returns a no-op
  lock): there is no filesystem lock to take there. ``file://`` URLs are local paths.
* ``flock`` is coherent between processes of one host; on network filesystems whose ``flock`` is
  local to each client, writers on different hosts are not excluded.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from featurestore.errors import FeatureStoreError

__all__ = ["LOCK_SUFFIX", "StoreLockedError", "WriterLock", "lock_path", "writer_lock"]

LOCK_SUFFIX = ".lock"
_HELD_FDS: set[int] = set()  # descriptors of the locks this process holds


class StoreLockedError(FeatureStoreError):
    """Another process holds the store's writer lock."""

    def __init__(self, store: str, lock_file: Path, holder: dict[str, Any]):
        self.store, self.lock_file, self.holder = store, lock_file, holder
        super().__init__(f"{store} is being written by another process ({describe_holder(holder)}; lock file "
                         f"{lock_file}); wait for it to finish or stop it, then rerun")


def lock_path(location: str | os.PathLike) -> Path | None:
    """The lock file of a store location, or None for a remote URL (no lock is taken there)."""
    text = os.fspath(location)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        return None
    path = Path(text).absolute()
    return path.with_name(path.name + LOCK_SUFFIX)


def writer_lock(location: str | os.PathLike, command: str | None = None) -> WriterLock:
    """The (not yet acquired) writer lock of ``location``; use it as a context manager."""
    return WriterLock(lock_path(location), str(location), command)


class WriterLock:
    """An exclusive, process-lifetime lock on one store (see the module docstring).

    Args:
        path: the lock file (None: a no-op lock for remote stores).
        store: the store's location, for messages.
        command: what the holder runs, recorded for the refusal message (default: ``sys.argv``).
    """

    def __init__(self, path: Path | None, store: str, command: str | None = None):
        self.path, self.store = path, store
        self.command = command if command is not None else " ".join(sys.argv)
        self._fd: int | None = None
        self._pid = os.getpid()  # the process that holds it (a forked copy of this object holds nothing)
        self.previous: dict[str, Any] | None = None  # a dead holder's record, when taken over

    @property
    def held(self) -> bool:
        return self._fd is not None and self._pid == os.getpid()

    def acquire(self) -> WriterLock:
        """Take the lock or raise StoreLockedError; prints a note when a dead holder's file is taken over."""
        if self.path is None or self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = _read_record(fd)
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise StoreLockedError(self.store, self.path, holder) from None
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed the file after we opened it: lock the new one
        try:
            self.previous = _read_record(fd) or None
            _write_record(fd, {"pid": os.getpid(), "host": socket.gethostname(),
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": self.command})
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._pid = fd, os.getpid()
        _HELD_FDS.add(fd)
        if self.previous:
            print(f"note: {self.path}: taking over the writer lock left by a process that ended without "
                  f"releasing it ({describe_holder(self.previous)})", file=sys.stderr)
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (removed first, while still held, so no one else's)."""
        if not self.held:
            return
        try:
            if _same_file(self._fd, self.path):
                self.path.unlink(missing_ok=True)
        finally:
            _HELD_FDS.discard(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def describe_holder(holder: dict[str, Any]) -> str:
    """``pid 123 on host h since ..., running 'cmd'`` from a lock record (whatever of it is there)."""
    if not holder:
        return "holder not recorded yet"
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    text = f"pid {pid} on host {host}"
    if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        text += " (no longer running)"
    if holder.get("started"):
        text += f" since {holder['started']}"
    if holder.get("command"):
        text += f", running {holder['command']!r}"
    return text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev)


def _read_record(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 65536).decode("utf-8", "replace")
        record = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_record(fd: int, record: dict[str, Any]) -> None:
    data = json.dumps(record).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _close_held_in_child() -> None:
    """In a forked child: close the inherited lock descriptors (the parent keeps its locks).

    ``WriterLock`` objects copied into the child say ``held`` False and release nothing.
    """
    for fd in _HELD_FDS:
        with contextlib.suppress(OSError):  # already closed in the child
            os.close(fd)
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_held_in_child)
