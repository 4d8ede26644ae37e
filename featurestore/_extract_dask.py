"""Extraction as tasks on a Dask cluster: the same pipeline, one task per run of whole blocks.

The driver plans (creates the feature sets, fixes blocks and batch windows) and sends each task a
list of blocks. A task opens the store by its path itself, rebuilds the encoders from their specs
(once per worker process), checks that they give the fingerprints the driver recorded, recomputes
which rows of its blocks are still not done (so a task retried after a worker died skips what the
first attempt wrote), and runs ``run_blocks`` with decoding in its own thread. Tasks never share a
chunk, because blocks are whole chunks of every feature set.

Dask worker processes are daemonic and cannot start DataLoader workers, so within a task decoding
is not overlapped with encoding; the parallelism is the cluster's (one task per worker thread),
and the writer thread still overlaps writing.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from featurestore._extract_plan import Plan, target_provenance
from featurestore._extract_run import RunStats, run_blocks
from featurestore.provenance import fingerprint

#: Tasks per Dask worker thread: enough to balance uneven blocks, few enough to load models rarely.
TASKS_PER_THREAD = 4

_ENCODERS: dict[tuple[str, str], object] = {}  # per worker process: (spec, device) -> encoder
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
            encoder = _encoder(target.spec, dev)
            expected = fingerprint(target.provenance)
            found = fingerprint(target_provenance(encoder, target.source, str(dev)))
            if found != expected:
                raise RuntimeError(f"on this Dask worker {target.spec} gives fingerprint {found}, the driver "
                                   f"planned {expected}: different weights or library versions on the workers")
            done = store.done_mask(target.name, refresh=True)
            targets.append(replace(target, encoder=encoder, todo=plan.selected & ~done))
        local = replace(plan, targets=targets)
        return run_blocks(local, store, blocks, dev, num_workers=0)


def _encoder(spec: str, device) -> object:
    """Build an encoder once per worker process; later tasks on that worker reuse it."""
    from featurestore.encoders import create_encoder

    key = (spec, str(device))
    with _ENCODERS_LOCK:
        if key not in _ENCODERS:
            _ENCODERS[key] = create_encoder(spec, device)
        return _ENCODERS[key]


def connect(scheduler) -> tuple[object, bool]:
    """A ``distributed.Client`` for an address, a cluster object or a client; True when we own it."""
    from distributed import Client

    if isinstance(scheduler, Client):
        return scheduler, False
    if isinstance(scheduler, str):
        return Client(scheduler), True
    if hasattr(scheduler, "scheduler_address"):
        return Client(scheduler), True
    raise TypeError(f"scheduler must be an address like 'tcp://host:8786', a distributed.Client or a cluster, "
                    f"got {type(scheduler).__name__}")


def group_blocks(blocks: list[tuple[int, int]], n_tasks: int) -> list[list[tuple[int, int]]]:
    """Split blocks into at most ``n_tasks`` contiguous groups of near-equal size."""
    n_tasks = max(1, min(n_tasks, len(blocks)))
    bounds = np.linspace(0, len(blocks), n_tasks + 1).round().astype(int)
    return [blocks[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def run_distributed(plan: Plan, store_ref: StoreRef, scheduler, device: str,
                    on_progress: Callable[[int], None] | None = None) -> tuple[RunStats, str]:
    """Run every block of ``plan`` as Dask tasks; returns merged stats and a description of the cluster."""
    from distributed import as_completed

    if store_ref.location.lower().endswith((".h5", ".hdf5")) or store_ref.backend == "hdf5":
        raise ValueError(f"{store_ref.location}: an HDF5 file cannot be written by several processes; extract "
                         f"into a Zarr store and convert it ('featurestore convert') afterwards")
    client, owned = connect(scheduler)
    try:
        threads = sum(client.nthreads().values()) or 1
        groups = group_blocks(plan.blocks(), threads * TASKS_PER_THREAD)
        light = replace(plan, targets=[replace(t, encoder=None) for t in plan.targets])
        shared = client.scatter(light, broadcast=True)
        need = plan.needed_any()
        futures = {client.submit(run_task, shared, store_ref, group, device, pure=False):
                   int(sum(need[a:b].sum() for a, b in group)) for group in groups}
        stats = RunStats()
        try:
            for future in as_completed(futures):
                stats.merge(future.result())
                if on_progress is not None:
                    on_progress(futures[future])
        except BaseException:
            client.cancel(list(futures))
            raise
        return stats, f"dask ({len(client.nthreads())} workers, {threads} threads, device {device})"
    finally:
        if owned:
            client.close()
