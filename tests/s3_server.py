"""A real S3-API server for the object-storage tests: moto's server in a process of its own.

Why a process and not moto's in-process mocks: the stores under test are written by other processes
(a killed ``featurestore extract``, Dask workers), which can only reach a server by URL. This is how
s3fs's own test suite runs (``moto_server`` on localhost). The server listens on 127.0.0.1 only, on a
port the OS picks; it keeps everything in memory and dies with its stdin (when the tests end, or
when pytest is killed).

Everything that talks to it learns the endpoint from the environment (:func:`s3_environment`):
dummy credentials, ``AWS_ENDPOINT_URL`` (which botocore, and so s3fs, honours for every client it
makes), no shared config or credential files and no instance-metadata lookups, so nothing here can
reach a non-loopback address. :func:`loopback_guard` makes that checked rather than hoped: an audit
hook that refuses any outgoing TCP connection or name lookup off 127.0.0.1 while the environment is
set, in this process and, through ``sitecustomize`` on ``PYTHONPATH``, in every Python child.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

#: Set in the environment while the S3 tests run; the audit hook only acts while it is "1".
GUARD_ENV = "AVSCENE_TEST_LOOPBACK_ONLY"

#: moto's S3 app alone (what ``moto_server s3`` serves), not ``ThreadedMotoServer``'s dispatcher: that
#: one finds the service of every request anew (listing moto's modules on disk) under one lock and logs
#: a line per request, half of the server's CPU in the S3 tests.
_SERVER = """
import logging, sys, threading
from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no log line per request
server = make_server("127.0.0.1", 0, create_backend_app("s3"), threaded=True, request_handler=MotoRequestHandler)
print(f"http://127.0.0.1:{server.server_port}", flush=True)
threading.Thread(target=lambda: (sys.stdin.read(), server.shutdown()), daemon=True).start()
server.serve_forever()  # until the parent closes our stdin (or dies)
"""

#: The hook, as source: run in this process and written as the children's ``sitecustomize.py``.
GUARD_SOURCE = '''
import os, socket, sys

_LOOPBACK_NAMES = {None, "", "localhost", "127.0.0.1", "::1", b"localhost", b"127.0.0.1"}


def _loopback(host):
    if isinstance(host, bytes):
        host = host.decode()
    return host in _LOOPBACK_NAMES or str(host).startswith("127.") or host == "::1"


def _avscene_loopback_only(event, args):
    """Refuse TCP connections and name lookups off the loopback interface (UDP connects send
    nothing: Dask's get_ip() uses one to learn the local address)."""
    if os.environ.get("AVSCENE_TEST_LOOPBACK_ONLY") != "1":
        return
    if event == "socket.connect":
        sock, address = args
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM \\
                and not _loopback(address[0]):
            raise ConnectionRefusedError(f"test guard: connection to {address!r} refused (loopback only)")
    elif event == "socket.getaddrinfo" and not _loopback(args[0]):
        raise OSError(f"test guard: name lookup of {args[0]!r} refused (loopback only)")


if not getattr(sys, "_avscene_loopback_guard", False):
    sys._avscene_loopback_guard = True
    sys.addaudithook(_avscene_loopback_only)
'''


class MotoServer:
    """``python -c <moto ThreadedMotoServer>`` on 127.0.0.1:<free port>; ``url`` is its endpoint."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self._proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
        line = self._proc.stdout.readline().strip()
        if not line.startswith("http://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"moto server did not start (printed {line!r}; is moto[server] installed?)")
        self.url = line

    def stop(self) -> None:
        """Close its stdin (it stops), then make sure it is gone."""
        try:
            self._proc.stdin.close()
            self._proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()


def s3_environment(url: str, guard_dir: Path) -> dict[str, str]:
    """The variables that point boto/s3fs (here and in every child) at the server, and only there."""
    guard_dir.mkdir(parents=True, exist_ok=True)
    (guard_dir / "sitecustomize.py").write_text(GUARD_SOURCE)
    path = os.pathsep.join(p for p in (str(guard_dir), os.environ.get("PYTHONPATH", "")) if p)
    missing = str(guard_dir / "absent")
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url, "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": missing, "AWS_SHARED_CREDENTIALS_FILE": missing, "NO_PROXY": "127.0.0.1,localhost",
            GUARD_ENV: "1", "PYTHONPATH": path}


def loopback_guard() -> None:
    """Install the audit hook in this process (once; it acts only while ``GUARD_ENV`` is "1")."""
    exec(compile(GUARD_SOURCE, "<loopback guard>", "exec"), {"__name__": "loopback_guard"})


def make_bucket(url: str, name: str) -> None:
    """Create an empty bucket on the server (a fresh s3fs client, so no listing cache is shared)."""
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": url}, skip_instance_cache=True).mkdir(name)
