"""verify's parallel chunk check: the same findings with 1 and many threads, memory of a few chunks.

The damage is real: flipped bytes in chunk files (plain, zstd-compressed and string chunks), a
deleted chunk file, done flags written for rows whose data never was, NaN and Inf in finished rows.
"""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store, open_store
from featurestore.store.verify import verify_store
from tests.featurestore.chunk_paths import chunk_file

N_CLIPS, DIM, CHUNK = 48, 8, 4
PLAIN, PACKED = "clip/plain", "clip/packed"
SHARDED, SHARDED_ZSTD = "clip/sharded", "clip/sharded-zstd"
WIDE = 2048  # float16: 4 KiB a clip, so a shard of CHUNK clips holds inner chunks of 2
PROV = {"encoder": "test/random", "config": {}, "weights": {"kind": "random", "seed": 0}, "segments": {}}


def _flip(chunk: Path) -> None:
    """Flip a byte in the middle of a chunk file (its checksum then fails)."""
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))


def _damaged_store(path: Path) -> list[str]:
    clips = [ClipRecord(f"bus-lisbon-{i}-{i}", label="bus", city="lisbon", location=f"lisbon-{i}",
                        splits=frozenset({"train"})) for i in range(N_CLIPS)]
    rng = np.random.default_rng(0)
    with create_store(path, Manifest("toy", list(TAU_CLASSES), clips)) as store:
        store.create_feature_set(PLAIN, 1, (DIM,), PROV, chunk_clips=CHUNK)
        store.write_rows(PLAIN, 0, rng.standard_normal((40, 1, DIM)).astype(np.float16))
        store.create_feature_set(PACKED, 1, (DIM,), PROV, dtype="float32", chunk_clips=CHUNK, compressor="zstd")
        store.write_rows(PACKED, 0, rng.standard_normal((N_CLIPS, 1, DIM)).astype(np.float32))
        arrays = store.arrays
        nan_block = rng.standard_normal((CHUNK, 1, DIM)).astype(np.float16)
        nan_block[1, 0, 3] = np.nan
        arrays.write(f"features/{PLAIN}/data", 12, nan_block)  # rows 12:16 are done: one now holds NaN
        inf_block = rng.standard_normal((CHUNK, 1, DIM)).astype(np.float32)
        inf_block[[0, 2], 0, 0] = np.inf
        arrays.write(f"features/{PACKED}/data", 28, inf_block)
        arrays.write(f"features/{PLAIN}/done", 40, np.ones(CHUNK, dtype=bool))  # done, data never written
        ids = store.clip_ids
        store.set_errors(PACKED, {ids[13]: "decode failed"})  # an error-text chunk in storage (rows 12:16)
    _flip(chunk_file(path, f"features/{PLAIN}/data", 2))  # rows 8:12
    chunk_file(path, f"features/{PLAIN}/data", 5).unlink()  # rows 20:24
    _flip(chunk_file(path, f"features/{PACKED}/data", 1))  # rows 4:8, compressed
    _flip(chunk_file(path, f"features/{PACKED}/errors", 3))  # rows 12:16, strings
    _flip(chunk_file(path, "index/city", 0))  # strings, rows 0:48
    return ids


def _sharded_set(store, name: str, compressor: str | None, values: np.ndarray | None = None,
                 done: np.ndarray | None = None) -> None:
    """A feature set of WIDE float16 per clip, sharded (CHUNK clips a shard, inner chunks of 2)."""
    store.create_feature_set(name, 1, (WIDE,), PROV, chunk_clips=CHUNK, compressor=compressor)
    assert (store.arrays.chunk_rows(f"features/{name}/data"), store.arrays.inner_rows(f"features/{name}/data")) == (CHUNK, 2)
    store.write_rows(name, 0, np.ones((N_CLIPS, 1, WIDE), np.float16) if values is None else values, done=done)


def test_findings_are_the_same_with_one_and_many_threads(tmp_path):
    path = tmp_path / "store.zarr"
    ids = _damaged_store(path)
    with open_store(path, "r") as store:
        one = verify_store(store, threads=1)
        many = verify_store(store, threads=4)
    assert one.to_dict() == many.to_dict()
    assert one.summary() == many.summary()
    found = [(p.where, p.rows) for p in one.problems]
    assert found == [
        (f"features/{PACKED}/data", (4, 8)),
        (f"features/{PACKED}/data", (28, 32)),
        (f"features/{PACKED}/errors", (12, 16)),
        (f"features/{PLAIN}/data", (8, 12)),
        (f"features/{PLAIN}/data", (12, 16)),
        (f"features/{PLAIN}/data", (20, 24)),
        (f"features/{PLAIN}/data", (40, 44)),
        ("index/city", (0, N_CLIPS)),
    ], "\n".join(map(str, one.problems))
    what = [p.what for p in one.problems]
    assert "could not be read" in what[0] and f"(clips {ids[4]} .. {ids[7]})" in what[0]
    assert "2 finished clip(s) hold NaN or Inf" in what[1]
    assert "could not be read" in what[2]
    assert "could not be read" in what[3] and "checksum" in what[3].lower()
    assert "1 finished clip(s) hold NaN or Inf" in what[4]
    assert "chunk missing from storage" in what[5] and f"(clips {ids[20]} .. {ids[23]})" in what[5]
    assert "chunk missing from storage" in what[6]
    assert "could not be read" in what[7]


def test_an_undamaged_local_zarr_store_is_checked_from_its_files(tmp_path, monkeypatch):
    """Every chunk (plain, zstd, strings, flags, shards of plain and zstd inner chunks) is checked
    from its file, none through zarr's read path (~2 ms a call on a loaded machine: what made verify
    10x slower than a checksum) nor the backend's inner-chunk reads."""
    path = tmp_path / "store.zarr"
    clips = [ClipRecord(f"bus-lisbon-{i}-{i}", label="bus", splits=frozenset({"train"})) for i in range(N_CLIPS)]
    with create_store(path, Manifest("toy", list(TAU_CLASSES), clips)) as store:
        store.create_feature_set(PLAIN, 1, (DIM,), PROV, chunk_clips=CHUNK)
        store.write_rows(PLAIN, 0, np.ones((N_CLIPS, 1, DIM), np.float16))
        store.create_feature_set(PACKED, 1, (DIM,), PROV, dtype="float32", chunk_clips=CHUNK, compressor="zstd")
        store.write_rows(PACKED, 0, np.ones((N_CLIPS, 1, DIM), np.float32))
        for name, compressor in ((SHARDED, None), (SHARDED_ZSTD, "zstd")):
            _sharded_set(store, name, compressor)
    with open_store(path, "r") as store:
        calls = []
        for name in ("read", "read_unchecked", "chunk_written", "read_chunks", "gather"):
            real = getattr(store.arrays, name)
            monkeypatch.setattr(store.arrays, name,
                                lambda *a, _r=real, _n=name, **k: calls.append(f"{_n} {a[0]}") or _r(*a, **k))
        report = verify_store(store, threads=4)
    assert report.ok, report.problems
    # data and done of four sets in chunks (shards) of CHUNK rows (no error texts: nothing failed, so
    # none was written), one chunk for each index array
    assert report.chunks_read == 4 * 2 * N_CLIPS // CHUNK + report.arrays_checked - 12
    # only the id -> row lookup is read through the store (a table of 24 bytes a clip, compared with
    # the ids the file pass decoded): every data, flag and string chunk is checked from its file
    assert [c for c in calls if " index/lookup/" not in c] == []


def test_verify_holds_a_few_chunks_in_memory_not_the_array(tmp_path):
    """32 MiB of features in 64 chunks of 512 KiB, checked on 4 threads: verify's peak allocation
    stays a few chunks per thread (plus the index it reads), never the array."""
    n, dim, per = 8192, 2048, 128
    path = tmp_path / "store.zarr"
    clips = [ClipRecord(f"c{i}", label="bus") for i in range(n)]
    with create_store(path, Manifest("toy", list(TAU_CLASSES), clips)) as store:
        store.create_feature_set(PLAIN, 1, (dim,), PROV, chunk_clips=per)
        block = np.ones((per * 8, 1, dim), np.float16)
        for start in range(0, n, len(block)):
            store.write_rows(PLAIN, start, block)
    data_bytes = n * dim * 2
    with open_store(path, "r") as store:
        store.clip_ids  # the index the store itself holds is not verify's memory
        tracemalloc.start()
        try:
            report = verify_store(store, threads=4)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert report.ok and report.chunks_read >= n // per
    assert peak < data_bytes / 2, f"peak {peak / 2**20:.1f} MiB for {data_bytes / 2**20:.0f} MiB of data"


def test_damaged_shards_read_from_their_files_are_reported_as_the_backend_reports_them(tmp_path, monkeypatch):
    """Shards (plain and zstd inner chunks) with a flipped byte in an inner chunk, a flipped byte in
    the index, an Inf in a finished clip (a NaN in a clip not done is none of verify's business) and a
    deleted shard file: the file path finds what the backend's inner-chunk reads find, with the same
    rows and words."""
    from featurestore.store import verify

    path = tmp_path / "store.zarr"
    rng = np.random.default_rng(1)
    clips = [ClipRecord(f"bus-lisbon-{i}-{i}", label="bus") for i in range(N_CLIPS)]
    with create_store(path, Manifest("toy", list(TAU_CLASSES), clips)) as store:
        for name, compressor in ((SHARDED, None), (SHARDED_ZSTD, "zstd")):
            values = rng.standard_normal((N_CLIPS, 1, WIDE)).astype(np.float16)
            values[13, 0, 5] = np.inf  # shard 3, rows 12:16
            values[17, 0, 1] = np.nan  # shard 4, in a row not done: not a finding
            done = np.ones(N_CLIPS, dtype=bool)
            done[17] = False
            _sharded_set(store, name, compressor, values, done)
        ids = store.clip_ids
    for name in (SHARDED, SHARDED_ZSTD):
        data = f"features/{name}/data"
        _flip_at(chunk_file(path, data, 2), 10)  # inner chunk 0 of shard 2: rows 8:10
        _flip_at(chunk_file(path, data, 7), -10)  # the index of shard 7: rows 28:32
        chunk_file(path, data, 5).unlink()  # rows 20:24
    with open_store(path, "r") as store:
        fast = verify_store(store, threads=2)
        with monkeypatch.context() as m:  # shards through the backend, as before the file path
            m.setattr(verify, "_parse_shards", lambda *a: None)
            slow = verify_store(store, threads=2)
    assert fast.to_dict() == slow.to_dict()
    found = [(p.where.rpartition("/")[0], p.rows, p.what) for p in fast.problems]
    for name in (f"features/{SHARDED}", f"features/{SHARDED_ZSTD}"):
        mine = [f[1:] for f in found if f[0] == name]
        assert [rows for rows, _ in mine] == [(8, 10), (12, 16), (20, 24), (28, 30)], mine
        assert "crc32c" in mine[0][1] and mine[1][1] == "1 finished clip(s) hold NaN or Inf"
        assert "chunk missing from storage" in mine[2][1] and "index fails its crc32c" in mine[3][1]
    assert f"(clips {ids[8]} .. {ids[9]})" in str(fast.problems[0])


def _flip_at(file: Path, offset: int) -> None:
    raw = bytearray(file.read_bytes())
    raw[offset] ^= 0xFF
    file.write_bytes(bytes(raw))
