"""The read path under hostile sequences: every ``get`` / ``get_many`` / ``read_rows`` answer is what
was last committed for those clips (checked against a numpy copy of what was written and a plain
``zarr`` read of the array), or a clear error: ``MissingFeatureError`` for a clip not done,
``UnknownClipError`` for an unknown id, ``CorruptChunkError`` naming the array for damage; never
another clip's values, a bare ``IndexError`` / ``KeyError``, or a SIGBUS.

Found by this review: a shard file cut short in place (``truncate``, a ``cp`` over it) while a store
held it mapped killed the process with SIGBUS on the next ``get`` of that shard (now a
``CorruptChunkError``); a ``get`` after the same store object created a set again with another
inner chunking read another clip's values (a group's inner rows were cached on the group ``get``
kept), and one after it deleted the set raised a bare ``KeyError``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr

from featurestore import ClipRecord, Manifest, create_store
from featurestore.errors import CorruptChunkError, MissingFeatureError, UnknownClipError, UnknownFeatureError
from featurestore.store import _shards, open_store
from tests.featurestore.chunk_paths import chunk_file

PROVENANCE = {"encoder": "test/read-path", "config": {}, "weights": {"kind": "random", "seed": 0},
              "segments": {"frames": 1}}
OTHER = dict(PROVENANCE, weights={"kind": "random", "seed": 1})
N, DIM = 600, 64  # float32: 256 B a clip; chunk_clips=40 -> 15 shards of 2 inner chunks of 20 rows
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def manifest(ids: list[str]) -> Manifest:
    return Manifest("read-path", ["a"], [ClipRecord(c, label="a") for c in ids])


def row_values(rows, dim: int = DIM, offset: float = 0.0, dtype="float32") -> np.ndarray:
    """A clip's row holds its row number (plus ``offset``) everywhere: another clip's values show."""
    rows = np.asarray(rows)
    return (rows[:, None, None] + offset + np.zeros((1, 1, dim))).astype(dtype)


def build(path, n: int = N, chunk: int = 40, done: np.ndarray | None = None):
    ids = [f"c{i:05d}" for i in range(n)]
    values = row_values(np.arange(n))
    with create_store(path, manifest(ids)) as store:
        store.create_feature_set("e", 1, (DIM,), PROVENANCE, dtype="float32", chunk_clips=chunk)
        store.write_rows("e", 0, values, done=done)
    return ids, values


def flip_byte_at(file, offset: int) -> None:
    """Flip one byte in place, then put the file's mtime back (same inode, size and mtime)."""
    stat = os.stat(file)
    with open(file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))


# ------------------------------------------------------------------------------- batches
@pytest.mark.parametrize("backend, cache_bytes", [("zarr", 256 << 20), ("zarr", 0), ("zarr", 3000),
                                                  ("hdf5", 256 << 20), ("hdf5", 0)])
def test_batches_of_any_shape_answer_what_was_committed(tmp_path, backend, cache_bytes, monkeypatch):
    """Empty, repeated, reversed, every shard, more shards than one call may map, a mix of done and
    not done: the values of those very clips in that order, or MissingFeatureError naming exactly the
    clips not done; whatever the cache bound and the backend."""
    monkeypatch.setattr(_shards, "MAX_MAPPED_SHARDS", 4)  # 15 shards: a batch is read in 4 parts
    done = np.ones(N, dtype=bool)
    done[[7, 300, 301, 599]] = False
    path = tmp_path / ("s.zarr" if backend == "zarr" else "s.h5")
    ids, values = build(path, done=done)
    rng = np.random.default_rng(0)
    good = np.flatnonzero(done)
    with open_store(path, cache_bytes=cache_bytes) as store:
        assert store.get_many("e", []).shape == (0, 1, DIM)
        batches = [good[::-1], np.repeat(good[:5], 3), good[rng.permutation(len(good))], rng.choice(good, 5000),
                   np.array([good[0]] * 7), good[::37]]
        for rows in batches:
            np.testing.assert_array_equal(store.get_many("e", [ids[r] for r in rows]), values[rows])
        for row in rng.choice(good, 200):
            np.testing.assert_array_equal(store.get("e", ids[row]), values[row])
        np.testing.assert_array_equal(store.read_rows("e", 8, 300), values[8:300])
        for rows, missing in (([5, 300, 6, 599, 300], ["c00300", "c00599"]), ([7], ["c00007"])):
            with pytest.raises(MissingFeatureError) as err:
                store.get_many("e", [ids[r] for r in rows]) if len(rows) > 1 else store.get("e", ids[rows[0]])
            assert set(err.value.clip_ids) == set(missing)
        with pytest.raises(UnknownClipError):
            store.get_many("e", [ids[1], "c99999", ids[2]])
    if backend == "zarr":  # the store's answers are the stored array, as zarr itself reads it
        plain = zarr.open_group(path, mode="r")["features/e/data"][:]
        np.testing.assert_array_equal(plain[good], values[good])


def test_missing_feature_error_names_the_clips(tmp_path):
    """(The attribute the batch test reads: the clips named, in the order asked.)"""
    done = np.ones(80, dtype=bool)
    done[[3, 50]] = False
    ids, _ = build(tmp_path / "s.zarr", n=80, chunk=40, done=done)
    with open_store(tmp_path / "s.zarr") as store, pytest.raises(MissingFeatureError, match="c00050, c00003"):
        store.get_many("e", [ids[50], ids[1], ids[3]])


# -------------------------------------------------------------------- another writer, partial commits
@pytest.mark.parametrize("backend, cache_bytes", [("zarr", 256 << 20), ("zarr", 0), ("zarr", 500), ("hdf5", 500)])
def test_a_reader_of_partial_commits_sees_each_committed_row_or_missing(tmp_path, backend, cache_bytes):
    """A writer commits one shard part by part (``unchanged``: patched shards renamed over the
    mapped ones) while another store object reads it without ``refresh``: each clip reads as written
    once its done flag is set, MissingFeatureError before, never the zeros of an unwritten row."""
    path = tmp_path / ("s.zarr" if backend == "zarr" else "s.h5")
    ids = [f"c{i}" for i in range(512)]
    values = row_values(np.arange(512), dim=16, offset=0.5)
    rng = np.random.default_rng(1)
    with create_store(path, manifest(ids)) as writer:
        writer.create_feature_set("e", 1, (16,), PROVENANCE, dtype="float32", chunk_clips=128)
        with open_store(path, cache_bytes=cache_bytes) as reader:
            block, done = np.zeros((128, 1, 16), np.float32), np.zeros(128, dtype=bool)
            for commit in range(8):
                new = np.arange(commit * 16, commit * 16 + 16)
                block[new] = values[128 + new]
                unchanged = done.copy()
                done[new] = True
                writer.write_rows("e", 128, block, done=done, unchanged=unchanged if commit % 2 else None)
                for _ in range(15):
                    rows = rng.integers(128, 256, rng.integers(1, 6))
                    try:
                        got = reader.get("e", ids[rows[0]])[None] if len(rows) == 1 else \
                            reader.get_many("e", [ids[r] for r in rows])
                    except MissingFeatureError as err:
                        assert not done[rows - 128].all()
                        assert set(err.clip_ids) == {ids[r] for r in rows if not done[r - 128]}
                    else:
                        assert done[rows - 128].all()
                        np.testing.assert_array_equal(got, values[rows])


def test_a_shard_replaced_with_the_same_size_and_mtime_is_read_anew_once_done_flags_are(tmp_path):
    """Another writer rewrites done rows (the shard file renamed over: same size); its mtime is put
    back. Once the reader reads the done flags anew, rows it never read come from the new file, and
    after ``refresh`` every row does."""
    path = tmp_path / "s.zarr"
    ids, values = build(path)
    new = values + 1000
    shard = chunk_file(path, "features/e/data", 2)  # rows 80:120
    with open_store(path) as reader:
        np.testing.assert_array_equal(reader.get_many("e", [ids[81], ids[1]]), values[[81, 1]])
        before = os.stat(shard)
        with open_store(path, "a") as writer:
            writer.write_rows("e", 80, new[80:120])
        os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(shard)
        assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
        reader.done_mask("e", refresh=True)
        np.testing.assert_array_equal(reader.get_many("e", [ids[119], ids[100]]), new[[119, 100]])
        np.testing.assert_array_equal(reader.get("e", ids[90]), new[90])
        reader.refresh()
        np.testing.assert_array_equal(reader.read_rows("e", 0, N), np.concatenate([values[:80], new[80:120],
                                                                                  values[120:]]))


# ------------------------------------------------------------------------------------ damage
def test_a_flipped_byte_in_a_mapped_shard_is_refused_when_first_read_and_after_refresh(tmp_path):
    """Same inode, size and mtime: an inner chunk not checked yet is refused by the next read of it;
    one checked before the flip is checked again once ``refresh`` drops the maps. Its neighbours read."""
    path = tmp_path / "s.zarr"
    ids, values = build(path)
    shard = chunk_file(path, "features/e/data", 3)  # rows 120:160, inner chunks 120:140, 140:160
    inner = 20 * DIM * 4 + 4
    with open_store(path) as store:
        np.testing.assert_array_equal(store.get("e", ids[125]), values[125])  # maps shard 3, checks 120:140
        flip_byte_at(shard, inner + 10)  # in row 140
        with pytest.raises(CorruptChunkError, match=r"features/e/data: rows 140:160"):
            store.get("e", ids[155])
        with pytest.raises(CorruptChunkError, match=r"features/e/data: rows 140:160"):
            store.get_many("e", [ids[0], ids[153]])
        flip_byte_at(shard, 10)  # in row 120, of the inner chunk checked before
        store.refresh()
        for read in (lambda: store.get("e", ids[121]), lambda: store.get_many("e", [ids[121], ids[500]]),
                     lambda: store.read_rows("e", 120, 125)):
            with pytest.raises(CorruptChunkError, match=r"features/e/data: rows 120:140"):
                read()
        np.testing.assert_array_equal(store.get_many("e", [ids[119], ids[160]]), values[[119, 160]])


CUT_SHORT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    from featurestore.errors import CorruptChunkError
    from featurestore.store import open_store
    path, shard, read = sys.argv[1], sys.argv[2], sys.argv[3]
    with open_store(path) as store:
        store.get("e", "c00410")                     # maps shard 10 (rows 400:440), checks its first chunk
        os.truncate(shard, 100)                      # cut in place: the map's pages past 100 B are gone
        try:
            if read == "get":
                store.get("e", "c00435")
            else:
                store.get_many("e", ["c00435", "c00001"])
        except CorruptChunkError as err:
            print("refused:", err)
        print("other shard:", float(store.get("e", "c00001")[0, 0]))
""")


@pytest.mark.parametrize("read", ["get", "get_many"])
def test_a_shard_cut_short_in_place_while_mapped_is_refused_not_sigbus(tmp_path, read):
    """A mapped file cut short in place (``truncate``, a ``cp`` over it, a full disk in a copy tool)
    must not be read through its map: the pages past its new end raise SIGBUS, which killed the
    process (the next cold ``get`` of that shard on a store in use). Run in a child process so that
    a SIGBUS fails this test instead of killing pytest."""
    path = tmp_path / "s.zarr"
    build(path)
    shard = chunk_file(path, "features/e/data", 10)
    proc = subprocess.run([sys.executable, "-c", CUT_SHORT.format(root=ROOT), str(path), str(shard), read],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "refused:" in proc.stdout and "features/e/data: rows 420:440" in proc.stdout, proc.stdout
    assert "other shard: 1.0" in proc.stdout


def test_a_map_cut_short_is_looked_at_anew(tmp_path):
    """The same rule on the reader itself (no child): the map of a file cut short is not used."""
    path = tmp_path / "s.zarr"
    ids, values = build(path)
    with open_store(path) as store:
        store.get("e", ids[410])
        state = store._b._shards._arrays["features/e/data"]
        mapped = state.maps[10]
        assert not mapped.cut_short()
        size = os.stat(chunk_file(path, "features/e/data", 10)).st_size
        os.truncate(chunk_file(path, "features/e/data", 10), size - 4)
        assert mapped.cut_short()
        with pytest.raises(CorruptChunkError, match=r"features/e/data: rows 420:440"):
            store.get("e", ids[439])


# ------------------------------------------------------------------------------- ids after appends
@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_ids_resolved_before_appends_in_several_steps_still_resolve_right(tmp_path, backend):
    """Ids resolved a few at a time (kept in the recent-ids dict), misses on ids not appended yet,
    then appends of 1, 499 and 1,500 clips: the writer and a reader refreshed after each step
    resolve every id to its row and read its values."""
    path = tmp_path / ("s.zarr" if backend == "zarr" else "s.h5")
    every = [f"c{i:05d}" for i in range(3000)]
    values = row_values(np.arange(3000), dim=8)
    with create_store(path, manifest(every[:1000])) as writer, open_store(path) as reader:
        writer.create_feature_set("e", 1, (8,), PROVENANCE, dtype="float32", chunk_clips=64)
        writer.write_rows("e", 0, values[:1000])
        reader.refresh()
        for lo, hi in ((1000, 1001), (1001, 1500), (1500, 3000)):
            for store in (writer, reader):
                for cid in every[lo - 5:lo + 3]:
                    if int(cid[1:]) < lo:
                        assert store.row(cid) == int(cid[1:])
                    else:
                        with pytest.raises(UnknownClipError):
                            store.row(cid)
                assert store.index.find(every[lo:lo + 3] + every[:2]).tolist() == [-1, -1, -1, 0, 1]
            writer.append_clips(manifest(every[lo:hi]))
            start = lo - lo % 64
            writer.write_rows("e", start, values[start:hi])
            reader.refresh()
            for store in (writer, reader):
                for cid in every[lo - 5:min(hi, lo + 3)] + [every[hi - 1]]:
                    assert store.row(cid) == int(cid[1:])
                    np.testing.assert_array_equal(store.get("e", cid), values[int(cid[1:])])
                np.testing.assert_array_equal(store.rows(every[:hi][::-1]), np.arange(hi)[::-1])
                np.testing.assert_array_equal(store.get_many("e", every[:hi:7][::-1]), values[:hi:7][::-1])


# ------------------------------------------------------------------ the same store object rewrites
def test_a_set_created_again_by_the_same_store_object_reads_its_new_rows(tmp_path):
    path = tmp_path / "s.zarr"
    ids, values = build(path, n=400, chunk=100)  # inner chunks of 25 rows
    with open_store(path, "a") as store:
        np.testing.assert_array_equal(store.get("e", ids[150]), values[150])
        new = row_values(np.arange(400), dim=512, offset=1000)  # 2 KiB a clip: inner chunks of 4 rows
        store.create_feature_set("e", 1, (512,), OTHER, dtype="float32", chunk_clips=100, overwrite=True)
        store.write_rows("e", 0, new)
        for row in (150, 5, 399):
            np.testing.assert_array_equal(store.get("e", ids[row]), new[row])


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_get_after_the_same_store_object_deleted_the_set_is_unknown_feature(tmp_path, backend):
    path = tmp_path / ("s.zarr" if backend == "zarr" else "s.h5")
    ids, _ = build(path, n=80)
    with open_store(path, "a") as store:
        store.get("e", ids[5])
        store.delete_feature_set("e")
        with pytest.raises(UnknownFeatureError):
            store.get("e", ids[5])
