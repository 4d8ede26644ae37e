"""Benchmark ``store.search``: exact numpy search vs a faiss IVF index, the memory-mapped sidecar, the build.

Data: ``--clips`` x ``--segments`` x ``--dim`` float16 (default 12,291 x 12 x 512, the dev set's size),
seeded, built once into ``--workdir``. Values are ``--data clustered`` (default; embeddings with
structure like real ones: a class centre, a location offset and per-frame noise) or ``--data random``
(i.i.d. normal: clip means spread evenly over the sphere, the hardest case for an inverted-file
index, reported for contrast). ``--clips 200000 --segments 1 --dim 128`` is a set past the ``auto``
switch (25.6M values > ``APPROX_ABOVE``) that runs in about two minutes here.

Measured in one run (each query is a ``--like`` query of a random stored clip through the public
``store.search``, k = 10, the clip itself left out):
  1. clip matrix: built from the store in one streaming pass into the ``.npy`` sidecar, then opened
     again by a new store object (the memory map, its manifest and its once-per-process block check).
  2. exact warm query: median and p95 over ``--queries`` ids. Also per query in one batch call.
  3. faiss: index build time from the clip matrix (train + add + the nprobe calibration) beside
     faiss used directly on the same vectors (the same nlist and training sample, train + add:
     floor <= 2x), warm query median/p95 at the calibrated nprobe, recall@10 against the exact
     answers (floor >= 0.95), and other nprobe values for the speed/recall trade-off.
  4. ``auto``: which method it picks at this size, and its warm median.
  5. first query in a new process (a subprocess, imports excluded) with the sidecars on disk, for
     exact (memory map) and faiss: floor <= 1 s.

Run:  .venv/bin/python scripts/bench/bench_search.py [--workdir /tmp/avscene-bench-search] [--data random]
      [--clips 200000 --segments 1 --dim 128]
Exit code 1 when a floor is missed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store, open_store
from featurestore.store import search as search_mod

FEATURE = "clip/bench"
PROVENANCE = {"encoder": "bench/synthetic", "config": {}, "weights": {"kind": "random", "seed": 0}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/avscene-bench-search")
    p.add_argument("--clips", type=int, default=12291)
    p.add_argument("--segments", type=int, default=12)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--data", choices=["clustered", "random"], default="clustered")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here as JSON")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> Path:
    """The store, built once per (size, data kind, seed); a marker file says what was built."""
    work = Path(args.workdir) / f"{args.data}-{args.clips}x{args.segments}x{args.dim}-s{args.seed}"
    path, marker = work / "store.zarr", work / "built.json"
    if marker.exists():
        return path
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    n, s, d = args.clips, args.segments, args.dim
    labels = np.arange(n) % 10
    locations = (np.arange(n) // 10) % 500
    clips = [ClipRecord(f"{TAU_CLASSES[labels[i]]}-city-{locations[i]}-{i}", label=TAU_CLASSES[labels[i]],
                        city="city", location=f"city-{locations[i]}", splits=frozenset({"all"})) for i in range(n)]
    with create_store(path, Manifest("bench", list(TAU_CLASSES), clips)) as store:
        info = store.create_feature_set(FEATURE, s, (d,), PROVENANCE)
        block = info.chunk_clips * 8
        centres = rng.standard_normal((10, d)) * 1.0
        offsets = rng.standard_normal((500, d)) * 0.7
        for start in range(0, n, block):
            stop = min(n, start + block)
            noise = rng.standard_normal((stop - start, s, d))
            if args.data == "clustered":
                own = rng.standard_normal((stop - start, 1, d)) * 0.5
                x = centres[labels[start:stop]][:, None] + offsets[locations[start:stop]][:, None] + own + noise
            else:
                x = noise
            store.write_rows(FEATURE, start, x.astype(np.float16))
    marker.write_text(json.dumps(vars(args)))
    return path


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def ms(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"median_ms": 1000 * statistics.median(values), "p95_ms": 1000 * values[int(0.95 * (len(values) - 1))]}


def first_query(path: Path, cid: str, method: str, k: int) -> dict:
    """Open the store and answer one query in a fresh interpreter (imports not counted)."""
    code = (f"import json, time\nfrom featurestore import open_store\nt0 = time.perf_counter()\n"
            f"with open_store({str(path)!r}) as s:\n    t1 = time.perf_counter()\n"
            f"    r = s.search({FEATURE!r}, {cid!r}, k={k}, method={method!r})\n    t2 = time.perf_counter()\n"
            f"print(json.dumps({{'open_s': t1 - t0, 'first_query_s': t2 - t1, "
            f"'built': any(n.startswith('built') for n in r.notes)}}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def faiss_directly(matrix: np.ndarray, rows: np.ndarray, nlist: int) -> float:
    """Seconds for faiss alone to train and fill the same IVF index on the same in-memory vectors."""
    import faiss

    n, d = matrix.shape
    t0 = time.perf_counter()
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    pick = np.sort(np.random.default_rng(0).choice(n, size=min(n, 64 * nlist), replace=False))
    index.train(matrix[pick])
    index.add_with_ids(matrix, rows)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = build(args)
    shutil.rmtree(str(path) + search_mod.SIDECAR_SUFFIX, ignore_errors=True)  # time the builds
    results: dict = {"clips": args.clips, "segments": args.segments, "dim": args.dim, "data": args.data,
                     "k": args.k, "queries": args.queries}
    with open_store(path) as store:
        ids = [str(c) for c in np.random.default_rng(1).choice(store.clip_ids, size=args.queries, replace=False)]
        results["matrix_build_s"], _ = timed(lambda: search_mod.clip_matrix(store, FEATURE))
    search_mod._files._VERIFIED.clear()  # as in a new process: the block check runs once more
    with open_store(path) as store:
        results["matrix_open_s"], held = timed(lambda: search_mod.clip_matrix(store, FEATURE))
        results["matrix_is_memory_mapped"] = isinstance(held.matrix, np.memmap)
        exact, times = {}, []
        for cid in ids:
            t, r = timed(lambda: store.search(FEATURE, cid, k=args.k, method="exact"))
            times.append(t)
            exact[cid] = r.clip_ids
        results["exact"] = ms(times)
        t, _ = timed(lambda: store.search(FEATURE, ids, k=args.k, method="exact"))
        results["exact_batch_per_query_ms"] = 1000 * t / len(ids)
        if not search_mod.faiss_available():
            results["faiss"] = "faiss-cpu is not installed"
        else:
            results["faiss_build_s"], index = timed(lambda: search_mod.faiss_index(store, FEATURE))
            results["faiss_nlist"] = index.nlist
            if index.nlist > 1:
                results["faiss_directly_s"] = faiss_directly(np.array(held.matrix), held.rows, index.nlist)
                results["build_vs_faiss_directly"] = results["faiss_build_s"] / results["faiss_directly_s"]
            results["faiss"] = {}
            results["faiss_nprobe_calibrated"] = index.default_nprobe
            for nprobe in sorted({8, 16, 32, index.default_nprobe, index.nlist // 2, index.nlist} - {0}):
                times, hits = [], 0
                for cid in ids:
                    t, r = timed(lambda: store.search(FEATURE, cid, k=args.k, method="faiss", nprobe=nprobe))
                    times.append(t)
                    hits += len(set(r.clip_ids) & set(exact[cid]))
                results["faiss"][nprobe] = {**ms(times), "recall_at_k": hits / (args.k * len(ids)),
                                            "default": nprobe == index.default_nprobe}
            t, _ = timed(lambda: store.search(FEATURE, ids, k=args.k, method="faiss"))
            results["faiss_batch_per_query_ms"] = 1000 * t / len(ids)
        auto = store.search(FEATURE, ids[0], k=args.k).method
        times = [timed(lambda: store.search(FEATURE, cid, k=args.k))[0] for cid in ids]
        results["auto"] = {"method": auto, **ms(times)}
    results["first_query_new_process"] = {m: first_query(path, ids[-1], m, args.k)
                                          for m in (["exact", "faiss"] if search_mod.faiss_available() else ["exact"])}
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return report(results, args)


def report(results: dict, args: argparse.Namespace) -> int:
    """One line per floor; 1 when one is missed."""
    lines, ok = [], True
    if results["auto"]["method"] == "exact":
        ok &= results["exact"]["median_ms"] < 50
        lines.append(f"auto = exact: warm median {results['exact']['median_ms']:.2f} ms (floor < 50 ms)")
    if isinstance(results["faiss"], dict):
        default = next(v for v in results["faiss"].values() if v["default"])
        ok &= default["recall_at_k"] >= 0.95
        lines.append(f"faiss recall@{args.k} {default['recall_at_k']:.3f} at nprobe {results['faiss_nprobe_calibrated']}"
                     f" (floor >= 0.95), warm median {default['median_ms']:.2f} ms")
        if "build_vs_faiss_directly" in results:
            ok &= results["build_vs_faiss_directly"] <= 2
            lines.append(f"faiss build {results['faiss_build_s']:.1f} s = {results['build_vs_faiss_directly']:.2f}x "
                         f"faiss directly {results['faiss_directly_s']:.1f} s (floor <= 2x)")
    for method, first in results["first_query_new_process"].items():
        ok &= first["first_query_s"] <= 1 and not first["built"]
        lines.append(f"new process, {method}: open {first['open_s'] * 1000:.0f} ms, first query "
                     f"{first['first_query_s'] * 1000:.0f} ms from the sidecar (floor <= 1 s)")
    print("\n".join(lines) + ("" if ok else "\nFLOOR MISSED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
