"""Shard checksums computed beside the writes: ``_crc.block_crcs`` and the fill's encode-ahead thread.

``block_crcs`` calls google-crc32c's C function through ctypes so that the next shard's checksums run
while the current shard is written. These tests pin what that must keep: the same checksums as
``google_crc32c.value`` (zarr's codec) for every row, other threads running during the calls, and
shards byte for byte the same as when each is encoded in the writer's own thread.
"""
from __future__ import annotations

import sys
import threading
import time

import google_crc32c
import numpy as np
import pytest

from featurestore import ClipRecord, Manifest, create_store, open_store
from featurestore.store import _crc, _file_writes, _shards
from tests.featurestore.chunk_paths import chunk_files


@pytest.mark.parametrize("shape", [(1, 1), (7, 8192), (300, 1028), (0, 64), (5, 0)])
def test_block_crcs_equal_google_crc32c_row_by_row(shape):
    raw = np.random.default_rng(sum(shape)).integers(0, 256, size=shape, dtype=np.uint8)
    sums = _crc.block_crcs(raw)
    assert sums.shape == (shape[0], 4) and sums.dtype == np.uint8
    assert sums.view("<u4").reshape(-1).tolist() == [google_crc32c.value(row.tobytes()) for row in raw]


def test_block_crcs_of_a_strided_view_checksum_its_values():
    raw = np.random.default_rng(3).integers(0, 256, size=(16, 64), dtype=np.uint8)
    view = raw[::2, 8:40]  # not contiguous: checksummed as its values, never as the memory under it
    assert _crc.block_crcs(view).view("<u4").reshape(-1).tolist() == [google_crc32c.value(r.tobytes()) for r in view]


def test_block_crcs_refuses_what_is_not_rows_of_bytes():
    with pytest.raises(TypeError, match="uint8"):
        _crc.block_crcs(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(TypeError, match="shape"):
        _crc.block_crcs(np.zeros(16, dtype=np.uint8))


def _steps_beside(raw: np.ndarray) -> int:
    """Steps a thread makes while ``block_crcs(raw)`` runs, with the interpreter's forced GIL hand-over
    (every 5 ms) pushed out of reach: the thread runs only where the GIL is released (each of its
    steps releases it again with ``sleep(0)``)."""
    steps, stop = [0], threading.Event()

    def count() -> None:
        while not stop.is_set():
            steps[0] += 1
            time.sleep(0)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(60)
    try:
        counter = threading.Thread(target=count)
        counter.start()
        time.sleep(0.01)
        before = steps[0]
        _crc.block_crcs(raw)
        during = steps[0] - before
        stop.set()
        counter.join()
    finally:
        sys.setswitchinterval(interval)
    return during


def test_block_crcs_lets_another_thread_run(monkeypatch):
    """A thread gets steps in while the checksums run; beside google_crc32c.value, which holds the
    GIL through each call, it gets none."""
    assert _crc.RELEASES_GIL, "google-crc32c's C library is reachable in this environment"
    raw = np.ones((8, 16 << 20), dtype=np.uint8)  # 128 MiB in 8 calls
    released = _steps_beside(raw)
    monkeypatch.setattr(_crc, "_VALUE", None)
    held = _steps_beside(raw)
    assert released >= 20 and held <= 2, (released, held)


def _fill(path, encode_ahead: bool, monkeypatch) -> dict[str, bytes]:
    monkeypatch.setattr(_shards, "CRC_RELEASES_GIL", encode_ahead)
    clips = [ClipRecord(f"c{i:04d}", label="a") for i in range(1000)]
    values = np.random.default_rng(1).standard_normal((1000, 1, 48)).astype(np.float16)
    with create_store(path, Manifest("toy", ["a"], clips)) as store:
        store.create_feature_set("emb", 1, (48,), {"model": "toy"}, chunk_clips=128)
        store.write_rows("emb", 0, values[:640])  # five shards in one write: four encoded ahead
        store.write_rows("emb", 640, values[640:])  # three, the last an edge shard
    with open_store(path) as store:
        assert np.array_equal(store.get_many("emb", [c.clip_id for c in clips]), values)
    return {f.name: f.read_bytes() for f in chunk_files(path, "features/emb/data")}


def test_shards_encoded_ahead_equal_shards_encoded_in_the_writer(tmp_path, monkeypatch):
    ahead = _fill(tmp_path / "ahead.zarr", True, monkeypatch)
    inline = _fill(tmp_path / "inline.zarr", False, monkeypatch)
    assert len(ahead) == 8 and ahead == inline


def test_a_failed_shard_write_stops_the_block_and_leaves_no_encoding_thread(tmp_path, monkeypatch):
    calls = []
    real = _shards.replace_file

    def failing(path, parts):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device", path)
        real(path, parts)

    monkeypatch.setattr(_shards, "replace_file", failing)
    clips = [ClipRecord(f"c{i:04d}", label="a") for i in range(512)]
    with create_store(tmp_path / "s.zarr", Manifest("toy", ["a"], clips)) as store:
        store.create_feature_set("emb", 1, (48,), {"model": "toy"}, chunk_clips=128)
        with pytest.raises(OSError, match="No space left"):
            store.write_rows("emb", 0, np.ones((512, 1, 48), dtype=np.float16))
        assert store.feature_info("emb").n_done == 0
    assert len(calls) == 2
    assert not [t for t in threading.enumerate() if t.name.startswith("shard-encode")]


def test_temp_names_differ_across_calls_threads_and_forked_children():
    import os

    names = [_file_writes._temp_name() for _ in range(1000)]
    from_threads: list[str] = []
    workers = [threading.Thread(target=lambda: from_threads.extend(_file_writes._temp_name() for _ in range(500)))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its names must not repeat the parent's next ones
        os.write(write, " ".join(_file_writes._temp_name() for _ in range(10)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        child = pipe.read().split()
    parent_next = [_file_writes._temp_name() for _ in range(10)]
    everything = names + from_threads + child + parent_next
    assert len(everything) == 3020 and len(set(everything)) == len(everything)
