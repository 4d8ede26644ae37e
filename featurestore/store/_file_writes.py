"""Files of a local store written whole (a temp file renamed over the old one), a few at a time.

Every file the store writes itself (shards, plain chunks, ``zarr.json``) is replaced whole, as
zarr's local store replaces it: a kill never leaves a torn file. The files of one write (a block's
shards, an index column's chunks, done flags) do not depend on each other, and copying bytes into the
page cache, like creating a file, is kernel work that releases the GIL. So :class:`FileWrites` hands
them to a few threads: on this 2-core VM a GB written as 8 MiB files took 0.24-0.25 s on one thread
and 0.14-0.19 s on two, and a new file's creation alone costs ~0.28 ms of kernel time here (~400 of
them for a million-clip store). A write returns only once every file of it is in place or has failed.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import queue
import threading
import uuid
from concurrent.futures import Future
from typing import Any, Callable

_IOV_MAX = 1024  # buffers per writev (POSIX's minimum IOV_MAX is 16; Linux and macOS take 1,024)
#: threads writing one call's files at most (more cores than this gained nothing measurable: the
#: copies share the memory bandwidth)
MAX_WRITE_THREADS = 4


def write_threads() -> int:
    """Threads for one write's files: the cores this process may run on, at most ``MAX_WRITE_THREADS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WRITE_THREADS, cores))


class FileWrites:
    """Runs the file writes of one call on a few threads; leaving the block waits for all of them.

    ``submit(fn, *args)`` returns a future; on leaving the ``with`` block every write has finished
    and the first failure, in the order the writes were submitted, is raised (the others' files are
    then in place or were never made: each is replaced whole, and every write is tried). An error
    or Ctrl-C in the block itself (or while leaving it) cancels the writes not started and waits for
    the running ones before it propagates, so no thread writes into the store after the call
    returns. The threads are started before any write is handed over (a pool that starts one per
    submit could leave a thread started under a Ctrl-C that it never joined). With one thread
    (``jobs`` <= 1, one core) each write runs at once in the caller's thread. Threads per call, not a
    pool per process: a forked worker (Dask) never inherits them.
    """

    def __init__(self, jobs: int, name: str = "store-write"):
        self._futures: list[Future] = []
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stops_sent = 0
        self._threads: list[threading.Event] = []  # each set when its thread has ended
        try:
            threads = min(int(jobs), write_threads())
            for i in range(threads if threads > 1 else 0):
                ended = threading.Event()
                self._threads.append(ended)  # before start: a Ctrl-C in start() leaves it started
                try:
                    threading.Thread(target=self._work, args=(ended,), name=f"{name}_{i}").start()
                except RuntimeError:  # no thread to be had: the others do the writes
                    self._threads.pop()
                    break
        except BaseException:  # Ctrl-C while starting them: the ones started end at once
            self._finish(cancel=True)
            raise

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._futures.append(future)
        if self._threads:
            self._queue.put((future, fn, args))
        else:
            _run(future, fn, args, Exception)
        return future

    def _work(self, ended: threading.Event) -> None:
        try:
            while (item := self._queue.get()) is not None:
                _run(*item)
        finally:
            ended.set()

    def _finish(self, cancel: bool) -> None:
        """Stop the threads once the writes handed over are done (or cancelled) and wait for them.

        Waits on an event each thread sets as it ends, not ``Thread.join``: CPython 3.11's join,
        interrupted by Ctrl-C, marks a running thread as stopped, so a second join returns at once."""
        if cancel:
            for future in self._futures:
                future.cancel()  # (a running or finished write is not cancelled)
        while self._stops_sent < len(self._threads):  # one None a thread (an extra one is harmless)
            self._queue.put(None)
            self._stops_sent += 1
        for ended in self._threads:
            ended.wait()

    def __enter__(self) -> FileWrites:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        try:
            self._finish(cancel=kind is not None)
        except BaseException:  # Ctrl-C while waiting: no new write starts, the running ones end
            self._finish(cancel=True)
            raise
        if kind is None:
            for future in self._futures:
                if future.exception() is not None:
                    raise future.exception()


def _run(future: Future, fn: Callable[..., Any], args: tuple, kept: type[BaseException] = BaseException) -> None:
    """Run one write into ``future`` unless it was cancelled; a failure of the ``kept`` kind is kept
    for the caller (in the caller's own thread a Ctrl-C is not: it stops the call at once)."""
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn(*args))
    except kept as err:
        future.set_exception(err)


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
    ``uuid4`` per file was a ``getrandom`` call each, and with other threads running each such call
    could wait for the GIL (~0.1 s of a million-clip fill)."""

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
