"""What a Dask extraction run reports when its workers die, and when the driver is stopped at awkward
moments, on one real two-process LocalCluster shared by the module (log-mel only, tiny clips): the
summary counts each row this run wrote once, as a local run's summary of the same store does."""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import pytest
from tests.featurestore.test_extract_support import assert_same_arrays, make_dataset, read_all
from tests.featurestore.test_hostile_dask import N_CLIPS, ONE_PER_CHUNK, KillOnWrite, SlowWrites
from tests.featurestore.test_hostile_dask import client  # noqa: F401 - the module's own cluster

from featurestore.extract import extract
from featurestore.extract.dask import TASKS_PER_THREAD, connect, group_blocks, run_task
from featurestore.extract.errors import ExtractionInterrupted, ExtractionStopped
from featurestore.store import open_store

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """N_CLIPS tiny clips (read-only), the arrays of their uninterrupted local log-mel extraction, and
    a store where a local run extracted the first clip only."""
    tmp = tmp_path_factory.mktemp("dask_counts")
    manifest = make_dataset(tmp / "data", N_CLIPS)
    extract(manifest, tmp / "clean.zarr", "logmel", **ONE_PER_CHUNK)
    extract(manifest, tmp / "started.zarr", "logmel", limit=1, **ONE_PER_CHUNK)
    return SimpleNamespace(manifest=manifest, clean=read_all(tmp / "clean.zarr"), started=tmp / "started.zarr")


@pytest.fixture()
def plugin(client, tmp_path):
    """Registers a worker plugin for one test and removes it (and what it patched) afterwards."""
    names = []

    def register(p) -> None:
        names.append(f"{type(p).__name__}-{tmp_path.name}")
        client.register_plugin(p, name=names[-1])

    yield register
    for name in names:
        client.unregister_worker_plugin(name)


def _second_block_of_a_task(client, first: int = 0, last: bool = False) -> int:
    """The row of the second block of the first (or ``last``) task that holds several blocks, when
    rows ``first``.. are to do."""
    threads = sum(client.nthreads().values())
    groups = group_blocks([(r, r + 1) for r in range(first, N_CLIPS)], threads * TASKS_PER_THREAD)
    several = [g[1][0] for g in groups if len(g) >= 2]
    return several[-1 if last else 0]


def test_a_retried_task_counts_the_rows_its_killed_attempt_wrote_as_written(client, dataset, plugin, tmp_path):
    """The worker running a two-block task dies writing its second row, after its first was done;
    Dask retries the task, which writes only the second. ``written`` counted the retry's rows alone
    (8 of the 9 rows this run wrote), unlike the clips count and a local run of the same store."""
    manifest = dataset.manifest
    local, remote = tmp_path / "local.zarr", tmp_path / "dask.zarr"
    shutil.copytree(dataset.started, local)
    shutil.copytree(dataset.started, remote)
    expected = extract(manifest, local, "logmel", **ONE_PER_CHUNK)
    marker = tmp_path / "killed"
    plugin(KillOnWrite(_second_block_of_a_task(client, first=1), str(marker)))

    summary = extract(manifest, remote, "logmel", scheduler=client, **ONE_PER_CHUNK)
    assert marker.exists(), "the worker was not killed"
    assert summary.exit_code == 0
    assert summary.features["logmel"] == expected.features["logmel"]
    assert (summary.features["logmel"].written, summary.features["logmel"].skipped) == (N_CLIPS - 1, 1)
    assert (summary.clips_done, summary.clips_skipped) == (expected.clips_done, expected.clips_skipped)
    assert_same_arrays(read_all(remote), read_all(local))


class LogTaskStarts(distributed.WorkerPlugin):
    """Appends the key of every extraction task a worker starts to ``log`` (a file: workers die)."""

    def __init__(self, log: str):
        self.log = log

    def transition(self, key, start: str, finish: str, **kwargs) -> None:
        if finish == "executing" and str(key).startswith("run_task"):
            with open(self.log, "a") as f:
                f.write(f"{key}\n")


def test_a_one_worker_cluster_whose_worker_dies_retries_the_task_alone(dataset, tmp_path):
    """The worker of a one-worker cluster dies in the last task, after it finished the others.

    The plan was scattered to the workers, and data scattered lives nowhere else: Dask cancelled every
    task and the run ended in a traceback, "FutureCancelledError: run_task-... cancelled for reason:
    already forgotten". And the driver held every task's future to the end of the run, so Dask ran
    again the tasks that had finished on the dead worker (their results were lost with it): tasks the
    driver neither counted nor waited for (they re-extracted the run's failed clips, and could write
    after the run had released its lock). Now the plan is computed again like any task's result, each
    future is released once read, and only the killed task runs twice."""
    marker, log = tmp_path / "killed", tmp_path / "starts.log"
    with pytest.MonkeyPatch.context() as mp, ExitStack() as stack:
        mp.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
        one = connect("local:1", stack)
        one.register_plugin(LogTaskStarts(str(log)), name="log")
        one.register_plugin(KillOnWrite(_second_block_of_a_task(one, last=True), str(marker)), name="kill")
        summary = extract(dataset.manifest, tmp_path / "s.zarr", "logmel", scheduler=one, **ONE_PER_CHUNK)
    assert marker.exists(), "the worker was not killed"
    assert summary.exit_code == 0 and summary.clips_done == N_CLIPS
    starts = log.read_text().split()
    assert sorted(starts.count(key) for key in set(starts)) == [1] * (len(set(starts)) - 1) + [2], starts
    assert_same_arrays(read_all(tmp_path / "s.zarr"), dataset.clean)


def _done_rows(store: Path) -> int:
    with open_store(store) as fs:
        return int(fs.done_mask("logmel", refresh=True).sum())


def test_ctrl_c_while_tasks_are_submitted_stops_those_already_running(client, dataset, plugin, tmp_path,
                                                                     monkeypatch):
    """Ctrl-C came while the driver was still submitting tasks (the third of eight), with the first two
    running: the futures made so far were dropped unwaited, and their tasks went on writing into the
    store after the run had returned and released its lock."""
    marker = tmp_path / "writing"
    plugin(SlowWrites(1.0, str(marker)))
    submit, calls = client.submit, []

    def interrupted_submit(fn, *args, **kwargs):
        if fn is run_task:
            calls.append(fn)
            if len(calls) == 3:  # Ctrl-C here, once the tasks submitted before are writing
                deadline = time.monotonic() + 30
                while not marker.exists() and time.monotonic() < deadline:
                    time.sleep(0.02)
                raise KeyboardInterrupt
        return submit(fn, *args, **kwargs)

    monkeypatch.setattr(client, "submit", interrupted_submit)
    store = tmp_path / "s.zarr"
    with pytest.raises(ExtractionInterrupted):
        extract(dataset.manifest, store, "logmel", scheduler=client, **ONE_PER_CHUNK)
    at_return = _done_rows(store)
    time.sleep(2.5)  # longer than what a running task has left to write (one block, 1 s)
    assert _done_rows(store) == at_return, "tasks went on writing after extract returned"
    assert at_return >= 1


def test_losing_the_scheduler_mid_run_is_one_line(dataset, tmp_path):
    """The scheduler went away while tasks ran (its node lost): Dask cancels every future, and the run
    ended in a traceback, "FutureCancelledError: run_task-... cancelled for reason:
    scheduler-connection-lost." plus a second line. Now one ``ExtractionStopped`` line (exit 1)
    naming the task's rows and the store, which keeps what was finished."""
    import dask

    marker = tmp_path / "writing"
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}), ExitStack() as stack:
        one = connect("local:1", stack)
        one.register_plugin(SlowWrites(0.5, str(marker)), name="slow")
        cluster = one.cluster

        def close_scheduler() -> None:
            deadline = time.monotonic() + 60
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            cluster.sync(cluster.scheduler.close)

        threading.Thread(target=close_scheduler, daemon=True).start()
        with pytest.raises(ExtractionStopped, match=r"Dask cancelled the task of rows \d+-\d+ \(.*"
                                                    r"scheduler-connection-lost.*\); the clips finished before "
                                                    r"are kept in .*s\.zarr, rerun") as caught:
            extract(dataset.manifest, tmp_path / "s.zarr", "logmel", scheduler=one, **ONE_PER_CHUNK)
    assert "\n" not in str(caught.value)


class SlowLogmel(distributed.WorkerPlugin):
    """Every log-mel batch takes ``seconds`` longer; the first one touches ``marker`` (tasks run)."""

    def __init__(self, seconds: float, marker: str):
        self.seconds, self.marker = seconds, marker

    def setup(self, worker) -> None:
        from featurestore.encoders.logmel import LogMelEncoder

        self.original = original = LogMelEncoder.forward
        seconds, marker = self.seconds, self.marker

        def forward(encoder, batch):
            Path(marker).touch()
            time.sleep(seconds)
            return original(encoder, batch)

        LogMelEncoder.forward = forward

    def teardown(self, worker) -> None:
        from featurestore.encoders.logmel import LogMelEncoder

        LogMelEncoder.forward = self.original


def _extraction_tasks_running(dask_worker) -> int:
    """Runs on a worker: its extraction tasks still running (those the scheduler gave up included)."""
    return sum(1 for key, ts in dask_worker.state.tasks.items()
               if str(key).startswith("run_task") and ts.state in ("executing", "cancelled", "long-running"))


DRIVER = """
import pickle, sys
from featurestore.extract import extract
extract(pickle.load(open(sys.argv[1], "rb")), sys.argv[2], "logmel", scheduler=sys.argv[3], device="cpu",
        batch_size=1, num_workers=1, chunk_clips=1, progress=False)
"""


def test_tasks_of_a_driver_killed_mid_run_stop_after_their_batch(client, plugin, tmp_path):
    """The driver was killed (SIGKILL, its terminal closed) while tasks of two blocks ran: the scheduler
    released its futures, but each running task went on to the end of its blocks, writing into the
    store with no lock held (a rerun started meanwhile writes the same shards). Now a task sees that
    the scheduler gave it up and stops after its current batch."""
    manifest = make_dataset(tmp_path / "data", 16)  # 16 blocks, 8 tasks of two blocks on 2 threads
    (tmp_path / "manifest.pkl").write_bytes(pickle.dumps(manifest))
    marker, store = tmp_path / "encoding", tmp_path / "s.zarr"
    plugin(SlowLogmel(1.5, str(marker)))
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path / "manifest.pkl"), str(store),
                               client.scheduler.address], cwd=Path(__file__).parents[2], env={**os.environ})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), "no task started encoding"
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    deadline = time.monotonic() + 60
    while sum(client.run(_extraction_tasks_running).values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not sum(client.run(_extraction_tasks_running).values())
    assert _done_rows(store) <= 2, "the tasks went on past their first block"
