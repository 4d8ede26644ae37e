"""Fixtures shared by every test package: tiny real demo datasets made by the synthetic generator."""
from __future__ import annotations

import fcntl
import os
import signal
import sys
from pathlib import Path

# One torch (OpenMP) thread per test process, set before anything imports torch, inherited by every
# child process: the suite runs in up to 4 pytest-xdist processes on 2 cores, where each process's
# intra-op thread pool waited for cores the others held (a 24-clip extraction cost 7.0 s of CPU with
# 2 threads and 4.3 s with one). A value the caller set is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
assert "torch" not in sys.modules, "torch was imported before tests/conftest.py could set OMP_NUM_THREADS"

import pytest

from featurestore.datasets import read_tau, read_tau_eval
from featurestore.demo import make_demo_dataset, make_demo_eval_dataset
from featurestore.manifest import Manifest
from tests import warm_child

#: The tiny development set: 2 clips per class (20 clips of 10 s, 48 kHz stereo 24-bit WAV, 64x48
#: H.264 at 5 fps), one location per clip, so each class has one clip in fold1_train and one in
#: fold1_evaluate; 5 of the 20 are night clips (see demo_truth.csv).
TINY = dict(clips_per_class=2, duration=10.0, n_cities=2, seed=0, width=64, height=48, fps=5,
            night_fraction=0.25, clips_per_location=1, progress=False)


@pytest.fixture(scope="session", autouse=True)
def _hash_cache_of_this_run(tmp_path_factory):
    """Weight-file hashes (``featurestore.encoders._content_hash``) go to this run's temp folder, not
    the user's ``~/.cache``; child processes inherit it. A value the caller set is kept."""
    os.environ.setdefault("FEATURESTORE_HASH_CACHE", str(tmp_path_factory.mktemp("hash_cache") / "sha256.json"))


def pytest_sessionfinish(session):
    """The warm children's server is stopped and waited for (its children's CPU counted here)."""
    warm_child.stop_server()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Directory of the tiny TAU-layout demo dataset (read-only: copy it before changing files)."""
    return make_demo_dataset(tmp_path_factory.mktemp("tiny_dataset") / "demo-development", **TINY)


@pytest.fixture
def tiny_manifest(tiny_dataset) -> Manifest:
    """A fresh Manifest of ``tiny_dataset`` per test (10 audio segments, 12 frames per clip)."""
    return read_tau(tiny_dataset)


@pytest.fixture(scope="session")
def tiny_eval_dataset(tmp_path_factory) -> Path:
    """Directory of a tiny evaluation-layout demo set: 6 clips of 1 s named 0..5, no labels."""
    return make_demo_eval_dataset(tmp_path_factory.mktemp("tiny_eval") / "demo-evaluation", n_clips=6,
                                  duration=1.0, width=64, height=48, fps=5, progress=False)


@pytest.fixture
def tiny_eval_manifest(tiny_eval_dataset) -> Manifest:
    """A fresh Manifest of ``tiny_eval_dataset`` (1 audio segment, 5 frames per clip)."""
    return read_tau_eval(tiny_eval_dataset)


@pytest.fixture(scope="session")
def librosa_compiled(tmp_path_factory):
    """librosa (the log-mel and delta tests' reference), its numba functions compiled by one test
    process at a time.

    librosa compiles its numba ufuncs when ``librosa.util`` is first imported (and some functions
    on their first call) and caches them beside its own sources: ~16 s of CPU in a fresh venv, and
    every pytest-xdist process that got there before the cache was written paid it again (the whole
    first run of the suite in a new venv was slower than the next). Under a lock that the session's
    processes share, the first compiles and the others load its cache (~1 s).
    """
    import numpy as np

    librosa = pytest.importorskip("librosa")
    lock = tmp_path_factory.getbasetemp().parent / "librosa-numba.lock"
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:  # what the tests call: the import's ufuncs, then the functions compiled on first use
            librosa.power_to_db(librosa.feature.melspectrogram(y=np.zeros(4096, np.float32), sr=16000, n_fft=512))
            librosa.feature.delta(np.zeros((2, 16)))
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)
    return librosa


@pytest.fixture()
def sigint_as_in_a_terminal():
    """SIGINT handled in this process while it starts the child, so the child starts with it as a
    terminal's foreground job does: a runner started in the background (``pytest &`` in a script)
    ignores SIGINT, and a child would inherit that and never see the Ctrl-C."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
