"""Resource faults during extraction, injected for real: a decode worker killed, /dev/shm full or a
file-size limit in a decode worker, the store's disk full (a small tmpfs), a file-size limit on the
store's writes. Each run must stop with one line naming the store and the cause and a non-zero exit
code (never a traceback, never a hang), leave a store that verifies, and resume to the arrays of a
clean run."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
from functools import partial

import pytest
from tests.featurestore.fault_support import (
    done_total, finish, forked_children, one_error_line, start_child, wait_stopped,
)
from tests.featurestore.test_extract_support import assert_same_arrays, make_dataset, read_all
from tests.warm_child import file_size_limit, ignore_sigxfsz

from featurestore.extract.buffer_pool import SLOTS_ENV
from featurestore.extract.errors import StoreWriteError
from featurestore.extract.pipeline import _loader_reason
from featurestore.cli import run_command
from featurestore.extract import extract
from featurestore.store import open_store

N_CLIPS = 16
ENCODERS = "logmel"
OPTIONS = dict(device="cpu", batch_size=2, num_workers=0, chunk_clips=2, progress=False)
WORKER_OPTIONS = dict(OPTIONS, encoders=ENCODERS, num_workers=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("faultdata") / "data", N_CLIPS)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    path = tmp_path_factory.mktemp("faultref") / "ref.zarr"
    extract(dataset, path, ENCODERS, **OPTIONS)
    return read_all(path)


def _resumes_to_reference(dataset, store, reference) -> None:
    """The stopped store verifies; a rerun completes it to exactly the clean run's arrays."""
    with open_store(store) as fs:
        report = fs.verify()
        assert report.ok, report.problems
    assert extract(dataset, store, ENCODERS, **OPTIONS).exit_code == 0
    assert_same_arrays(read_all(store), reference)


# --------------------------------------------------------------------------------- decode workers
@pytest.mark.parametrize("torch_text, ours", [
    ("DataLoader worker (pid 12) is killed by signal: Killed.", "a decode worker (pid 12) was killed by signal: Killed"),
    ("DataLoader worker (pid(s) 12) exited unexpectedly", "a decode worker (pid 12) exited unexpectedly"),
    ("DataLoader worker (pid(s) 12, 13) exited unexpectedly", "a decode worker (pid(s) 12, 13) exited unexpectedly"),
])
def test_both_of_torchs_wordings_of_a_dead_worker_name_its_pid_the_same_way(torch_text, ours):
    """torch says either, depending on which of its checks sees the death first (a race)."""
    assert _loader_reason(RuntimeError(torch_text)) == ours


@pytest.mark.slow
def test_a_decode_worker_killed_with_sigkill_stops_the_run_with_one_line(dataset, reference, tmp_path):
    store = tmp_path / "s.zarr"
    proc = start_child(tmp_path / "child", dataset, store, WORKER_OPTIONS, signal_at="STOP:4")
    try:
        wait_stopped(proc)
        workers = forked_children(proc.pid)
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
    code, err = finish(proc, timeout=60)
    assert code == 1, err
    line = one_error_line(err)
    # torch names the worker when its SIGCHLD handler reports it; when the death is seen first as a
    # batch that cannot be received, the line says so without a pid (seen on a loaded machine)
    named = f"decode worker (pid {workers[0]})" in line or "a decode worker died" in line
    assert str(store) in line and named and "rerun to resume" in line, line
    assert 4 <= done_total(store) < N_CLIPS
    _resumes_to_reference(dataset, store, reference)


@pytest.mark.slow
def test_a_file_size_limit_in_a_decode_worker_stops_the_run_with_one_line(dataset, reference, tmp_path):
    """RLIMIT_FSIZE set on the running worker (SIGXFSZ ignored, so the write fails with EFBIG): its
    next batch cannot go into shared memory. Before, the DataLoader's queue thread printed that
    error and dropped the batch, and the run waited for it for ever."""
    store = tmp_path / "s.zarr"
    # a worker that reuses its shared buffers needs no new shared memory after its first batches:
    # the limit bites on fresh shared memory, which this run uses for every batch
    proc = start_child(tmp_path / "child", dataset, store, WORKER_OPTIONS, signal_at="STOP:2",
                       preexec_fn=ignore_sigxfsz, env={SLOTS_ENV: "0"})
    try:
        wait_stopped(proc)
        (worker,) = forked_children(proc.pid)
        resource.prlimit(worker, resource.RLIMIT_FSIZE, (4096, 4096))
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
    code, err = finish(proc, timeout=60)
    assert code == 1, err
    line = one_error_line(err)
    assert str(store) in line and f"decode worker (pid {worker})" in line and "shared memory" in line
    assert "File too large" in line
    _resumes_to_reference(dataset, store, reference)


@pytest.mark.slow
def test_a_full_dev_shm_stops_the_run_with_one_line(dataset, reference, tmp_path):
    """The child runs in its own mount namespace with a 256 KiB /dev/shm (a decoded batch is larger)."""
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=256k tmpfs /dev/shm"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private /dev/shm here (needs root and unshare): {probe.stderr.strip()}")
    store = tmp_path / "s.zarr"
    proc = start_child(tmp_path / "child", dataset, store, WORKER_OPTIONS,
                       prefix=["unshare", "-m", "sh", "-c",
                               'mount -t tmpfs -o size=256k tmpfs /dev/shm && exec "$@"', "sh"])
    code, err = finish(proc, timeout=90)
    assert code == 1, err
    line = one_error_line(err)
    assert str(store) in line and "shared memory" in line and "No space left on device" in line
    _resumes_to_reference(dataset, store, reference)


# --------------------------------------------------------------------------------- store writes
@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs mounted for this test (root only), unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the disk-full test (needs root): {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt, leave: int) -> None:
    """Write a filler file so that about ``leave`` bytes stay free."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with open(mnt / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_disk_full_stops_with_one_line_and_a_rerun_after_freeing_space_completes(dataset, reference, small_disk,
                                                                                 capsys):
    store = small_disk / "s.zarr"
    assert extract(dataset, store, ENCODERS, limit=2, **OPTIONS).exit_code == 0  # index, feature set, 1 chunk
    _fill(small_disk, leave=600 * 1024)  # about three more chunks (~190 KiB each) fit
    with pytest.raises(StoreWriteError) as stopped:
        extract(dataset, store, ENCODERS, **OPTIONS)
    message = str(stopped.value)
    assert message.startswith(f"{store}: disk full while writing features/logmel rows ")
    assert message.endswith("; free space and rerun to resume") and "\n" not in message
    assert 2 < done_total(store) < N_CLIPS  # stopped in the middle, the chunks before are kept
    with open_store(store) as fs:
        assert fs.verify().ok

    # the same through the command line: exit 1, one line
    code = run_command("featurestore", "extract", lambda: extract(dataset, store, ENCODERS, **OPTIONS).exit_code)
    assert code == 1
    assert "disk full while writing features/logmel rows" in one_error_line(capsys.readouterr().err)

    (small_disk / "filler").unlink()
    _resumes_to_reference(dataset, store, reference)


@pytest.mark.slow
def test_a_file_size_limit_on_the_store_stops_with_one_line(dataset, reference, tmp_path):
    """RLIMIT_FSIZE of 64 KiB on the writer (SIGXFSZ ignored): a 190 KiB chunk does not fit."""
    store = tmp_path / "s.zarr"
    assert extract(dataset, store, ENCODERS, limit=2, **OPTIONS).exit_code == 0  # the index (256 KiB files)
    proc = start_child(tmp_path / "child", dataset, store, dict(OPTIONS, encoders=ENCODERS),
                       preexec_fn=partial(file_size_limit, 64 * 1024))
    code, err = finish(proc, timeout=90)
    assert code == 1, err
    line = one_error_line(err)
    assert f"{store}: file size limit exceeded while writing features/logmel rows 2:4" in line
    _resumes_to_reference(dataset, store, reference)
