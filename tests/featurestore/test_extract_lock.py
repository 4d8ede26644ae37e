"""One writer per store: a second extraction is refused naming the running one (even before it has
recorded itself in the lock file), two creators of a new store do not collide, a lock left by a
killed writer is taken over, and readers never wait and see only finished clips. Every writer here
is a real process."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from tests.featurestore.fault_support import (
    done_total, finish, kill_group, one_error_line, start_child, wait_stopped,
)
from tests.featurestore.test_extract_support import assert_same_arrays, make_dataset, read_all

from featurestore.cli import run_command
from featurestore.extract import extract
from featurestore.store import open_store
from featurestore.store.lock import StoreLockedError, WriterLock, lock_path, writer_lock

N_CLIPS = 16
#: Two feature sets of different chunk sizes; the second is parameter-free (stored frames), so the
#: child processes skip timm's import (about 2 s of CPU each): which encoder writes is not what is tested.
ENCODERS = "logmel,frames/32"
OPTIONS = dict(device="cpu", batch_size=4, num_workers=0, chunk_clips={"logmel": 2, "frames/32": 8},
               progress=False)
CHILD_OPTIONS = dict(encoders=ENCODERS, **OPTIONS)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("lockdata")
    return make_dataset(root / "data", N_CLIPS)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """The arrays of an uninterrupted run, by nobody else disturbed."""
    path = tmp_path_factory.mktemp("lockref") / "ref.zarr"
    extract(dataset, path, ENCODERS, **OPTIONS)
    return read_all(path)


# ------------------------------------------------------------------------------ the lock itself
def test_lock_refuses_a_second_holder_and_takes_over_a_file_whose_holder_is_gone(tmp_path):
    store = tmp_path / "s.zarr"
    with writer_lock(store, command="first") as first:
        record = json.loads(lock_path(store).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(StoreLockedError) as refused:
            writer_lock(store, command="second").acquire()  # another descriptor: refused even here
        message = str(refused.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
        assert str(lock_path(store)) in message and "'first'" in message and "\n" not in message
        assert first.held
    assert not lock_path(store).exists()  # released: removed

    # a lock file whose writer is gone (flock not held), naming a pid that runs (1): taken over
    lock_path(store).write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": "old"}))
    lock = WriterLock(lock_path(store), str(store)).acquire()
    assert lock.previous == {"pid": 1, "host": "elsewhere", "command": "old"}
    lock.release()


def test_a_forked_child_does_not_keep_the_lock_after_its_parent_is_killed(tmp_path):
    """Decode workers are forked while the lock is held: when the writer dies, they must not hold it."""
    store = tmp_path / "s.zarr"
    # the parent dies only once the child runs (its at-fork handlers done): a child not yet scheduled
    # on a loaded machine would still share the parent's descriptor, which is not the case tested
    code = ("import os, signal, sys, time\n"
            "from featurestore.store.lock import writer_lock\n"
            "writer_lock(sys.argv[1]).acquire()\n"
            "if os.fork() == 0:\n"
            "    open(sys.argv[2], 'w').close(); time.sleep(60); os._exit(0)\n"
            "while not os.path.exists(sys.argv[2]):\n"
            "    time.sleep(0.005)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(store), str(tmp_path / "child-runs")],
                            start_new_session=True)
    try:
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        assert lock_path(store).exists()  # left behind by the killed holder; its child still runs
        lock = writer_lock(store).acquire()
        assert lock.previous["pid"] == proc.pid
        lock.release()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


def test_remote_urls_take_no_lock():
    assert lock_path("memory://x") is None and lock_path("s3://bucket/x.zarr") is None
    assert lock_path("file:///tmp/x.zarr") == lock_path("/tmp/x.zarr")
    with writer_lock("memory://x") as lock:
        assert not lock.held


# ------------------------------------------------------------------------------ with extraction
@pytest.mark.slow
def test_a_second_writer_is_refused_and_readers_see_only_finished_clips(dataset, reference, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    proc = start_child(tmp_path / "child", dataset, store, CHILD_OPTIONS, signal_at="STOP:6")
    try:
        wait_stopped(proc)
        # a reader in the middle of the run: no lock, no wait, only done clips, already final values
        with open_store(store, "r") as fs:
            seen = {name: (fs.read_rows(name, 0, fs.n_clips, check_done=False), fs.done_mask(name))
                    for name in fs.feature_sets()}
            if seen["logmel"][1].any():
                fs.get_many("logmel", [fs.clip_ids[i] for i in np.flatnonzero(seen["logmel"][1])])
        assert 0 < sum(int(m.sum()) for _, m in seen.values()) < 2 * N_CLIPS

        t0 = time.monotonic()
        with pytest.raises(StoreLockedError) as refused:
            extract(dataset, store, ENCODERS, **OPTIONS)
        assert time.monotonic() - t0 < 10  # at once, before any encoder is built
        message = str(refused.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in message
        assert str(lock_path(store)) in message

        code = run_command("featurestore", "extract", lambda: extract(dataset, store, ENCODERS, **OPTIONS).exit_code)
        assert code == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"pid {proc.pid}" in line and "being written by another process" in line
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
    code, err = finish(proc)
    assert code == 0, err

    final = read_all(store)
    assert_same_arrays(final, reference)
    for name, (data, mask) in seen.items():  # what the reader saw done is what the run ended with
        np.testing.assert_array_equal(data[mask].view(np.uint16), final[name][0][mask].view(np.uint16))
    assert not lock_path(store).exists()


@pytest.mark.slow
def test_two_runs_creating_the_same_store_at_once_do_not_collide(dataset, reference, tmp_path):
    store = tmp_path / "new.zarr"
    go = tmp_path / "go"
    procs = [start_child(tmp_path / "child", dataset, store, CHILD_OPTIONS, env={"TEST_GO_FILE": str(go)})
             for _ in range(2)]
    try:
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("go.ready-*"))) < 2:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "children did not start"
            time.sleep(0.02)
        go.touch()
        results = [finish(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                kill_group(p)
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    winner = next(p for p, (code, _) in zip(procs, results) if code == 0)
    refused = one_error_line(next(err for code, err in results if code == 2))
    # the holder, named by the kernel's lock table, even when the winner had not recorded itself yet
    assert f"pid {winner.pid} on host {socket.gethostname()}" in refused, refused
    assert str(lock_path(store)) in refused
    with open_store(store) as fs:
        assert fs.n_clips == N_CLIPS and fs.verify().ok  # created once, nothing doubled
    assert_same_arrays(read_all(store), reference)
    assert not list(tmp_path.glob(".new.zarr.creating-*")) and not lock_path(store).exists()


@pytest.mark.slow
def test_a_lock_left_by_a_killed_writer_is_taken_over(dataset, reference, tmp_path, capfd):
    store = tmp_path / "s.zarr"
    proc = start_child(tmp_path / "child", dataset, store, CHILD_OPTIONS, signal_at="KILL:6")
    code, err = finish(proc)
    assert code == -signal.SIGKILL, err
    assert json.loads(lock_path(store).read_text())["pid"] == proc.pid  # left behind
    assert done_total(store) >= 6

    summary = extract(dataset, store, ENCODERS, **OPTIONS)
    assert summary.exit_code == 0
    note = capfd.readouterr().err
    assert f"taking over the writer lock left by a process that ended without releasing it (pid {proc.pid}" in note
    assert "no longer running" in note
    assert not lock_path(store).exists()
    with open_store(store) as fs:
        assert fs.verify().ok
    assert_same_arrays(read_all(store), reference)


# ------------------------------------------------------- who holds it, when the holder has not said yet
HOLDER = """
import fcntl, json, os, socket, sys, time
from pathlib import Path
from featurestore.store.lock import _write_record  # before the flock: on a loaded machine the import
# alone can outlast the refused writer's wait for a record (HOLDER_WAIT_S), which is not the case tested
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
Path(sys.argv[2]).touch()  # locked: the record in the file is still the dead holder's
time.sleep(float(sys.argv[3]))
if float(sys.argv[3]) < 10:  # then records itself, as WriterLock does
    _write_record(fd, {"pid": os.getpid(), "host": socket.gethostname(), "command": "late holder"})
time.sleep(60)
"""


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("delay", [0.3, 60.0], ids=["records-late", "never-records"])
def test_a_refusal_names_the_holder_even_before_it_has_recorded_itself(tmp_path, delay):
    """The race of two creators, made deterministic: a holder takes the flock and records itself
    late (or not at all) over the record a killed earlier holder left. The refusal must name the
    process that holds the lock, never the dead one."""
    store = tmp_path / "s.zarr"
    dead = _dead_pid()
    lock_path(store).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "command": "killed run"}))
    locked = tmp_path / "locked"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_path(store)), str(locked), str(delay)])
    try:
        deadline = time.monotonic() + 60
        while not locked.exists():
            assert holder.poll() is None and time.monotonic() < deadline, "the holder did not start"
            time.sleep(0.01)
        t0 = time.monotonic()
        with pytest.raises(StoreLockedError) as refused:
            writer_lock(store).acquire()
        waited = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait()
    message = str(refused.value)
    assert f"pid {dead} " not in message and "killed run" not in message, message
    assert f"pid {holder.pid} on host {socket.gethostname()}" in message, message
    if delay < 10:
        assert "'late holder'" in message
    else:
        assert "(details not recorded yet)" in message
    assert waited < 10  # a bounded wait for the record, never for the lock
