"""A shard file that cannot be read (a folder in its place) is a ``CorruptChunkError`` naming the
array and its rows, on every read path (a mapped ``get``, ``get_many``, ``read_rows``), not a bare
``OSError: [Errno 22] Invalid argument`` from mapping a folder."""
from __future__ import annotations

import numpy as np
import pytest

from featurestore import ClipRecord, Manifest, create_store
from featurestore.errors import CorruptChunkError
from featurestore.store import open_store
from tests.featurestore.chunk_paths import chunk_file

PROVENANCE = {"encoder": "test/hostile", "config": {}, "weights": {"kind": "random", "seed": 0},
              "segments": {"frames": 1}}


def test_a_folder_in_place_of_a_shard_is_a_corrupt_chunk_naming_its_rows(tmp_path):
    path = tmp_path / "s.zarr"
    with create_store(path, Manifest("files", ["a"], [ClipRecord(f"k{i}", label="a") for i in range(200)])) as store:
        store.create_feature_set("e", 1, (64,), PROVENANCE, chunk_clips=100)
        store.write_rows("e", 0, np.ones((200, 1, 64)))
    shard = chunk_file(path, "features/e/data", 0)
    shard.unlink()
    shard.mkdir()
    with open_store(path) as store:
        for read in (lambda: store.get("e", "k3"), lambda: store.get_many("e", ["k3", "k150"]),
                     lambda: store.read_rows("e", 0, 10)):
            with pytest.raises(CorruptChunkError, match=r"features/e/data: rows 0:50 could not be read .*directory"):
                read()
        np.testing.assert_array_equal(store.get("e", "k150"), np.ones((1, 64)))  # the other shard reads
