"""A refused ``featurestore extract`` is one line, exit 2, and leaves nothing new behind.

A ``--scheduler`` that is no Dask scheduler (a port that accepts and never answers, a web server,
nothing listening) is refused within Dask's connect timeout, naming the address and what was found
there; every refusal found after the store was made (the scheduler, an encoder that does not fit the
dataset, chunk sizes, an HDF5 store for Dask) removes the store that run created, and never an
existing one. Ctrl-C (a real SIGINT to a real extraction's process group) is one line saying how
many clips the store kept, exit 130, no decode worker left, and the rerun resumes. Servers here are
real sockets in threads; the commands are real processes or the real ``featurestore.cli.main``.
"""
from __future__ import annotations

import http.server
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tests.featurestore.fault_support import finish, kill_group, one_error_line, wait_stopped
from tests.featurestore.test_extract_support import make_dataset
from tests import warm_child

from featurestore.cli import main
from featurestore.datasets import open_dataset
from featurestore.extract.pipeline import TEST_SIGNAL_ENV
from featurestore.store import create_store, open_store

WAIT_S = 2  # DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT in the children (Dask's default is 30 s)
LIGHT = ["--encoders", "logmel", "--device", "cpu", "--num-workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def tau_dir(tmp_path_factory):
    """Two 10 s clips in the TAU development layout (8 kHz audio, 1 fps video: small files)."""
    root = tmp_path_factory.mktemp("tau") / "TAU-urban-audio-visual-scenes-2021-development"
    make_dataset(root, 2, seconds=10.0, rate=8000, fps=1)
    return root


@pytest.fixture()
def silent_port():
    """A port that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    accepted = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:  # closed at the end of the test
                return

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for conn in accepted:
        conn.close()


@pytest.fixture()
def http_port():
    """A real (tiny) web server, like the Dask dashboard on 8787."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _extract_process(tau_dir: Path, store: Path, *extra: str) -> tuple[int, str, float]:
    """``featurestore extract`` in a child process; (exit code, stderr, seconds). A hang fails."""
    env = {**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": f"{WAIT_S}s"}
    t0 = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "featurestore", "extract", str(tau_dir), str(store), *LIGHT,
                               *extra], env=env, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("featurestore extract hangs on this --scheduler")
    return done.returncode, done.stderr, time.monotonic() - t0


def _left(tmp_path: Path, before: set[str]) -> set[str]:
    """Names that appeared in ``tmp_path`` (a store, a temp store, a lock file)."""
    return {p.name for p in tmp_path.iterdir()} - before


@pytest.mark.parametrize("server", ["silent", "http", "nothing"])
def test_a_scheduler_address_that_is_no_dask_scheduler_is_one_line_within_the_timeout(
        server, tau_dir, tmp_path, request):
    pytest.importorskip("distributed")
    port = {"silent": lambda: request.getfixturevalue("silent_port"),
            "http": lambda: request.getfixturevalue("http_port"), "nothing": _free_port}[server]()
    address = f"tcp://127.0.0.1:{port}"
    before = {p.name for p in tmp_path.iterdir()}
    code, err, seconds = _extract_process(tau_dir, tmp_path / "runs" / "new.zarr", "--scheduler", address)
    line = one_error_line(err)
    assert code == 2, err
    assert f"--scheduler {address}: " in line
    expected = {"silent": f"sent nothing within {WAIT_S} s", "http": "not a Dask scheduler: a web server ('HTTP/1.",
                "nothing": f"nothing listens there (connection refused for {WAIT_S} s)"}[server]
    assert expected in line, line
    assert seconds < 30  # Dask's timeout (2 s here) and the start of the process, never a hang
    assert _left(tmp_path, before) == set()  # no store, no temp store, no lock file, no runs/


@pytest.mark.parametrize("extra, says", [
    (["--encoder-option", "logmel.segment_seconds=2.0"], "works on 2.0 s segments"),
    (["--chunk-clips", "100000"], "chunk_clips must be at most 65536 clips"),
    (["--scheduler", "local:0"], "expected 'local:N' with N >= 1"),
    (["--scheduler", "local:1", "--backend", "hdf5"], "an HDF5 file cannot be written by several processes"),
], ids=["encoder-misfit", "chunk-sizes", "local-0", "hdf5-for-dask"])
def test_a_run_refused_after_it_made_a_new_store_leaves_no_store(extra, says, tau_dir, tmp_path, capsys):
    if "--scheduler" in extra:
        pytest.importorskip("distributed")
    before = {p.name for p in tmp_path.iterdir()}
    assert main(["extract", str(tau_dir), str(tmp_path / "runs" / "a" / "new.zarr"), *LIGHT, *extra]) == 2
    assert says in one_error_line(capsys.readouterr().err)
    assert _left(tmp_path, before) == set()


def test_a_refused_run_never_removes_a_store_that_was_there(tau_dir, tmp_path, capsys):
    dask = pytest.importorskip("dask")
    pytest.importorskip("distributed")
    store = tmp_path / "old.zarr"
    create_store(store, open_dataset(tau_dir)).close()
    marker = store / "kept-by-the-user"
    marker.write_text("x")
    refused = (["--scheduler", f"tcp://127.0.0.1:{_free_port()}"], ["--encoder-option", "logmel.segment_seconds=2.0"])
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        for extra in refused:
            assert main(["extract", str(tau_dir), str(store), *LIGHT, *extra]) == 2
            one_error_line(capsys.readouterr().err)
            assert marker.exists()
            with open_store(store) as fs:
                assert fs.n_clips == 2 and not fs.feature_sets()
    assert {p.name for p in tmp_path.iterdir()} == {"old.zarr"}


# ------------------------------------------------------------------------------------------ Ctrl-C
@pytest.mark.slow
def test_ctrl_c_is_one_line_saying_what_was_kept_exit_130_and_the_rerun_resumes(tmp_path, sigint_as_in_a_terminal):
    """A real SIGINT to the whole process group (what Ctrl-C in a terminal sends; the decode workers
    block it, see ``featurestore._sigint``), while the run is mid-way (stopped by the SIGSTOP hook
    after 2 done rows). Under load this once printed a worker's traceback: the main thread, cut
    while it received a batch, dropped the worker's file-descriptor handshake."""
    root = tmp_path / "TAU-urban-audio-visual-scenes-2021-development"
    make_dataset(root, 6, seconds=10.0, rate=8000, fps=1)
    store = tmp_path / "s.zarr"
    argv = ["-m", "featurestore", "extract", str(root), str(store), "--encoders", "logmel",
            "--device", "cpu", "--num-workers", "1", "--batch-size", "2", "--chunk-clips", "2", "--quiet"]
    env = {**os.environ, TEST_SIGNAL_ENV: "STOP:2"}
    proc = warm_child.start(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # a new session
    try:
        wait_stopped(proc)
        os.killpg(proc.pid, signal.SIGINT)
        os.killpg(proc.pid, signal.SIGCONT)
        code, err = finish(proc, timeout=60)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert code == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    (line,) = [x for x in err.splitlines() if x.strip() and not x.startswith("note:")]
    kept = re.fullmatch(r"featurestore extract: interrupted; (\d+) of 6 clips done and kept in (.+) \((\d+) by this "
                        r"run\); rerun the same command to resume", line)
    assert kept and kept[2] == str(store) and kept[1] == kept[3], line
    assert 2 <= int(kept[1]) < 6
    deadline = time.monotonic() + 10
    while _group_alive(proc.pid):  # the decode workers are gone too
        assert time.monotonic() < deadline, "decode workers outlived the interrupted run"
        time.sleep(0.05)
    assert not (tmp_path / "s.zarr.lock").exists()

    with open_store(store) as fs:
        assert fs.verify().ok and int(fs.done_mask("logmel").sum()) == int(kept[1])
    env.pop(TEST_SIGNAL_ENV)
    rerun = warm_child.run(argv, env=env, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{6 - int(kept[1])} clips done, {kept[1]} skipped, 0 failed of 6" in rerun.stdout


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_scheduler_without_dask_installed_is_one_line_naming_the_extra(tau_dir, tmp_path):
    """Dask is an extra (``avscene[dask]``): without it ``--scheduler`` is refused before any work."""
    code = ("import sys; sys.modules['distributed'] = None  # what an install without the extra gives\n"
            "from featurestore.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "extract", str(tau_dir), str(tmp_path / "runs" / "s.zarr"),
                           *LIGHT, "--scheduler", "local:2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "pip install 'avscene[dask]'" in one_error_line(done.stderr)
    assert list(tmp_path.iterdir()) == []
