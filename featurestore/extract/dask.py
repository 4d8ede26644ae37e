"""Extraction as tasks on a Dask cluster: the same pipeline, one task per run of whole blocks.

The driver plans (creates the feature sets, fixes blocks and decode batches) and sends each task a
list of blocks. A task opens the store by its path itself, rebuilds the encoders from their specs
and options (once per worker process), checks that they give the fingerprints the driver recorded, recomputes
which rows of its blocks are still not done (so a task retried after a worker died skips what the
first attempt wrote), and runs ``run_blocks`` with decoding in its own thread. Tasks never share a
chunk (a shard, where the feature set is sharded: the unit written whole), because blocks are whole
chunks of every feature set (``check_blocks_aligned``).

``scheduler`` may be an address, ``"local:N"`` (a LocalCluster of N single-threaded processes started
for the run), a cluster or a client. An address is checked with a bounded wait before the store is
created: one line (``SchedulerError``) when nothing there greets like a Dask scheduler. A task lost to dead workers (``KilledWorker``) does not stop the
others; its rows still not done are reported as failed clips, and a rerun extracts them.

Dask worker processes are daemonic and cannot start DataLoader workers, so within a task decoding
is not overlapped with encoding; the parallelism is the cluster's (one task per worker thread),
and the writer thread still overlaps writing.
"""
from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from featurestore._sigint import ignored_by_new_processes
from featurestore.extract.errors import SchedulerError, hdf5_with_dask
from featurestore.extract.plan import Plan, target_provenance
from featurestore.provenance import canonical_json, fingerprint

if TYPE_CHECKING:  # the pipeline imports torch: loaded by the functions that run it, so that a bad
    from featurestore.extract.pipeline import RunStats  # scheduler is refused without importing torch

#: ``scheduler="local:N"``: start a LocalCluster of N single-threaded worker processes for this run.
LOCAL_PREFIX = "local:"
#: Tasks per Dask worker thread: enough to balance uneven blocks, few enough to load models rarely.
TASKS_PER_THREAD = 4
#: Threads a task decodes its next batches in while it encodes one (``run_blocks(decode_threads=)``).
DECODE_THREADS = 2

_ENCODERS: dict[tuple[str, str, str], object] = {}  # per worker process: (spec, options, device) -> encoder
_ENCODERS_LOCK = threading.Lock()


@dataclass(frozen=True)
class StoreRef:
    """How a task opens the store: by location, never by handle."""

    location: str
    backend: str | None = None
    storage_options: dict | None = None


def run_task(plan: Plan, store_ref: StoreRef, blocks: list[tuple[int, int]], device: str) -> RunStats:
    """One Dask task: extract ``blocks`` of ``plan`` into the store at ``store_ref``."""
    from featurestore.encoders import resolve_device
    from featurestore.extract.pipeline import run_blocks
    from featurestore.store import open_store

    dev = resolve_device(device)
    # the driver holds the writer lock and repaired the store when it opened it
    with open_store(store_ref.location, "a", backend=store_ref.backend,
                    storage_options=store_ref.storage_options, repair=False) as store:
        targets = []
        for target in plan.targets:
            encoder = _encoder(target.spec, target.options, dev)
            expected = fingerprint(target.provenance)
            found = fingerprint(target_provenance(encoder, target.source, str(dev)))
            if found != expected:
                raise RuntimeError(f"on this Dask worker {target.spec} gives fingerprint {found}, the driver "
                                   f"planned {expected}: different weights or library versions on the workers")
            done = store.done_mask(target.name, refresh=True)
            targets.append(replace(target, encoder=encoder, todo=plan.selected & ~done))
        local = replace(plan, targets=targets)
        return run_blocks(local, store, blocks, dev, num_workers=0, decode_threads=DECODE_THREADS)


def _encoder(spec: str, options: dict, device) -> object:
    """Build an encoder (with the options the driver built it with) once per worker process;
    later tasks on that worker reuse it."""
    from featurestore.encoders import create_encoder

    key = (spec, canonical_json(options), str(device))
    with _ENCODERS_LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = create_encoder(spec, device, **options)
        return _ENCODERS[key]


def connect(scheduler, stack: ExitStack):
    """A ``distributed.Client`` for ``scheduler``; whatever this call starts is closed by ``stack``.

    ``scheduler`` is an address (``tcp://host:8786``), ``local:N`` (a ``LocalCluster`` of N worker
    processes with one thread each, started here and closed at the end), a cluster object or a
    ``distributed.Client`` (used as is, left open). An address is checked first (``check_scheduler``):
    distributed's own handshake waits forever on a port that accepts and never answers.

    Raises:
        SchedulerError: nothing answers at the address as a Dask scheduler does (one line saying what
            was found there).
        ValueError: ``local:N`` without a positive N.
    """
    try:
        from distributed import Client
    except ImportError:
        raise SchedulerError(f"--scheduler {scheduler}: Dask is not installed; pip install 'avscene[dask]'") from None

    if isinstance(scheduler, Client):
        return scheduler
    if isinstance(scheduler, str) and scheduler.startswith(LOCAL_PREFIX):
        scheduler = stack.enter_context(local_cluster(_local_workers(scheduler)))
    elif not isinstance(scheduler, str) and not hasattr(scheduler, "scheduler_address"):
        raise TypeError(f"scheduler must be an address like 'tcp://host:8786', 'local:N', a distributed.Client "
                        f"or a cluster, got {type(scheduler).__name__}")
    if not isinstance(scheduler, str):
        return stack.enter_context(Client(scheduler))
    wait = connect_timeout()
    check_scheduler(scheduler, wait)
    try:
        return stack.enter_context(Client(scheduler, timeout=wait))
    except (OSError, TimeoutError) as err:  # it greeted, then went away or did not register us in time
        raise SchedulerError(f"--scheduler {scheduler}: {' '.join(str(err).split()) or type(err).__name__}; "
                             f"is the scheduler running and reachable?") from None


def connect_timeout() -> float:
    """Seconds to wait for a scheduler: Dask's ``distributed.comm.timeouts.connect`` (default 30 s; set
    ``DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=60s`` to wait longer)."""
    import dask
    from dask.utils import parse_timedelta

    return float(parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="seconds"))


#: The first 8 bytes a Dask comm sends are the length of its first message (little-endian); the
#: handshake is a few hundred bytes, so a larger number means something else is talking.
_MAX_GREETING_BYTES = 1 << 20


def check_scheduler(address: str, timeout: float) -> None:
    """Refuse ``address`` in one line unless something there greets like a Dask scheduler within
    ``timeout`` seconds (``tcp://`` addresses; other schemes are left to distributed).

    A Dask server writes its handshake as soon as it accepts a connection, before reading anything,
    so this sends nothing: it connects (retrying a refused connection until ``timeout``, as
    distributed does for a scheduler still starting), reads the first 8 bytes and closes. A silent
    port, an HTTP server (the dashboard's port 8787 among them: asked one web request once it has
    stayed silent) or any other service is named for what it did; a scheduler logs the probe as a
    connection closed before its handshake.
    """
    from distributed.comm import parse_address, parse_host_port

    try:
        scheme, where = parse_address(address)
        if scheme != "tcp":
            return
        host, port = parse_host_port(where)
    except ValueError as err:
        raise SchedulerError(f"--scheduler {address!r}: not a scheduler address ({err}); expected "
                             f"tcp://HOST:PORT (a Dask scheduler listens on 8786 by default) or local:N") from None
    deadline = time.monotonic() + timeout
    with _connected(address, host, port, deadline, timeout) as sock:
        head = _greeting(address, sock, deadline, timeout)
    (length,) = struct.unpack("<Q", head[:8])
    if not 0 < length <= _MAX_GREETING_BYTES:
        shown = head.decode("ascii", "replace").split("\r")[0].split("\n")[0]
        raise SchedulerError(f"--scheduler {address}: not a Dask scheduler: it answered {shown!r} "
                             f"instead of a Dask handshake ({_PORTS})")


_PORTS = "a Dask scheduler listens on 8786 by default; 8787 is its dashboard, a web page"


@contextmanager
def _connected(address: str, host: str, port: int, deadline: float, timeout: float) -> Iterator[socket.socket]:
    """A TCP connection to ``host:port``, a refused one retried until ``deadline``."""
    pause = 0.05
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=max(0.01, deadline - time.monotonic()))
            break
        except ConnectionRefusedError:
            if time.monotonic() + pause >= deadline:
                raise SchedulerError(f"--scheduler {address}: nothing listens there (connection refused for "
                                     f"{timeout:g} s); is the scheduler running?") from None
            time.sleep(pause)
            pause = min(1.0, 2 * pause)
        except TimeoutError:
            raise SchedulerError(f"--scheduler {address}: no answer within {timeout:g} s (the connection was "
                                 f"not accepted; {_TIMEOUT_HINT})") from None
        except socket.gaierror as err:
            raise SchedulerError(f"--scheduler {address}: unknown host {host!r} ({err.strerror})") from None
        except OSError as err:
            raise SchedulerError(f"--scheduler {address}: cannot connect ({err.strerror or err})") from None
    try:
        yield sock
    finally:
        sock.close()


_TIMEOUT_HINT = "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=60s waits longer"
#: How long a silent server has to answer a web request (the usual mistake: the dashboard's port).
_HTTP_WAIT_S = 1.0


def _http_status(sock: socket.socket) -> str | None:
    """The status line a web server gives to a request, or None. Asked only once the server has
    stayed silent for the whole timeout, so never of a scheduler that greeted."""
    try:
        sock.settimeout(_HTTP_WAIT_S)
        sock.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
        reply = sock.recv(256)
    except OSError:
        return None
    line = reply.split(b"\r\n")[0].split(b"\n")[0].decode("ascii", "replace")
    return line if line.startswith("HTTP/") else None


def _greeting(address: str, sock: socket.socket, deadline: float, timeout: float) -> bytes:
    """The first 8 bytes the server sends by itself (a Dask handshake's length)."""
    head = b""
    while len(head) < 8:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            part = sock.recv(64)
        except TimeoutError:
            if not head and (status := _http_status(sock)):
                raise SchedulerError(f"--scheduler {address}: not a Dask scheduler: a web server ({status!r} to "
                                     f"a web request; {_PORTS})") from None
            raise SchedulerError(f"--scheduler {address}: not a Dask scheduler, or one too busy to answer: it "
                                 f"accepted the connection but sent nothing within {timeout:g} s (a scheduler "
                                 f"greets at once; {_PORTS}; {_TIMEOUT_HINT})") from None
        except OSError as err:
            raise SchedulerError(f"--scheduler {address}: the connection failed ({err.strerror or err})") from None
        if not part:
            raise SchedulerError(f"--scheduler {address}: not a Dask scheduler: it closed the connection "
                                 f"{'after ' + repr(head) if head else 'without a word'} ({_PORTS})")
        head += part
    return head


#: Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` in every worker (and in the process that starts
#: it) so that freed memory goes back to the OS. Setting it turns off glibc's adaptive mmap threshold,
#: so every large tensor is a fresh mmap and page faults: a ResNet-18 forward on 12 frames took 0.74 s
#: in such a worker vs 0.55 s without it (docs/benchmarks.md). Our clusters leave glibc's default.
NANNY_ENVIRON_UNSET = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def local_cluster(n_workers: int):
    """A ``LocalCluster`` of ``n_workers`` processes with one thread each (torch single-threaded too:
    Dask's nanny sets ``OMP_NUM_THREADS=1`` in the workers), no dashboard, and glibc's own malloc
    trimming (see ``NANNY_ENVIRON_UNSET``).

    The scheduler's HTTP server listens on a free port of the loopback interface: distributed starts
    it even without a dashboard, on 8787 for ``dashboard_address=None`` (dask/distributed#7207), so a
    second cluster on the machine (two extractions, a user's notebook) warned "Port 8787 is already
    in use"."""
    import dask
    from distributed import LocalCluster

    with dask.config.set(NANNY_ENVIRON_UNSET), ignored_by_new_processes():
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                            dashboard_address="127.0.0.1:0", scheduler_kwargs={"dashboard": False})


def _local_workers(scheduler: str) -> int:
    count = scheduler[len(LOCAL_PREFIX):]
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"scheduler {scheduler!r}: expected 'local:N' with N >= 1 worker processes, e.g. 'local:2'")
    return int(count)


def group_blocks(blocks: list[tuple[int, int]], n_tasks: int) -> list[list[tuple[int, int]]]:
    """Split blocks into at most ``n_tasks`` contiguous groups of near-equal size."""
    n_tasks = max(1, min(n_tasks, len(blocks)))
    bounds = np.linspace(0, len(blocks), n_tasks + 1).round().astype(int)
    return [blocks[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def check_blocks_aligned(plan: Plan) -> None:
    """Every block starts on a chunk (shard) boundary of every target it writes (one with rows to do
    there) and ends on one or at the last row, so no two tasks ever write the same shard (a shard
    written by two would lose one's rows)."""
    for target in plan.targets:
        per = target.chunk_clips
        for start, stop in plan.blocks():
            if target.todo[start:stop].any() and (start % per or (stop % per and stop != plan.n_rows)):
                raise RuntimeError(f"block {start}:{stop} is not made of whole chunks of {per} clips of "
                                   f"{target.name}: two Dask tasks could write the same shard")


def run_distributed(plan: Plan, store_ref: StoreRef, client, device: str,
                    on_progress: Callable[[int], None] | None = None) -> tuple[RunStats, str]:
    """Run every block of ``plan`` as Dask tasks on ``client`` (from ``connect``, which the caller
    calls before it creates the store, so that a bad scheduler leaves nothing behind); returns
    merged stats and a description of the cluster.

    A task whose worker died (``KilledWorker``: Dask retried it ``allowed-failures`` times) does not
    stop the others: they finish, and the rows the lost task left not done are reported as failed
    clips (exit code 1), so a rerun extracts exactly those. Any other task error cancels the run.
    """
    from distributed import KilledWorker, as_completed

    from featurestore.extract.pipeline import RunStats

    if store_ref.backend == "hdf5":
        raise hdf5_with_dask(store_ref.location)
    check_blocks_aligned(plan)
    threads = sum(client.nthreads().values()) or 1
    groups = group_blocks(plan.blocks(), threads * TASKS_PER_THREAD)
    light = replace(plan, targets=[replace(t, encoder=None) for t in plan.targets])
    shared = client.scatter(light, broadcast=True)
    need = plan.needed_any()
    futures = {client.submit(run_task, shared, store_ref, group, device, pure=False): group for group in groups}
    stats, lost = RunStats(), []
    try:
        for future in as_completed(futures):
            try:
                stats.merge(future.result())
            except KilledWorker as err:
                lost.append((futures[future], err))
            if on_progress is not None:
                on_progress(int(sum(need[a:b].sum() for a, b in futures[future])))
    except BaseException:
        client.cancel(list(futures))
        raise
    if lost:
        stats.merge(lost_task_stats(plan, store_ref, lost))
    where = "local cluster" if type(getattr(client, "cluster", None)).__name__ == "LocalCluster" else "cluster"
    return stats, f"dask ({len(client.nthreads())} workers, {threads} threads, device {device}; {where})"


def lost_task_stats(plan: Plan, store_ref: StoreRef, lost: list[tuple[list[tuple[int, int]], Exception]]) -> RunStats:
    """What tasks whose worker died left behind, read back from the store: rows they finished count as
    written, rows still not done as failed (the next run extracts them)."""
    from featurestore.extract.pipeline import RunStats
    from featurestore.store import open_store

    stats = RunStats()
    with open_store(store_ref.location, "r", backend=store_ref.backend,
                    storage_options=store_ref.storage_options) as store:
        for blocks, err in lost:
            in_task = np.zeros(plan.n_rows, dtype=bool)
            for a, b in blocks:
                in_task[a:b] = True
            stats.clips += int((in_task & plan.needed_any()).sum())
            message = (f"Dask worker died while extracting rows {blocks[0][0]}-{blocks[-1][1] - 1} "
                       f"({type(err).__name__}); a rerun extracts them")
            for target in plan.targets:
                todo = in_task & target.todo
                done = store.done_mask(target.name, refresh=True)
                stats.written[target.name] = stats.written.get(target.name, 0) + int((todo & done).sum())
                missing = np.flatnonzero(todo & ~done)
                if len(missing):
                    stats.failed.setdefault(target.name, {}).update({int(r): message for r in missing})
    return stats
