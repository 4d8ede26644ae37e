"""Starting the app: open the store, project the map's sets, bind a socket, run uvicorn.

`view` blocks (the command line); `start` runs the server in a thread and returns a `Running`
handle (tests, the benchmark, notebooks). Both bind 127.0.0.1 unless told otherwise; another host
prints a warning, since the app has no login and serves the dataset's media.
"""
from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featurestore.viewer._deps import require_view_extra

LOCAL = "127.0.0.1"


@dataclass
class Running:
    """A server started by `start`: its URL, and `stop()` to end it (the store is closed if we opened it)."""

    url: str
    server: Any
    thread: threading.Thread
    state: Any
    owns_store: bool

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        if self.owns_store:
            self.state.store.close()


def map_sets(store: Any) -> list[str]:
    """Feature sets that can go on the map: one vector per segment, at least one clip done."""
    return [name for name, info in store.feature_sets().items() if len(info.feature_shape) == 1 and info.n_done]


def prepare(store: Any, feature_sets: Sequence[str] | None = None, method: str = "pca",
            recipes: Sequence[str] = (), keep: bool = True, log: Any = None) -> Any:
    """The app's `ViewState`: projections of the map's sets (from their sidecars, or computed now)
    and the outputs to show (stored runs, and what providers add for ``recipes``)."""
    from featurestore.viewer.data import ViewState, map_points_parts
    from featurestore.viewer.outputs import load_sources
    from featurestore.viewer.projection import project

    names = list(feature_sets) if feature_sets else map_sets(store)
    projections = {}
    for name in names:
        proj = project(store, name, method, keep=keep)
        projections[name] = proj
        if log is not None:
            how = f"computed in {proj.seconds:.2f} s" if proj.seconds else "read from its sidecar"
            kept = f", kept in {proj.kept_in}" if proj.kept_in and proj.seconds else \
                ("" if proj.kept_in else ", not kept (the store is not writable here)")
            print(f"map of {name}: {len(proj.rows)} clips, {method} {how}{kept}", file=log)
    state = ViewState(store, projections, load_sources(store, recipes))
    for name, proj in projections.items():  # now, not on the first page a browser asks for
        map_points_parts(state, name)  # encodes and keeps the map's ids and positions
        _warm_neighbours(store, name, proj, log)
    return state


def _warm_neighbours(store: Any, name: str, proj: Any, log: Any) -> None:
    """Build search's clip matrix at start when it has no sidecar: at 100,000 clips building it is
    seconds, which the first clip page would otherwise wait. A matrix already kept is left to the
    first clip page (opening it maps and checks 200 MiB at 100,000 x 512: the idle app would hold
    those pages resident for nothing)."""
    import re

    from featurestore.store.search import set_key, sidecar_dir

    folder, key = sidecar_dir(store, name), set_key(store, name, "exact")
    if folder is not None and folder.is_dir() and any(re.fullmatch(re.escape(key) + r"-[0-9a-f]+\.json", entry.name)
                                                      for entry in folder.iterdir()):
        return
    t0 = time.perf_counter()
    result = store.search(name, store.index.ids_at(proj.rows[:1])[0], k=1, method="exact")
    built = [note for note in result.notes if note.startswith("built")]
    if log is not None and built:
        print(f"neighbours of {name}: search's clip matrix built in {time.perf_counter() - t0:.2f} s", file=log)


def _open(store: Any) -> tuple[Any, bool]:
    if isinstance(store, (str, Path)):
        from featurestore.store import open_store

        return open_store(store, "r"), True
    return store, False


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; a port out of range, a host that does not resolve or an
    address in use is one `ValueError` naming them (socket's own errors name neither)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: expected 0-65535 (0: any free port)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot listen on --host {host} --port {port}: {err.strerror or err}") from None
    return sock


def _server(state: Any, host: str) -> Any:
    import uvicorn

    from featurestore.viewer.app import create_app

    if host != LOCAL:
        print(f"WARNING: featurestore view listens on {host}: anyone who can reach it can read this store and "
              f"its dataset's media files (there is no login)", file=sys.stderr)
    app = create_app(state, local_only=host in (LOCAL, "localhost", "::1"))
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))


def _url(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def start(store: Any, host: str = LOCAL, port: int = 0, **options: Any) -> Running:
    """Start the app in a background thread (``port=0``: a free port); returns when it answers."""
    require_view_extra()
    store, owns = _open(store)
    try:
        state = prepare(store, **options)
        sock = _bind(host, port)
    except BaseException:
        if owns:
            store.close()
        raise
    server = _server(state, host)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="featurestore-view")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    return Running(_url(sock, host), server, thread, state, owns)


def view(store: Any, host: str = LOCAL, port: int = 8765, log: Any = sys.stdout, **options: Any) -> None:
    """Serve the app until Ctrl-C, printing its URL (``featurestore view STORE``).

    Args:
        store: a path or URL, or an open `FeatureStore`.
        host: the address to listen on (default loopback only; another one prints a warning).
        port: the port (0: any free one).
        options: `prepare`'s ``feature_sets``, ``method``, ``recipes``, ``keep``.
    """
    require_view_extra()
    store, owns = _open(store)
    try:
        state = prepare(store, log=log, **options)
        sock = _bind(host, port)
        server = _server(state, host)
        print(f"featurestore view: {_url(sock, host)} (Ctrl-C to stop)", file=log, flush=True)
        with contextlib.closing(sock):
            server.run(sockets=[sock])
    finally:
        if owns:
            store.close()
