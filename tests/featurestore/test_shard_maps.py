"""How shards are memory-mapped for random reads: all their pages at their second use, where the
array fits in memory.

A shard mapped bare costs a page fault per new page a random read touches; populated
(``MADV_POPULATE_READ``) it costs one pass over its cached pages and nothing after. The kernel's own
account of a mapping (``Rss`` in ``/proc/self/smaps``) tells which happened, so these tests read it
rather than trusting the call was made.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store
from featurestore.store import _file_writes, _shards, open_store
from tests.featurestore.chunk_paths import arrays, chunk_file, chunk_files

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not _shards._MADV_POPULATE_READ,
                                reason="MADV_POPULATE_READ and /proc/self/smaps are Linux's")

PROVENANCE = {"encoder": "test/maps", "config": {}, "weights": {"kind": "random", "seed": 0},
              "segments": {"frames": 1}}
CLIPS, DIM = 16384, 256  # 512 B a row: one 8 MiB shard


@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("maps") / "store.zarr"
    ids = [f"{TAU_CLASSES[i % 10]}-city0-{i}-a" for i in range(CLIPS)]
    manifest = Manifest("maps", list(TAU_CLASSES), [ClipRecord(c, label=TAU_CLASSES[i % 10]) for i, c in enumerate(ids)])
    values = np.random.default_rng(0).standard_normal((CLIPS, 1, DIM)).astype(np.float16)
    with create_store(path, manifest) as store:
        store.create_feature_set("emb", 1, (DIM,), PROVENANCE, chunk_clips=CLIPS)
        store.write_rows("emb", 0, values)
    return path, values


def shard_files(path: Path) -> list[Path]:
    return chunk_files(path, "features/emb/data")


def uncached(file: Path) -> Path:
    """``file`` with its pages dropped from the page cache: a bare mapping then holds only what its
    reads fault in (a cached file may sit in large folios, which one fault maps whole)."""
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return file


def mapped_kib(file: Path) -> int:
    """Resident KiB of this process's mappings of ``file`` (0: not mapped)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = head[-1] == str(file)
        elif inside and head and head[0] == "Rss:":
            total += int(head[1])
    return total


def test_a_shard_of_an_array_that_fits_in_memory_gets_its_pages_on_its_second_use(store_path):
    path, values = store_path
    shard = uncached(shard_files(path)[0])
    with open_store(path) as store:
        ids = store.clip_ids
        np.testing.assert_array_equal(store.get("emb", ids[1234]), values[1234])
        first = mapped_kib(shard)  # one read of a store object: mapped bare, its pages read around the row
        np.testing.assert_array_equal(store.get_many("emb", [ids[9000], ids[16000]]), values[[9000, 16000]])
        second = mapped_kib(shard)
    assert 0 < first <= 2048
    assert second >= 0.9 * shard.stat().st_size / 1024  # every page of the 8 MiB shard


def test_a_bigger_shard_waits_for_a_read_per_4_mib_of_it(store_path, monkeypatch):
    """Populating costs ~0.1 ms a MiB: a shard is populated once it has served a read per
    ``_POPULATE_AFTER_BYTES`` of it; here 1 MiB, so the 8 MiB shard waits for its eighth read."""
    path, values = store_path
    shard = uncached(shard_files(path)[0])
    monkeypatch.setattr(_shards, "_POPULATE_AFTER_BYTES", 1 << 20)
    rows = [100 + 2000 * i for i in range(8)]
    with open_store(path) as store:
        ids = store.clip_ids
        for row in rows[:7]:
            np.testing.assert_array_equal(store.get("emb", ids[row]), values[row])
        after_seven = mapped_kib(shard)
        np.testing.assert_array_equal(store.get("emb", ids[rows[7]]), values[rows[7]])
        after_eight = mapped_kib(shard)
    assert 0 < after_seven <= 4096
    assert after_eight >= 0.9 * shard.stat().st_size / 1024


def test_an_array_larger_than_a_quarter_of_memory_stays_mapped_bare(store_path, monkeypatch):
    path, values = store_path
    shard = uncached(shard_files(path)[0])
    monkeypatch.setattr(_shards, "_physical_memory", lambda: 4 * CLIPS * DIM * 2 - 4)  # a byte too small
    with open_store(path) as store:
        for rows in ([5], [8000], [16000, 12000]):
            np.testing.assert_array_equal(store.get_many("emb", [store.clip_ids[r] for r in rows]), values[rows])
        resident = mapped_kib(shard)
    assert 0 < resident <= 3072  # the pages read around four rows (readahead), not the 8 MiB


def test_the_rule_is_a_quarter_of_physical_memory(monkeypatch):
    layout = _shards.ShardLayout(1024, 8, (1, 512), np.dtype("<f2"), False, 0)
    monkeypatch.setattr(_shards, "_physical_memory", lambda: 4 << 30)  # 4 GiB: arrays up to 1 GiB
    assert _shards.populates(layout, 1 << 20)  # 1 KiB rows: exactly 1 GiB
    assert not _shards.populates(layout, (1 << 20) + 1)


def test_a_shard_written_from_views_of_the_rows_reads_back_whole_in_zarr_python(store_path):
    """The 8 MiB shard is 1,024 inner chunks and their checksums: 2,049 buffers, three ``writev`` calls."""
    import zarr

    path, values = store_path
    layout_rows = zarr.open_array(path / "features" / "emb" / "data", mode="r")
    assert len(_shards.shard_parts(_shards.ShardLayout.of(layout_rows), values)[0]) > 2 * _file_writes._IOV_MAX
    np.testing.assert_array_equal(layout_rows[:], values)


def test_a_short_write_is_finished_from_where_it_stopped(tmp_path, monkeypatch):
    """``writev`` may write less than asked (a signal, a full disk that frees up): the rest follows in order."""
    parts = [np.full(1000, i % 251, dtype=np.uint8) for i in range(3000)]
    real = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, buffers: real(fd, buffers[:len(buffers) // 2 + 1][:-1] or buffers[:1]))
    _file_writes.replace_file(str(tmp_path / "f"), parts)
    np.testing.assert_array_equal(np.fromfile(tmp_path / "f", dtype=np.uint8), np.concatenate(parts))


def flip_byte_at(file: Path, offset: int) -> None:
    """Flip one byte in place (the file keeps its inode: what a bad disk does, not a writer)."""
    with open(file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


def test_a_shard_in_use_is_checked_whole_once_and_a_damaged_chunk_is_still_named_when_read(store_path, tmp_path):
    """Once populated, a shard's unchecked inner chunks are checked in one pass (a random batch then
    costs no checksum); the pass raises nothing for a chunk no one asked for, and the read of that
    chunk still names the damage."""
    import shutil

    from featurestore.errors import CorruptChunkError

    source, values = store_path
    path = tmp_path / "store.zarr"
    shutil.copytree(source, path)
    shard = shard_files(path)[0]
    inner = (8 << 10) + 4  # 16 rows of 512 B a chunk, then its crc32c
    flip_byte_at(shard, 700 * inner + 100)  # inside inner chunk 700: rows 11200-11215
    with open_store(path) as store:
        ids, reader = store.clip_ids, store._b._shards
        np.testing.assert_array_equal(store.get("emb", ids[5]), values[5])
        checked_before = int(reader._arrays["features/emb/data"].checked.sum())
        np.testing.assert_array_equal(store.get_many("emb", [ids[9000], ids[16000]]), values[[9000, 16000]])
        checked = reader._arrays["features/emb/data"].checked
        with pytest.raises(CorruptChunkError, match="features/emb/data: rows 11200:11216"):
            store.get_many("emb", [ids[3], ids[11210]])
    assert checked_before == 1
    assert np.flatnonzero(~checked[:1024]).tolist() == [700]  # every chunk but the damaged one


def test_a_bulk_id_lookup_names_a_damaged_block_of_the_lookup_table(store_path, tmp_path):
    """Many ids are looked up by a binary search over views of the mapped table: a block that fails
    its crc32c is named as the array and rows it holds, never searched."""
    import shutil

    from featurestore.errors import CorruptChunkError

    source, values = store_path
    path = tmp_path / "store.zarr"
    shutil.copytree(source, path)
    with open_store(path) as store:
        ids = store.clip_ids
        rows = np.random.default_rng(1).choice(CLIPS, 500, replace=False)
        np.testing.assert_array_equal(store.rows([ids[r] for r in rows]), rows)  # found across the blocks
        [table] = [a for a in arrays(path) if a.startswith("index/lookup/") and a.endswith("/table")]
        table = chunk_file(path, table)  # rows 0:16384 of the table, all of it
    flip_byte_at(table, 5 * (64 * 24 + 4) + 10)  # block 5: table rows 320-383
    with open_store(path) as store, pytest.raises(CorruptChunkError, match=r"table: rows 320:384"):
        store.rows(list(ids))


def test_single_gets_check_only_their_chunks_and_the_first_batch_checks_the_shard_whole(store_path):
    """A cold single ``get`` on a store in use checks its one inner chunk, never the thousand of its
    shard (~1.3 ms per 8 MiB: what a batch pays once, not a single read)."""
    path, values = store_path
    with open_store(path) as store:
        ids, reader = store.clip_ids, store._b._shards
        for row in (10, 5000, 9000):  # the second use populates the map
            np.testing.assert_array_equal(store.get("emb", ids[row]), values[row])
        checked = reader._arrays["features/emb/data"].checked
        assert int(checked[:1024].sum()) == 3
        np.testing.assert_array_equal(store.get_many("emb", [ids[1], ids[16383]]), values[[1, 16383]])
        assert bool(checked[:1024].all())


def test_a_cold_get_keeps_its_row_and_a_second_read_of_its_chunk_keeps_the_chunk(store_path):
    """A random read copies no neighbours into the decoded-chunk cache (fresh memory: page faults, a
    third of a cold ``get``): its entry holds the row asked, the others flagged absent; the clip again
    is a hit, a neighbour read next keeps the chunk whole."""
    path, values = store_path
    with open_store(path) as store:
        ids, cache = store.clip_ids, store._rows_cache.chunks
        per = store._b.inner_rows("features/emb/data")
        key = ("features/emb/data", per, 3)
        first = store.get("emb", ids[3 * per + 1])
        assert cache.get(key)[1].tolist() == [i == 1 for i in range(per)]
        first[:] = 7  # the caller's copy, not a view of the cache or the map
        np.testing.assert_array_equal(store.get("emb", ids[3 * per + 1]), values[3 * per + 1])
        np.testing.assert_array_equal(store.get("emb", ids[3 * per + 2]), values[3 * per + 2])  # its neighbour
        block, kept = cache.get(key)
        assert kept.all()
        np.testing.assert_array_equal(block, values[3 * per:4 * per])
