"""Extraction as tasks on a Dask cluster: the same pipeline, one task per run of whole blocks.

The driver plans (creates the feature sets, fixes blocks and decode batches) and sends each task a
list of blocks. A task opens the store by its path itself, rebuilds the encoders from their specs
and options (once per worker process), checks that they give the fingerprints the driver recorded, recomputes
which rows of its blocks are still not done (so a task retried after a worker died skips what the
first attempt wrote), and runs ``run_blocks`` with decoding in its own thread. Tasks never share a
chunk, because blocks are whole chunks of every feature set.

``scheduler`` may be an address, ``"local:N"`` (a LocalCluster of N single-threaded processes started
for the run), a cluster or a client. A task lost to dead workers (``KilledWorker``) does not stop the
others; its rows still not done are reported as failed clips, and a rerun extracts them.

Dask worker processes are daemonic and cannot start DataLoader workers, so within a task decoding
is not overlapped with encoding; the parallelism is the cluster's (one task per worker thread),
and the writer thread still overlaps writing.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace

import numpy as np

from featurestore.extract.plan import Plan, target_provenance
from featurestore.extract.pipeline import RunStats, run_blocks
from featurestore.provenance import canonical_json, fingerprint

#: ``scheduler="local:N"``: start a LocalCluster of N single-threaded worker processes for this run.
LOCAL_PREFIX = "local:"
#: Tasks per Dask worker thread: enough to balance uneven blocks, few enough to load models rarely.
TASKS_PER_THREAD = 4

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
    from featurestore.store import open_store

    dev = resolve_device(device)
    with open_store(store_ref.location, "a", backend=store_ref.backend,
                    storage_options=store_ref.storage_options) as store:
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
        return run_blocks(local, store, blocks, dev, num_workers=0)


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
    ``distributed.Client`` (used as is, left open).
    """
    from distributed import Client

    if isinstance(scheduler, Client):
        return scheduler
    if isinstance(scheduler, str) and scheduler.startswith(LOCAL_PREFIX):
        scheduler = stack.enter_context(local_cluster(_local_workers(scheduler)))
    elif not isinstance(scheduler, str) and not hasattr(scheduler, "scheduler_address"):
        raise TypeError(f"scheduler must be an address like 'tcp://host:8786', 'local:N', a distributed.Client "
                        f"or a cluster, got {type(scheduler).__name__}")
    return stack.enter_context(Client(scheduler))


#: Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_=65536`` in every worker (and in the process that starts
#: it) so that freed memory goes back to the OS. Setting it turns off glibc's adaptive mmap threshold,
#: so every large tensor is a fresh mmap and page faults: a ResNet-18 forward on 12 frames took 0.74 s
#: in such a worker vs 0.55 s without it (docs/benchmarks.md). Our clusters leave glibc's default.
NANNY_ENVIRON_UNSET = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}


def local_cluster(n_workers: int):
    """A ``LocalCluster`` of ``n_workers`` processes with one thread each (torch single-threaded too:
    Dask's nanny sets ``OMP_NUM_THREADS=1`` in the workers), no dashboard, and glibc's own malloc
    trimming (see ``NANNY_ENVIRON_UNSET``)."""
    import dask
    from distributed import LocalCluster

    with dask.config.set(NANNY_ENVIRON_UNSET):
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None)


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


def run_distributed(plan: Plan, store_ref: StoreRef, scheduler, device: str,
                    on_progress: Callable[[int], None] | None = None) -> tuple[RunStats, str]:
    """Run every block of ``plan`` as Dask tasks; returns merged stats and a description of the cluster.

    A task whose worker died (``KilledWorker``: Dask retried it ``allowed-failures`` times) does not
    stop the others: they finish, and the rows the lost task left not done are reported as failed
    clips (exit code 1), so a rerun extracts exactly those. Any other task error cancels the run.
    """
    from distributed import KilledWorker, as_completed

    if store_ref.backend == "hdf5":
        raise ValueError(f"{store_ref.location}: an HDF5 file cannot be written by several processes; extract "
                         f"into a Zarr store and convert it ('featurestore convert') afterwards")
    with ExitStack() as stack:
        client = connect(scheduler, stack)
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
        where = "local cluster" if isinstance(scheduler, str) and scheduler.startswith(LOCAL_PREFIX) else "cluster"
        return stats, f"dask ({len(client.nthreads())} workers, {threads} threads, device {device}; {where})"


def lost_task_stats(plan: Plan, store_ref: StoreRef, lost: list[tuple[list[tuple[int, int]], Exception]]) -> RunStats:
    """What tasks whose worker died left behind, read back from the store: rows they finished count as
    written, rows still not done as failed (the next run extracts them)."""
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
