"""Ctrl-C with DataLoader worker processes (``featurestore._sigint``): real forked workers, real signals.

A Ctrl-C once printed a worker's traceback under load: the main thread, interrupted while it received
a batch's tensors from a worker (a file-descriptor handshake with a thread of the worker), dropped
the connection, and the worker's thread printed it. These tests put the SIGINT at chosen points,
never by timing: a token in the batch sends it while the batch is being unpickled.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from featurestore._sigint import iter_loader, join

_reached: list[str] = []  # what the main process has unpickled of the current batch, in order


def _reach(name: str) -> str:
    _reached.append(name)
    return name


class _Reached:
    """Unpickled (in the main process) as ``_reach(name)``: notes how far receiving got."""

    def __init__(self, name: str):
        self.name = name

    def __reduce__(self):
        return _reach, (self.name,)


class _CtrlC:
    """Unpickled as a SIGINT to ``pid``: Ctrl-C arriving halfway through receiving a batch."""

    def __init__(self, pid: int):
        self.pid = pid

    def __reduce__(self):
        return os.kill, (self.pid, signal.SIGINT)


class _Batches(Dataset):
    """Item i: tensors in shared memory (each received through a handshake with the worker), with
    a SIGINT to ``pid`` between the first and the second when ``pid`` is given."""

    def __init__(self, n: int, pid: int | None = None):
        self.n, self.pid = n, pid

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> list:
        middle = [_CtrlC(self.pid)] if self.pid else []
        return [_Reached("first"), torch.full((64,), float(i)), *middle, _Reached("second"),
                torch.full((64,), -float(i)), _Reached("end")]


def _unchanged(item):
    return item


def _loader(dataset: Dataset) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=1, collate_fn=_unchanged)


def _sigint_blocked(pid: int) -> bool:
    """Whether ``pid``'s main thread blocks SIGINT (``SigBlk`` in /proc, a hex mask of signals 1..64)."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("SigBlk:"))
    return bool(int(line.split()[1], 16) >> (signal.SIGINT - 1) & 1)


@pytest.fixture()
def noting_handler():
    """A SIGINT handler that notes how far the batch had been received when it ran (instead of
    raising), so the test sees the batch too; the previous handler is put back afterwards."""
    calls: list[list[str]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(list(_reached)))
    yield calls
    signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_while_a_batch_is_received_waits_until_the_batch_is_whole(noting_handler, capfd):
    """The SIGINT sent between the batch's two tensors reaches the handler only once all of it
    arrived (before the fix the handler ran at once, between them), and nothing is printed."""
    batches = iter_loader(_loader(_Batches(2, pid=os.getpid())))
    for i in range(2):
        _reached.clear()
        batch = next(batches)
        assert noting_handler[i] == ["first", "second", "end"]
        assert [x[0].item() if isinstance(x, torch.Tensor) else x for x in batch] == [
            "first", float(i), None, "second", -float(i), "end"]  # None: what os.kill returned
    del batches
    assert "Traceback" not in capfd.readouterr().err


@pytest.fixture()
def python_handler():
    """Python's own SIGINT handler (KeyboardInterrupt), whatever the test runner installed."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_while_a_batch_is_received_is_raised_after_it_and_the_workers_end_quietly(python_handler, capfd):
    """With Python's own handler the held Ctrl-C is a KeyboardInterrupt once the batch is whole;
    the loader then shuts its worker down without a word, and Ctrl-C is not held any more."""
    loader = _loader(_Batches(3, pid=os.getpid()))
    batches = iter_loader(loader)
    _reached.clear()
    with pytest.raises(KeyboardInterrupt):
        next(batches)
    assert _reached == ["first", "second", "end"]
    worker = batches._batches._workers[0]
    del batches
    worker.join(timeout=30)
    assert worker.exitcode == 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert "Traceback" not in capfd.readouterr().err


def test_workers_are_forked_deaf_to_ctrl_c_and_this_process_is_not(python_handler, capfd):
    """A SIGINT to a worker (what Ctrl-C sends the whole process group) leaves it working: it is
    blocked there from the fork on, so no worker prints ``KeyboardInterrupt`` while it starts or
    drops a batch; this process still takes SIGINT, with its handler as it was."""
    batches = iter_loader(_loader(_Batches(3)))
    worker = batches._batches._workers[0]
    assert _sigint_blocked(worker.pid) and not _sigint_blocked(os.getpid())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    os.kill(worker.pid, signal.SIGINT)  # one that took it would quit: torch's "worker exited unexpectedly"
    assert [batch[1][0].item() for batch in batches] == [0.0, 1.0, 2.0]
    assert "Traceback" not in capfd.readouterr().err


def test_a_ctrl_c_another_thread_took_reaches_the_main_thread_while_it_waits_for_that_thread(python_handler):
    """A SIGINT taken by a busy thread (after SIGSTOP/SIGCONT any thread of the group may take it)
    while the main thread joins that thread: a KeyboardInterrupt while the thread still runs. A
    plain ``join`` raised it only once the thread ended (here after 3 s; an extraction's writer
    thread: after the whole run, or at exit)."""
    go, stop, ended = threading.Event(), threading.Event(), threading.Event()

    def busy() -> None:
        go.wait()
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        deadline = time.monotonic() + 3
        while not stop.is_set() and time.monotonic() < deadline:
            sum(range(1000))
        ended.set()

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            go.set()
            join(thread)
        assert not ended.is_set()
    finally:
        stop.set()
        ended.wait(10)
