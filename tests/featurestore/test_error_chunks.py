"""Error-text chunks are written only where a text is, or was: a clean fill writes none.

A block whose rows all finished has no error to record; its error chunk is written only when one is
already in storage (texts of earlier failures to clear). An absent chunk reads as "no error", so the
failures, done counts and verify report are those of a store that wrote chunks of empty texts.
"""
from __future__ import annotations

import numpy as np
import pytest

from featurestore import ClipRecord, Manifest, create_store, open_store
from tests.featurestore.chunk_paths import chunk_files

N = 96
DIM = 8


def _store(path, backend_suffix: str):
    clips = [ClipRecord(f"c{i:03d}", label="a") for i in range(N)]
    store = create_store(str(path) + backend_suffix, Manifest("toy", ["a"], clips))
    store.create_feature_set("emb", 1, (DIM,), {"model": "toy"}, chunk_clips=32)
    return store


def _values(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, DIM)).astype(np.float16)


def test_a_clean_fill_writes_no_error_chunk(tmp_path):
    with _store(tmp_path / "s", ".zarr") as store:
        store.write_rows("emb", 0, _values(N))
        assert store.feature_info("emb").n_done == N
    path = str(tmp_path / "s.zarr")
    assert chunk_files(path, "features/emb/errors") == []
    assert len(chunk_files(path, "features/emb/data")) == 3 and len(chunk_files(path, "features/emb/done")) == 3
    with open_store(path) as store:
        report = store.verify()
        assert report.ok, report.problems
        assert store.errors("emb") == {}
        assert np.array_equal(store.get_many("emb", [f"c{i:03d}" for i in range(N)]), _values(N))


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_failure_is_recorded_and_cleared_when_its_rows_finish(tmp_path, suffix):
    with _store(tmp_path / "s", suffix) as store:
        done = np.ones(32, dtype=bool)
        done[5] = False
        store.write_rows("emb", 32, _values(32), done=done, errors={37: "decode failed: bad header"})
        store.write_rows("emb", 0, _values(32))  # a clean block beside it: nothing to clear there
        assert store.errors("emb") == {"c037": "decode failed: bad header"}
        store.write_rows("emb", 32, _values(32, seed=1))  # the failed row now finishes
        assert store.errors("emb") == {}
        assert store.feature_info("emb").n_done == 64
    if suffix == ".zarr":  # the chunk that held a text was written again (cleared), no other one exists
        files = chunk_files(str(tmp_path / "s.zarr"), "features/emb/errors")
        assert [f.name for f in files] == ["c.1"]
    with open_store(str(tmp_path / "s") + suffix) as store:
        assert store.verify().ok and store.errors("emb") == {}
        assert store.feature_info("emb").n_done == 64


def test_a_block_across_a_stored_error_chunk_clears_it_and_keeps_the_next_one_absent(tmp_path):
    with _store(tmp_path / "s", ".zarr") as store:
        store.set_errors("emb", {"c010": "killed"})
        assert store.errors("emb") == {"c010": "killed"}
        store.write_rows("emb", 0, _values(64))  # chunks 0 (holding the text) and 1 (never written)
        assert store.errors("emb") == {}
    names = [f.name for f in chunk_files(str(tmp_path / "s.zarr"), "features/emb/errors")]
    assert names == ["c.0", "c.1"]  # the block is written whole once a chunk of it held a text
