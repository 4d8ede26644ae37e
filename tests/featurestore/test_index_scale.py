"""The clip index at scale: a 100k-clip store opens and resolves ids without decoding its string columns.

Every read of the backend is counted (the store's ``_b.read`` wrapped), so the tests prove what is
decoded, not only how long it takes: before the persisted id lookup, opening a store and resolving
one id decoded every id (and ``ls``/``feature_info`` every per-clip error text). Also: stores in the
layout before the lookup (a crafted ``zarr.json`` without it) still read, and an append or a
conversion gives them one; an append SIGKILLed after writing its lookup, before its commit, leaves
the old lookup in use and the orphan removed by the next writable open.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from featurestore import ClipRecord, Manifest, convert_store, create_store, open_store
from featurestore.cli import describe_store
from featurestore.errors import UnknownClipError
from featurestore.store import index
from featurestore.store.index import LOOKUP_ATTR, LOOKUP_INNER_ROWS, VALUES_ATTR

N = 100_000
FEAT = "emb/test"
PROV = {"encoder": "emb/test@none", "config": {}, "weights": {"kind": "random", "seed": 0}, "segments": {}}
CHUNK = 4096
REPO = Path(__file__).resolve().parents[2]
STRING_COLUMNS = ("index/clip_id", "index/city", "index/location", "index/audio_path", "index/video_path")


def clip_id(i: int) -> str:
    return f"clip-{i:06d}-{i % 97}"


def clips(first: int, n: int) -> list[ClipRecord]:
    return [ClipRecord(clip_id(i), label="a" if i % 2 else "b", city=f"city{i % 7}", location=f"city{i % 7}-{i % 13}",
                       splits=frozenset({"train"} if i % 3 else {"test"})) for i in range(first, first + n)]


def values(rows: np.ndarray) -> np.ndarray:
    """The stored values of ``rows``: each row's number (mod 2048, exact in float16) in every cell."""
    return np.repeat((rows % 2048).astype(np.float16)[:, None, None], 4, axis=2)


def build(path: str, n: int = N, failed: int = 0) -> None:
    """A store of ``n`` clips with one finished 1 x 4 float16 feature set (``failed`` clips failed)."""
    with create_store(path, Manifest("scale", ["a", "b"], clips(0, n))) as store:
        store.create_feature_set(FEAT, 1, (4,), PROV, chunk_clips=CHUNK)
        data = values(np.arange(n))
        done = np.ones(n, dtype=bool)
        done[:failed] = False
        store.write_rows(FEAT, 0, data, done=done, errors={r: f"bad clip {r}" for r in range(failed)})


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("scale") / "big.zarr")
    build(path)
    return path


def counting(store) -> Counter:
    """Rows read per array path from now on (every read of the store's backend: row ranges, the
    inner chunks of sharded arrays, and rows or inner chunks from memory-mapped shards)."""
    counts: Counter = Counter()
    read, read_chunks, gather = store._b.read, store._b.read_chunks, store._b.gather
    one_chunk = store._b.chunk

    def counted(path: str, start: int, stop: int):
        counts[path] += stop - start
        return read(path, start, stop)

    def counted_chunks(path: str, chunks, required):
        blocks = read_chunks(path, chunks, required)
        counts[path] += sum(len(b) for b in blocks)
        return blocks

    def counted_gather(path: str, rows, required):
        values = gather(path, rows, required)
        counts[path] += 0 if values is None else len(values)
        return values

    def counted_chunk(path: str, chunk: int, required: bool):
        block = one_chunk(path, chunk, required)
        counts[path] += 0 if block is None else len(block)
        return block

    store._b.read, store._b.read_chunks, store._b.gather = counted, counted_chunks, counted_gather
    store._b.chunk = counted_chunk
    return counts


def drop_lookup(path: str) -> None:
    """Make a store look as it was written before the lookup: no lookup group, no root attributes."""
    meta_file = Path(path, "zarr.json")
    meta = json.loads(meta_file.read_text())
    for key in (LOOKUP_ATTR, VALUES_ATTR):
        meta["attributes"].pop(key, None)
    meta_file.write_text(json.dumps(meta))
    import shutil

    shutil.rmtree(Path(path, "index", "lookup"))


# ------------------------------------------------------------------------------- no column decoded
def test_open_row_and_get_decode_no_string_column(big):
    with open_store(big) as store:
        counts = counting(store)
        row = store.row(clip_id(54_321))
        value = store.get(FEAT, clip_id(54_321))
        inner = store.arrays.inner_rows(f"features/{FEAT}/data")
    assert row == 54_321
    np.testing.assert_array_equal(value, values(np.array([54_321]))[0])
    assert not set(counts) & set(STRING_COLUMNS), counts
    lookup = [p for p in counts if p.startswith("index/lookup/")]
    assert sum(counts[p] for p in lookup if p.endswith("/table")) == LOOKUP_INNER_ROWS  # one table chunk
    assert inner < CHUNK and counts[f"features/{FEAT}/data"] == inner  # the clip's inner chunk, nothing else
    assert counts[f"features/{FEAT}/done"] <= 2 * CHUNK  # its done flags, not the whole mask


def test_ls_and_feature_info_read_no_string_column_and_no_error_text(big):
    with open_store(big) as store:
        counts = counting(store)
        desc = describe_store(store)
        info = store.feature_info(FEAT)
    assert desc["index"]["n_clips"] == N and desc["index"]["cities"] == [f"city{i}" for i in range(7)]
    assert desc["index"]["splits"] == {"test": N // 3 + 1, "train": N - N // 3 - 1}
    assert info.n_done == N and info.n_errors == 0
    assert not set(counts) & {*STRING_COLUMNS, f"features/{FEAT}/errors"}, counts


def test_every_id_resolves_to_the_row_the_id_dict_gives(big):
    ids = [clip_id(i) for i in range(N)]
    with open_store(big) as store:
        counts = counting(store)
        np.testing.assert_array_equal(store.rows(ids), np.arange(N))  # bulk: every key's block bisected
        asked = [ids[7], "no-such-clip", ids[-1], *[f"absent-{i}" for i in range(10)], ids[0]]
        assert store.index.find(asked).tolist() == [7, -1, N - 1, *[-1] * 10, 0]  # absent ids: -1, never a row
        assert "index/clip_id" not in counts
        sample = np.random.default_rng(0).choice(N, 3000, replace=False)
        store.index.forget()  # then one id at a time: fence + table chunks
        assert [store.row(ids[i]) for i in sample] == sample.tolist()
        old = {cid: row for row, cid in enumerate(store.clip_ids)}  # what the index was before
    assert old == dict(zip(ids, range(N)))
    assert store.index.find(["nope", clip_id(N), clip_id(7) + "x"]).tolist() == [-1, -1, -1]


def test_a_single_id_is_found_by_integer_steps_at_either_end_of_its_block(big):
    """A cold single ``get`` resolves its id through one mapped table block (``_find_one``), whether
    the id starts or ends its block or lies in the last, part-filled one; an absent id is -1."""
    with open_store(big) as store:
        meta = store.arrays.attrs("")[LOOKUP_ATTR]
        table = store.arrays.read(f"{meta['path']}/table", 0, N)
        ends = np.r_[0:N:LOOKUP_INNER_ROWS, LOOKUP_INNER_ROWS - 1:N:LOOKUP_INNER_ROWS, N - 1]
        rows = table[ends, 2].astype(int)[::97].tolist()
        assert [store.index._find_one(clip_id(r)) for r in rows] == rows
        assert [store.index._find_one(c) for c in ("nope", clip_id(7) + "x", clip_id(N))] == [-1, -1, -1]


def test_single_ids_whose_keys_share_high_halves_across_blocks_are_found(tmp_path, monkeypatch):
    """Keys whose high halves are equal (64 bits: practically never; forced here to 256 values) run
    across table blocks: a single id the integer steps cannot place is found by the batch search, and
    an absent one is -1, never another clip's row."""
    real = index._KEYS[index.LOOKUP_KEY]
    monkeypatch.setitem(index._KEYS, index.LOOKUP_KEY, lambda b: bytes(7) + real(b)[7:])
    path = str(tmp_path / "equal.zarr")
    build(path, n=1000)
    with open_store(path) as store:
        assert [store.row(clip_id(i)) for i in range(0, 1000, 7)] == list(range(0, 1000, 7))
        np.testing.assert_array_equal(store.get(FEAT, clip_id(999)), values(np.array([999]))[0])
        assert store.index.find_one(clip_id(1000)) == -1


def test_a_loop_of_single_lookups_turns_into_one_dict(big):
    """Warm gets stay a dict lookup: once single lookups add up to a sixteenth of the index, the id
    column is decoded once and later lookups read nothing (bench_store's warm get floor)."""
    ids = [clip_id(i) for i in range(N)]
    with open_store(big) as store:
        counts = counting(store)
        assert [store.row(ids[i]) for i in range(N // 16 + 1)] == list(range(N // 16 + 1))
        assert counts["index/clip_id"] == N  # decoded once, whole
        before = dict(counts)
        assert [store.row(ids[i]) for i in range(N - 100, N)] == list(range(N - 100, N))
        assert dict(counts) == before


def test_unknown_id_is_refused_through_the_lookup(big):
    with open_store(big) as store:
        with pytest.raises(UnknownClipError, match="clip-000007-7"):
            store.get(FEAT, "clip-000007-7x")
        with pytest.raises(UnknownClipError):
            store.get_many(FEAT, [clip_id(1), "nope"])


def test_errors_are_read_only_where_rows_are_not_done(tmp_path):
    path = str(tmp_path / "failed.zarr")
    build(path, n=20_000, failed=3)
    with open_store(path) as store:
        counts = counting(store)
        assert store.feature_info(FEAT).n_errors == 3
        assert counts[f"features/{FEAT}/errors"] == CHUNK  # the one chunk holding rows not done
        assert store.errors(FEAT) == {clip_id(r): f"bad clip {r}" for r in range(3)}
        assert counts[f"features/{FEAT}/errors"] == 2 * CHUNK


def test_a_lookup_that_disagrees_with_the_ids_is_named(tmp_path):
    path = str(tmp_path / "wrong.zarr")
    build(path, n=5_000)
    with open_store(path, "a") as store:
        assert store.index.lookup_problem() is None
        table_path = store.attrs[LOOKUP_ATTR]["path"] + "/table"
        table = store.arrays.read(table_path, 0, 5_000)
        table[[0, 1], 2] = table[[1, 0], 2]  # two ids swap rows: whole, checksummed, wrong
        store.arrays.write(table_path, 0, table)
    with open_store(path) as store:
        assert store.index.lookup_problem() == (
            "2 of 5000 lookup entries do not match the clip ids (ids would resolve to wrong rows)")
        report = store.verify()
    assert not report.ok
    assert [(p.where, p.what) for p in report.problems if p.where == "index/lookup"] == [
        ("index/lookup", "2 of 5000 lookup entries do not match the clip ids (ids would resolve to wrong rows)")]


# ------------------------------------------------------------------------------------ old layout
def test_a_store_without_lookup_reads_and_an_append_writes_one(tmp_path):
    path = str(tmp_path / "old.zarr")
    build(path, n=10_000)
    drop_lookup(path)
    with open_store(path) as store:
        assert store.attrs.get(LOOKUP_ATTR) is None
        assert store.row(clip_id(9_999)) == 9_999 and store.rows([clip_id(5), clip_id(3)]).tolist() == [5, 3]
        assert describe_store(store)["index"]["cities"] == [f"city{i}" for i in range(7)]
    with open_store(path, "a") as store:
        store.append_clips(Manifest("scale", ["a", "b"], clips(10_000, 100)))
    with open_store(path) as store:
        counts = counting(store)
        assert store.row(clip_id(10_050)) == 10_050 and store.row(clip_id(17)) == 17
        assert "index/clip_id" not in counts
        assert store.attrs[LOOKUP_ATTR]["n_clips"] == 10_100


@pytest.mark.parametrize("dst_name", ["new.zarr", "new.h5"])
def test_convert_gives_an_old_store_a_lookup(tmp_path, dst_name):
    src, dst = str(tmp_path / "old.zarr"), str(tmp_path / dst_name)
    build(src, n=5_000)
    drop_lookup(src)
    convert_store(src, dst, progress=False)
    with open_store(dst) as store:
        counts = counting(store)
        assert store.rows([clip_id(4_999), clip_id(0)]).tolist() == [4_999, 0]
        assert "index/clip_id" not in counts
        assert store.verify().ok


def test_a_reader_whose_lookup_an_append_replaced_still_finds_its_clips(tmp_path, monkeypatch):
    monkeypatch.setattr(index, "LOOKUP_INNER_ROWS", 1024)  # a table of three chunks, quickly
    path = str(tmp_path / "grow.zarr")
    build(path, n=3 * 1024)
    high = index.id_keys([clip_id(i) for i in range(3 * 1024)])[:, 0]
    first, last = int(np.argmin(high)), int(np.argmax(high))  # in the table's first and last chunk
    with open_store(path) as reader:
        assert reader.row(clip_id(first)) == first  # fence and the first table chunk read
        with open_store(path, "a") as writer:
            writer.append_clips(Manifest("scale", ["a", "b"], clips(3 * 1024, 10)))
            assert writer.arrays.children("index/lookup") == [str(3 * 1024 + 10)]
        # the last table chunk of the deleted lookup: the reader falls back to its committed ids
        assert reader.row(clip_id(last)) == last
        assert reader.index.find([clip_id(3 * 1024)]).tolist() == [-1]  # not committed for it


# ------------------------------------------------------------------------------------------ kills
_APPEND_THEN_DIE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from featurestore import Manifest, open_store
from featurestore.store import index
from test_index_scale import clips

written = index.ClipIndex._write_lookup
def write_then_die(self, *args):
    meta = written(self, *args)
    os.kill(os.getpid(), signal.SIGKILL)  # the lookup is on disk; the commit (n_clips) is not
index.ClipIndex._write_lookup = write_then_die
with open_store({path!r}, "a") as store:
    store.append_clips(Manifest("scale", ["a", "b"], clips({first}, {n})))
"""


@pytest.mark.parametrize("name", ["kill.zarr", "kill.h5"])
def test_an_append_killed_before_its_commit_leaves_the_old_lookup_in_use(tmp_path, name):
    path = str(tmp_path / name)
    build(path, n=8_000)
    script = _APPEND_THEN_DIE.format(tests=str(Path(__file__).parent), path=path, first=8_000, n=500)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    with open_store(path) as store:  # a reader: the committed rows, through the old lookup
        assert store.n_clips == 8_000
        assert store.attrs[LOOKUP_ATTR]["n_clips"] == 8_000
        assert store.index.find([clip_id(7_999), clip_id(8_000)]).tolist() == [7_999, -1]
        assert "8500" in store.arrays.children("index/lookup")  # the orphan, named by nothing
    with open_store(path, "a") as store:  # the next writable open removes it; the append then runs clean
        assert store.arrays.children("index/lookup") == ["8000"]
        store.append_clips(Manifest("scale", ["a", "b"], clips(8_000, 500)))
    with open_store(path) as store:
        ids = [clip_id(i) for i in range(8_500)]
        np.testing.assert_array_equal(store.rows(ids), np.arange(8_500))
        assert store.arrays.children("index/lookup") == ["8500"]
        assert store.verify().ok


def test_many_ids_in_a_table_that_cannot_be_mapped_cost_the_blocks_not_ids_times_blocks(tmp_path):
    """An HDF5 lookup (no memory map: the block path) with every id asked at once: the blocks are
    read once and searched by key. Comparing each id with its whole block took ids x block rows x 24
    bytes (8 MiB here; 5 GB at 12,291 ids in a table of 16,384-row blocks, as stores written before
    the lookup's 64-row blocks have)."""
    import tracemalloc

    clips = [ClipRecord(f"c{i}", label="x", splits=frozenset({"s"})) for i in range(5000)]
    path = tmp_path / "s.h5"
    create_store(path, Manifest("toy", ["x"], clips), backend="hdf5").close()
    with open_store(path, "r") as store:
        ids = store.clip_ids[::-1]
        tracemalloc.start()
        try:
            rows = store._index.find(ids)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    np.testing.assert_array_equal(rows, np.arange(5000)[::-1])
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MiB"
