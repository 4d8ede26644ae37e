"""Ctrl-C with DataLoader worker processes: the command's one line, never a worker's traceback.

Ctrl-C sends SIGINT to the whole foreground process group: the main process and every DataLoader
worker forked from it. Two races made that print a traceback now and then (issue 22 item 3, seen
under load):

* torch hands a batch's shared-memory tensors to the main process as file descriptors, through
  ``multiprocessing.resource_sharer``: to receive a batch, the main thread connects to a thread of
  the worker (an authenticated handshake, then the descriptor). A KeyboardInterrupt raised in the
  main thread halfway through drops that connection, and the worker's thread prints the broken
  connection's traceback (``ConnectionResetError`` in ``deliver_challenge``) unless that worker
  happens to be exiting already on its own SIGINT.
* a worker that takes the SIGINT while it starts (before torch's loop catches it) prints
  ``Process ...: KeyboardInterrupt`` with a traceback; one that exits on it while the main thread
  receives from it fails that receive as if the worker had died (a "decode worker died" error).

:func:`iter_loader` closes both, instead of making them rarer: the workers are forked with SIGINT
blocked, so they never see Ctrl-C (the main process shuts them down, as at the end of a run), and
the main thread holds a SIGINT that arrives while it receives a batch until the batch is whole,
then raises it. Each batch travels as ``(hold, batch, release)``: unpickling the first token holds
Ctrl-C, the last one releases it, so the hold lasts exactly as long as the receiving and never
covers the wait for a batch.

:func:`ignored_by_new_processes` does the same for processes that are started rather than forked
(Dask's ``local:N`` workers): they start with SIGINT ignored.

:func:`kept` closes a third: Python runs a signal's handler at its next check between bytecodes, and
when that falls inside a weakref finalizer or a ``__del__`` (the decode buffer pool frees a slot from
one, torch's iterators shut down from one), the KeyboardInterrupt it raises is printed as "Exception
ignored" and dropped: the run went on and ended with exit 0 (seen once in CI, in
``extract/buffer_pool.py``'s finalizer). Inside :func:`kept` every SIGINT handled is counted, and
:func:`raise_swallowed` (called by the work loop after each batch) and the end of the block raise a
KeyboardInterrupt for a SIGINT that was handled but never reached the caller.
"""
from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is not imported for this module's sake
    from torch.utils.data import DataLoader

_held = 0  # batches (or worker starts) the main thread is inside now
_pending: tuple[int, FrameType | None] | None = None  # a SIGINT that came while held
_previous: Any = None  # the SIGINT handler before the hold, called with the pending SIGINT on release
_counting: _Counting | None = None  # the handler of the innermost ``kept`` block, if any


def iter_loader(loader: DataLoader) -> Iterator[Any]:
    """``iter(loader)`` for a torch DataLoader, made safe for Ctrl-C (see the module docstring).

    With worker processes, wraps ``loader.collate_fn`` (once) so that each batch travels between
    the hold and release tokens, and forks the workers with SIGINT blocked. Without workers it is
    ``iter(loader)``. Off the main thread (where no KeyboardInterrupt is raised) nothing is held.
    """
    if not loader.num_workers:
        return iter(loader)
    if not isinstance(loader.collate_fn, _Bracketed):
        loader.collate_fn = _Bracketed(loader.collate_fn)
    return _Batches(_start_workers(loader))


def _start_workers(loader: DataLoader) -> Iterator[Any]:
    """``iter(loader)`` with SIGINT blocked in this thread while it forks (the workers inherit the
    mask, so they never get it; this process still does, in another thread or once unblocked) and
    held, so a Ctrl-C is raised once the iterator is whole (then dropped: torch's ``__del__`` shuts
    the workers down) rather than halfway through starting them."""
    _hold()
    try:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    finally:
        _release()


class _Batches:
    """The loader's batches, unwrapped from their tokens. A receive that failed halfway (a worker
    that died) leaves no hold behind: a Ctrl-C that came meanwhile is raised instead of that error."""

    def __init__(self, batches: Iterator[Any]):
        self._batches = batches

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> Any:
        try:
            item = next(self._batches)
        finally:
            _release(everything=True)
        return item[1]

    def close(self) -> None:
        """Shut the worker processes down now. Dropping the iterator is not enough while an exception
        propagates: its traceback keeps the frames that hold it, torch keeps the workers' pids
        registered, and torch's SIGCHLD handler then raises a killed worker's error in whatever line
        runs next (a lock's release, after the run's one-line error was already raised)."""
        shutdown = getattr(self._batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class _Bracketed:
    """A collate function whose batches go out as ``(hold, batch, release)`` (picklable: a worker
    started by spawn or forkserver receives it too)."""

    def __init__(self, collate_fn: Callable[[Any], Any]):
        self.collate_fn = collate_fn

    def __call__(self, data: Any) -> tuple[_Token, Any, _Token]:
        return (_HOLD, self.collate_fn(data), _RELEASE)


class _Token:
    """Calls ``action`` in the process that unpickles it (and is unpickled as None)."""

    def __init__(self, action: Callable[[], None]):
        self.action = action

    def __reduce__(self) -> tuple[Callable[[], None], tuple]:
        return self.action, ()


def _hold() -> None:
    """From now on a SIGINT is noted, not raised, until ``_release`` (main thread only; a handler
    that is not a Python callable, SIG_IGN or SIG_DFL, is left alone: nothing to print there)."""
    global _held, _previous
    if threading.current_thread() is not threading.main_thread():
        return
    if _held == 0:
        previous = signal.getsignal(signal.SIGINT)
        if not callable(previous) or previous is _note:
            return
        signal.signal(signal.SIGINT, _note)  # runs a SIGINT that came before this under the old handler
        _previous = previous
    _held += 1


def _release(everything: bool = False) -> None:
    """End one hold (``everything``: all of them); at the last, put the old handler back and give
    it the SIGINT that came meanwhile (``default_int_handler`` raises KeyboardInterrupt)."""
    global _held, _pending, _previous
    if _held == 0 or threading.current_thread() is not threading.main_thread():
        return
    _held = 0 if everything else _held - 1
    if _held:
        return
    previous, _previous = _previous, None
    signal.signal(signal.SIGINT, previous)  # a SIGINT not yet handled is noted by _note first
    pending, _pending = _pending, None
    if pending is not None:
        previous(*pending)


def _note(signum: int, frame: FrameType | None) -> None:
    global _pending
    _pending = (signum, frame)


_HOLD, _RELEASE = _Token(_hold), _Token(_release)


def check_pending() -> None:
    """Run now, in the main thread, the Python handlers of signals another thread took.

    CPython (3.11) runs a signal's handler in the main thread at its next check of the interpreter's
    "eval breaker"; a thread other than the main one that took the signal may clear the breaker, and
    a main thread that only waits (a join, a queue) then runs the handler once that thread ends, or
    at exit: Ctrl-C that a writer thread took was a KeyboardInterrupt only after the whole run (exit
    0 and a traceback from a finalizer, seen under load after SIGSTOP/SIGCONT, where any thread may
    take the group's SIGINT). ``pthread_sigmask`` runs pending handlers when it returns. Elsewhere
    than the main thread (no handler runs there) nothing happens."""
    if hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, ())


def join(thread: threading.Thread, poll: float = 0.1) -> None:
    """``thread.join()`` in which a Ctrl-C is a KeyboardInterrupt within ``poll`` seconds, whichever
    thread took the signal (see :func:`check_pending`)."""
    while thread.is_alive():
        thread.join(poll)
        check_pending()


@contextmanager
def ignored_by_new_processes() -> Iterator[None]:
    """Processes started (fork + exec) inside start with SIGINT ignored: an ignored signal stays ignored
    across exec, where a handled one is reset. For Dask's ``local:N`` worker processes: Ctrl-C reaches
    the whole process group, and a worker that took it printed its own KeyboardInterrupt traceback and
    died mid-task before the command's one line; the command handles Ctrl-C and closes the cluster.
    Only in the main thread (where signal handlers are set); elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _Counting:
    """A SIGINT handler that counts each SIGINT, then hands it to the handler it replaced (which raises
    KeyboardInterrupt), so that a KeyboardInterrupt Python dropped can be told from none."""

    def __init__(self, previous: Callable[[int, FrameType | None], Any]):
        self.previous = previous
        self.handled = 0  # SIGINTs handled since the block began
        self.raised = 0  # of those, the ones known to have reached the caller

    def __call__(self, signum: int, frame: FrameType | None) -> Any:
        self.handled += 1
        return self.previous(signum, frame)


@contextmanager
def kept() -> Iterator[None]:
    """A block in which a Ctrl-C that Python swallowed (in a finalizer, see the module docstring) is
    still a KeyboardInterrupt: at the next :func:`raise_swallowed`, or when the block ends. Only in the
    main thread, and only over a Python handler (SIG_IGN and SIG_DFL are left alone)."""
    global _counting
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous) \
            or isinstance(previous, _Counting) or previous is _note:
        yield
        return
    counting, outer, hook = _Counting(previous), _counting, sys.unraisablehook
    signal.signal(signal.SIGINT, counting)
    _counting, sys.unraisablehook = counting, _QuietInterrupts(hook)
    try:
        yield
        raise_swallowed()
    finally:
        _counting, sys.unraisablehook = outer, hook
        if signal.getsignal(signal.SIGINT) is counting:
            signal.signal(signal.SIGINT, previous)


class _QuietInterrupts:
    """``sys.unraisablehook`` that leaves out the "Exception ignored ... KeyboardInterrupt" report
    (the interrupt is raised again, and the command prints its one line); others go to ``hook``."""

    def __init__(self, hook: Callable[[Any], Any]):
        self.hook = hook

    def __call__(self, unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            self.hook(unraisable)


def raise_swallowed() -> None:
    """Raise KeyboardInterrupt if a SIGINT handled inside the current :func:`kept` block raised one
    that never came out (cheap: called once per batch). One that did come out ended the block's work
    before this call, so every SIGINT counted and not yet raised here is one that was dropped."""
    counting = _counting
    if counting is not None and counting.handled > counting.raised:
        counting.raised = counting.handled
        raise KeyboardInterrupt
