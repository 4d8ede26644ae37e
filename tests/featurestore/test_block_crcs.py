"""Shard checksums computed beside the writes: ``_crc.block_crcs``.

``block_crcs`` calls google-crc32c's C function through ctypes so that one shard's checksums run
while another thread writes a shard (``_file_writes.FileWrites``). These tests pin what that must
keep: the same checksums as ``google_crc32c.value`` (zarr's codec) for every row, and other threads
running during the calls.
"""
from __future__ import annotations

import sys
import threading
import time

import google_crc32c
import numpy as np
import pytest

from featurestore.store import _crc


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
