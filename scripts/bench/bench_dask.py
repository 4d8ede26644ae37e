"""Benchmark of extraction as Dask tasks: 2 workers vs 1, and 1 Dask worker vs the local pipeline.

On a synthetic TAU-layout dataset (real WAV + MP4, 10 s clips, 10 audio segments, ``--frames`` frames)
it runs the same extraction, into a fresh store each time, three ways, interleaved ``--repeats``
times so that machine load hits all of them alike:

* ``local``: the local pipeline in this process, decoding in the encoding thread
  (``num_workers=0``) and torch on one thread: one core, like one Dask worker;
* ``dask1`` / ``dask2``: ``extract(..., scheduler=client)`` on a warm ``LocalCluster`` of 1 / 2
  worker processes with one thread each (the clusters are started, and the encoders built on every
  worker by a warm-up run, before any timing).

Times are the extraction's ``pipeline_seconds`` (decode + encode + write; for Dask also planning the
tasks, shipping the plan and collecting results), so model building and imports are outside them.
Printed per run: seconds per clip, the busy stages per clip, and the load average; then the ratios
of each repeat: ``dask1 / dask2`` (scaling, floor 1.6x on 2 cores) and ``dask1 / local`` (Dask
overhead, at most 1.15). ``--cold`` adds one ``scheduler="local:2"`` run, whose wall time includes
starting the cluster and building the encoders on its workers.

Usage:
    python scripts/bench/bench_dask.py --clips 32 --encoders timm/resnet18@none --frames 12 --repeats 3
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

SCALING_FLOOR = 1.6
OVERHEAD_CEILING = 1.15
RUNS = ("local", "dask1", "dask2")


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _extract(dataset: Path, store: Path, args: argparse.Namespace, scheduler=None, limit: int | None = None) -> dict:
    from featurestore.extract import extract

    options = dict(device=args.device, batch_size=args.batch_size, chunk_clips=args.chunk_clips, frames=args.frames,
                   progress=False, limit=limit)
    load_before = _load()
    if scheduler is None:
        summary = extract(dataset, store, args.encoders, num_workers=0, **options)
    else:
        summary = extract(dataset, store, args.encoders, scheduler=scheduler, **options)
    if summary.exit_code != 0:
        raise RuntimeError(f"extraction failed: {summary.line()}")
    workers = 1 if scheduler is None else len(scheduler.nthreads()) if hasattr(scheduler, "nthreads") else 2
    return {"summary": summary, "load": f"{load_before} -> {_load()}", "workers": workers}


def _describe(label: str, r: dict) -> str:
    s = r["summary"]
    n = s.clips_done
    stages = ", ".join(f"{k} {1000 * v / n:.0f}" for k, v in s.stage_seconds.items() if k != "wait for input")
    return (f"  {label:6s} {s.pipeline_seconds:7.2f} s pipeline = {1000 * s.pipeline_seconds / n:6.0f} ms/clip "
            f"(wall {s.wall_seconds:.2f} s); busy ms/clip: {stages}; outside the stages "
            f"{1000 * _outside(r) / n:.0f} ms/clip; load {r['load']}")


def _outside(r: dict) -> float:
    """Pipeline seconds not spent in any stage, per worker: planning, scheduling, shipping, idling.

    The busy stages of n workers add up to about n times the pipeline time, so this is
    ``pipeline - stages / workers``; unlike the pipeline time it hardly moves when other jobs slow
    the encoder down, which makes it the load-robust measure of what Dask itself costs."""
    s = r["summary"]
    return s.pipeline_seconds - s.stages_total() / r["workers"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--encoders", default="timm/resnet18@none")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--device", default="cpu", help="where the encoders run (cuda: measure GPU per-clip costs)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--chunk-clips", type=int, default=4,
                   help="clips per chunk, hence per block: small enough to give every worker several tasks")
    p.add_argument("--limit", type=int, default=None, help="extract only the first N clips of the dataset")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--runs", default=",".join(RUNS), help=f"which of {','.join(RUNS)} to run")
    p.add_argument("--cold", action="store_true", help="also one scheduler='local:2' run, cluster start included")
    p.add_argument("--storage", action="store_true",
                   help="also print bytes per clip of every feature set, from the last local run's store")
    p.add_argument("--tmp", default=None, help="where the dataset and stores go (default: the system temp)")
    args = p.parse_args()
    runs = [r for r in args.runs.split(",") if r]
    if set(runs) - set(RUNS):
        p.error(f"--runs: unknown {sorted(set(runs) - set(RUNS))}")

    import torch
    from distributed import Client

    logging.getLogger("distributed").setLevel(logging.ERROR)  # the in-process scheduler's INFO lines

    from featurestore.demo import make_demo_dataset
    from featurestore.extract.dask import local_cluster

    torch.set_num_threads(1)  # the local run uses one core, like a Dask worker (whose nanny sets OMP_NUM_THREADS=1)
    print(f"{os.cpu_count()} CPUs, load average {_load()} at start; encoders {args.encoders}; {args.frames} frames; "
          f"batch {args.batch_size}; {args.chunk_clips} clips per chunk")
    with tempfile.TemporaryDirectory(prefix="bench_dask_", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        per_class = math.ceil(args.clips / 10)
        dataset = make_demo_dataset(tmp / "data", clips_per_class=per_class, duration=10.0, progress=False)
        n = per_class * 10
        print(f"dataset: {n} clips of 10 s (48 kHz stereo, 128x96 video at 10 fps)")
        clients = {}
        try:
            for name, workers in (("dask1", 1), ("dask2", 2)):
                if name in runs:
                    clients[name] = Client(local_cluster(workers))
                    _extract(dataset, tmp / f"warm-{name}.zarr", args, clients[name], limit=2 * workers)
            if "local" in runs:
                _extract(dataset, tmp / "warm-local.zarr", args, limit=2)
            results: dict[str, list[dict]] = {r: [] for r in runs}
            for i in range(args.repeats):
                print(f"repeat {i + 1}:")
                for name in runs:
                    r = _extract(dataset, tmp / f"{name}-{i}.zarr", args, clients.get(name), limit=args.limit)
                    results[name].append(r)
                    print(_describe(name, r))
        finally:
            for client in clients.values():
                cluster = client.cluster
                client.close()
                cluster.close()
        _ratios(results)
        if args.storage and "local" in runs:
            _storage(tmp / f"local-{args.repeats - 1}.zarr")
        if args.cold:
            t0 = time.perf_counter()
            r = _extract(dataset, tmp / "cold.zarr", args, "local:2", limit=args.limit)
            print(f"cold scheduler='local:2': wall {time.perf_counter() - t0:.1f} s for {n} clips, of which pipeline "
                  f"{r['summary'].pipeline_seconds:.1f} s (starting 2 workers, importing torch and building the "
                  f"encoders on them is inside the pipeline time here); load {r['load']}")


def _storage(path: Path) -> None:
    """Bytes per clip of each feature set: from its shape and dtype, and as files on disk."""
    import numpy as np

    from featurestore.store import open_store

    total = 0
    with open_store(path) as store:
        for name, info in store.feature_sets().items():
            per_clip = int(np.prod(info.shape[1:])) * np.dtype(info.dtype).itemsize
            files = [f for f in (path / "features" / name / "data").rglob("*") if f.is_file()]
            disk = sum(f.stat().st_size for f in files) / max(1, info.n_done)
            total += per_clip
            print(f"  storage {name}: {info.shape[1:]} {info.dtype} = {per_clip} B/clip "
                  f"(on disk {disk:.0f} B/clip with {info.chunk_clips} clips per chunk)")
    print(f"  storage, all feature sets: {total} B/clip = {total / 2**10:.1f} KiB/clip")


def _ratios(results: dict[str, list[dict]]) -> None:
    def seconds(name: str) -> list[float]:
        return [r["summary"].pipeline_seconds for r in results.get(name, [])]

    if seconds("dask1") and seconds("dask2"):
        ratios = [a / b for a, b in zip(seconds("dask1"), seconds("dask2"))]
        verdict = "OK" if statistics.median(ratios) >= SCALING_FLOOR else "BELOW THE FLOOR"
        print(f"scaling, 1 worker / 2 workers: {', '.join(f'{x:.2f}x' for x in ratios)} "
              f"(median {statistics.median(ratios):.2f}x; floor {SCALING_FLOOR}x, ideal 2x) -> {verdict}")
    if seconds("dask1") and seconds("local"):
        ratios = [a / b for a, b in zip(seconds("dask1"), seconds("local"))]
        verdict = "OK" if statistics.median(ratios) <= OVERHEAD_CEILING else "OVER THE LIMIT"
        print(f"overhead, 1 Dask worker / local pipeline (both one core): {', '.join(f'{x:.3f}' for x in ratios)} "
              f"(median {statistics.median(ratios):.3f}; at most {OVERHEAD_CEILING}) -> {verdict}")
        extra = [(_outside(a) - _outside(b)) / a["summary"].clips_done
                 for a, b in zip(results["dask1"], results["local"])]
        busy = [a["summary"].stages_total() / b["summary"].stages_total()
                for a, b in zip(results["dask1"], results["local"])]
        print(f"  of which Dask's own cost (time outside the busy stages, dask1 - local): "
              f"{', '.join(f'{1000 * x:+.0f} ms/clip' for x in extra)}; busy stages dask1 / local "
              f"(same work: above 1 only when load slowed one run): {', '.join(f'{x:.2f}' for x in busy)}")


if __name__ == "__main__":
    main()
