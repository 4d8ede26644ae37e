"""One store object read from several threads while one of them refreshes it (a viewer's request
threads): every read returns the stored values, none fails. A refresh dropped the shard maps in the
middle of another thread's read: ``KeyError: ('features/e/data', 0)`` from the map bookkeeping."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from featurestore import ClipRecord, Manifest, create_store
from featurestore.store import open_store

PROVENANCE = {"encoder": "test/hostile", "config": {}, "weights": {"kind": "random", "seed": 0},
              "segments": {"frames": 1}}
N = 2000


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("threads") / "s.zarr"
    ids = [f"k{i}" for i in range(N)]
    values = np.random.default_rng(0).standard_normal((N, 1, 256)).astype(np.float16)
    with create_store(path, Manifest("threads", ["a"], [ClipRecord(c, label="a") for c in ids])) as store:
        store.create_feature_set("e", 1, (256,), PROVENANCE, chunk_clips=250)
        store.write_rows("e", 0, values)
    return path, ids, values


def test_reads_from_threads_while_one_refreshes_return_the_stored_values(store_path):
    path, ids, values = store_path
    failures: list[BaseException] = []
    wrong = []

    def read(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for k in range(120):
                rows = rng.integers(0, N, 16)
                got = store.get_many("e", [ids[i] for i in rows]) if k % 2 else store.get("e", ids[rows[0]])[None]
                if not np.array_equal(got, values[rows[:len(got)]]):
                    wrong.append(rows)
                if seed == 0 and k % 4 == 0:
                    store.refresh()
        except BaseException as err:  # noqa: BLE001 - reported below, with the others
            failures.append(err)

    with open_store(path) as store:
        threads = [threading.Thread(target=read, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not failures, repr(failures[0])
    assert not wrong
