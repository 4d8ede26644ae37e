"""Extraction as Dask tasks on a real two-process LocalCluster equals the local run bit for bit."""
from __future__ import annotations

import shutil

import pytest
from tests.featurestore.test_extract_support import ENCODERS, FAST, assert_same_arrays, clip_id, make_dataset, read_all

from featurestore.extract import extract
from featurestore.store import open_store

distributed = pytest.importorskip("distributed")
# Blocks of 4 rows (the ViT's chunk), log-mel chunks of 2 inside them: tasks own whole blocks.
OPTIONS = {**FAST, "batch_size": 4, "chunk_clips": {"logmel": 2, "timm/test_vit": 4}}


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


@pytest.mark.slow
def test_dask_tasks_write_the_same_arrays_as_a_local_run(tmp_path, client):
    manifest = make_dataset(tmp_path / "data", 9)  # 3 blocks: 4, 4 and 1 clips
    local = tmp_path / "local.zarr"
    extract(manifest, local, ENCODERS, **OPTIONS)

    remote = tmp_path / "dask.zarr"
    summary = extract(manifest, remote, ENCODERS, scheduler=client, **OPTIONS)
    assert summary.exit_code == 0 and summary.clips_done == 9
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


def _tasks_seen() -> int:
    """Runs on each worker: how many extraction encoders it built (one per spec once tasks ran)."""
    from featurestore import _extract_dask

    return len(_extract_dask._ENCODERS)
