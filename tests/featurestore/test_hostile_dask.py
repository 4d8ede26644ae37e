"""Hostile runs of extraction as Dask tasks, on one real two-process LocalCluster shared by the module:
a store the workers cannot see, a worker whose encoder gives another fingerprint, a worker killed
after it finished part of a multi-block task, and Ctrl-C while tasks run. Log-mel only, so the
workers never import timm."""
from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from tests.featurestore.test_extract_support import FAST, assert_same_arrays, make_dataset, read_all

from featurestore.errors import FeatureStoreError
from featurestore.extract import extract
from featurestore.extract.dask import connect
from featurestore.extract.errors import ExtractionInterrupted, ExtractionStopped, SchedulerError
from featurestore.store import open_store

distributed = pytest.importorskip("distributed")

N_CLIPS = 10
#: One clip per chunk: 10 blocks, grouped into 8 tasks on 2 threads, so tasks 2:4 and 6:8 hold two blocks.
ONE_PER_CHUNK = {**FAST, "batch_size": 1, "chunk_clips": 1}


@pytest.fixture(scope="module")
def client():
    """The module's one cluster (``local:2``: two single-threaded worker processes)."""
    with pytest.MonkeyPatch.context() as mp, ExitStack() as stack:
        mp.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
        yield connect("local:2", stack)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """N_CLIPS tiny clips (read-only) and the arrays of their uninterrupted local log-mel extraction."""
    tmp = tmp_path_factory.mktemp("hostile_dask")
    manifest = make_dataset(tmp / "data", N_CLIPS)
    extract(manifest, tmp / "clean.zarr", "logmel", **ONE_PER_CHUNK)
    return manifest, read_all(tmp / "clean.zarr")


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


class _PatchWriteRows(distributed.WorkerPlugin):
    """Base of the plugins that wrap ``FeatureStore.write_rows`` in the worker (``before`` runs first)."""

    def setup(self, worker) -> None:
        from featurestore.store.store import FeatureStore

        self.original = original = FeatureStore.write_rows
        before = self.before

        def write_rows(store, name, start, *args, **kwargs):
            before(name, start)
            return original(store, name, start, *args, **kwargs)

        FeatureStore.write_rows = write_rows

    def teardown(self, worker) -> None:
        from featurestore.store.store import FeatureStore

        FeatureStore.write_rows = self.original


class KillOnWrite(_PatchWriteRows):
    """SIGKILLs the worker about to write ``row`` of log-mel, once (``marker`` records it)."""

    def __init__(self, row: int, marker: str):
        self.row, self.marker = row, marker

    def before(self, name: str, start: int) -> None:
        if name == "logmel" and start == self.row and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)


class SlowWrites(_PatchWriteRows):
    """Every write takes ``seconds`` longer; the first one touches ``marker`` (tasks are running)."""

    def __init__(self, seconds: float, marker: str):
        self.seconds, self.marker = seconds, marker

    def before(self, name: str, start: int) -> None:
        Path(self.marker).touch()
        time.sleep(self.seconds)


class OtherLogmelWeights(distributed.WorkerPlugin):
    """The worker's log-mel reports another weights identity (another library release on the workers)."""

    def setup(self, worker) -> None:
        from featurestore.encoders.logmel import LogMelEncoder

        self.original = LogMelEncoder.weights_provenance
        LogMelEncoder.weights_provenance = lambda self: {"kind": "parameter-free", "release": "other"}

    def teardown(self, worker) -> None:
        from featurestore.encoders.logmel import LogMelEncoder

        LogMelEncoder.weights_provenance = self.original


class NoTimm(distributed.WorkerPlugin):
    """The worker's environment lacks timm (``import timm`` fails there) and has built no encoder yet."""

    def setup(self, worker) -> None:
        import sys

        from featurestore.extract import dask as extract_dask

        self.saved = {name: sys.modules.pop(name) for name in list(sys.modules)
                      if name == "timm" or name.startswith("timm.")}
        sys.modules["timm"] = None  # what an environment without timm gives: ImportError on import
        self.built = dict(extract_dask._ENCODERS)
        extract_dask._ENCODERS.clear()

    def teardown(self, worker) -> None:
        import sys

        from featurestore.extract import dask as extract_dask

        del sys.modules["timm"]
        sys.modules.update(self.saved)
        extract_dask._ENCODERS.clear()
        extract_dask._ENCODERS.update(self.built)


def _memory_store_exists(path: str) -> bool:
    """Runs on a worker: whether its own process memory holds a store at ``path``."""
    import fsspec

    return fsspec.filesystem("memory").exists(path)


def _memory_files(prefix: str) -> dict[str, bytes]:
    """Every file of this process's ``memory://`` filesystem under ``prefix``."""
    import fsspec

    fs = fsspec.filesystem("memory")
    return {path: fs.cat_file(path) for path in fs.find(prefix)}


def _put_memory_files(files: dict[str, bytes]) -> None:
    """Runs on a worker: write ``files`` into its own ``memory://`` filesystem (a copy of a store)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for path, data in files.items():
        fs.pipe_file(path, data)


def _done_rows(store: Path) -> int:
    with open_store(store) as fs:
        return int(fs.done_mask("logmel", refresh=True).sum())


def test_a_store_the_workers_cannot_reach_is_one_line_and_is_not_created_on_them(client, dataset):
    """``memory://`` lives in the driver's process: each worker opened the location in mode 'a' and so
    created an empty store of its own there, then failed with "no feature set named 'logmel'; the
    store has: (none)" (and Dask's "Compute Failed" traceback in the log)."""
    manifest, _ = dataset
    location = "memory://hostile-dask/unreachable.zarr"
    with pytest.raises(ExtractionStopped, match=r"Dask worker tcp://\S+ cannot open the store "
                                                r"memory://hostile-dask/unreachable\.zarr .*same location"):
        extract(manifest, location, "logmel", scheduler=client, **FAST)
    assert not any(client.run(_memory_store_exists, "/hostile-dask/unreachable.zarr").values())


def test_workers_writing_into_a_copy_of_the_store_is_not_reported_as_done(client, dataset):
    """Each worker reaches a copy of the store at the same location (rsynced to every node's scratch
    disk; here each worker process's own ``memory://``): the copies pass every check of the tasks,
    which write into them. Before: "3 clips done", exit 0, while the driver's store held none of
    them. Now an ``ExtractionStopped`` line naming the store and the clips not done there."""
    manifest, _ = dataset
    location = "memory://hostile-dask/copied.zarr"
    extract(manifest, location, "logmel", limit=2, **FAST)  # the driver's store: 2 clips done
    client.run(_put_memory_files, _memory_files("/hostile-dask/copied.zarr"))
    with pytest.raises(ExtractionStopped, match=rf"{location}: {N_CLIPS - 2} clips of logmel that the Dask tasks "
                                                rf"extracted are not done in this store .*same location"):
        extract(manifest, location, "logmel", scheduler=client, **FAST)
    with open_store(location) as fs:
        assert int(fs.done_mask("logmel").sum()) == 2


def test_a_scheduler_without_workers_is_refused_in_one_line_before_the_store_is_made(dataset, tmp_path):
    """Before: after Dask's connect timeout, a bare ``TimeoutError: No valid workers found`` (naming no
    scheduler) from scattering the plan, and the store it had created was left behind."""
    import dask

    manifest, _ = dataset
    store = tmp_path / "s.zarr"
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}), \
            distributed.LocalCluster(n_workers=0, processes=False, dashboard_address="127.0.0.1:0",
                                     scheduler_kwargs={"dashboard": False}) as cluster:
        address = cluster.scheduler_address
        with pytest.raises(SchedulerError, match=rf"--scheduler {address}: the scheduler has no workers \(none "
                                                 rf"joined within 1 s\)"):
            extract(manifest, store, "logmel", scheduler=address, **FAST)
    assert not store.exists() and list(tmp_path.iterdir()) == []


def test_a_worker_whose_encoder_gives_another_fingerprint_stops_the_run_in_one_line(client, dataset, plugin,
                                                                                  tmp_path):
    """Before: a bare RuntimeError from the task (the command printed a traceback); now an
    ``ExtractionStopped`` (exit 1, one line) naming the worker, the encoder and both fingerprints."""
    manifest, _ = dataset
    plugin(OtherLogmelWeights())
    with pytest.raises(ExtractionStopped, match=r"on Dask worker tcp://\S+ logmel gives fingerprint \w+, the "
                                                r"driver planned \w+") as caught:
        extract(manifest, tmp_path / "s.zarr", "logmel", scheduler=client, **FAST)
    assert "\n" not in str(caught.value) and isinstance(caught.value, FeatureStoreError)
    assert _done_rows(tmp_path / "s.zarr") == 0


def test_a_worker_without_the_encoders_library_stops_the_run_in_one_line(client, dataset, plugin, tmp_path):
    """Before: the worker's ImportError came back as is (the command printed its traceback, and
    Dask logged "Compute Failed" with another); now one ``ExtractionStopped`` line naming the
    worker, the encoder and what failed."""
    manifest, _ = dataset
    plugin(NoTimm())
    with pytest.raises(ExtractionStopped, match=r"Dask worker tcp://\S+ cannot build encoder timm/test_vit@none: "
                                                r".*timm.*the driver's environment") as caught:
        extract(manifest, tmp_path / "s.zarr", "timm/test_vit@none", scheduler=client, **FAST)
    assert "\n" not in str(caught.value)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs workers without CUDA")
def test_device_cuda_on_workers_without_a_gpu_names_the_worker(client, dataset, tmp_path):
    """``--device cuda`` with a scheduler is resolved on each worker (the driver plans on the CPU).
    Before: the worker's ValueError "...CUDA is not available here" came back as is, "here" being a
    worker the message did not name (and Dask logged a "Compute Failed" traceback)."""
    manifest, _ = dataset
    with pytest.raises(ExtractionStopped, match=r"Dask worker tcp://\S+: device 'cuda' was requested but CUDA "
                                                r"is not available here"):
        extract(manifest, tmp_path / "s.zarr", "logmel", scheduler=client, **{**FAST, "device": "cuda"})


def test_a_retried_task_counts_the_rows_its_killed_attempt_finished(client, dataset, plugin, tmp_path):
    """The worker running the task of blocks 2 and 3 dies writing row 3, after row 2 was done; Dask
    retries the task, which only redoes row 3. The summary counted only the retry's rows: 9 clips
    done, 0 skipped, 0 failed of 10 selected, though all 10 were extracted by this run."""
    manifest, clean = dataset
    marker = tmp_path / "killed"
    plugin(KillOnWrite(3, str(marker)))
    summary = extract(manifest, tmp_path / "s.zarr", "logmel", scheduler=client, **ONE_PER_CHUNK)
    assert marker.exists(), "the worker was not killed"
    assert summary.exit_code == 0
    assert (summary.clips_done, summary.clips_skipped, summary.clips_failed) == (N_CLIPS, 0, 0)
    assert_same_arrays(read_all(tmp_path / "s.zarr"), clean)


def test_ctrl_c_stops_the_tasks_before_the_run_returns(client, dataset, plugin, tmp_path):
    """Ctrl-C while tasks run: the driver cancelled the futures and returned (releasing the writer
    lock and printing what the store kept), but tasks already running went on writing into the store,
    so the count was wrong and a rerun would write the same shards beside them. Now the driver asks
    the tasks to stop, waits for them (each writes what it finished), then counts."""
    manifest, clean = dataset
    marker = tmp_path / "writing"
    plugin(SlowWrites(0.4, str(marker)))
    main = threading.get_ident()

    def interrupt() -> None:
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        signal.pthread_kill(main, signal.SIGINT)

    store = tmp_path / "s.zarr"
    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(ExtractionInterrupted) as caught:
        extract(manifest, store, "logmel", scheduler=client, **ONE_PER_CHUNK)
    at_return = _done_rows(store)
    time.sleep(2.0)  # longer than a task's remaining writes (at most 2 blocks of 0.4 s each)
    assert _done_rows(store) == at_return, "tasks went on writing after extract returned"
    assert f"{at_return} of {N_CLIPS} clips done and kept" in str(caught.value)
    assert at_return < N_CLIPS

    summary = extract(manifest, store, "logmel", scheduler=client, **ONE_PER_CHUNK)
    assert (summary.clips_done, summary.clips_skipped) == (N_CLIPS - at_return, at_return)
    with open_store(store) as fs:
        assert fs.verify().ok
    assert_same_arrays(read_all(store), clean)
