"""Benchmark ``store.search``: exact numpy search vs a faiss IVF index, on a store the size of the dev set.

Data: 12,291 clips x 12 frames x 512 float16, seeded, built once into ``--workdir``. Values are
``--data clustered`` (default; embeddings with structure like real ones: a class centre, a location
offset and per-frame noise) or ``--data random`` (i.i.d. normal: clip means spread evenly over the
sphere, the hardest case for an inverted-file index, reported for contrast).

Measured in one run (each query is a ``--like`` query of a random stored clip through the public
``store.search``, k = 10, the clip itself left out):
  1. clip matrix: built from the store (reads every chunk once), then loaded from the sidecar file.
  2. exact warm query: median and p95 over ``--queries`` ids, after the first query loaded the matrix.
     Floor: < 50 ms.
  3. faiss: index build time (train + add + the nprobe calibration), warm query median/p95 at the
     calibrated nprobe, and recall@10 against the exact answers (mean over the same ids; the
     calibration used other clips). Floor: recall@10 >= 0.95. Also at other nprobe values, to show
     the speed/recall trade-off.

Run:  .venv/bin/python scripts/bench/bench_search.py [--workdir /tmp/avscene-bench-search] [--data random]
Exit code 1 when a floor is missed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = build(args)
    shutil.rmtree(str(path) + search_mod.SIDECAR_SUFFIX, ignore_errors=True)  # time the builds
    results: dict = {"clips": args.clips, "segments": args.segments, "dim": args.dim, "data": args.data,
                     "k": args.k, "queries": args.queries}
    with open_store(path) as store:
        ids = list(np.random.default_rng(1).choice(store.clip_ids, size=args.queries, replace=False))
        results["matrix_build_s"], _ = timed(lambda: search_mod.clip_matrix(store, FEATURE))
    with open_store(path) as store:
        results["matrix_load_s"], _ = timed(lambda: search_mod.clip_matrix(store, FEATURE))
        exact, times = {}, []
        for cid in ids:
            t, r = timed(lambda: store.search(FEATURE, cid, k=args.k, method="exact"))
            times.append(t)
            exact[cid] = r.clip_ids
        results["exact"] = ms(times)
        if not search_mod.faiss_available():
            results["faiss"] = "faiss-cpu is not installed"
        else:
            results["faiss_build_s"], index = timed(lambda: search_mod.faiss_index(store, FEATURE))
            results["faiss_nlist"] = index.nlist
            results["faiss"] = {}
            results["faiss_nprobe_calibrated"] = index.default_nprobe
            for nprobe in sorted({8, 16, 32, index.default_nprobe, index.nlist // 2, index.nlist}):
                times, hits = [], 0
                for cid in ids:
                    t, r = timed(lambda: store.search(FEATURE, cid, k=args.k, method="faiss", nprobe=nprobe))
                    times.append(t)
                    hits += len(set(r.clip_ids) & set(exact[cid]))
                results["faiss"][nprobe] = {**ms(times), "recall_at_k": hits / (args.k * len(ids)),
                                            "default": nprobe == index.default_nprobe}
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    ok = results["exact"]["median_ms"] < 50
    if isinstance(results["faiss"], dict):
        default = next(v for v in results["faiss"].values() if v["default"])
        ok &= default["recall_at_k"] >= 0.95
    print(f"exact warm median {results['exact']['median_ms']:.2f} ms (floor < 50 ms)"
          + (f"; faiss recall@{args.k} {default['recall_at_k']:.3f} at nprobe {index.default_nprobe} (floor >= 0.95)"
             if isinstance(results["faiss"], dict) else "") + ("" if ok else "  FLOOR MISSED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
