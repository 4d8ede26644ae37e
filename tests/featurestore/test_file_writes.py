"""The files of one write go in on a few threads (``_file_writes.FileWrites``) and stay whole.

What the threads must not change: the bytes of every shard and chunk (equal to those written on one
thread), the first failure raised (in the order the files were submitted) with every other file
whole or absent, a call that returns only after its last file, no thread left writing after an
error or Ctrl-C, and temp names no two writers share.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from featurestore import ClipRecord, Manifest, create_store, open_store
from featurestore.store import _file_writes, _shards, layout
from featurestore.store import clips as clips_module
from tests.featurestore.chunk_paths import chunk_files


def writer_threads() -> list[str]:
    """Writer threads still there (a thread that has signalled its end may take a moment to return)."""
    deadline = time.monotonic() + 2
    while True:
        names = [t.name for t in threading.enumerate() if t.name.startswith(("shard-write", "chunk-write", "store-write"))]
        if not names or time.monotonic() > deadline:
            return names
        time.sleep(0.01)


def _fill(path, threads: int, monkeypatch) -> dict[str, bytes]:
    """A store of 1,000 clips filled in two writes of several shards, on ``threads`` threads; the
    bytes of every file it holds."""
    monkeypatch.setattr(_file_writes, "write_threads", lambda: threads)
    for module in (layout, clips_module):  # index columns of eight chunks
        monkeypatch.setattr(module, "INDEX_CHUNK_ROWS", 128)
    clips = [ClipRecord(f"c{i:04d}", label=["a", "b"][i % 2], city=f"city{i % 3}") for i in range(1000)]
    values = np.random.default_rng(1).standard_normal((1000, 1, 48)).astype(np.float16)
    with create_store(path, Manifest("toy", ["a", "b"], clips)) as store:
        store.create_feature_set("emb", 1, (48,), {"model": "toy"}, chunk_clips=128)
        store.write_rows("emb", 0, values[:640])  # five shards in one write
        store.write_rows("emb", 640, values[640:])  # three, the last an edge shard
    with open_store(path) as store:
        assert np.array_equal(store.get_many("emb", [c.clip_id for c in clips]), values)
        assert store.column("city").tolist() == [f"city{i % 3}" for i in range(1000)]
    return {str(f.relative_to(path)): f.read_bytes() for f in path.rglob("*") if f.is_file()}


def test_files_written_on_several_threads_equal_those_written_on_one(tmp_path, monkeypatch):
    several = _fill(tmp_path / "several.zarr", 4, monkeypatch)
    one = _fill(tmp_path / "one.zarr", 1, monkeypatch)
    assert len(chunk_files(tmp_path / "several.zarr", "features/emb/data")) == 8
    assert len(chunk_files(tmp_path / "several.zarr", "index/city")) == 8
    assert several.keys() == one.keys()
    differing = [name for name in several if several[name] != one[name] and not name.endswith("zarr.json")]
    assert differing == [], differing  # (zarr.json files hold creation times and provenance)
    assert not writer_threads()


def test_a_failed_shard_raises_the_first_failure_and_records_the_others(tmp_path, monkeypatch):
    """Shard 1 of four fails while done rows are rewritten: the error names its file, shards 0, 2 and 3
    hold the new rows, shard 1 its old ones, whole, no done flag changes, the data version moves on,
    no writer thread is left, and the store reads the shards written since (not its cached view)."""
    monkeypatch.setattr(_file_writes, "write_threads", lambda: 2)
    real = _shards.replace_file

    def failing(path, parts):
        if "c.1." in os.path.basename(path):
            raise OSError(28, "No space left on device", path)
        real(path, parts)

    clips = [ClipRecord(f"c{i:04d}", label="a") for i in range(512)]
    first, second = np.ones((512, 1, 48), dtype=np.float16), np.full((512, 1, 48), 2, dtype=np.float16)
    with create_store(tmp_path / "s.zarr", Manifest("toy", ["a"], clips)) as store:
        store.create_feature_set("emb", 1, (48,), {"model": "toy"}, chunk_clips=128)
        store.write_rows("emb", 0, first)
        assert store.read_rows("emb", 0, 512)[0, 0, 0] == 1
        monkeypatch.setattr(_shards, "replace_file", failing)
        version = store.data_version("emb")
        with pytest.raises(OSError, match=r"No space left.*c\.1\.0\.0"):
            store.write_rows("emb", 0, second)
        assert store.data_version("emb", refresh=True) != version  # caches built on the old rows retire
        assert not writer_threads()
        monkeypatch.setattr(_shards, "replace_file", real)
        assert store.feature_info("emb").n_done == 512  # the done flags were not touched
        rows = store.read_rows("emb", 0, 512)[:, 0, 0]
        assert rows[128:256].tolist() == [1] * 128  # shard 1: the earlier file, whole
        assert set(rows[:128].tolist()) == set(rows[256:].tolist()) == {2}  # the others: their new files
    names = sorted(p.name for p in chunk_files(tmp_path / "s.zarr", "features/emb/data"))
    assert len(names) == 4 and not [n for n in os.listdir(tmp_path / "s.zarr/features/emb/data") if "partial" in n]


def test_file_writes_raise_the_first_failure_in_submit_order_after_every_write():
    """The second write fails at once, the first fails later: the first's error is raised, and only
    once the slow third write has finished."""
    finished: list[str] = []

    def job(name: str, delay: float, error: bool) -> None:
        time.sleep(delay)
        finished.append(name)
        if error:
            raise ValueError(name)

    writes = _file_writes.FileWrites(3)
    with pytest.raises(ValueError, match="first"):
        with writes:
            writes.submit(job, "first", 0.05, True)
            writes.submit(job, "second", 0.0, True)
            writes.submit(job, "third", 0.15, False)
    assert sorted(finished) == ["first", "second", "third"]


def test_file_writes_run_side_by_side(monkeypatch):
    """Two writes of one call overlap: the first waits for an event only the second sets (on one
    thread this would time out)."""
    monkeypatch.setattr(_file_writes, "write_threads", lambda: 2)
    started = threading.Event()
    with _file_writes.FileWrites(2) as writes:
        waited = writes.submit(started.wait, 10)
        writes.submit(started.set)
    assert waited.result() is True


def test_an_error_in_the_caller_cancels_writes_not_started_and_waits_for_the_running_ones(monkeypatch):
    monkeypatch.setattr(_file_writes, "write_threads", lambda: 2)
    ran: list[int] = []
    started, gate = threading.Semaphore(0), threading.Event()

    def job(i: int) -> None:
        started.release()
        gate.wait(10)
        time.sleep(0.05)
        ran.append(i)

    with pytest.raises(KeyboardInterrupt):
        with _file_writes.FileWrites(10) as writes:
            for i in range(10):
                writes.submit(job, i)
            assert started.acquire(timeout=10) and started.acquire(timeout=10)  # two are running
            gate.set()
            raise KeyboardInterrupt  # what Ctrl-C raises in the caller's thread
    assert sorted(ran) == [0, 1]  # the two running when it came ended; none started after
    assert not writer_threads()


def test_one_write_runs_in_the_callers_thread(monkeypatch):
    monkeypatch.setattr(_file_writes, "write_threads", lambda: 4)
    with _file_writes.FileWrites(1) as writes:
        ident = writes.submit(threading.get_ident)
    assert ident.result() == threading.get_ident()
    monkeypatch.setattr(_file_writes, "write_threads", lambda: 1)  # one core: every write inline
    with pytest.raises(OSError, match="gone"):
        with _file_writes.FileWrites(5) as writes:
            for _ in range(5):
                writes.submit(threading.get_ident)
            writes.submit(os.stat, "/gone")
            writes.submit(threading.get_ident)
    assert {f.result() for f in writes._futures if f.exception() is None} == {threading.get_ident()}


def test_write_threads_follow_the_cores_up_to_the_cap(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert _file_writes.write_threads() == _file_writes.MAX_WRITE_THREADS
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert _file_writes.write_threads() == 1


def test_temp_names_differ_across_calls_threads_and_forked_children():
    names = [_file_writes._temp_name() for _ in range(1000)]
    from_threads: list[str] = []
    workers = [threading.Thread(target=lambda: from_threads.extend(_file_writes._temp_name() for _ in range(500)))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its names must not repeat the parent's next ones
        os.write(write, " ".join(_file_writes._temp_name() for _ in range(10)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        child = pipe.read().split()
    parent_next = [_file_writes._temp_name() for _ in range(10)]
    everything = names + from_threads + child + parent_next
    assert len(everything) == 3020 and len(set(everything)) == len(everything)


def test_ctrl_c_while_waiting_for_the_writes_still_waits_for_the_running_ones(monkeypatch):
    """A real SIGINT while the caller waits on leaving the block: the running writes end before the
    KeyboardInterrupt leaves it, the ones not started never start. (CPython 3.11's ``Thread.join``,
    interrupted so, takes a running thread for stopped: the wait must not rest on it.)"""
    monkeypatch.setattr(_file_writes, "write_threads", lambda: 2)
    ran: list[int] = []

    def job(i: int) -> None:
        time.sleep(0.4)
        ran.append(i)

    threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):
        with _file_writes.FileWrites(6) as writes:
            for i in range(6):
                writes.submit(job, i)
    assert sorted(ran) == [0, 1]
    assert not writer_threads()
