"""Filling a feature set: a block's files (shards, then error texts, then done flags) one after another.

A file that cannot be written fails ``write_rows`` naming it, no file after it is written (so no
done flag), no temp file is left; an interrupt leaves only whole shards; a new store keeps a feature
set's chunk files (keys ``c.<i>.0.0``) in the array's folder, and in a store of the old layout
(``c/<i>/0/0``) a chunk folder deleted since it was made is made again (files are created first,
folders only when missing). Small stores through the public API (three 64 KiB shards a block).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from featurestore import ClipRecord, Manifest, create_store, open_store
from featurestore.store import _shards
from tests.featurestore.chunk_paths import chunk_file, chunk_files

DIM = 32  # float16: 64 B a clip
SHARD = 1024  # clips a shard (64 KiB)
N = 3 * SHARD
FEAT = "emb/fill"
PROV = {"encoder": "emb/fill@none", "config": {}, "weights": {"kind": "random", "seed": 0}, "segments": {}}


def values(n: int) -> np.ndarray:
    return ((np.arange(n)[:, None] % 2048) + np.arange(DIM) % 5).astype(np.float16)[:, None, :]


def new_store(path: Path) -> None:
    """A store of ``N`` clips with an empty feature set of three shards."""
    with create_store(str(path), Manifest("fill", ["a"], [ClipRecord(f"c{i:05d}", label="a") for i in range(N)])) as fs:
        info = fs.create_feature_set(FEAT, 1, (DIM,), PROV, chunk_clips=SHARD)
        assert info.chunk_clips == SHARD


ARRAYS = [f"features/{FEAT}/{leaf}" for leaf in ("data", "done", "errors")]


def shard_file(path: Path, shard: int) -> Path:
    return chunk_file(path, f"features/{FEAT}/data", shard)


def old_layout(path: Path) -> None:
    """The feature set's arrays keyed as stores made before the "." separator were (``c/<i>/0/0``):
    their metadata edited before any chunk of them is written."""
    for array in ARRAYS:
        meta = path / array / "zarr.json"
        doc = json.loads(meta.read_text())
        assert doc["chunk_key_encoding"]["name"] == "default" and chunk_files(path, array) == []
        doc["chunk_key_encoding"]["configuration"] = {"separator": "/"}
        meta.write_text(json.dumps(doc))


def leftovers(path: Path) -> list[Path]:
    return sorted(path.rglob("*.partial"))


def done_count(path: Path) -> int:
    with open_store(str(path)) as fs:
        return int(fs.done_mask(FEAT).sum())


def test_a_shard_that_cannot_be_written_fails_the_block_naming_it_and_nothing_after_it_is_written(tmp_path):
    path = tmp_path / "s.zarr"
    new_store(path)
    (shard_file(path, 1) / "in-the-way").mkdir(parents=True)  # a folder where shard 1's file goes
    with open_store(str(path), mode="a") as fs:
        with pytest.raises(OSError) as caught:
            fs.write_rows(FEAT, 0, values(N))
    assert str(shard_file(path, 1)) in str(caught.value)
    assert shard_file(path, 0).is_file()  # written before the failure, whole
    assert not shard_file(path, 2).exists()  # never started after it
    assert leftovers(path) == []
    assert done_count(path) == 0
    group = zarr.open_group(str(path), mode="r")
    np.testing.assert_array_equal(group[f"features/{FEAT}/data"][:SHARD], values(SHARD))


def test_an_interrupt_while_a_block_is_written_leaves_whole_shards(tmp_path, monkeypatch):
    path = tmp_path / "s.zarr"
    new_store(path)
    real, calls = _shards.shard_parts, []

    def interrupted(layout, block):
        calls.append(len(block))
        if len(calls) == 2:  # Ctrl-C after the first shard is written
            raise KeyboardInterrupt
        return real(layout, block)

    monkeypatch.setattr(_shards, "shard_parts", interrupted)
    with open_store(str(path), mode="a") as fs:
        with pytest.raises(KeyboardInterrupt):
            fs.write_rows(FEAT, 0, values(N))
    assert [shard_file(path, s).exists() for s in range(3)] == [True, False, False]
    assert leftovers(path) == [] and done_count(path) == 0
    group = zarr.open_group(str(path), mode="r")
    np.testing.assert_array_equal(group[f"features/{FEAT}/data"][:SHARD], values(SHARD))


def test_a_new_stores_shards_are_files_in_the_arrays_folder(tmp_path):
    """The layout new stores write: no folder per chunk (a new shard's file needed two ``mkdir``s)."""
    path = tmp_path / "s.zarr"
    new_store(path)
    done = np.ones(N, dtype=bool)
    done[SHARD + 5] = False  # a failure: the block's error texts are written too
    with open_store(str(path), mode="a") as fs:
        fs.write_rows(FEAT, 0, values(N), done=done, errors={SHARD + 5: "no frames"})
    data = path / "features" / "emb" / "fill" / "data"
    assert sorted(os.listdir(data)) == ["c.0.0.0", "c.1.0.0", "c.2.0.0", "zarr.json"]
    for array in ARRAYS:  # the done flags and error texts too: nothing but files
        folder = path / array
        assert [p.name for p in folder.iterdir() if not p.is_file()] == []
        keys = [f"c.{s}.0.0" if array.endswith("/data") else f"c.{s}" for s in range(3)]  # data is 3-d
        assert [p.name for p in chunk_files(path, array)] == keys


def test_chunk_folders_deleted_since_they_were_made_are_made_again(tmp_path):
    """A store in the old layout (``c/<i>/0/0``): its chunk files are still created first and their
    folders made only when that fails, so a folder deleted since the last write is made again."""
    path = tmp_path / "s.zarr"
    new_store(path)
    old_layout(path)
    done, failed = np.ones(N, dtype=bool), 2 * SHARD + 7  # a failure: the block's error texts are written too
    done[failed] = False
    with open_store(str(path), mode="a") as fs:
        fs.write_rows(FEAT, 0, values(N), done=done, errors={failed: "no frames"})
        for array in ARRAYS:
            assert (path / array / "c").is_dir()  # the old layout was written
            shutil.rmtree(path / array / "c")
        fs.write_rows(FEAT, 0, values(N), done=done, errors={failed: "no frames again"})
    with open_store(str(path)) as fs:
        rows = np.flatnonzero(done)
        np.testing.assert_array_equal(fs.get_many(FEAT, [f"c{i:05d}" for i in rows]), values(N)[rows])
        assert fs.done_mask(FEAT).tolist() == done.tolist()
        assert fs.errors(FEAT) == {f"c{failed:05d}": "no frames again"}
        assert fs.verify().ok
    assert leftovers(path) == [] and all((path / array / "c").is_dir() for array in ARRAYS)
    assert shard_file(path, 2) == path / "features" / "emb" / "fill" / "data" / "c" / "2" / "0" / "0"
    assert sorted(os.listdir(shard_file(path, 2).parent.parent.parent)) == ["0", "1", "2"]


def test_error_texts_that_cannot_be_written_leave_the_blocks_shards_but_no_done_flag(tmp_path):
    path = tmp_path / "s.zarr"
    new_store(path)
    errors_chunk = chunk_file(path, f"features/{FEAT}/errors", 1)
    (errors_chunk / "in-the-way").mkdir(parents=True)
    with open_store(str(path), mode="a") as fs:
        with pytest.raises(OSError) as caught:
            fs.write_rows(FEAT, 0, values(N))
    assert str(errors_chunk) in str(caught.value)
    assert all(shard_file(path, s).is_file() for s in range(3))  # the values come first
    assert chunk_files(path, f"features/{FEAT}/done") == []  # the done flags come last
    assert leftovers(path) == [] and done_count(path) == 0


def test_a_failed_rewrite_serves_the_shards_written_before_it_and_moves_the_data_version(tmp_path, monkeypatch):
    """Done rows written again, shard 1 of three failing: shard 0 is served from its new file (not the
    store's cached chunks or maps of the old one), shards 1 and 2 keep their rows, the done flags stay,
    and the data version moves on (what was built from the old rows is stale)."""
    path = tmp_path / "s.zarr"
    new_store(path)
    real = _shards.replace_file

    def failing(file, parts):
        if file == str(shard_file(path, 1)):
            raise OSError(28, "No space left on device", file)
        real(file, parts)

    with open_store(str(path), mode="a") as fs:
        fs.write_rows(FEAT, 0, values(N))
        fs.get_many(FEAT, [f"c{i:05d}" for i in range(0, N, 7)])  # chunks cached, shards mapped
        version = fs.data_version(FEAT)
        monkeypatch.setattr(_shards, "replace_file", failing)
        with pytest.raises(OSError, match="No space left"):
            fs.write_rows(FEAT, 0, values(N) + 1)
        rows = fs.get_many(FEAT, [f"c{i:05d}" for i in range(N)])
        np.testing.assert_array_equal(rows[:SHARD], values(SHARD) + 1)
        np.testing.assert_array_equal(rows[SHARD:], values(N)[SHARD:])
        assert fs.done_mask(FEAT).all()
        assert fs.data_version(FEAT, refresh=True) != version
    assert leftovers(path) == []
