"""Benchmark `heads sweep`: 16 linear trials in one sweep vs the same 16 as separate runs vs one trial.

    python scripts/bench/bench_sweep.py                   # 4,000 clips x 10 segments x 512-d, 2 epochs
    python scripts/bench/bench_sweep.py --clips 12291     # the benchmark store's size

The store (one CLIP-sized feature set, float16 random values with a class signal, TAU-like splits by
groups of 10 clips) is made once into ``--cache-dir`` and reused. Each case runs in its own process, so
its peak RSS is its own, and times only its training (not the interpreter and torch imports):

- ``one``: one trial, ``heads.train`` (what ``heads train`` does);
- ``separate``: the 16 trials (lr 4 values x 4 seeds) as 16 ``heads.train`` calls, each reading the store;
- ``sweep``: the same 16 trials as one ``heads.sweep`` (one shared read of the store, trained stacked);
- ``unshared``: that sweep with ``share_reads=False`` (each trial reads the store every epoch, one after another).

Each case first trains one untimed 1-epoch warm-up run (torch's lazy initialisation, the page cache).

Prints a Markdown table with the ratios to one trial, and the machine's load average.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
FEATURE = "clip/ViT-B-32"
CLASSES = [f"class{i}" for i in range(10)]
LRS = [0.1, 0.03, 0.01, 0.003]
SEEDS = [0, 1, 2, 3]
CASES = ("one", "sweep", "unshared", "separate")


def build_store(path: Path, n_clips: int, segments: int, dim: int) -> Path:
    """The synthetic store (made once; an existing complete one is reused)."""
    from featurestore.manifest import ClipRecord, Manifest
    from featurestore.store import create_store

    if (path / "zarr.json").exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(CLASSES), n_clips)
    train_group = rng.random(n_clips // 10 + 1) < 0.7
    clips = [ClipRecord(f"c{i}", label=CLASSES[labels[i]],
                        splits=frozenset({"fold1_train" if train_group[i // 10] else "fold1_evaluate"}))
             for i in range(n_clips)]
    store = create_store(path, Manifest("bench", CLASSES, clips, audio_segments=segments, video_frames=segments))
    info = store.create_feature_set(FEATURE, segments, (dim,), {"encoder": FEATURE, "weights": {"kind": "random", "seed": 0}})
    means = rng.normal(size=(len(CLASSES), dim)).astype(np.float32)
    step = info.chunk_clips * max(1, 2048 // info.chunk_clips)
    for start in range(0, n_clips, step):
        n = min(step, n_clips - start)
        x = means[labels[start:start + n]][:, None, :] * 0.3 + rng.standard_normal((n, segments, dim), dtype=np.float32)
        store.write_rows(FEATURE, start, x.astype(np.float16))
    store.close()
    return path


def _config(store: Path, out: Path, epochs: int, lr: float = LRS[0], seed: int = SEEDS[0]):
    from heads.config import TrainConfig

    return TrainConfig(head="linear", features=[FEATURE], store=str(store), out=str(out), epochs=epochs, lr=lr,
                       seed=seed, progress=False, device="cpu")


def run_case(case: str, store: Path, work: Path, epochs: int) -> dict:
    """One case in this process: seconds of training and peak RSS."""
    import torch

    import heads

    torch.set_num_threads(1)
    shutil.rmtree(work, ignore_errors=True)
    heads.train(_config(store, work / "warm-up", 1))  # untimed: first-call costs (lazy torch init, page cache)
    started = time.perf_counter()
    if case == "one":
        heads.train(_config(store, work / "one", epochs))
    elif case == "separate":
        for lr in LRS:
            for seed in SEEDS:
                heads.train(_config(store, work / f"lr={lr}" / f"seed_{seed}", epochs, lr, seed))
    else:
        heads.sweep(_config(store, work, epochs), {"lr": LRS}, seeds=SEEDS, out=work / "sweep",
                    share_reads=case == "sweep")
    seconds = time.perf_counter() - started
    return {"case": case, "seconds": round(seconds, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=4000)
    parser.add_argument("--segments", type=int, default=10)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/avscene-bench-sweep"))
    parser.add_argument("--case", choices=["one", "separate", "sweep", "unshared"], help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    store = args.cache_dir / f"store-{args.clips}x{args.segments}x{args.dim}.zarr"
    if args.case:
        print(json.dumps(run_case(args.case, store, args.cache_dir / f"work-{args.case}", args.epochs)))
        return 0
    build_store(store, args.clips, args.segments, args.dim)
    load_before = os.getloadavg()
    results = {}
    for case in CASES:
        cmd = [sys.executable, __file__, "--case", case, "--clips", str(args.clips), "--segments", str(args.segments),
               "--dim", str(args.dim), "--epochs", str(args.epochs), "--cache-dir", str(args.cache_dir)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        results[case] = json.loads(done.stdout.strip().splitlines()[-1])
    one = results["one"]
    print(f"linear, {args.clips} clips x {args.segments} segments x {args.dim}-d float16, {args.epochs} epoch(s), "
          f"16 trials = lr {LRS} x seeds {SEEDS}; load average {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    print("| case | seconds | x one trial | peak RSS MB | x one trial |")
    print("|---|---|---|---|---|")
    labels = {"one": "one trial (heads.train)", "sweep": "16 trials, one sweep (shared read, stacked)",
              "unshared": "16 trials, one sweep (--no-shared-reads)", "separate": "16 trials, 16 separate runs"}
    for case in CASES:
        r = results[case]
        print(f"| {labels[case]} | {r['seconds']:.2f} | {r['seconds'] / one['seconds']:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['peak_rss_mb'] / one['peak_rss_mb']:.2f} |")
    print(f"separate / sweep: {results['separate']['seconds'] / results['sweep']['seconds']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                                         "loadavg": load_before}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
