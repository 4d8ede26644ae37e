"""The store on ``s3://`` for real: a moto S3 server process (tests/s3_server.py) that killed CLI
runs, Dask workers and the test process all reach by URL, each operation equal to the same one on a
local store.

The endpoint reaches every process through the environment only (``AWS_ENDPOINT_URL`` and dummy
credentials; the CLI has no storage-option flag), as docs/scaling.md tells users to do; an audit hook
refuses any connection off 127.0.0.1 in this process and in every Python child. One extraction
(killed, then resumed by two Dask workers) is shared by the read, search, verify and training tests.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from tests.featurestore.chunk_paths import chunk_key
from tests.featurestore.test_extract_support import assert_same_arrays, read_all
from tests.s3_server import MotoServer, loopback_guard, make_bucket, s3_environment
from tests import warm_child

from featurestore.cli import main as featurestore_main
from featurestore.extract.pipeline import TEST_SIGNAL_ENV
from featurestore.store import open_store

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
pytestmark = pytest.mark.slow

ENCODERS = "logmel,timm/test_vit@none"
#: Light encoders, 2 frames, chunks of 4 clips, encode batches of 2: the tiny set's 20 clips are 5
#: chunks per feature set, so a kill after a few done rows leaves a store partly written. (Chunks of 2
#: doubled the objects, and the S3 requests that the server answers at ~2 ms of CPU each.)
LIGHT = ["--encoders", ENCODERS, "--device", "cpu", "--frames", "2", "--num-workers", "0", "--chunk-clips", "4",
         "--batch-size", "2", "--quiet"]
KILL_AT_DONE = 12  # done rows over both feature sets (40 in all)
#: The resume's Dask workers are forked from the command (Dask's ``fork`` method) instead of spawned: a
#: spawned worker imports torch, timm and Dask anew (~5 s of CPU each), a fork of the warm command has
#: them. They are still two processes that reach the server by URL; spawned ``local:N`` workers (what
#: users get) are tested in test_extract_dask.py.
FORKED_WORKERS = {"DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD": "fork"}


@pytest.fixture(scope="session")
def s3_server():
    """One moto server process for the session (127.0.0.1, a free port); stopped at the end."""
    server = MotoServer()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def s3_env(s3_server, tmp_path_factory):
    """The S3 environment (endpoint, dummy credentials, loopback guard) set for this module's tests."""
    loopback_guard()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_environment(s3_server, tmp_path_factory.mktemp("s3_guard")).items():
            mp.setenv(key, value)
        yield s3_server


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory):
    """The demo generator's tiny set at 2 s per clip (20 clips, 16 kHz audio, 2 fps video): small
    enough that each extraction below takes seconds; still both splits for the heads."""
    from featurestore.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("s3_data") / "demo-development", clips_per_class=2,
                             duration=2.0, n_cities=2, seed=0, sample_rate=16000, width=64, height=48, fps=2,
                             night_fraction=0.25, clips_per_location=1, progress=False)


@pytest.fixture(scope="module")
def local_store(demo_set, tmp_path_factory):
    """The tiny demo set extracted into a local store: the reference every S3 result must equal."""
    store = tmp_path_factory.mktemp("s3_local") / "local.zarr"
    assert featurestore_main(["extract", str(demo_set), str(store), *LIGHT]) == 0
    return store


def _cli(*args: str, env: dict | None = None, timeout: float = 180.0) -> subprocess.CompletedProcess:
    """``featurestore ...`` in a child process of its own group (the kill takes its workers too),
    started warm (:mod:`tests.warm_child`; the loopback guard's sitecustomize runs in it)."""
    proc = warm_child.start(["-m", "featurestore", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"featurestore {args[0]} did not end in {timeout} s")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def s3_store(s3_env, demo_set):
    """``featurestore extract`` into ``s3://extracted/store.zarr``: SIGKILLed (its process group)
    after 12 done rows, checked, then resumed by the same command on two Dask worker processes
    (``--scheduler local:2``, forked: ``FORKED_WORKERS``), which reach the server by URL. Returns (url,
    what was seen)."""
    make_bucket(s3_env, "extracted")
    url = "s3://extracted/store.zarr"
    killed = _cli("extract", str(demo_set), url, *LIGHT, env={TEST_SIGNAL_ENV: f"KILL:{KILL_AT_DONE}"})
    with open_store(url, "r") as store:
        masks = {name: store.done_mask(name) for name in store.feature_sets()}
        done = {name: int(mask.sum()) for name, mask in masks.items()}
        done["all sets"] = int(np.logical_and.reduce(list(masks.values())).sum())
        after_kill = store.verify()
    resumed = _cli("extract", str(demo_set), url, *LIGHT, "--scheduler", "local:2", "--json", env=FORKED_WORKERS)
    return url, {"killed": killed, "done": done, "verify": after_kill, "resumed": resumed}


def test_extract_into_s3_killed_then_resumed_by_two_dask_workers_equals_a_local_run(s3_store, local_store):
    url, seen = s3_store
    assert seen["killed"].returncode == -signal.SIGKILL, seen["killed"].stderr[-2000:]
    assert KILL_AT_DONE <= seen["done"]["logmel"] + seen["done"]["timm/test_vit"] < 40, seen["done"]
    assert seen["verify"].ok, seen["verify"].problems  # what the kill left is a valid, partial store
    resumed = seen["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout)
    done_before = seen["done"]["all sets"]  # clips done in every set: what a rerun skips
    assert (summary["clips_done"], summary["clips_skipped"]) == (20 - done_before, done_before), summary
    assert summary["device"].startswith("dask (2 workers"), summary["device"]
    assert_same_arrays(read_all(url), read_all(local_store))


def test_nothing_reaches_past_loopback_here_or_in_children(s3_env):
    """The guard is live: a connection to a documentation-range address is refused before any
    packet leaves, in this process, in a Python child (how Dask workers start) and in a warm child
    (how the CLI runs here)."""
    with pytest.raises(OSError, match="test guard"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)
    child = "import socket\nsocket.create_connection(('192.0.2.1', 80), timeout=1)"
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "test guard" in proc.stderr, proc.stderr[-2000:]
    warm = warm_child.run(["-c", child], timeout=120)  # how the CLI children here start
    assert warm.returncode == 1 and "test guard" in warm.stderr, warm.stderr[-2000:]


def test_get_many_search_and_verify_on_s3_equal_the_local_store(s3_store, local_store):
    url, _ = s3_store
    with open_store(url, "r") as remote, open_store(local_store, "r") as local:
        ids = remote.clip_ids
        assert ids == local.clip_ids
        picked = [ids[i] for i in (17, 3, 3, 0, 11)]  # unsorted, repeated, across chunks
        for name in ("logmel", "timm/test_vit"):
            np.testing.assert_array_equal(remote.get_many(name, picked), local.get_many(name, picked))
        for query in (ids[0], ids[13]):
            a = remote.search("timm/test_vit", query, k=5, method="exact")
            b = local.search("timm/test_vit", query, k=5, method="exact")
            assert a.clip_ids == b.clip_ids
            np.testing.assert_array_equal(a.scores, b.scores)
        report = remote.verify()
        assert report.ok and not report.problems, report.problems
        assert report.chunks_read == local.verify().chunks_read > 0


def test_verify_on_s3_reports_a_deleted_chunk_object(s3_env, s3_store, tmp_path):
    """Damage done through the S3 API itself (an object deleted) is found by verify on the URL."""
    import s3fs

    url, _ = s3_store
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_env}, skip_instance_cache=True)
    copy = "s3://extracted/damaged.zarr"
    fs.copy(url, copy, recursive=True)
    array = f"{copy}/features/timm/test_vit/data"
    chunk = f"{array}/{chunk_key(json.loads(fs.cat(f'{array}/zarr.json')), 1)}"  # the second shard's object
    assert fs.exists(chunk)
    fs.rm(chunk)
    with open_store(copy, "r") as store:
        report = store.verify()
    assert not report.ok
    assert any("timm/test_vit" in str(problem) for problem in report.problems), report.problems


def test_a_head_trained_streaming_from_s3_equals_one_trained_from_the_local_store(s3_store, local_store, tmp_path):
    from safetensors.numpy import load_file

    from heads.cli import main as heads_main

    url, _ = s3_store
    runs = {}
    for where, store in (("s3", url), ("local", str(local_store))):
        out = tmp_path / where
        code = heads_main(["train", "--store", store, "--head", "linear", "--features", "timm/test_vit",
                           "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--num-workers", "0",
                           "--out", str(out), "--quiet"])
        assert code == 0, where
        runs[where] = out
    s3_epochs, local_epochs = _epoch_metrics(runs["s3"]), _epoch_metrics(runs["local"])
    assert len(s3_epochs) == 2 and all(len(epoch) > 1 for epoch in s3_epochs), s3_epochs
    assert s3_epochs == local_epochs
    weights = {w: load_file(o / "best.safetensors") for w, o in runs.items()}
    assert weights["s3"].keys() == weights["local"].keys()
    for key in weights["s3"]:
        np.testing.assert_array_equal(weights["s3"][key], weights["local"][key])


def _epoch_metrics(run_dir) -> list[dict]:
    """Each epoch's line of metrics.jsonl without its timings (which differ between any two runs)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if "time" not in k and "second" not in k} for line in lines]


def test_an_s3_url_without_s3fs_is_one_line_naming_the_extra():
    """``featurestore ls s3://...`` in an interpreter where s3fs cannot be imported: exit 2, one line."""
    code = ("import sys\nsys.modules['s3fs'] = None\nfrom featurestore.cli import main\n"
            "sys.exit(main(['ls', 's3://bkt/x.zarr']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "pip install 'avscene[s3]'" in proc.stderr, proc.stderr
