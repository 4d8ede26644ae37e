"""The verify benchmark's reference must read the store's layouts: sharded feature sets (Zarr v3
shards of inner chunks, each with its own crc32c) and plain chunks (one crc32c per file).

Before it knew shards it called every shard of a healthy store damaged; these tests build small
stores with the benchmark's own builder and check that the reference finds no damage where there is
none, and finds a flipped byte and a non-finite value (with a correct checksum) where there is.
"""
from __future__ import annotations

from pathlib import Path

import google_crc32c
import numpy as np
import pytest
from tests.scripts_support import script_module



@pytest.fixture(scope="module")
def bench():
    with script_module("bench/bench_verify.py") as module:
        yield module


def _store(bench, tmp_path: Path, chunk_clips: int | None):
    args = bench.parse_args(["--workdir", str(tmp_path), "--clips", "300", "--dim", "64"]
                            + ([] if chunk_clips is None else ["--chunk-clips", str(chunk_clips)]))
    files = bench.chunk_files(bench.build(args))
    feature = [f for f in files if f.is_float]
    return files, feature


def _first_inner_chunk(path: Path, index_bytes: int) -> tuple[int, int]:
    raw = np.fromfile(path, dtype=np.uint8)
    index = raw[-index_bytes:-4].view("<u8").reshape(-1, 2)
    return int(index[0, 0]), int(index[0, 1])


def test_sharded_store_is_read_by_inner_chunk(bench, tmp_path):
    files, feature = _store(bench, tmp_path, None)
    assert feature and all(f.index_bytes for f in feature)  # the default layout is sharded
    assert any(not f.index_bytes for f in files)  # the index columns are plain chunks
    assert bench.reference(files) == 0 and bench.reference(files, exponent_bits=True) == 0

    shard = feature[0]
    lo, n = _first_inner_chunk(shard.path, shard.index_bytes)
    raw = bytearray(shard.path.read_bytes())
    raw[lo + 3] ^= 0x01  # one byte of the first inner chunk's values
    shard.path.write_bytes(bytes(raw))
    assert bench.reference(files) == 1


def test_non_finite_inner_chunk_with_a_good_checksum_is_found(bench, tmp_path):
    files, feature = _store(bench, tmp_path, None)
    shard = feature[0]
    lo, n = _first_inner_chunk(shard.path, shard.index_bytes)
    raw = np.fromfile(shard.path, dtype=np.uint8)
    raw[lo:lo + 2] = np.frombuffer(np.float16(np.inf).tobytes(), dtype=np.uint8)
    raw[lo + n - 4:lo + n] = np.frombuffer(
        np.uint32(google_crc32c.value(raw[lo:lo + n - 4])).tobytes(), dtype=np.uint8)
    raw.tofile(shard.path)
    assert bench.reference(files) == 1
    assert bench.reference(files, exponent_bits=True) == 1


def test_damaged_shard_index_counts_once(bench, tmp_path):
    files, feature = _store(bench, tmp_path, None)
    raw = bytearray(feature[0].path.read_bytes())
    raw[-8] ^= 0xFF  # inside the index, before its crc32c
    feature[0].path.write_bytes(bytes(raw))
    assert bench.reference(files) == 1


def test_plain_layout_is_one_checksum_per_file(bench, tmp_path):
    files, feature = _store(bench, tmp_path, 8)  # 8 clips x 128 B: one inner chunk, no sharding
    assert feature and not any(f.index_bytes for f in feature)  # (the id lookup may be sharded)
    assert len(feature) == 300 // 8 + 1
    assert bench.reference(files) == 0
    raw = bytearray(feature[1].path.read_bytes())
    raw[0] ^= 0x01
    feature[1].path.write_bytes(bytes(raw))
    assert bench.reference(files) == 1


def test_the_benchmark_runs_and_prints_its_ratio(bench, tmp_path, capsys):
    rc = bench.main(["--workdir", str(tmp_path), "--clips", "200", "--dim", "64", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "damaged" not in out  # the healthy store passes both checks
    assert "ratio verify/reference throughput:" in out
    ratio = float(out.split("ratio verify/reference throughput:")[1].split()[0])
    assert rc == (0 if ratio >= bench.FLOOR else 1)
