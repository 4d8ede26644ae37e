"""A real SIGKILL in the middle of an extraction: the store stays valid and a rerun completes it to
exactly the arrays of an uninterrupted run. Once at a moment chosen by polling the store from
outside, and at five points chosen by done-row count (the test hook of ``featurestore.extract.pipeline``)."""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from tests.featurestore.fault_support import done_total, finish, start_child
from tests.featurestore.test_extract_support import ENCODERS, assert_same_arrays, make_dataset, read_all
from tests import warm_child

from featurestore.extract import extract
from featurestore.store import open_store

N_CLIPS = 24
# Chunks of different sizes per feature set and encode batches of 4 rows: a kill usually lands
# after some log-mel chunks of a block are written but before that block's ViT chunk is.
OPTIONS = dict(device="cpu", batch_size=4, num_workers=1, chunk_clips={"logmel": 2, "timm/test_vit": 8},
               progress=False)
CHILD = """
import pickle, sys
from featurestore.extract import extract
manifest = pickle.load(open(sys.argv[1], "rb"))
extract(manifest, sys.argv[2], {encoders!r}, **{options!r})
"""


def _done_counts(path: Path) -> dict[str, int]:
    """Done rows per feature set, as another process sees them now ({} before the store exists)."""
    if not path.exists():
        return {}
    with open_store(path, "r") as store:
        return {name: int(store.done_mask(name, refresh=True).sum()) for name in store.feature_sets()}


def _run_and_kill(manifest_file: Path, store: Path, at_least: int, timeout: float = 90.0) -> dict[str, int]:
    """Start an extraction in a new process group; SIGKILL it (and its decode workers) as soon as
    the log-mel set has at least ``at_least`` done rows. Returns the counts seen after the kill."""
    code = CHILD.format(encoders=ENCODERS, options=OPTIONS)
    proc = warm_child.start(["-c", code, str(manifest_file), str(store)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # in a new session
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                counts = _done_counts(store)
            except KeyError:  # a feature set is being created right now: its arrays appear one by one
                counts = {}
            if counts.get("logmel", 0) >= at_least:
                break
            if proc.poll() is not None:
                pytest.fail(f"extraction ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        else:
            pytest.fail("no progress within the timeout")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return _done_counts(store)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run_bit_for_bit(tmp_path):
    manifest = make_dataset(tmp_path / "data", N_CLIPS)
    manifest_file = tmp_path / "manifest.pkl"
    manifest_file.write_bytes(pickle.dumps(manifest))
    store = tmp_path / "killed.zarr"

    seen = _run_and_kill(manifest_file, store, at_least=6)
    assert 0 < seen["logmel"] and min(seen.values()) < N_CLIPS, seen
    with open_store(store) as fs:
        report = fs.verify()
        assert report.ok, report.problems
        done_before = np.ones(N_CLIPS, dtype=bool)
        for name in fs.feature_sets():
            done_before &= fs.done_mask(name)

    summary = extract(manifest, store, ENCODERS, **OPTIONS)
    assert summary.exit_code == 0
    assert summary.clips_skipped == int(done_before.sum())
    assert summary.clips_done == N_CLIPS - int(done_before.sum())
    with open_store(store) as fs:
        assert fs.verify().ok

    reference = tmp_path / "reference.zarr"
    extract(manifest, reference, ENCODERS, **OPTIONS)
    killed, clean = read_all(store), read_all(reference)
    assert all(mask.all() for _, mask in killed.values())
    assert_same_arrays(killed, clean)


#: Kill points, as done rows summed over both feature sets (48 in all): after the first chunk, then
#: spread over the run. Each resumed run is killed at the next point.
KILL_AT_DONE = (1, 9, 18, 28, 38)
#: The five-point run's second set is parameter-free (stored frames, chunks of 8 as the ViT's above):
#: its six processes skip timm's import (about 2 s of CPU each); the test above kills a ViT run.
FIVE_ENCODERS = "logmel,frames/32"
FIVE_OPTIONS = dict(OPTIONS, chunk_clips={"logmel": 2, "frames/32": 8})


@pytest.mark.slow
def test_sigkill_at_five_points_spread_over_the_run_then_resume_equals_an_uninterrupted_run(tmp_path):
    """SIGKILL (the whole process group, decode workers too) at chosen points by done-row count,
    resuming after each: the store verifies every time and ends bit-identical to a clean run."""
    manifest = make_dataset(tmp_path / "data", N_CLIPS)
    store = tmp_path / "killed.zarr"
    total = 2 * N_CLIPS
    for at_done in KILL_AT_DONE:
        proc = start_child(tmp_path / "child", manifest, store, dict(encoders=FIVE_ENCODERS, **FIVE_OPTIONS),
                           signal_at=f"KILL:{at_done}")
        code, err = finish(proc)
        assert code == -signal.SIGKILL, err
        with open_store(store) as fs:
            report = fs.verify()
            assert report.ok, (at_done, report.problems)
        assert at_done <= done_total(store) < total, at_done

    summary = extract(manifest, store, FIVE_ENCODERS, **FIVE_OPTIONS)
    assert summary.exit_code == 0
    reference = tmp_path / "reference.zarr"
    extract(manifest, reference, FIVE_ENCODERS, **FIVE_OPTIONS)
    assert_same_arrays(read_all(store), read_all(reference))
    with open_store(store) as fs:
        assert fs.verify().ok
