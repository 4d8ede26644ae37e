"""What a user of a store on S3 meets when things go wrong: two writers at once, a killed writer's
lock, stores whose names are prefixes of each other, another process changing the store, and
requests that fail (refused credentials, no endpoint, a server error mid-read or mid-write).

One moto server for the session (test_s3.py's fixture); faults are injected by :class:`FaultProxy`,
a small HTTP relay in front of it that answers the requests a test picks with an S3 error document.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
import pytest
from tests.featurestore.test_s3 import LIGHT, _cli, demo_set, s3_env, s3_server  # noqa: F401 - fixtures shared with test_s3
from tests.s3_server import make_bucket

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store
from featurestore.errors import CorruptChunkError, StoreFormatError
from featurestore.store import RemoteStoreError, open_store
from featurestore.store.lock import StoreLockedError, writer_lock

s3fs = pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
pytestmark = pytest.mark.slow

BUCKET = "hostile"
N = 40
IDS = [f"{TAU_CLASSES[i % 10]}-city0-{i}-a" for i in range(N)]
VALUES = np.random.default_rng(0).standard_normal((N, 1, 16)).astype(np.float16)
PROVENANCE = {"encoder": "test/hostile", "config": {}, "weights": {"kind": "random", "seed": 0},
              "segments": {"frames": 1}}
#: One botocore attempt per request: a failure injected on purpose is not retried for seconds.
ONE_TRY = {"config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}


class FaultProxy:
    """An S3 endpoint relaying to the moto server, answering the requests ``fail(method, path)``
    picks (a ``(status, code)`` pair) with that S3 error instead."""

    def __init__(self, upstream: str):
        self.fail = lambda method, path: None
        self._upstream = urlsplit(upstream)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def relay(self) -> None:
                size = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(size) if size else None
                fault = proxy.fail(self.command, self.path)
                if fault is not None:
                    status, code = fault
                    data = f"<Error><Code>{code}</Code><Message>injected {code}</Message></Error>".encode()
                    headers = [("Content-Type", "application/xml")]
                else:
                    conn = http.client.HTTPConnection(proxy._upstream.hostname, proxy._upstream.port, timeout=60)
                    conn.request(self.command, self.path, body=body,
                                 headers={k: v for k, v in self.headers.items() if k.lower() != "connection"})
                    response = conn.getresponse()
                    status, data = response.status, response.read()
                    headers = [(k, v) for k, v in response.getheaders()
                               if k.lower() not in ("transfer-encoding", "connection", "content-length")]
                    conn.close()
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = relay

        return Handler

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="module", autouse=True)
def _clients_of_this_module():
    """fsspec keeps one S3FileSystem per set of options in a process, bound to the endpoint the
    environment named when it was made; this module's server is not test_s3.py's (a session fixture
    imported into a module is a fixture of its own), so neither module may use the other's clients."""
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def bucket(s3_env):  # noqa: F811 - the fixture imported above
    make_bucket(s3_env, BUCKET)
    return s3_env


@pytest.fixture(scope="module")
def proxy(bucket):
    relay = FaultProxy(bucket)
    yield relay
    relay.stop()


def _fs() -> s3fs.S3FileSystem:
    """A client of its own (no listing shared with the code under test), as another process has."""
    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def _make(url: str, storage_options: dict | None = None, name: str = "e") -> None:
    manifest = Manifest("hostile", list(TAU_CLASSES),
                        [ClipRecord(c, label=TAU_CLASSES[i % 10]) for i, c in enumerate(IDS)])
    with create_store(url, manifest, storage_options=storage_options) as store:
        store.create_feature_set(name, 1, (16,), PROVENANCE, chunk_clips=10)
        store.write_rows(name, 0, VALUES)


@pytest.fixture(scope="module")
def store(bucket):
    url = f"s3://{BUCKET}/store"
    _make(url)
    return url


# ------------------------------------------------------------------------------ the writer lock
def test_of_writers_racing_for_one_s3_store_exactly_one_gets_the_lock(bucket):
    url = f"s3://{BUCKET}/raced"
    start, outcomes = threading.Barrier(6), []

    def race() -> None:
        lock = writer_lock(url, command="racer")
        start.wait()
        try:
            outcomes.append(lock.acquire())
        except StoreLockedError as err:
            outcomes.append(err)

    threads = [threading.Thread(target=race) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = [o for o in outcomes if not isinstance(o, StoreLockedError)]
    assert len(held) == 1 and len(outcomes) == 6, outcomes
    refused = [str(o) for o in outcomes if isinstance(o, StoreLockedError)]
    assert all(f"lock object {url}.lock" in text and f"pid {os.getpid()}" in text for text in refused), refused
    held[0].release()
    assert not _fs().exists(f"{BUCKET}/raced.lock")
    with writer_lock(url):  # free again
        pass


def test_extract_into_an_s3_store_another_driver_writes_is_refused_in_one_line(bucket, demo_set):  # noqa: F811
    url = f"s3://{BUCKET}/driven.zarr"
    with writer_lock(url, command="the first driver"):
        second = _cli("extract", str(demo_set), url, *LIGHT)
    assert second.returncode == 2, second.stderr[-2000:]
    assert second.stderr.count("\n") == 1 and "is being written by another process" in second.stderr, second.stderr
    assert "running 'the first driver'" in second.stderr and f"lock object {url}.lock" in second.stderr
    assert not _fs().find(f"{BUCKET}/driven.zarr")  # the second driver created nothing


def test_a_killed_writers_lock_is_taken_over_here_and_another_hosts_is_refused_naming_the_fix(bucket, capfd):
    url = f"s3://{BUCKET}/killed"
    code = (f"from featurestore.store.lock import writer_lock\nwriter_lock({url!r}).acquire()\n"
            "print('held', flush=True)\nimport time\ntime.sleep(120)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(StoreLockedError, match=f"pid {child.pid} on host"):  # it runs: refused
            writer_lock(url).acquire()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    lock = writer_lock(url).acquire()  # dead, on this host: taken over with a note
    assert lock.previous["pid"] == child.pid
    assert "taking over the writer lock" in capfd.readouterr().err
    lock.release()
    record = {"pid": 4242, "host": socket.gethostname() + "-elsewhere", "started": "then", "command": "extract"}
    _fs().pipe_file(f"{BUCKET}/killed.lock", json.dumps(record).encode())
    with pytest.raises(StoreLockedError, match=rf"aws s3 rm {url}\.lock"):
        writer_lock(url).acquire()


def test_stores_whose_names_are_prefixes_of_each_other_stay_apart(store, bucket):
    other = f"{store}2"
    _make(other)
    with writer_lock(store), writer_lock(other):  # separate locks
        pass
    with open_store(store, "w"):  # replaced: its neighbour keeps every object
        pass
    with open_store(other) as kept:
        np.testing.assert_array_equal(kept.read_rows("e", 0, N), VALUES)
        assert kept.verify().ok
    with pytest.raises(FileNotFoundError, match=rf"no feature store at s3://{BUCKET}/stor \(no zarr.json there\)"):
        open_store(f"s3://{BUCKET}/stor")
    with pytest.raises(FileNotFoundError, match="the bucket 'absent-bucket' does not exist"):
        open_store("s3://absent-bucket/store")
    _make(store)  # as the other tests expect it


# ------------------------------------------------------------------- another process's changes
def test_a_set_another_process_added_or_deleted_is_seen_after_refresh_and_when_opened_again(store):
    other = {"skip_instance_cache": True}  # a client of its own, as another process has
    reader = open_store(store)
    assert list(reader.feature_sets()) == ["e"]
    with open_store(store, "a", storage_options=other) as writer:
        writer.create_feature_set("e3", 1, (16,), PROVENANCE, chunk_clips=10)
        writer.write_rows("e3", 0, VALUES * 3)
        writer.delete_feature_set("e")
    reader.refresh()
    assert list(reader.feature_sets()) == ["e3"]
    reader.close()
    with open_store(store) as again:
        assert list(again.feature_sets()) == ["e3"]
        np.testing.assert_array_equal(again.read_rows("e3", 0, N), VALUES * 3)
    _make(store)


def test_a_set_another_process_replaced_is_never_read_through_the_old_metadata(store):
    """Same bytes per row, other dtype: the new float32 shards read as the old float16 would pass
    every checksum. A reader holding the store open (no ``refresh``) reads the set as it is now."""
    new = np.random.default_rng(5).standard_normal((N, 1, 8)).astype(np.float32)  # 32 bytes a row, as before
    with open_store(store) as reader:
        np.testing.assert_array_equal(reader.get_many("e", IDS[:3]), VALUES[:3])  # shard 0 read, done flags kept
        with open_store(store, "a", storage_options={"skip_instance_cache": True}) as writer:
            writer.create_feature_set("e", 1, (8,), dict(PROVENANCE, weights={"kind": "random", "seed": 7}),
                                      dtype="float32", chunk_clips=10, overwrite=True)
            writer.write_rows("e", 0, new)
        np.testing.assert_array_equal(reader.get_many("e", IDS[10:13]), new[10:13])  # a shard not read before
        np.testing.assert_array_equal(reader.read_rows("e", 20, 23), new[20:23])
    _make(store)


def test_an_object_overwritten_with_other_bytes_is_named_or_found(bucket):
    """A done-flag chunk overwritten with junk: verify names the array (as on disk); a set's
    ``zarr.json`` overwritten: one line naming that object (it said "a zarr.json metadata file")."""
    url = f"s3://{BUCKET}/overwritten"
    _make(url)
    fs = _fs()
    fs.pipe_file(f"{BUCKET}/overwritten/features/e/done/c.1", b"junk")
    with open_store(url) as store:
        report = store.verify()
    assert not report.ok and any("features/e/done" in p.where for p in report.problems), report.problems
    fs.pipe_file(f"{BUCKET}/overwritten/features/e/data/zarr.json", b"{not json")
    with pytest.raises(StoreFormatError, match=rf"^{url}/features/e/data/zarr.json is not valid JSON"):
        with open_store(url) as store:
            store.get_many("e", IDS[:2])


# ------------------------------------------------------------------------------ failed requests
def test_a_server_error_or_refusal_mid_read_is_named_as_such_never_as_damage(store, proxy):
    options = {"client_kwargs": {"endpoint_url": proxy.url}, "skip_instance_cache": True, **ONE_TRY}
    with open_store(store, storage_options=options) as reader:
        proxy.fail = lambda method, path: (500, "InternalError") if "/e/data/c." in path else None
        try:
            with pytest.raises(RemoteStoreError, match=rf"{store}: reading features/e/data.* failed: the request "
                                                       r"failed: .*Internal.*rerun") as caught:
                reader.get_many("e", IDS[:3])
            assert not isinstance(caught.value, CorruptChunkError)
            proxy.fail = lambda method, path: (403, "AccessDenied") if "/e/done/c." in path else None
            with pytest.raises(RemoteStoreError, match="access was refused"):
                reader.verify()  # not a report calling the store damaged
        finally:
            proxy.fail = lambda method, path: None
        assert reader.verify().ok
        np.testing.assert_array_equal(reader.get_many("e", IDS[:3]), VALUES[:3])


def test_a_shard_put_that_fails_leaves_its_rows_not_done_and_a_rerun_completes(store, proxy):
    options = {"client_kwargs": {"endpoint_url": proxy.url}, "skip_instance_cache": True, **ONE_TRY}
    with open_store(store, "a", storage_options=options) as writer:
        writer.create_feature_set("w", 1, (16,), PROVENANCE, chunk_clips=10)
        proxy.fail = lambda method, path: (500, "InternalError") if method == "PUT" and "/w/data/c.1." in path else None
        try:
            with pytest.raises(RemoteStoreError, match=rf"{store}: writing features/w/data rows 0:40 failed"):
                writer.write_rows("w", 0, VALUES)
        finally:
            proxy.fail = lambda method, path: None
    with open_store(store) as reader:
        assert not reader.done_mask("w").any()  # no row of the failed write is served
    with open_store(store, "a") as writer:
        writer.write_rows("w", 0, VALUES)
    with open_store(store) as reader:
        np.testing.assert_array_equal(reader.read_rows("w", 0, N), VALUES)


def test_missing_or_refused_credentials_and_an_unreachable_endpoint_are_one_line_naming_the_url(store, proxy):
    proxy.fail = lambda method, path: (403, "InvalidAccessKeyId")
    try:
        refused = _cli("ls", store, env={"AWS_ENDPOINT_URL": proxy.url, "AWS_MAX_ATTEMPTS": "1"})
    finally:
        proxy.fail = lambda method, path: None
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    unreachable = _cli("ls", store, env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "1"})
    missing = _cli("ls", store, env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": ""})
    for proc, what in ((refused, "access was refused"), (unreachable, "the endpoint could not be reached"),
                       (missing, "no credentials were found")):
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.count("\n") == 1 and store in proc.stderr and what in proc.stderr, proc.stderr


def test_extract_into_an_open_s3_store_takes_its_lock_through_the_stores_storage_options(bucket, proxy, demo_set):
    """The lock object is written with the store's own ``storage_options`` (here: an endpoint that
    only they name). Before, the lock used the environment's settings alone, so a store whose
    credentials or endpoint were given only in ``storage_options`` was refused at the lock."""
    from featurestore.datasets import open_dataset
    from featurestore.extract import extract

    url = f"s3://{BUCKET}/lock-options"
    options = {"client_kwargs": {"endpoint_url": proxy.url}, "skip_instance_cache": True}
    seen: list[tuple[str, str]] = []
    proxy.fail = lambda method, path: seen.append((method, path))  # records, answers nothing itself
    try:
        create_store(url, open_dataset(demo_set), storage_options=options).close()
        with open_store(url, "a", storage_options=options) as store:
            summary = extract(open_dataset(demo_set), store, "logmel", device="cpu", num_workers=0, limit=2,
                              batch_size=2, chunk_clips=4, progress=False)
    finally:
        proxy.fail = lambda method, path: None
    assert summary.clips_done == 2
    assert any(method == "PUT" and path.split("?")[0].endswith("/lock-options.lock") for method, path in seen), seen
