"""Filling a feature set (``create_feature_set`` + ``write_rows`` of 65,536-row blocks) vs h5py writing
the same matrix, interleaved in one process (issue 23's create + fill, without ``create_store``).

The store is created once (its index is not timed); each round deletes the feature set, syncs, then
times the fill, then h5py's ``create_dataset`` of the same ``[N, 1, 512]`` float16 matrix after a
sync with its earlier file deleted. Each timed write starts right after fresh memory is touched
(``bench_scale.touch_free_memory``: on a VM that hands free memory back to its host, a write's
kernel time otherwise depends on how long the machine idled before it). Prints each round (wall,
user and system CPU of the process) and the medians with their ratio. Kernel write times vary
several-fold from run to run on a shared machine (h5py's as much as ours): compare medians of many
rounds, or run it on ``/dev/shm``. A round during which the VM handed memory back to its host
(``bench_scale.reporting_passes``) is marked and left out of the medians.

    python scripts/bench/bench_fill.py --clips 1000000 --rounds 5 --dir /tmp/bench_fill
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import time

import h5py
import numpy as np

from bench_scale import reporting_passes, touch_free_memory  # (this script's folder is on sys.path when run)
from featurestore import Manifest, create_store

FEATURE, DIM = "clip/bench", 512
PROVENANCE = {"encoder": "bench/random", "config": {}, "weights": {"kind": "random", "seed": 0},
              "segments": {"frames": 1}}


def timed(work, nbytes: int) -> tuple[float, float, float, bool]:
    """(wall, user, system) seconds of ``work()`` (writing about ``nbytes``) after a sync, and whether
    the VM handed memory back to its host from the touch of fresh memory to the end."""
    os.sync()
    passes = reporting_passes()
    touch_free_memory(nbytes)
    before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    work()
    wall, after = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
    return wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime, reporting_passes() != passes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default="/tmp/bench_fill", help="where the store and the h5py file go (deleted after)")
    args = parser.parse_args()
    data = np.random.default_rng(0).standard_normal((args.clips, 1, DIM), dtype=np.float32).astype(np.float16)
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    h5 = os.path.join(args.dir, "matrix.h5")
    store = create_store(os.path.join(args.dir, "store"),
                         Manifest.from_columns("bench", ["a"], [f"c{i:08d}" for i in range(args.clips)]))

    def fill() -> None:
        info = store.create_feature_set(FEATURE, 1, (DIM,), PROVENANCE)
        step = info.chunk_clips * max(1, 65536 // info.chunk_clips)
        for start in range(0, args.clips, step):
            store.write_rows(FEATURE, start, data[start:start + step])

    def write_h5() -> None:
        with h5py.File(h5, "w") as f:
            f.create_dataset("data", data=data)

    ours, theirs = [], []
    try:
        for _ in range(args.rounds):
            if FEATURE in store.feature_sets():
                store.delete_feature_set(FEATURE)
            ours.append(timed(fill, data.nbytes))
            if os.path.exists(h5):
                os.unlink(h5)
            theirs.append(timed(write_h5, data.nbytes))
            (w, u, s, back), (hw, hu, hs, hback) = ours[-1], theirs[-1]
            print(f"fill wall {w:.3f} s (user {u:.3f}, sys {s:.3f}) | h5py wall {hw:.3f} s (user {hu:.3f}, "
                  f"sys {hs:.3f}) | {w / hw:.2f}x" + (" (the VM handed memory back: left out)" if back or hback
                                                      else ""), flush=True)
    finally:
        store.close()
        shutil.rmtree(args.dir, ignore_errors=True)
    quiet = [(a[:3], b[:3]) for a, b in zip(ours, theirs) if not (a[3] or b[3])] or \
        [(a[:3], b[:3]) for a, b in zip(ours, theirs)]  # (every round disturbed: all of them, as printed)
    med = [statistics.median(col) for col in zip(*(a for a, _ in quiet))]
    hmed = [statistics.median(col) for col in zip(*(b for _, b in quiet))]
    print(f"median of {len(quiet)} of {args.rounds}: fill wall {med[0]:.3f} s (user {med[1]:.3f}, sys {med[2]:.3f}) | "
          f"h5py wall {hmed[0]:.3f} s (sys {hmed[2]:.3f}) | {med[0] / hmed[0]:.2f}x h5py")


if __name__ == "__main__":
    main()
