"""Extraction as Dask tasks on a real two-process LocalCluster equals the local run bit for bit, each
task writing whole shards that no other task writes; ``scheduler="local:N"`` starts its own cluster;
a worker SIGKILLed mid-task loses nothing written by other tasks, and a rerun extracts only what is
missing."""
from __future__ import annotations

import os
import shutil
import signal
import time
from contextlib import ExitStack
from types import SimpleNamespace

import pytest
from tests.featurestore.test_extract_support import ENCODERS, FAST, assert_same_arrays, clip_id, make_dataset, read_all

from featurestore.extract import extract
from featurestore.extract.dask import connect
from featurestore.store import open_store

distributed = pytest.importorskip("distributed")
# Blocks of 4 rows (the ViT's chunk), log-mel chunks of 2 inside them: tasks own whole blocks.
OPTIONS = {**FAST, "batch_size": 4, "chunk_clips": {"logmel": 2, "timm/test_vit": 4}}


@pytest.fixture(scope="module")
def local2():
    """The module's one cluster, started the way ``scheduler="local:2"`` starts one (``connect``): two
    single-threaded worker processes. MALLOC_TRIM_THRESHOLD_ is removed from this process first (a
    default LocalCluster started earlier in this process may have put it into os.environ, so only our
    cluster decides); what the start left in this process (the SIGINT handler, that variable) is kept
    for the tests of what local clusters leave alone."""
    before = signal.getsignal(signal.SIGINT)
    with pytest.MonkeyPatch.context() as mp, ExitStack() as stack:
        mp.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
        client = connect("local:2", stack)
        yield SimpleNamespace(client=client, sigint_before=before, sigint_after=signal.getsignal(signal.SIGINT),
                              malloc_trim_after=os.environ.get("MALLOC_TRIM_THRESHOLD_"))


@pytest.fixture()
def client(local2):
    return local2.client


@pytest.mark.slow
def test_dask_tasks_write_the_same_arrays_as_a_local_run(tmp_path, client):
    manifest = make_dataset(tmp_path / "data", 9)  # 3 blocks: 4, 4 and 1 clips
    local = tmp_path / "local.zarr"
    extract(manifest, local, ENCODERS, **OPTIONS)

    remote = tmp_path / "dask.zarr"
    log = tmp_path / "writes.log"
    client.register_plugin(RecordDataWrites(str(log)), name=f"record-{tmp_path.name}")
    try:
        summary = extract(manifest, remote, ENCODERS, scheduler=client, **OPTIONS)
    finally:
        client.unregister_worker_plugin(f"record-{tmp_path.name}")
    assert summary.exit_code == 0 and summary.clips_done == 9
    _assert_whole_shards_of_one_writer(log, "features/logmel/data", 2, 9)
    assert summary.device.startswith("dask (2 workers")
    assert summary.stage_seconds["encode timm/test_vit"] > 0 and summary.stage_seconds["write"] > 0
    workers = {w for w, tasks in client.run(_tasks_seen).items() if tasks}
    assert len(workers) == 2, "both Dask workers should have run extraction tasks"
    with open_store(remote) as store:
        assert store.verify().ok
    assert_same_arrays(read_all(remote), read_all(local))

    # a failing clip inside a task is recorded like in a local run, and a rerun only redoes it
    bad = tmp_path / "bad.zarr"
    root = tmp_path / "data"
    shutil.copy(root / manifest.clips[4].audio, tmp_path / "saved.wav")
    (root / manifest.clips[4].audio).write_bytes(b"RIFF0000WAVEjunk" * 10)
    failed = extract(manifest, bad, ENCODERS, scheduler=client, **OPTIONS)
    assert failed.exit_code == 1 and list(failed.failures) == [clip_id(4)]
    shutil.copy(tmp_path / "saved.wav", root / manifest.clips[4].audio)
    again = extract(manifest, bad, ENCODERS, scheduler=client, **OPTIONS)
    assert again.exit_code == 0 and (again.clips_done, again.clips_skipped) == (1, 8)
    with open_store(bad) as store:
        assert store.verify().ok and all(info.n_done == 9 for info in store.feature_sets().values())


@pytest.mark.slow
def test_dask_workers_rebuild_named_encoders_with_their_options(tmp_path, client):
    """Workers get the options the driver built with (they rebuilt from the spec alone and refused
    on the fingerprint before), and fill the chosen feature-set names."""
    manifest = make_dataset(tmp_path / "data", 5)
    asked = dict(encoders={"logmel": "logmel", "vit1": "timm/test_vit@none:1"},
                 encoder_options={"logmel": {"n_mels": 32}}, **{**OPTIONS, "chunk_clips": {"logmel": 2, "vit1": 4}})
    local = tmp_path / "local.zarr"
    extract(manifest, local, **asked)
    summary = extract(manifest, tmp_path / "dask.zarr", scheduler=client, **asked)
    assert summary.exit_code == 0 and summary.clips_done == 5 and sorted(summary.features) == ["logmel", "vit1"]
    assert_same_arrays(read_all(tmp_path / "dask.zarr"), read_all(local))
    with open_store(tmp_path / "dask.zarr") as store:
        assert store.feature_info("logmel").shape[2] == 32


@pytest.mark.slow
def test_dask_run_writes_the_same_frames(tmp_path, client):
    """The ``frames/<size>`` feature set (uint8 frames, no parameters) through Dask tasks equals a local run."""
    manifest = make_dataset(tmp_path / "data", 5)
    options = dict(device="cpu", batch_size=2, num_workers=1, chunk_clips=2, progress=False)
    local, remote = tmp_path / "local.zarr", tmp_path / "dask.zarr"
    extract(manifest, local, "frames/32", **options)
    summary = extract(manifest, remote, "frames/32", scheduler=client, **options)
    assert summary.exit_code == 0 and summary.clips_done == 5
    assert_same_arrays(read_all(remote), read_all(local))


@pytest.mark.slow
def test_a_scheduler_address_passes_the_greeting_check_and_runs(tmp_path, client):
    """``scheduler="tcp://..."`` (what ``--scheduler`` gives): the greeting check accepts a real
    scheduler and the run uses it."""
    manifest = make_dataset(tmp_path / "data", 5)
    address = client.scheduler.address
    assert address.startswith("tcp://")
    summary = extract(manifest, tmp_path / "dask.zarr", ENCODERS, scheduler=address, **OPTIONS)
    assert summary.exit_code == 0 and summary.clips_done == 5
    assert summary.device == "dask (2 workers, 2 threads, device cpu; cluster)"


class RecordDataWrites(distributed.WorkerPlugin):
    """Appends ``pid path start rows shard_rows whole`` to ``log`` for every feature-data write a
    worker makes (``whole``: the rows are whole shards, written without reading the shard back),
    so a test can tell that each Dask task writes whole shards of its own."""

    def __init__(self, log: str):
        self.log = log

    def setup(self, worker) -> None:
        from featurestore.store._zarr import ZarrBackend

        self.original = original = ZarrBackend.write
        log = self.log

        def write(backend, path, start, data, **kwargs):
            if path.endswith("/data"):
                layout = backend._layout(path)
                whole = layout is not None and layout.whole_shards(start, len(data), backend.shape(path)[0])
                with open(log, "a") as f:
                    f.write(f"{os.getpid()} {path} {start} {len(data)} {layout.shard_rows if layout else 0} "
                            f"{int(whole)}\n")
            return original(backend, path, start, data, **kwargs)

        ZarrBackend.write = write

    def teardown(self, worker) -> None:
        from featurestore.store._zarr import ZarrBackend

        ZarrBackend.write = self.original


def _assert_whole_shards_of_one_writer(log, path: str, shard_rows: int, n_rows: int) -> None:
    """Every write of ``path`` the workers logged is whole shards (written without reading a shard
    back), and no shard is written by two workers."""
    writes = [line.split() for line in log.read_text().splitlines() if line.split()[1] == path]
    assert writes and all(w[4] == str(shard_rows) and w[5] == "1" for w in writes), writes
    writers: dict[int, set[str]] = {}
    for pid, _, start, rows, _, _ in writes:
        for shard in range(int(start) // shard_rows, -(-(int(start) + int(rows)) // shard_rows)):
            writers.setdefault(shard, set()).add(pid)
    assert sorted(writers) == list(range(-(-n_rows // shard_rows))), writers
    assert all(len(pids) == 1 for pids in writers.values()), writers


def _tasks_seen() -> int:
    """Runs on each worker: how many extraction encoders it built (one per spec once tasks ran)."""
    from featurestore.extract import dask as extract_dask

    return len(extract_dask._ENCODERS)


@pytest.mark.slow
def test_local_n_starts_a_cluster_of_n_processes_for_the_run(tmp_path):
    """Log-mel alone: the cluster's two new worker processes need not import timm (~2 s of CPU each)."""
    manifest = make_dataset(tmp_path / "data", 5)  # 2 blocks: 4 and 1 clips
    local = tmp_path / "local.zarr"
    extract(manifest, local, "logmel", **{**OPTIONS, "chunk_clips": {"logmel": 2}})
    summary = extract(manifest, tmp_path / "dask.zarr", "logmel", scheduler="local:2",
                      **{**OPTIONS, "chunk_clips": {"logmel": 2}})
    assert summary.exit_code == 0 and summary.clips_done == 5
    assert summary.device == "dask (2 workers, 2 threads, device cpu; local cluster)"
    assert_same_arrays(read_all(tmp_path / "dask.zarr"), read_all(local))


def test_local_clusters_leave_glibc_malloc_trimming_alone(local2):
    """Dask's nanny would set MALLOC_TRIM_THRESHOLD_ in the workers (and here), which slows torch
    forwards by about a third; ``local_cluster`` (what ``connect("local:N")`` starts) unsets it."""
    seen = local2.client.run(lambda: {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")})
    assert list(seen.values()) == [{"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": "1"}] * 2
    assert local2.malloc_trim_after is None and "MALLOC_TRIM_THRESHOLD_" not in os.environ


def test_a_local_cluster_holds_no_fixed_port(local2):
    """distributed binds the scheduler's HTTP server to 8787 even without a dashboard, so a second
    cluster warned that the port was in use; ours listens on a free port of the loopback interface."""
    scheduler = local2.client.cluster.scheduler
    assert scheduler.http_server.port != 8787 and scheduler.http_server.address == "127.0.0.1"


def test_local_cluster_workers_leave_ctrl_c_to_the_command(local2):
    """Ctrl-C reaches the whole process group: a ``local:N`` worker that took it printed its own
    KeyboardInterrupt traceback and died mid-task, before the command's one line. Its workers start
    with SIGINT ignored; the command (this process) keeps its own handler and closes the cluster."""
    assert local2.sigint_after is local2.sigint_before
    workers = local2.client.run(os.getpid)
    os.kill(next(iter(workers.values())), signal.SIGINT)
    time.sleep(0.5)
    assert local2.client.run(os.getpid) == workers  # the same worker processes, still serving


@pytest.mark.parametrize("spelling", ["local:0", "local:", "local:two"])
def test_local_n_needs_a_positive_worker_count(spelling):
    from featurestore.extract.dask import _local_workers

    with pytest.raises(ValueError, match="local:N"):
        _local_workers(spelling)


class KillOnWrite(distributed.WorkerPlugin):
    """SIGKILLs the worker process when it is about to write ``feature``'s chunk at ``row`` (once:
    ``marker`` records that it happened, so the retried task and later tests pass through)."""

    def __init__(self, feature: str, row: int, marker: str):
        self.feature, self.row, self.marker = feature, row, marker

    def setup(self, worker) -> None:
        from featurestore.store.store import FeatureStore

        self.original = original = FeatureStore.write_rows
        feature, row, marker = self.feature, self.row, self.marker

        def write_rows(store, name, start, *args, **kwargs):
            if name == feature and start == row and not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            return original(store, name, start, *args, **kwargs)

        FeatureStore.write_rows = write_rows

    def teardown(self, worker) -> None:
        from featurestore.store.store import FeatureStore

        FeatureStore.write_rows = self.original


def _set_allowed_failures(n: int, dask_scheduler=None) -> int:
    old, dask_scheduler.allowed_failures = dask_scheduler.allowed_failures, n
    return old


@pytest.fixture()
def killing(tmp_path, client):
    """Registers a one-shot kill of the worker that writes the ViT chunk at row 4 (block 4-8)."""
    marker = tmp_path / "killed"
    name = f"kill-{tmp_path.name}"
    client.register_plugin(KillOnWrite("timm/test_vit", 4, str(marker)), name=name)
    yield marker
    client.unregister_worker_plugin(name)


N_KILL = 12  # blocks 0-4, 4-8, 8-12; the kill lands after the block's two log-mel chunks are written


@pytest.fixture(scope="module")
def kill_set(tmp_path_factory):
    """The kill tests' dataset of N_KILL clips (read-only) and the arrays of its uninterrupted local
    extraction, made once for both tests."""
    tmp = tmp_path_factory.mktemp("dask_kill")
    manifest = make_dataset(tmp / "data", N_KILL)
    extract(manifest, tmp / "clean.zarr", ENCODERS, **OPTIONS)
    return manifest, read_all(tmp / "clean.zarr")


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_the_retry_skips_what_was_written(tmp_path, client, kill_set, killing):
    manifest, clean_arrays = kill_set
    summary = extract(manifest, tmp_path / "dask.zarr", ENCODERS, scheduler=client, **OPTIONS)
    assert killing.exists(), "the worker was not killed"
    assert summary.exit_code == 0 and summary.clips_done == N_KILL
    # the retried task found log-mel rows 4-7 done by the killed attempt and only encoded the ViT
    assert summary.features["logmel"].written == N_KILL  # rows 4-7, written by the killed attempt, count once too
    assert summary.features["timm/test_vit"].written == N_KILL
    with open_store(tmp_path / "dask.zarr") as store:
        assert store.verify().ok
    assert_same_arrays(read_all(tmp_path / "dask.zarr"), clean_arrays)


@pytest.mark.slow
def test_a_task_lost_for_good_fails_only_its_rows_and_a_rerun_completes_them(tmp_path, client, kill_set, killing):
    manifest, clean_arrays = kill_set
    store = tmp_path / "dask.zarr"
    old = client.run_on_scheduler(_set_allowed_failures, 0)  # no retry: the first death loses the task
    try:
        failed = extract(manifest, store, ENCODERS, scheduler=client, **OPTIONS)
    finally:
        client.run_on_scheduler(_set_allowed_failures, old)
    assert killing.exists(), "the worker was not killed"
    assert failed.exit_code == 1
    killed_rows = [clip_id(i) for i in range(4, 8)]
    assert set(killed_rows) <= set(failed.failures)
    assert all(list(failed.failures[c]) == ["timm/test_vit"] for c in killed_rows)
    assert "Dask worker died" in failed.failures[clip_id(4)]["timm/test_vit"]

    after = read_all(store)
    with open_store(store) as fs:
        assert fs.verify().ok
    ids = [clip_id(i) for i in range(N_KILL)]
    # the failures are exactly the rows left not done: nothing written by another task was lost,
    # the killed task's log-mel chunks (written before the kill) included
    assert after["logmel"][1][4:8].all()
    not_done = {ids[r] for name, (_, mask) in after.items() for r in range(N_KILL) if not mask[r]}
    assert not_done == set(failed.failures)
    for name, (data, mask) in after.items():
        assert_same_arrays({name: (data, mask)}, {name: (clean_arrays[name][0], mask)})
    missing = {name: int((~mask).sum()) for name, (_, mask) in after.items()}

    again = extract(manifest, store, ENCODERS, scheduler=client, **OPTIONS)
    assert again.exit_code == 0
    assert (again.clips_done, again.clips_skipped) == (len(failed.failures), N_KILL - len(failed.failures))
    assert {name: f.written for name, f in again.features.items()} == missing
    assert_same_arrays(read_all(store), clean_arrays)
