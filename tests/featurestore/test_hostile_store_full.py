"""A shard write that the file system refuses half-way (disk full; here the process's file size
limit, which fails a write the same way without filling a disk) names the shard file, leaves no
temp file and nothing marked done, and the blocks written before stay whole."""
from __future__ import annotations

import re
import signal
import sys

import numpy as np
import pytest

from featurestore import ClipRecord, Manifest, create_store
from featurestore.store import open_store
from tests.featurestore.chunk_paths import chunk_file

resource = pytest.importorskip("resource")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE and SIGXFSZ as on Linux")

PROVENANCE = {"encoder": "test/hostile", "config": {}, "weights": {"kind": "random", "seed": 0},
              "segments": {"frames": 1}}


def test_a_shard_write_refused_half_way_names_the_file_and_marks_nothing_done(tmp_path):
    path = tmp_path / "s.zarr"
    values = np.ones((200, 1, 2048))  # 4 KiB a clip: shards of 100 clips, 400 KiB each
    with create_store(path, Manifest("full", ["a"], [ClipRecord(f"k{i}", label="a") for i in range(200)])) as store:
        store.create_feature_set("e", 1, (2048,), PROVENANCE, chunk_clips=100)
        store.write_rows("e", 0, values[:100])
        shard = chunk_file(path, "features/e/data", 1)  # rows 100:200
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
        try:
            with pytest.raises(OSError, match=f"File too large: '{re.escape(str(shard))}'"):
                store.write_rows("e", 100, values[100:])
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, handler)
    assert not list(path.rglob("*.partial"))
    with open_store(path) as store:
        assert store.done_mask("e").tolist() == [True] * 100 + [False] * 100
        np.testing.assert_array_equal(store.read_rows("e", 0, 100), values[:100].astype(np.float16))
        assert store.verify().ok
