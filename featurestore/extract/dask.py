"""Extraction as tasks on a Dask cluster: the same pipeline, one task per run of whole blocks.

The driver plans (creates the feature sets, fixes blocks and decode batches) and sends each task a
list of blocks. A task opens the store by its path itself, rebuilds the encoders from their specs
and options (once per worker process), checks that they give the fingerprints the driver recorded, recomputes
which rows of its blocks are still not done (so a task retried after a worker died skips what the
first attempt wrote), and runs ``run_blocks`` with decoding in its own thread. Tasks never share a
chunk (a shard, where the feature set is sharded: the unit written whole), because blocks are whole
chunks of every feature set (``check_blocks_aligned``).

A task that cannot run on its worker (no store at the location there, or not the driver's; an
encoder that cannot be built there or gives another fingerprint) returns a ``TaskRefused``, which the
driver raises as one ``ExtractionStopped`` line naming the worker. Ctrl-C, or any task's error, sets
the run's stop ``Event``: running tasks stop after their current batch (writing what they
finished) and the driver waits for them before it returns, so no task writes into the store after
the run released its lock. A task the scheduler gave up (its driver killed or disconnected) stops
the same way. After the run the driver counts the rows written from the store (``read_back``: a
retried task's killed attempt wrote some of them) and checks that every row the tasks reported done is
done in its own store (``check_written``: workers that wrote into a copy of the store are an error).

``scheduler`` may be an address, ``"local:N"`` (a LocalCluster of N single-threaded processes started
for the run), a cluster or a client. An address is checked with a bounded wait before the store is
created: one line (``SchedulerError``) when nothing there greets like a Dask scheduler, or when the
scheduler has no worker. A task lost to dead workers (``KilledWorker``) does not stop the others;
its rows still not done are reported as failed clips, and a rerun extracts them. The plan reaches
the workers as a task's result, computed again if every worker holding it dies.

Dask worker processes are daemonic and cannot start DataLoader workers, so within a task decoding
is not overlapped with encoding; the parallelism is the cluster's (one task per worker thread),
and the writer thread still overlaps writing.
"""
from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from featurestore._sigint import ignored_by_new_processes
from featurestore.extract.errors import ExtractionStopped, SchedulerError, hdf5_with_dask
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


def run_task(plan: Plan, store_ref: StoreRef, blocks: list[tuple[int, int]], device: str,
             stop: str | None = None) -> RunStats | TaskRefused:
    """One Dask task: extract ``blocks`` of ``plan`` into the store at ``store_ref``.

    ``stop`` names the run's ``distributed.Event``: once the driver sets it (Ctrl-C, or another
    task's error), a task not started yet returns at once and a running one stops after its current
    batch, having written the chunks it finished (as a local run does on Ctrl-C). A task that cannot
    run on this worker returns a ``TaskRefused`` (one line for the user) instead of raising, so that
    the worker logs no "Compute Failed" traceback.
    """
    flag = _StopFlag(stop)
    if flag.is_set():
        return _no_stats()
    where = _worker_address()
    try:
        with _open_on_worker(store_ref, where) as store:  # before torch is imported: a refusal comes at once
            dev = _worker_device(device, where)
            local = _worker_plan(plan, store, dev, where)
            from featurestore.extract.pipeline import run_blocks

            return run_blocks(local, store, blocks, dev, num_workers=0, on_progress=flag.check,
                              decode_threads=DECODE_THREADS)
    except _Refused as err:
        return TaskRefused(str(err))
    except _StopRequested:  # the chunks it finished are written; the driver counts from the store
        return _no_stats()


def _no_stats() -> RunStats:
    from featurestore.extract.pipeline import RunStats

    return RunStats()


@dataclass(frozen=True)
class TaskRefused:
    """What a task returns when it cannot run on its worker (the store not reachable there, an
    encoder that cannot be built or gives another fingerprint); the driver raises it as one
    ``ExtractionStopped`` line."""

    message: str


class _Refused(Exception):
    """Raised inside a task by the checks that make a ``TaskRefused``."""


class _StopRequested(Exception):
    """Raised inside a task's pipeline (through its progress callback) when the driver asked to stop."""


#: How often a running task asks the scheduler whether the driver wants it to stop (seconds).
STOP_CHECK_S = 0.25
#: How long the driver waits for running tasks to stop after Ctrl-C or a task's error (a second
#: Ctrl-C stops waiting); each stops after its current batch and writes the chunks it finished.
STOP_WAIT_S = 120.0


class _StopFlag:
    """The driver's stop request as a task sees it: the run's ``distributed.Event``, asked at most
    every ``STOP_CHECK_S`` seconds while the pipeline runs, or the scheduler having given up the task
    (``_cancelled_here``)."""

    def __init__(self, name: str | None):
        self.name, self.event, self.last = name, None, float("-inf")

    def is_set(self) -> bool:
        if self.name is None:
            return False
        if self.event is None:
            from distributed import Event, get_client

            self.event = Event(self.name, client=get_client())
        return bool(self.event.is_set()) or _cancelled_here()

    def check(self, _clips: int = 0) -> None:
        """``run_blocks``' progress callback: raise ``_StopRequested`` once the driver asked to stop."""
        now = time.monotonic()
        if now - self.last >= STOP_CHECK_S:
            self.last = now
            if self.is_set():
                raise _StopRequested()


def _cancelled_here() -> bool:
    """Whether the scheduler gave up the task running in this thread: its driver died or lost its
    connection (killed, its terminal closed), so the futures were released, or the driver cancelled
    it after ``stop_tasks`` waited in vain. Dask lets a running task run on ("cancelled" on its worker):
    it went on writing into the store for the rest of its blocks, with no lock held, beside the tasks of
    a rerun writing the same shards."""
    from distributed import get_worker

    worker = get_worker()
    task = worker.state.tasks.get(worker.get_current_task())
    return task is None or task.state == "cancelled"


def _worker_address() -> str:
    """This Dask worker's address, for the messages that name it."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):  # not in a worker (a task run by hand)
        return "(not a worker)"


def _worker_device(device: str, where: str):
    """``device`` resolved on this worker (``--device cuda`` on a worker without a GPU: ``_Refused``,
    naming the worker; the driver plans on the CPU and cannot tell)."""
    from featurestore.encoders import resolve_device

    try:
        return resolve_device(device)
    except ValueError as err:
        raise _Refused(f"Dask worker {where}: {_one_line(err)}") from None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


_SAME_LOCATION = ("every worker must reach the store under the same location (a shared filesystem or an "
                  "object-store URL; memory:// is one process's own)")


def _open_on_worker(ref: StoreRef, where: str):
    """The store at ``ref`` opened for writing on this worker; ``_Refused`` when there is none here.

    Opened read-only first: mode ``"a"`` creates a store where there is none, so a worker that does
    not see the driver's store (another machine's disk, ``memory://``) made an empty store of its own
    and failed on "no feature set named ...". The driver holds the writer lock and repaired the store
    when it opened it (``repair=False``)."""
    from featurestore.store import open_store

    args = dict(backend=ref.backend, storage_options=ref.storage_options)
    try:
        open_store(ref.location, "r", **args).close()
        return open_store(ref.location, "a", repair=False, **args)
    except Exception as err:  # noqa: BLE001 - whatever the backend says, it is one line naming the worker
        raise _Refused(f"Dask worker {where} cannot open the store {ref.location} ({_one_line(err)}); "
                       f"{_SAME_LOCATION}") from None


def _worker_plan(plan: Plan, store, dev, where: str) -> Plan:
    """``plan`` with this worker's encoders and the rows still not done (a retried task skips what
    its first attempt wrote); ``_Refused`` when the store here is not the driver's or an encoder
    cannot be built here or gives another fingerprint than the driver's."""
    from featurestore.errors import FeatureStoreError, UnknownFeatureError

    targets = []
    for target in plan.targets:
        expected = fingerprint(target.provenance)
        try:
            stored = store.feature_info(target.name).fingerprint
        except UnknownFeatureError:
            stored = None
        if stored != expected:
            found = f"no feature set {target.name!r}" if stored is None else \
                f"feature set {target.name!r} with fingerprint {stored}"
            raise _Refused(f"Dask worker {where} finds {found} in the store {store.location}, the driver's "
                           f"has fingerprint {expected}: not the driver's store; {_SAME_LOCATION}")
        try:
            encoder = _encoder(target.spec, target.options, dev)
        except (ImportError, FeatureStoreError) as err:
            raise _Refused(f"Dask worker {where} cannot build encoder {target.spec}: {_one_line(err)}; every "
                           f"worker needs the driver's environment (avscene, torch, timm, open_clip, "
                           f"plugins and weights)") from None
        found_fp = fingerprint(target_provenance(encoder, target.source, str(dev)))
        if found_fp != expected:
            raise _Refused(f"on Dask worker {where} {target.spec} gives fingerprint {found_fp}, the driver "
                           f"planned {expected}: different weights or library versions on the workers")
        done = store.done_mask(target.name, refresh=True)
        targets.append(replace(target, encoder=encoder, todo=plan.selected & ~done))
    return replace(plan, targets=targets)


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
            was found there), or the scheduler has no worker within Dask's connect timeout.
        ValueError: ``local:N`` without a positive N.
    """
    try:
        from distributed import Client
    except ImportError:
        raise SchedulerError(f"--scheduler {scheduler}: Dask is not installed; pip install 'avscene[dask]'") from None

    if isinstance(scheduler, Client):
        client = scheduler
    elif isinstance(scheduler, str) and scheduler.startswith(LOCAL_PREFIX):
        client = stack.enter_context(Client(stack.enter_context(local_cluster(_local_workers(scheduler)))))
    elif not isinstance(scheduler, str):
        if not hasattr(scheduler, "scheduler_address"):
            raise TypeError(f"scheduler must be an address like 'tcp://host:8786', 'local:N', a distributed.Client "
                            f"or a cluster, got {type(scheduler).__name__}")
        client = stack.enter_context(Client(scheduler))
    else:
        check_scheduler(scheduler, connect_timeout())
        try:
            client = stack.enter_context(Client(scheduler, timeout=connect_timeout()))
        except (OSError, TimeoutError) as err:  # it greeted, then went away or did not register us in time
            raise SchedulerError(f"--scheduler {scheduler}: {' '.join(str(err).split()) or type(err).__name__}; "
                                 f"is the scheduler running and reachable?") from None
    check_workers(client, scheduler if isinstance(scheduler, str) else client.scheduler.address, connect_timeout())
    return client


def check_workers(client, label: str, timeout: float) -> None:
    """Refuse a scheduler that has no worker (none joined within ``timeout`` seconds) in one line,
    before the store is created: the run's first step (scattering the plan) failed there with a
    bare ``TimeoutError: No valid workers found`` after the store had been made and left behind."""
    if client.nthreads():
        return
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        raise SchedulerError(f"--scheduler {label}: the scheduler has no workers (none joined within {timeout:g} s); "
                             f"start some ('dask worker {label}') or wait longer ({_TIMEOUT_HINT})") from None


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
    clips (exit code 1), so a rerun extracts exactly those. A task refused by its worker
    (``TaskRefused``) is an ``ExtractionStopped`` line; that, any other task error and Ctrl-C stop
    the run: the tasks are asked to stop and waited for (``stop_tasks``) before this raises, so that
    none writes into the store after the run has returned and released its lock.

    Raises:
        ExtractionStopped: a worker could not run its task (the store or an encoder, named).
    """
    from distributed import Event

    if store_ref.backend == "hdf5":
        raise hdf5_with_dask(store_ref.location)
    check_blocks_aligned(plan)
    threads = sum(client.nthreads().values()) or 1
    groups = group_blocks(plan.blocks(), threads * TASKS_PER_THREAD)
    stop = Event(f"featurestore-extract-stop-{uuid.uuid4().hex}", client=client)
    pending: dict = {}  # future -> its blocks, until its result is read
    try:  # a Ctrl-C while tasks are submitted stops those already submitted too
        shared = _shared_plan(client, plan)
        for group in groups:
            pending[client.submit(run_task, shared, store_ref, group, device, stop.name, pure=False)] = group
        stats, lost = _collect(plan, store_ref, pending, on_progress)
    except BaseException:
        stop_tasks(client, stop, list(pending))
        raise
    stats.merge(read_back(plan, store_ref, lost))
    where = "local cluster" if type(getattr(client, "cluster", None)).__name__ == "LocalCluster" else "cluster"
    return stats, f"dask ({len(client.nthreads())} workers, {threads} threads, device {device}; {where})"


def _identity(value: object) -> object:
    return value


def _shared_plan(client, plan: Plan):
    """``plan`` without its encoders, as the result of a task that every extraction task depends on.

    Not scattered: scattered data lives only on the workers, so when every worker holding it had died
    (the worker of a one-worker cluster killed once) Dask cancelled every task ("already forgotten")
    and the run ended in a traceback. A task's result is computed again from the plan the scheduler
    keeps. Dask's warning about a large graph is for data sent with many tasks; this is sent once."""
    light = replace(plan, targets=[replace(t, encoder=None) for t in plan.targets])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
        return client.submit(_identity, light, pure=False)


def _collect(plan: Plan, store_ref: StoreRef, pending: dict,
             on_progress: Callable[[int], None] | None) -> tuple[RunStats, list]:
    """The tasks' results as they come, merged, and the tasks lost to dead workers with their blocks.

    A task cancelled by someone else (the connection to the scheduler lost: Dask cancels every
    future; another client) is one ``ExtractionStopped`` line: it was a two-line traceback.
    Each future is released once read (removed from ``pending``): a future still held is a result
    Dask computes again when the worker that kept it dies, a task the driver neither counts nor waits
    for (it re-extracted the run's failed clips, and could write after the run had ended).
    """
    from distributed import KilledWorker, as_completed

    from featurestore.extract.pipeline import RunStats

    need = plan.needed_any()
    stats, lost = RunStats(), []
    for future in as_completed(list(pending)):
        blocks = pending[future]
        planned = int(sum(need[a:b].sum() for a, b in blocks))
        try:
            result = future.result()
        except KilledWorker as err:
            lost.append((blocks, err))
        except CancelledError as err:  # not by this run: the scheduler lost, or another client cancelled it
            raise ExtractionStopped(f"Dask cancelled the task of rows {blocks[0][0]}-{blocks[-1][1] - 1} "
                                    f"({_one_line(err)}); the clips finished before are kept in "
                                    f"{store_ref.location}, rerun to resume once the cluster is back") from None
        else:
            if isinstance(result, TaskRefused):
                raise ExtractionStopped(f"{result.message}; the clips finished before are kept in "
                                        f"{store_ref.location}, rerun to resume once fixed")
            # a retry skips the rows its killed attempt finished, which this run did extract:
            # clips count whole, and rows written are counted from the store (``read_back``)
            result.clips, result.written = planned, {}
            stats.merge(result)
        del pending[future]
        future.release()
        if on_progress is not None:
            on_progress(planned)
    return stats, lost


def stop_tasks(client, stop, futures: list, wait_s: float = STOP_WAIT_S) -> None:
    """Ask the run's tasks to stop (``stop``, the Event they poll) and wait for them, at most
    ``wait_s`` seconds (a second Ctrl-C stops waiting), then cancel what is left (a running task
    cancelled stops after its current batch too: ``_cancelled_here``).

    Cancelling alone forgets a running task on the scheduler but not on its worker: the task went on
    writing into the store after the run had returned, counted what was kept and released the lock,
    beside a rerun's tasks writing the same shards."""
    from distributed import wait

    with contextlib.suppress(BaseException):  # a second Ctrl-C, the timeout, a lost scheduler: the first error wins
        stop.set()
        wait(futures, timeout=wait_s)
    with contextlib.suppress(Exception):  # as above
        client.cancel(futures)


def check_written(plan: Plan, store, stats: RunStats) -> None:
    """After a Dask run, every row the tasks reported done must be done in the driver's store.

    A worker that reaches a *copy* of the store at the same location (the store rsynced to each
    node's scratch disk) passes every check of its task and writes into its copy: the summary said
    the clips were extracted, exit 0, while the driver's store had none of them.

    Raises:
        ExtractionStopped: rows neither done in ``store`` nor reported failed (a few named).
    """
    for target in plan.targets:
        failed = np.zeros(plan.n_rows, dtype=bool)
        failed[list(stats.failed.get(target.name, {}))] = True
        missing = np.flatnonzero(target.todo & ~failed & ~store.done_mask(target.name, refresh=True))
        if len(missing):
            shown = ", ".join(plan.clip_ids[r] for r in missing[:3])
            raise ExtractionStopped(f"{store.location}: {len(missing)} clips of {target.name} that the Dask tasks "
                                    f"extracted are not done in this store (e.g. {shown}): the workers wrote "
                                    f"into another store at that location; {_SAME_LOCATION}")


def read_back(plan: Plan, store_ref: StoreRef, lost: list[tuple[list[tuple[int, int]], Exception]]) -> RunStats:
    """What the run left in the store, read back once every task has ended: the rows it wrote per
    feature set (rows to do that are now done: those a killed attempt wrote before its retry skipped
    them count once, as in a local run's summary, which a task's own count cannot) and what the tasks
    lost to dead workers (``lost``) left behind: their clips, and their rows still not done as failed
    (the next run extracts them)."""
    from featurestore.extract.pipeline import RunStats
    from featurestore.store import open_store

    stats = RunStats()
    with open_store(store_ref.location, "r", backend=store_ref.backend,
                    storage_options=store_ref.storage_options) as store:
        done = {t.name: store.done_mask(t.name, refresh=True) for t in plan.targets}
    for target in plan.targets:
        stats.written[target.name] = int((target.todo & done[target.name]).sum())
    for blocks, err in lost:
        in_task = np.zeros(plan.n_rows, dtype=bool)
        for a, b in blocks:
            in_task[a:b] = True
        stats.clips += int((in_task & plan.needed_any()).sum())
        message = (f"Dask worker died while extracting rows {blocks[0][0]}-{blocks[-1][1] - 1} "
                   f"({type(err).__name__}); a rerun extracts them")
        for target in plan.targets:
            missing = np.flatnonzero(in_task & target.todo & ~done[target.name])
            if len(missing):
                stats.failed.setdefault(target.name, {}).update({int(r): message for r in missing})
    return stats
