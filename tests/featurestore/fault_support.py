"""Helpers of the fault tests: extraction in a real child process, stopped or killed at chosen points.

The child runs ``extract`` through ``featurestore.cli.run_command``, so its exit code and stderr are
what ``featurestore extract`` gives. It starts warm (forked from a server that imported torch once,
:mod:`tests.warm_child`) unless it runs under a ``prefix`` command, which needs a fresh interpreter. Points in the run are chosen by the number of done rows
(``FEATURESTORE_TEST_SIGNAL_AT_DONE=KILL:10`` / ``STOP:10``, see ``featurestore.extract.pipeline``), never
by sleeping.
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests import warm_child

from featurestore.extract.pipeline import TEST_SIGNAL_ENV
from featurestore.store import open_store

CHILD = """
import os, pickle, sys, time
from pathlib import Path
from featurestore.cli import run_command
from featurestore.extract import extract
manifest = pickle.loads(Path(sys.argv[1]).read_bytes())
options = pickle.loads(Path(sys.argv[2]).read_bytes())
go = os.environ.get("TEST_GO_FILE")
if go:  # wait with everything imported until the test says go (several children start at once)
    Path(f"{go}.ready-{os.getpid()}").touch()
    while not Path(go).exists():
        time.sleep(0.005)
sys.exit(run_command("featurestore", "extract", lambda: extract(manifest, sys.argv[3], **options).exit_code))
"""


def start_child(tmp: Path, manifest, store: Path, options: dict, signal_at: str | None = None,
                env: dict | None = None, prefix: list[str] | None = None, preexec_fn=None):
    """Start an extraction child in its own process group (stdout dropped, stderr piped); a
    ``preexec_fn`` must pickle (a module-level function, or a ``functools.partial`` of one)."""
    tmp.mkdir(parents=True, exist_ok=True)
    manifest_file, options_file = tmp / "manifest.pkl", tmp / f"options-{time.monotonic_ns()}.pkl"
    if not manifest_file.exists():
        manifest_file.write_bytes(pickle.dumps(manifest))
    options_file.write_bytes(pickle.dumps(options))
    child_env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    child_env.pop(TEST_SIGNAL_ENV, None)
    if signal_at:
        child_env[TEST_SIGNAL_ENV] = signal_at
    args = ["-c", CHILD, str(manifest_file), str(options_file), str(store)]
    if prefix is None:
        return warm_child.start(args, env=child_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=preexec_fn)
    return subprocess.Popen([*prefix, sys.executable, *args], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=child_env, preexec_fn=preexec_fn)


def finish(proc: subprocess.Popen, timeout: float = 120.0) -> tuple[int, str]:
    """Wait for a child; (exit code, stderr). Kills its process group on timeout (and fails)."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail(f"extraction child {proc.pid} did not end within {timeout} s (hangs)")
    return proc.returncode, err.decode(errors="replace")


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_stopped(proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Wait until the child stopped itself (SIGSTOP hook); fail if it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"extraction ended (exit {proc.returncode}) before it stopped: "
                        f"{proc.stderr.read().decode()[-2000:]}")
        if _state(proc.pid) == "T":
            return
        time.sleep(0.02)
    kill_group(proc)
    pytest.fail("the extraction did not reach its stop point in time")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def forked_children(pid: int) -> list[int]:
    """Child processes forked from ``pid`` without exec (decode workers: same command line)."""
    own = Path(f"/proc/{pid}/cmdline").read_bytes()
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:  # a thread that ended while we looked
            continue
        for child in children:
            try:
                if Path(f"/proc/{child}/cmdline").read_bytes() == own:
                    found.append(int(child))
            except OSError:
                pass
    return found


def done_total(store: Path) -> int:
    """Done rows summed over every feature set, as a reader sees them now."""
    with open_store(store, "r") as fs:
        return sum(int(fs.done_mask(name).sum()) for name in fs.feature_sets())


def one_error_line(stderr: str) -> str:
    """The ``featurestore extract: error: ...`` line; fails when stderr holds a traceback instead."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("featurestore extract: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]
