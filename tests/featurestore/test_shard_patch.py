"""A partial commit of a shard writes the inner chunks that changed, not the whole shard.

``write_rows(..., unchanged=)`` (extraction's writer: rows done before are the stored bits) patches a
copy of the shard file with the inner chunks of the rows done since, and renames it over the shard.
The file stays standard Zarr v3 (zarr-python reads it), rows not done are not written, the shard is
replaced atomically (a new file, never the old one written in place), and a shard that is absent or
laid out otherwise is written whole.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import zarr

from featurestore import ClipRecord, Manifest, create_store, open_store
from featurestore.store import _shard_patch
from tests.featurestore.chunk_paths import chunk_file

DIM = 512  # float16: 1 KiB a clip -> inner chunks of 8 clips (8 KiB)
SHARD, INNER, N = 128, 8, 256
LENGTH = INNER * DIM * 2 + 4  # an inner chunk's bytes and its crc32c
PROV = {"encoder": "x", "config": {}, "weights": {"kind": "random", "seed": 0}, "segments": {}}


def values(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((SHARD, 1, DIM)).astype(np.float16)


def shard_file(path, shard: int = 0) -> str:
    return str(chunk_file(path, "features/emb/data", shard))


@pytest.fixture
def store_path(tmp_path) -> str:
    path = str(tmp_path / "s.zarr")
    with create_store(path, Manifest("p", ["a"], [ClipRecord(f"c{i}", label="a") for i in range(N)])) as store:
        store.create_feature_set("emb", 1, (DIM,), PROV, chunk_clips=SHARD)
    return path


def test_a_partial_commit_writes_the_inner_chunks_of_the_rows_done_since(store_path, monkeypatch):
    first, second = values(0), values(1)
    done = np.zeros(SHARD, dtype=bool)
    done[:32] = True
    with open_store(store_path, "a") as store:
        store.write_rows("emb", 0, first, done=done)  # no shard yet: written whole
        before = open(shard_file(store_path), "rb").read()
        inode = os.stat(shard_file(store_path)).st_ino
        wanted = second.copy()
        wanted[:32] = first[:32]  # the rows done before, as extraction's writer keeps them
        patched = []
        real = _shard_patch.patch_shard
        monkeypatch.setattr("featurestore.store._zarr.patch_shard",
                            lambda *a: patched.append(real(*a)) or patched[-1])
        now = done.copy()
        now[32:60] = True
        store.write_rows("emb", 0, wanted, done=now, unchanged=done)
        assert patched == [True]
        after = open(shard_file(store_path), "rb").read()
        assert os.stat(shard_file(store_path)).st_ino != inode  # a new file renamed over the shard
        assert len(after) == len(before)
        changed = [c for c in range(SHARD // INNER) if before[c * LENGTH:(c + 1) * LENGTH] != after[c * LENGTH:(c + 1) * LENGTH]]
        assert changed == [4, 5, 6, 7]  # rows 32-59: inner chunks 4-7; rows not done are not written
        assert after[SHARD // INNER * LENGTH:] == before[SHARD // INNER * LENGTH:]  # the same index
        np.testing.assert_array_equal(store.get_many("emb", [f"c{i}" for i in range(60)]), wanted[:60])
        assert store.verify().ok
    stored = zarr.open_group(store_path, mode="r")["features/emb/data"][:60]  # standard Zarr v3 still
    np.testing.assert_array_equal(stored, wanted[:60])


def test_nothing_changed_writes_nothing_and_other_layouts_are_written_whole(store_path):
    block = values(2)
    with open_store(store_path, "a") as store:
        store.write_rows("emb", SHARD, block)
        stat = os.stat(shard_file(store_path, 1))
        store.write_rows("emb", SHARD, block, unchanged=np.ones(SHARD, dtype=bool))  # a commit of nothing new
        assert os.stat(shard_file(store_path, 1)).st_ino == stat.st_ino
        with open(shard_file(store_path, 1), "ab") as f:
            f.write(b"\0" * 16)  # no longer the layout this store writes: the next commit rewrites it whole
        done = np.zeros(SHARD, dtype=bool)
        done[:8] = True
        store.write_rows("emb", SHARD, block, done=done, unchanged=np.zeros(SHARD, dtype=bool))
        size = os.path.getsize(shard_file(store_path, 1))
        assert size == SHARD // INNER * LENGTH + SHARD // INNER * 16 + 4
        store.refresh()
        np.testing.assert_array_equal(store.get_many("emb", [f"c{SHARD + i}" for i in range(8)]), block[:8])
