"""Benchmark the feature store's read paths against h5py, numpy memmap and plain Zarr, in one run on one data set.

The data is the size of the full DCASE2021 Task 1B development set as one CLIP feature set:
12,291 clips x 12 frames x 512 float16 (random values, seeded). It is built once into ``--workdir``
as (a) a feature store (Zarr v3, the default backend and layout: shards of inner chunks) and (b) a
plain h5py file holding the same array as one contiguous ``[12291, 12, 512]`` dataset, and (c) the
same matrix as a ``.npy`` file for numpy's memmap, then reused.

Measured (each row says exactly what is compared):
  1. warm single-clip read: ``store.get(name, id)`` after the store's chunk cache has seen the data,
     vs ``ds[i]`` on the open h5py file (OS page cache warm); median over many random ids.
     Floor (issue 23): ours <= 2x h5py. Plain Zarr ``arr[i]`` is shown for context.
  2. cold single-clip read: ``store.get`` on a store with ``cache_bytes=0`` (every call reads and
     checks its clip's inner chunk; index and done flags loaded), vs ``ds[i]``. Floor: <= 3x h5py.
  3. batched read: ``store.get_many(name, ids)`` for 1,024 random ids on a store whose chunk cache is
     empty, vs numpy memmap fancy indexing of the same rows; and the bytes the store decoded (inner
     chunks) per byte returned. Floors: <= 10x the memmap, <= 16x the bytes. 1,024 separate cold
     ``store.get`` calls are shown for context. The OS page cache is warm for all, so this compares
     read paths, not the disk.

Run:  .venv/bin/python scripts/bench/bench_store.py [--workdir /tmp/avscene-bench]
Exit code 1 when a floor is missed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import zarr
from tqdm.auto import tqdm

from featurestore import TAU_CLASSES, ClipRecord, Manifest, convert_store, create_store, open_store

FEATURE = "clip/bench"
PROVENANCE = {"encoder": "bench/random-normal", "config": {}, "weights": {"kind": "random", "seed": 0},
              "segments": {"frames": 12}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/avscene-bench", help="where the data is built once and reused")
    p.add_argument("--clips", type=int, default=12291)
    p.add_argument("--segments", type=int, default=12)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--n-get", type=int, default=3000, help="random ids timed for the warm single reads")
    p.add_argument("--batch", type=int, default=1024, help="ids per get_many")
    p.add_argument("--repeats", type=int, default=7, help="repeats of the batched comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-clips", type=int, default=None,
                   help="clips per store chunk, a shard (default: the store's own choice, ~TARGET_CHUNK_BYTES)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the data even when cached")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------- the data
def rows_of(ids: list[str]) -> list[int]:
    """Row of each bench clip id (the row is the id's last number before the suffix)."""
    return [int(c.rsplit("-", 2)[1]) for c in ids]


def clip_ids(n: int) -> list[str]:
    return [f"{TAU_CLASSES[i % 10]}-city{i % 12}-{i % 97}-{i}-a" for i in range(n)]


def build(args: argparse.Namespace) -> tuple[Path, Path]:
    """Write the store and the plain h5py file once; a marker file records what was built."""
    work = Path(args.workdir) / f"chunks-{args.chunk_clips}"
    store_path, raw_path, marker = work / "store.zarr", work / "raw.h5", work / "built.json"
    npy_path = raw_path.with_suffix(".npy")
    spec = {"clips": args.clips, "segments": args.segments, "dim": args.dim, "seed": args.seed,
            "chunk_clips": args.chunk_clips, "layout": 2}  # 2: sharded feature sets, and the .npy
    if not args.rebuild and marker.exists() and json.loads(marker.read_text()) == spec:
        return store_path, raw_path
    work.mkdir(parents=True, exist_ok=True)
    ids = clip_ids(args.clips)
    manifest = Manifest("bench", list(TAU_CLASSES),
                        [ClipRecord(c, label=TAU_CLASSES[i % 10], splits=frozenset({"all"})) for i, c in enumerate(ids)])
    rng = np.random.default_rng(args.seed)
    shape = (args.clips, args.segments, args.dim)
    npy = np.lib.format.open_memmap(npy_path, mode="w+", dtype=np.float16, shape=shape)
    with create_store(store_path, manifest) as store, h5py.File(raw_path, "w") as raw:
        info = store.create_feature_set(FEATURE, args.segments, (args.dim,), PROVENANCE,
                                        chunk_clips=args.chunk_clips)
        ds = raw.create_dataset("data", shape=shape, dtype="float16")
        block = info.chunk_clips * max(1, 8192 // info.chunk_clips)
        for start in tqdm(range(0, args.clips, block), desc="build", unit="block"):
            data = rng.standard_normal((min(block, args.clips - start),) + shape[1:]).astype(np.float16)
            store.write_rows(FEATURE, start, data)
            ds[start:start + len(data)] = data
            npy[start:start + len(data)] = data
    npy.flush()
    del npy
    convert_store(store_path, work / "store.h5", progress=False)
    marker.write_text(json.dumps(spec))
    print(f"built {store_path} and {raw_path}: {args.clips} x {args.segments} x {args.dim} float16")
    return store_path, raw_path


# ------------------------------------------------------------------------------------ timing
def median_latency(read: Callable[[int], object], rows: np.ndarray) -> float:
    """Median seconds of ``read(row)`` over ``rows``, each call timed on its own."""
    times = np.empty(len(rows))
    for k, row in enumerate(rows):
        t0 = time.perf_counter()
        read(int(row))
        times[k] = time.perf_counter() - t0
    return float(np.median(times))


def bench_warm_get(store_path: Path, raw_path: Path, rows: np.ndarray) -> dict[str, float]:
    """Median latency of one-clip reads after warming: store.get, h5py ds[i], zarr arr[i]."""
    ids = clip_ids(int(rows.max()) + 1)
    with open_store(store_path, "r") as store, h5py.File(raw_path, "r") as raw:
        ds = raw["data"]
        arr = zarr.open_array(store_path / "features" / FEATURE / "data", mode="r")
        for row in rows:  # the chunk cache sees every timed clip (and the OS page cache warms)
            store.get(FEATURE, ids[row]), ds[int(row)]
        for row in rows[:200]:
            arr[int(row)]
        ours = median_latency(lambda r: store.get(FEATURE, ids[r]), rows)
        h5 = median_latency(lambda r: ds[r], rows)
        plain_zarr = median_latency(lambda r: arr[r], rows[: max(200, len(rows) // 5)])
        check = int(rows[0])
        if not np.array_equal(store.get(FEATURE, ids[check]), ds[check]):
            raise RuntimeError(f"store and h5py disagree on row {check}: the benchmark data is inconsistent")
    with open_store(store_path.with_suffix(".h5"), "r") as h5store:
        for row in rows:
            h5store.get(FEATURE, ids[row])
        ours_h5 = median_latency(lambda r: h5store.get(FEATURE, ids[r]), rows)
    return {"store_get": ours, "h5py_row": h5, "zarr_row": plain_zarr, "store_get_hdf5": ours_h5}


def bench_cold_get(store_path: Path, raw_path: Path, rows: np.ndarray) -> dict[str, float]:
    """Median latency of a one-clip read that decodes its clip's chunk (no chunk cache) vs h5py."""
    ids = clip_ids(int(rows.max()) + 1)
    with open_store(store_path, "r", cache_bytes=0) as store, h5py.File(raw_path, "r") as raw:
        ds = raw["data"]
        store.done_mask(FEATURE), store.rows([ids[r] for r in rows])  # index + done flags loaded
        for row in rows[:100]:
            store.get(FEATURE, ids[row]), ds[int(row)]
        interleaved = {"store": [], "h5py": []}
        for row in rows:  # interleaved, so that load from other processes hits both alike
            interleaved["store"].append(median_latency(lambda r: store.get(FEATURE, ids[r]), np.array([row])))
            interleaved["h5py"].append(median_latency(lambda r: ds[r], np.array([row])))
    return {"store_cold_get": float(np.median(interleaved["store"])),
            "h5py_cold_row": float(np.median(interleaved["h5py"]))}


def decoded_bytes(store) -> Callable[[], int]:
    """A counter of the bytes the store reads for values from now on: what its shard reader fetches
    or checks (indexes and inner chunks, whether read by range or through a memory map), or, for a
    store without one (HDF5), the chunks it decodes."""
    reader = getattr(store._b, "_shards", None)
    if reader is not None:
        start = reader.bytes_read
        return lambda: reader.bytes_read - start
    counted = [0]
    read_chunks = store._b.read_chunks

    def counting(path: str, chunks, required):
        blocks = read_chunks(path, chunks, required)
        counted[0] += sum(b.nbytes for b in blocks)
        return blocks

    store._b.read_chunks = counting
    return lambda: counted[0]


def bench_batched(store_path: Path, npy_path: Path, batches: list[list[str]]) -> dict[str, list[float]]:
    """get_many on an empty chunk cache vs numpy memmap fancy indexing (and, for context, separate
    gets with the cache disabled), same ids, interleaved per repeat so that load hits all alike."""
    many, single, no_fill, cpu_many, cpu_single, memmap, decoded = [], [], [], [], [], [], []
    mm = np.load(npy_path, mmap_mode="r")
    mm[rows_of(batches[0])]  # the mapping made once, as a user holding it open has it
    for ids in tqdm(batches, desc="batched", unit="repeat"):
        rows = np.array(rows_of(ids))
        t0 = time.perf_counter()
        reference = mm[rows]
        memmap.append(time.perf_counter() - t0)
        with open_store(store_path, "r") as store:
            store.done_mask(FEATURE), store.rows(ids)  # index + done flags loaded outside the timing
            counted = decoded_bytes(store)
            t0, c0 = time.perf_counter(), time.process_time()
            got = store.get_many(FEATURE, ids)
            many.append(time.perf_counter() - t0)
            cpu_many.append(time.process_time() - c0)
            decoded.append(counted() / got.nbytes)
        if not np.array_equal(got, reference):
            raise RuntimeError("get_many and the memmap returned different data")
        with open_store(store_path, "r", cache_bytes=0) as store:  # context: the cost of filling the cache
            store.done_mask(FEATURE), store.rows(ids)
            t0 = time.perf_counter()
            store.get_many(FEATURE, ids)
            no_fill.append(time.perf_counter() - t0)
        with open_store(store_path, "r", cache_bytes=0) as cold:
            cold.done_mask(FEATURE), cold.rows(ids)
            t0, c0 = time.perf_counter(), time.process_time()
            singles = [cold.get(FEATURE, c) for c in ids]
            single.append(time.perf_counter() - t0)
            cpu_single.append(time.process_time() - c0)
        if not np.array_equal(got, np.stack(singles)):
            raise RuntimeError("get_many and per-clip get returned different data")
    return {"get_many": many, "separate_gets": single, "get_many_no_cache": no_fill,
            "cpu_get_many": cpu_many, "cpu_separate_gets": cpu_single, "memmap": memmap, "decoded": decoded}


# ------------------------------------------------------------------------------------ report
def report(args: argparse.Namespace, store_path: Path, warm: dict, cold: dict, batched: dict,
           batches: list[list[str]]) -> bool:
    clip_bytes = args.segments * args.dim * 2
    with open_store(store_path, "r") as store:
        chunk_clips = store.feature_info(FEATURE).chunk_clips
        inner = store.arrays.inner_rows(f"features/{FEATURE}/data")
    print(f"\ndata: {args.clips} clips x {args.segments} x {args.dim} float16 "
          f"({args.clips * clip_bytes / 2**20:.0f} MiB); store shards of {chunk_clips} clips "
          f"({chunk_clips * clip_bytes / 2**20:.2f} MiB), inner chunks of {inner} clip(s) "
          f"({inner * clip_bytes / 2**10:.0f} KiB)")
    print(f"\n1. warm single-clip read, median of {args.n_get} random ids")
    print(f"   store.get (zarr backend, warm chunk cache) {warm['store_get'] * 1e6:9.1f} us")
    print(f"   h5py ds[i] (contiguous, file open)         {warm['h5py_row'] * 1e6:9.1f} us")
    print(f"   zarr v3 arr[i] (same store array, context) {warm['zarr_row'] * 1e6:9.1f} us")
    print(f"   store.get (hdf5 backend, warm, context)    {warm['store_get_hdf5'] * 1e6:9.1f} us")
    ratio_get = warm["store_get"] / warm["h5py_row"]
    ok_get = ratio_get <= 2.0
    print(f"   ratio store.get / h5py = {ratio_get:.2f}x  (floor <= 2x: {'PASS' if ok_get else 'FAIL'}); "
          f"plain zarr / h5py = {warm['zarr_row'] / warm['h5py_row']:.1f}x")
    ratio_cold = cold["store_cold_get"] / cold["h5py_cold_row"]
    ok_cold = ratio_cold <= 3.0
    print(f"\n2. cold single-clip read (cache_bytes=0: decodes its inner chunk), median of {args.n_get} ids")
    print(f"   store.get {cold['store_cold_get'] * 1e6:9.1f} us vs h5py ds[i] {cold['h5py_cold_row'] * 1e6:9.1f} us: "
          f"{ratio_cold:.2f}x  (floor <= 3x: {'PASS' if ok_cold else 'FAIL'})")
    many, single, memmap = batched["get_many"], batched["separate_gets"], batched["memmap"]
    n_chunks = statistics.mean(len({r // inner for r in rows_of(ids)}) for ids in batches)
    print(f"\n3. {args.batch} random ids (touching {n_chunks:.0f} of {-(-args.clips // inner)} inner chunks), "
          f"{args.repeats} repeats, fresh store object each: best / median")
    print(f"   store.get_many, empty chunk cache          {min(many) * 1e3:8.1f} / {statistics.median(many) * 1e3:8.1f} ms")
    print(f"   numpy memmap fancy index, same rows        {min(memmap) * 1e3:8.1f} / "
          f"{statistics.median(memmap) * 1e3:8.1f} ms")
    ratio_many = statistics.median(many) / statistics.median(memmap)
    ok_many = ratio_many <= 10.0
    print(f"   ratio get_many / memmap = {ratio_many:.1f}x on medians ({min(many) / min(memmap):.1f}x best)  "
          f"(floor <= 10x: {'PASS' if ok_many else 'FAIL'})")
    amplification = statistics.median(batched["decoded"])
    ok_bytes = amplification <= 16.0
    print(f"   bytes decoded / bytes returned = {amplification:.1f}x  (floor <= 16x: {'PASS' if ok_bytes else 'FAIL'})")
    no_fill = batched["get_many_no_cache"]
    print(f"   context: get_many, cache_bytes=0          {min(no_fill) * 1e3:8.1f} / "
          f"{statistics.median(no_fill) * 1e3:8.1f} ms  (decodes the same chunks, keeps none)")
    print(f"   context: {args.batch} x store.get, cache_bytes=0  "
          f"{min(single) * 1e3:8.1f} / {statistics.median(single) * 1e3:8.1f} ms: get_many "
          f"{statistics.median(single) / statistics.median(many):.1f}x faster on medians")
    return ok_get and ok_cold and ok_many and ok_bytes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    store_path, raw_path = build(args)
    rng = np.random.default_rng(args.seed + 1)
    rows = rng.integers(0, args.clips, size=args.n_get)
    ids = clip_ids(args.clips)
    batches = [[ids[r] for r in rng.choice(args.clips, size=args.batch, replace=False)] for _ in range(args.repeats)]
    warm = bench_warm_get(store_path, raw_path, rows)
    cold = bench_cold_get(store_path, raw_path, rows)
    batched = bench_batched(store_path, raw_path.with_suffix(".npy"), batches)
    ok = report(args, store_path, warm, cold, batched, batches)
    print(f"\nbench_store: {'all floors met' if ok else 'a floor was MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
