"""The sharded chunk layout: small inner chunks inside shards, read by byte range from a cached index.

A 100k-clip store is built through the public API without encoders (rows written directly). The
tests count the bytes read from shard files (``os.pread`` wrapped), so they prove what a random read
touches, not only how long it takes; zarr-python reads what the store wrote and the store reads
what zarr-python wrote; a damaged inner chunk or shard index is refused (never zeros) and ``verify``
names its rows; a store in the layout before sharding still reads, and ``convert`` shards it.
"""
from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import zarr

from featurestore import ClipRecord, Manifest, convert_store, create_store, open_store
from featurestore.errors import CorruptChunkError, MissingChunkError
from featurestore.store import feature_sets
from featurestore.store._shards import ShardReader
from tests.featurestore.chunk_paths import chunk_file

N = 100_000
DIM = 128  # float16: 256 B a clip -> inner chunks of 32 clips (8 KiB), shards of 4,096 clips (1 MiB)
FEAT = "emb/test"
PROV = {"encoder": "emb/test@none", "config": {}, "weights": {"kind": "random", "seed": 0}, "segments": {}}
INNER, SHARD = 32, 4096
INNER_BYTES = INNER * DIM * 2
INDEX_BYTES = SHARD // INNER * 16 + 4


def clip_id(i: int) -> str:
    return f"c{i:06d}"


def values(rows: np.ndarray) -> np.ndarray:
    """Each row's values: its number (mod 2048, exact in float16) plus the column, in every cell."""
    return ((rows[:, None] % 2048) + np.arange(DIM) % 7).astype(np.float16)[:, None, :]


def build(path: str, n: int = N, inner: int = INNER) -> None:
    """A store of ``n`` clips with one finished 1 x DIM float16 feature set, in the default layout."""
    with create_store(path, Manifest("scale", ["a"], [ClipRecord(clip_id(i), label="a") for i in range(n)])) as fs:
        info = fs.create_feature_set(FEAT, 1, (DIM,), PROV, chunk_clips=SHARD)  # the default: 16,384 here
        assert (info.chunk_clips, fs.arrays.inner_rows(f"features/{FEAT}/data")) == (SHARD, inner)
        for start in range(0, n, 8 * SHARD):
            stop = min(n, start + 8 * SHARD)
            fs.write_rows(FEAT, start, values(np.arange(start, stop)))


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("shards") / "big.zarr")
    build(path)
    return path


@pytest.fixture
def small(tmp_path) -> str:
    path = str(tmp_path / "small.zarr")
    build(path, 2 * SHARD + 100)  # two whole shards and a part-filled last one
    return path


def count_reads(monkeypatch) -> list[int]:
    """Sizes of every ``os.pread`` from now on (how the store reads local shard files)."""
    sizes: list[int] = []
    pread = os.pread

    def counted(fd: int, n: int, offset: int) -> bytes:
        data = pread(fd, n, offset)
        sizes.append(len(data))
        return data

    monkeypatch.setattr(os, "pread", counted)
    return sizes


def shard_file(path: str, shard: int) -> str:
    return str(chunk_file(path, f"features/{FEAT}/data", shard))


def test_random_reads_by_range_fetch_only_their_inner_chunks(big, monkeypatch):
    """The inner-chunk reader (remote stores, compressed shards, single gets): counted at the syscall."""
    monkeypatch.setattr(ShardReader, "gather", lambda *args: None)  # no memory maps: every read by range
    rng = np.random.default_rng(0)
    rows = rng.choice(N, 256, replace=False)
    with open_store(big) as fs:
        fs.done_mask(FEAT)  # the done flags and the ids are resolved once; what is counted below is the values
        ids = [clip_id(r) for r in rows]
        fs.rows(ids)
        sizes = count_reads(monkeypatch)
        got = fs.get_many(FEAT, ids)
        np.testing.assert_array_equal(got, values(rows))
        inner = len(np.unique(rows // INNER))
        shards = len(np.unique(rows // SHARD))
        indexes = [s for s in sizes if s == INDEX_BYTES]
        chunks = [s for s in sizes if s != INDEX_BYTES]
        assert len(indexes) == shards  # one index read per shard touched
        assert all(s % (INNER_BYTES + 4) == 0 for s in chunks)  # runs of whole inner chunks, nothing else
        assert sum(chunks) == inner * (INNER_BYTES + 4)  # exactly the inner chunks holding the clips
        assert sum(chunks) <= INNER * 1.01 * got.nbytes  # ~32x the bytes returned, not a 1 MiB shard each
        sizes.clear()  # the shard indexes are kept: a second batch reads inner chunks only
        more = rng.choice(N, 64, replace=False)
        np.testing.assert_array_equal(fs.get_many(FEAT, [clip_id(r) for r in more]), values(more))
        assert sizes and all(s % (INNER_BYTES + 4) == 0 for s in sizes)
        assert sum(sizes) <= 64 * (INNER_BYTES + 4)


def test_random_reads_from_mapped_shards_check_only_their_inner_chunks(big, monkeypatch):
    """The memory-mapped path (local, uncompressed shards): no read syscalls for values; what it
    checks (each shard's index, each inner chunk holding a clip, once) is counted by the reader."""
    rows = np.random.default_rng(2).choice(N, 256, replace=False)
    with open_store(big) as fs:
        fs.done_mask(FEAT)
        ids = [clip_id(r) for r in rows]
        for _ in range(2):  # the id lookup's table (mapped too, checked whole at its second use) is not counted below
            fs.rows(ids)
        reader = fs._b._shards
        start = reader.bytes_read
        sizes = count_reads(monkeypatch)
        got = fs.get_many(FEAT, ids)
        np.testing.assert_array_equal(got, values(rows))
        assert sizes == []  # values come from the maps
        inner, shards = len(np.unique(rows // INNER)), len(np.unique(rows // SHARD))
        assert reader.bytes_read - start == shards * INDEX_BYTES + inner * (INNER_BYTES + 4)
        before = reader.bytes_read
        np.testing.assert_array_equal(fs.get_many(FEAT, [clip_id(r) for r in rows[::-1]]), values(rows[::-1]))
        # each shard's second use: it is populated and the rest of its inner chunks checked at once
        whole = sum(-(-min(SHARD, N - s * SHARD) // INNER) for s in np.unique(rows // SHARD).tolist())
        assert reader.bytes_read - before == (whole - inner) * (INNER_BYTES + 4)
        before = reader.bytes_read
        np.testing.assert_array_equal(fs.get_many(FEAT, [clip_id(r) for r in rows[:100]]), values(rows[:100]))
        assert reader.bytes_read == before  # checked once per mapping


def test_zarr_python_reads_what_the_store_wrote_and_the_store_reads_what_zarr_wrote(big, small):
    arr = zarr.open_array(os.path.join(big, "features", *FEAT.split("/"), "data"), mode="r")
    assert (arr.shards[0], arr.chunks[0]) == (SHARD, INNER)
    rows = np.random.default_rng(1).choice(N, 500, replace=False)
    with open_store(big) as fs:
        np.testing.assert_array_equal(arr.oindex[rows], fs.get_many(FEAT, [clip_id(r) for r in rows]))
    np.testing.assert_array_equal(arr[N - 50:], values(np.arange(N - 50, N)))  # the last, part-filled shard

    theirs = zarr.open_array(os.path.join(small, "features", *FEAT.split("/"), "data"), mode="a")
    new = np.full((40, 1, DIM), -3.5, dtype=np.float16)
    theirs[SHARD + 10:SHARD + 50] = new  # zarr-python rewrites part of shard 1
    with open_store(small) as fs:
        np.testing.assert_array_equal(fs.read_rows(FEAT, SHARD + 10, SHARD + 50), new)
        np.testing.assert_array_equal(fs.get(FEAT, clip_id(SHARD + 9)), values(np.array([SHARD + 9]))[0])


def test_a_damaged_inner_chunk_is_refused_and_verify_names_its_rows(small):
    target = SHARD + 5 * INNER + 3  # a clip in inner chunk 5 of shard 1
    with open(shard_file(small, 1), "r+b") as f:
        f.seek(5 * (INNER_BYTES + 4) + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    first = SHARD + 5 * INNER
    with open_store(small) as fs:
        with pytest.raises(CorruptChunkError, match=rf"rows {first}:{first + INNER} could not be read.*crc32c"):
            fs.get(FEAT, clip_id(target))
        with pytest.raises(CorruptChunkError, match=rf"rows {first}:{first + INNER}"):
            fs.get_many(FEAT, [clip_id(0), clip_id(target)])
        neighbour = first + INNER  # the next inner chunk of the same shard is intact
        np.testing.assert_array_equal(fs.get(FEAT, clip_id(neighbour)), values(np.array([neighbour]))[0])
        report = fs.verify()
    assert [(p.where, p.rows) for p in report.problems] == [(f"features/{FEAT}/data", (first, first + INNER))]
    assert f"{clip_id(first)} .. {clip_id(first + INNER - 1)}" in str(report.problems[0])


def test_a_damaged_shard_index_or_an_absent_inner_chunk_is_refused_never_zeros(small):
    import google_crc32c

    path = shard_file(small, 0)
    data = bytearray(open(path, "rb").read())
    index = np.frombuffer(bytes(data[-INDEX_BYTES:-4]), "<u8").reshape(-1, 2).copy()
    index[2] = 2**64 - 1  # inner chunk 2 marked absent, index checksum made right: a lost inner chunk
    body = index.tobytes()
    data[-INDEX_BYTES:] = body + google_crc32c.value(body).to_bytes(4, "little")
    open(path, "wb").write(bytes(data))
    with open_store(small) as fs:
        with pytest.raises(MissingChunkError, match=rf"rows {2 * INNER}:{3 * INNER} were written but"):
            fs.get(FEAT, clip_id(2 * INNER + 1))
        report = fs.verify()
        assert [(p.rows, "inner chunk missing" in p.what) for p in report.problems] == [((2 * INNER, 3 * INNER), True)]

    data[-10] ^= 0xFF  # now the index fails its checksum
    open(path, "wb").write(bytes(data))
    with open_store(small) as fs:
        with pytest.raises(CorruptChunkError, match=r"index fails its crc32c"):
            fs.get(FEAT, clip_id(7))
        assert not fs.verify().ok
        np.testing.assert_array_equal(fs.get(FEAT, clip_id(SHARD + 7)), values(np.array([SHARD + 7]))[0])


def test_a_store_in_the_layout_before_shards_reads_and_converts_into_shards(tmp_path, monkeypatch):
    old = str(tmp_path / "old.zarr")
    with monkeypatch.context() as m:  # the layout before: one plain chunk per block of clips
        m.setattr(feature_sets, "default_inner_clips", lambda n_segments, shape, dtype, chunk_clips: chunk_clips)
        build(old, 9001, inner=SHARD)
    arr = zarr.open_array(os.path.join(old, "features", *FEAT.split("/"), "data"), mode="r")
    assert arr.shards is None and arr.chunks[0] == SHARD
    rows = np.array([0, 1, 4095, 4096, 9000])
    with open_store(old) as fs:
        np.testing.assert_array_equal(fs.get_many(FEAT, [clip_id(r) for r in rows]), values(rows))
    for dst in ("new.zarr", "new.h5"):
        convert_store(old, tmp_path / dst, progress=False)
        with open_store(tmp_path / dst) as fs:
            assert (fs.feature_info(FEAT).chunk_clips, fs.arrays.inner_rows(f"features/{FEAT}/data")) == (SHARD, INNER)
            np.testing.assert_array_equal(fs.read_rows(FEAT, 0, 9001), values(np.arange(9001)))
            assert fs.verify().ok
    with h5py.File(tmp_path / "new.h5", "r") as f:  # HDF5: small chunks, writers' blocks unchanged
        assert f[f"features/{FEAT}/data"].chunks[0] == INNER


def test_hdf5_feature_sets_get_small_chunks_and_read_back(tmp_path):
    path = str(tmp_path / "s.h5")
    build(path, SHARD + 300)
    with h5py.File(path, "r") as f:
        assert f[f"features/{FEAT}/data"].chunks == (INNER, 1, DIM)
    with open_store(path) as fs:
        assert fs.feature_info(FEAT).chunk_clips == SHARD
        rows = np.array([5, SHARD + 299, 77, 4000])
        np.testing.assert_array_equal(fs.get_many(FEAT, [clip_id(r) for r in rows]), values(rows))
        assert fs.verify().ok


def test_zstd_shards_and_a_url_store_take_the_same_byte_range_path(tmp_path):
    """Compressed inner chunks (frames) and a store behind fsspec (no local files): written whole,
    read by range, read back by zarr-python the same."""
    for where, compressor in ((str(tmp_path / "z.zarr"), "zstd"), (f"memory://shards-{os.getpid()}/s.zarr", None)):
        n = SHARD + 200
        with create_store(where, Manifest("z", ["a"], [ClipRecord(clip_id(i), label="a") for i in range(n)])) as fs:
            fs.create_feature_set(FEAT, 1, (DIM,), PROV, compressor=compressor)
            fs.write_rows(FEAT, 0, values(np.arange(n)))
            rows = np.array([n - 1, 3, SHARD + 33, 40])
            fs.refresh()
            ids = [clip_id(r) for r in rows]
            fs.rows(ids)  # the id lookup's reads are not counted below
            start = fs._b._shards.bytes_read
            np.testing.assert_array_equal(fs.get_many(FEAT, ids), values(rows))
            data = f"features/{FEAT}/data"  # the default shard; its index is read again after refresh
            index_bytes = fs.arrays.chunk_rows(data) // fs.arrays.inner_rows(data) * 16 + 4
            assert fs._b._shards.bytes_read - start <= 2 * index_bytes + len(rows) * (INNER_BYTES + 4)
            assert fs.verify().ok
        arr = zarr.open_array(f"{where}/features/{FEAT}/data", mode="r")
        assert [type(c).__name__ for c in arr.metadata.codecs[0].codecs][1:] == (["ZstdCodec"] if compressor else []) \
            + ["Crc32cCodec"]
        np.testing.assert_array_equal(arr[:], values(np.arange(n)))


def test_a_shard_rewritten_by_another_writer_is_read_anew_never_stale(small):
    """A reader holding a shard mapped sees rows another process finished since (after refresh, as
    for every cached read): the replaced file is mapped again, not its old bytes served."""
    later = np.arange(SHARD, 2 * SHARD)
    with open_store(small, "a") as writer:
        done = np.ones(SHARD, dtype=bool)
        done[100:] = False  # shard 1 holds 100 finished rows, the rest not yet
        writer.write_rows(FEAT, SHARD, np.zeros((SHARD, 1, DIM), np.float16), done=done)
    with open_store(small) as reader:
        np.testing.assert_array_equal(reader.get_many(FEAT, [clip_id(SHARD + 1), clip_id(SHARD + 2)]), 0)
        with open_store(small, "a") as writer:
            writer.write_rows(FEAT, SHARD, values(later))
        # rows finished since: the done flags are read anew, and with them the mapped shard's file checked
        # a single get (one inner chunk as a view of the map) maps the new file, as a batch does
        np.testing.assert_array_equal(reader.get(FEAT, clip_id(SHARD + 700)), values(np.array([SHARD + 700]))[0])
        np.testing.assert_array_equal(reader.get_many(FEAT, [clip_id(SHARD + 500), clip_id(SHARD + 501)]),
                                      values(np.array([SHARD + 500, SHARD + 501])))
        reader.refresh()
        rows = np.array([SHARD + 1, SHARD + 500, 2 * SHARD - 1])
        np.testing.assert_array_equal(reader.get_many(FEAT, [clip_id(r) for r in rows]), values(rows))


def test_dask_blocks_must_be_whole_shards_of_every_feature_set_they_write():
    """A plan whose blocks would split a shard between two Dask tasks is refused before any task
    runs; a set with nothing to do in a block does not constrain it."""
    from featurestore.extract.dask import check_blocks_aligned
    from featurestore.extract.plan import Plan, Source, Target

    n = 20

    def target(name: str, chunk: int, todo: bool) -> Target:
        return Target(name, None, f"{name}@none", Source("audio", 1, 16000, 1.0), (4,), "float32", chunk, {},
                      np.full(n, todo), skipped=0, options={})

    def plan(block: int, *targets: Target) -> Plan:
        return Plan(list(targets), block, n, np.ones(n, dtype=bool), [""] * n, [""] * n,
                    [clip_id(i) for i in range(n)], 2)

    check_blocks_aligned(plan(8, target("a", 8, True)))  # 0:8, 8:16, 16:20 (the end)
    check_blocks_aligned(plan(4, target("a", 4, True), target("b", 8, False)))  # b has nothing to do
    with pytest.raises(RuntimeError, match=r"block 0:4 is not made of whole chunks of 8 clips of a"):
        check_blocks_aligned(plan(4, target("a", 8, True)))


def test_mapped_shards_are_bounded_so_their_file_descriptors_are(big, monkeypatch):
    """Each memory map holds a file descriptor: a store keeps at most MAX_MAPPED_SHARDS of them."""
    from featurestore.store import _shards

    monkeypatch.setattr(_shards, "MAX_MAPPED_SHARDS", 3)
    rows = np.arange(0, N, SHARD // 2)  # two clips in every one of the 25 shards
    with open_store(big) as fs:
        fds = len(os.listdir("/proc/self/fd"))
        np.testing.assert_array_equal(fs.get_many(FEAT, [clip_id(r) for r in rows]), values(rows))
        assert len(fs._b._shards._maps) == 3
        assert len(os.listdir("/proc/self/fd")) <= fds + 3


def test_plain_chunks_written_as_files_are_what_zarr_python_reads(tmp_path):
    """Done flags, error texts and index columns (numbers, vlen-utf8 strings, a padded edge chunk)
    written whole by the store's own chunk writer read back the same through zarr-python."""
    path, n = str(tmp_path / "plain.zarr"), SHARD + 10
    ids = [clip_id(i) for i in range(n)]
    with create_store(path, Manifest("p", ["a", "b"], [ClipRecord(c, label="ab"[i % 2], city=f"ü{i % 3}")
                                                        for i, c in enumerate(ids)])) as fs:
        fs.create_feature_set(FEAT, 1, (DIM,), PROV, chunk_clips=SHARD)
        done = np.arange(SHARD) % 5 != 0
        fs.write_rows(FEAT, 0, values(np.arange(SHARD)), done=done,
                      errors={int(r): f"bad clip {r} ✗" for r in np.flatnonzero(~done)})
        fs.write_rows(FEAT, SHARD, values(np.arange(SHARD, n)))  # the last, part-filled chunk
    root = zarr.open_group(path, mode="r")
    assert root["index/clip_id"][:].tolist() == ids
    assert root["index/city"][:].tolist() == [f"ü{i % 3}" for i in range(n)]
    np.testing.assert_array_equal(root["index/label"][:], np.arange(n) % 2)
    np.testing.assert_array_equal(root[f"features/{FEAT}/done"][:], np.r_[done, np.ones(10, dtype=bool)])
    errors = root[f"features/{FEAT}/errors"][:]
    assert [(i, e) for i, e in enumerate(errors) if e] == [(int(r), f"bad clip {r} ✗") for r in np.flatnonzero(~done)]
    with open_store(path) as fs:
        assert fs.errors(FEAT)[clip_id(5)] == "bad clip 5 ✗" and fs.verify().ok


def test_a_batch_over_more_shards_than_may_be_mapped_reads_them_in_turns(big, monkeypatch):
    """One ``get_many`` touching more shards than ``MAX_MAPPED_SHARDS`` maps them a bound at a time
    (each map holds a descriptor), rows in the order asked, every value right."""
    from featurestore.store import _shards

    monkeypatch.setattr(_shards, "MAX_MAPPED_SHARDS", 4)
    rows = np.random.default_rng(7).permutation(np.arange(3, N, SHARD // 3))  # 3 clips in each of 25 shards
    with open_store(big) as fs:
        np.testing.assert_array_equal(fs.get_many(FEAT, [clip_id(r) for r in rows]), values(rows))
        assert len(fs._b._shards._maps) == 4


def test_rows_of_a_shard_never_written_read_as_fill_unless_required(tmp_path):
    """A batch over written shards and one never written: with done checks it is refused, without
    them (what ``_same_values`` and ``verify`` ask) its rows are the fill value; both the few-rows-a-
    shard path and the many-rows-a-shard path of the mapped reader."""
    from featurestore.errors import MissingFeatureError
    from featurestore.store.row_group import FEATURE_SETS

    path = str(tmp_path / "holes.zarr")
    n = 3 * SHARD
    with create_store(path, Manifest("holes", ["a"], [ClipRecord(clip_id(i), label="a") for i in range(n)])) as fs:
        fs.create_feature_set(FEAT, 1, (DIM,), PROV, chunk_clips=SHARD)
        for start in (0, 2 * SHARD):  # shard 1 is never written
            fs.write_rows(FEAT, start, values(np.arange(start, start + SHARD)))
    rng = np.random.default_rng(3)
    with open_store(path) as fs:
        group = fs.row_group(FEATURE_SETS, FEAT)
        for rows in (rng.choice(n, 6, replace=False), rng.choice(n, 900, replace=False)):
            rows[0] = SHARD + 17
            got = group.gather(rows, check_done=False)
            hole = (rows >= SHARD) & (rows < 2 * SHARD)
            np.testing.assert_array_equal(got[~hole], values(rows[~hole]))
            assert (got[hole] == 0).all()
            with pytest.raises(MissingFeatureError, match=clip_id(SHARD + 17)):
                fs.get_many(FEAT, [clip_id(r) for r in rows])
