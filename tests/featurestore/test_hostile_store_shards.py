"""Memory-mapped shard reads under a low file descriptor limit: every map holds a descriptor, so
a store keeps at most a quarter of the process's limit mapped (macOS's default soft limit is 256,
``MAX_MAPPED_SHARDS`` too), and a map that finds the descriptors used up (by other files) drops the
store's older maps and tries again, instead of a bare ``OSError: Too many open files``."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from featurestore import ClipRecord, Manifest, create_store
from featurestore.store import open_store

resource = pytest.importorskip("resource")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/fd")

PROVENANCE = {"encoder": "test/hostile", "config": {}, "weights": {"kind": "random", "seed": 0},
              "segments": {"frames": 1}}
N, DIM = 400, 4096  # 8 KiB a clip: one clip an inner chunk, shards of 2 clips: 200 shard files


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("fds") / "s.zarr"
    ids = [f"k{i}" for i in range(N)]
    values = np.random.default_rng(0).standard_normal((N, 1, DIM)).astype(np.float16)
    with create_store(path, Manifest("fds", ["a"], [ClipRecord(c, label="a") for c in ids])) as store:
        store.create_feature_set("e", 1, (DIM,), PROVENANCE, chunk_clips=2)
        store.write_rows("e", 0, values)
    return path, ids, values


@pytest.fixture
def low_limit():
    """Sets the soft descriptor limit to the descriptors open now plus a margin; restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def set_margin(margin: int) -> int:
        limit = len(os.listdir("/proc/self/fd")) + margin
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        return limit

    yield set_margin
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_batch_over_more_shards_than_the_limit_allows_maps_a_quarter_of_it(store_path, low_limit):
    path, ids, values = store_path
    with open_store(path) as store:
        store.rows(ids)  # the id lookup and done flags read before the limit
        store.done_mask("e")
        limit = low_limit(90)
        np.testing.assert_array_equal(store.get_many("e", ids[::-1]), values[::-1])
        assert len(store._b._shards._maps) <= limit // 4


def test_a_map_that_finds_the_descriptors_used_up_drops_older_maps(store_path, low_limit):
    path, ids, values = store_path
    with open_store(path) as store:
        store.rows(ids)
        store.done_mask("e")
        low_limit(400)  # a quarter: 100 maps allowed, but other files leave room for about 10
        held = []
        try:
            while len(os.listdir("/proc/self/fd")) < resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 12:
                held.append(os.open(os.devnull, os.O_RDONLY))
            for i in range(0, N, 2):  # one shard each
                np.testing.assert_array_equal(store.get("e", ids[i]), values[i])
        finally:
            for fd in held:
                os.close(fd)
