"""The writer lock of a store: one extraction at a time per store, readers never wait.

``writer_lock(location)`` takes an exclusive ``flock`` on ``<store>.lock``, a file beside the store
(beside a ``.zarr`` directory or an ``.h5`` file, so Zarr never sees a foreign file inside its
hierarchy). The kernel holds the lock for as long as the process lives and drops it when the
process dies, however it dies (``kill -9`` included), so a lock file left by a killed writer is
never mistaken for a running one: the next writer takes it over and says so. The file holds JSON
(pid, host, start time, command) only to name the holder in the refusal message.

The refusal names the process that holds the ``flock`` now, never a dead one: the holder writes its
record just *after* taking the lock, so a refused writer may find no record yet, or the record of a
killed earlier holder. Where ``/proc/locks`` lists the lock, the kernel says which pid holds it and
the record is believed only when it names that pid; elsewhere a record is believed when its pid
runs. A refused writer reads again for up to ``HOLDER_WAIT_S`` until the record is believable, then
names what it knows: the kernel's pid ("details not recorded yet") or "holder not known yet".

* A second writer is refused at once with :class:`StoreLockedError` naming the running process and
  the lock file; it never waits.
* The lock is taken before a new store is created, so two processes creating the same store are
  serialised: the second is refused; nothing is created twice.
* Processes forked while the lock is held (decode workers) close their copy of the descriptor, so
  only the process that took the lock holds it; ``exec``'d children never inherit it.
* Readers (``open_store(..., "r")``) take no lock.
* An ``s3://`` store's lock is an object beside it, ``<store>.lock``, created with a conditional
  PUT (``If-None-Match: *``): of two writers starting at once, S3 lets exactly one create it, and the
  other is refused naming the holder. Object storage does not drop the lock when its holder dies: a
  record left by a process of this host that no longer runs is taken over (a PUT conditional on
  that record's ETag, so two writers cannot both take it over); one left by another host is
  refused with the command that removes it. Servers without conditional writes ignore the
  condition (no exclusion there, as before). Other URLs (``memory://``, ``gs://``...) get no lock
  (a no-op lock). ``file://`` URLs are local paths.
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
from typing import TYPE_CHECKING, Any

from featurestore.errors import FeatureStoreError

if TYPE_CHECKING:
    from featurestore.store._remote_lock import RemoteLock

__all__ = ["HOLDER_WAIT_S", "LOCK_SUFFIX", "REMOTE_LOCK_SCHEMES", "StoreLockedError", "WriterLock", "current_holder",
           "lock_path", "writer_lock"]

LOCK_SUFFIX = ".lock"
#: URL schemes whose stores get a lock object (``_remote_lock``); other URLs get none.
REMOTE_LOCK_SCHEMES = ("s3", "s3a")
#: How long a refused writer waits for the holder to record itself (the time between its ``flock``
#: and its record: microseconds, unless the machine is loaded).
HOLDER_WAIT_S = 1.0
_HELD_FDS: set[int] = set()  # descriptors of the locks this process holds


class StoreLockedError(FeatureStoreError):
    """Another process holds the store's writer lock."""

    def __init__(self, store: str, lock_file: Path | str, holder: dict[str, Any]):
        self.store, self.lock_file, self.holder = store, lock_file, holder
        fix = "wait for it to finish or stop it, then rerun"
        if isinstance(lock_file, str):  # an object: nothing drops it when its holder dies elsewhere
            fix += f" (if it no longer runs, delete the lock object: aws s3 rm {lock_file})"
        super().__init__(f"{store} is being written by another process ({describe_holder(holder)}; lock "
                         f"{'object' if isinstance(lock_file, str) else 'file'} {lock_file}); {fix}")


def lock_path(location: str | os.PathLike) -> Path | None:
    """The lock file of a store location, or None for a remote URL (no lock is taken there).

    A store named through a symbolic link (``store.zarr -> /scratch/store.zarr``) gets the lock of the
    store the link names, so a writer using the link and one using the real path exclude each other."""
    text = os.fspath(location)
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        return None
    path = Path(text).absolute()
    if path.is_symlink():  # a link to a store locks the store it names: one lock however the store is named
        path = Path(os.path.realpath(path))
    return path.with_name(path.name + LOCK_SUFFIX)


def writer_lock(location: str | os.PathLike, command: str | None = None,
                storage_options: dict | None = None) -> WriterLock | RemoteLock:
    """The (not yet acquired) writer lock of ``location``; use it as a context manager.

    ``storage_options`` reach s3fs for an ``s3://`` store's lock object (as ``open_store``'s do)."""
    text = os.fspath(location)
    if "://" in text and text.split("://")[0] in REMOTE_LOCK_SCHEMES:
        from featurestore.store._remote_lock import RemoteLock

        return RemoteLock(text, command, storage_options)
    return WriterLock(lock_path(location), text, command)


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
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                try:
                    holder = current_holder(fd)
                finally:
                    os.close(fd)
                raise StoreLockedError(self.store, self.path, holder) from None
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
        return "holder not known yet"
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    text = f"pid {pid} on host {host}"
    if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
        text += " (no longer running)"
    if not holder.get("started") and not holder.get("command"):
        return text + " (details not recorded yet)"
    if holder.get("started"):
        text += f" since {holder['started']}"
    if holder.get("command"):
        text += f", running {holder['command']!r}"
    return text


def current_holder(fd: int, wait: float | None = None) -> dict[str, Any]:
    """The record of the process that holds the ``flock`` on ``fd``'s file (see the module docstring).

    Reads the record again for up to ``wait`` seconds (default ``HOLDER_WAIT_S``) while it is
    missing or names another process than the holder (a dead earlier holder's record, or a record
    half written). Then: ``{"pid", "host"}`` when the kernel named the holder, else ``{}``.
    """
    deadline = time.monotonic() + (HOLDER_WAIT_S if wait is None else wait)
    while True:
        pid = _kernel_holder(fd)
        record = _read_record(fd)
        if _names_holder(record, pid):
            return record
        if time.monotonic() >= deadline:
            return {"pid": pid, "host": socket.gethostname()} if pid is not None else {}
        time.sleep(0.02)


def _names_holder(record: dict[str, Any], kernel_pid: int | None) -> bool:
    """Whether ``record`` describes the process holding the lock now."""
    if not record:
        return False
    here = record.get("host") == socket.gethostname()
    if kernel_pid is not None:
        return here and record.get("pid") == kernel_pid
    pid = record.get("pid")
    return not here or (isinstance(pid, int) and _alive(pid))


def _kernel_holder(fd: int) -> int | None:
    """The pid holding a ``flock`` on ``fd``'s file, as ``/proc/locks`` lists it (Linux), else None.

    ``/proc/locks`` names a file by ``MAJOR:MINOR:INODE`` (hexadecimal device numbers) and lists only
    locks whose owner is visible in this pid namespace."""
    try:
        st = os.fstat(fd)
        with open("/proc/locks", encoding="ascii", errors="replace") as table:
            lines = table.read().splitlines()
    except OSError:
        return None
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()  # '1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF' ('->' marks a waiter)
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode and fields[4].isdigit():
            return int(fields[4]) or None
    return None


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
    """The JSON object at the start of the file ({} when there is none): a record being replaced
    may be followed by the tail of a longer old one until the file is truncated."""
    try:
        text = os.pread(fd, 65536, 0).decode("utf-8", "replace")
        record = json.JSONDecoder().raw_decode(text.lstrip())[0] if text.strip() else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_record(fd: int, record: dict[str, Any]) -> None:
    """Written over the old record, then cut to length: the file is never seen empty."""
    data = json.dumps(record).encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
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
