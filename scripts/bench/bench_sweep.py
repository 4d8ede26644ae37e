"""Benchmark `heads sweep`: 16 trials of a small head in one sweep vs 16 separate runs vs one trial vs the compute floor.

    python scripts/bench/bench_sweep.py                          # linear on 12,291 clips; the MLP heads on 2,000
    python scripts/bench/bench_sweep.py --heads linear --clips 4000

The stores (one CLIP-sized feature set, float16 random values with a class signal, TAU-like splits by
groups of 10 clips) are made once into ``--cache-dir`` and reused. Each case runs in its own process, so
its peak RSS is its own, and times only its training (not the interpreter and torch imports):

- ``one``: one trial, ``heads.train`` (what ``heads train`` does);
- ``sweep``: the 16 trials (lr 4 values x 4 seeds) as one ``heads.sweep`` (one shared read, stacked);
- ``floor``: the compute floor of that sweep: the same 16 stacked forward/backward/SGD steps of
  `heads._stacked` on random tensors already in memory (no store, no validation, no checkpoints);
- ``unshared`` (linear): the sweep with ``share_reads=False`` (each trial reads the store every epoch);
- ``separate``: the 16 trials as 16 ``heads.train`` calls, each reading the store.

Each case first trains one untimed 1-epoch warm-up run (torch's lazy initialisation, the page cache).
The short cases (one trial, sweep, floor) run ``--repeat`` times, interleaved, and the fastest counts:
on a shared machine a burst of load otherwise decides a ratio.
Beside each case's wall seconds the table gives its process CPU seconds (every thread's, of the fastest
run): under load the wall time stretches by whatever the other processes take, the CPU time much less.
The MLP heads are compute-bound, so they run on a smaller store (``--mlp-clips``) to keep the benchmark
minutes long; their floors are ratios to the compute floor, which scales with the store the same way.

Heads that cannot be stacked (``--heads spectrogram_cnn``) train their trials in joblib worker processes,
each opening the store itself. Their cases, on a store of one ``logmel`` set (``--cnn-clips`` clips of
``[64, 48]`` float16, a ``test_resnet`` backbone), ``--cnn-trials`` trials (lr x seeds):

- ``one``: one trial, ``heads.train``, one torch thread;
- ``sequential``: the N trials as one ``heads.sweep(jobs=1)``: one after another in this process, one thread;
- ``jobs``: the N trials as one ``heads.sweep(jobs=2)``: two worker processes, one thread each;

with the parent's peak RSS and how many feature rows the parent read (0: the workers read the store
themselves, nothing is copied to them). One thread everywhere: on a shared 2-core machine two OpenMP
threads per process were 6x slower than one (they spin while the other sessions hold the cores).

Prints a Markdown table per head with the ratios, and the machine's load average.
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
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
FEATURE = "clip/ViT-B-32"
CLASSES = [f"class{i}" for i in range(10)]
LRS = [0.1, 0.03, 0.01, 0.003]
#: late_fusion diverges at lr 0.1 on this store (its two unnormalised linear layers after the branches)
HEAD_LRS = {"late_fusion": [0.01, 0.003, 0.001, 0.0003]}
SEEDS = [0, 1, 2, 3]
CASES = ("one", "sweep", "floor", "unshared", "separate")
HEADS = ("linear", "embedding_mlp", "late_fusion")
CNN = "spectrogram_cnn"
CNN_CASES = ("one", "sequential", "jobs")
CNN_SHAPE = (64, 48)  # stored log-mel [n_mels, frames]
CNN_HEAD = {"backbone": "test_resnet", "input_shape": list(CNN_SHAPE), "resize_to": list(CNN_SHAPE), "freq_mask_width": 8}
CNN_LRS = [0.01, 0.003]


def build_store(path: Path, n_clips: int, segments: int, dim: int) -> Path:
    """The synthetic store (made once; an existing complete one is reused)."""
    from featurestore import ClipRecord, Manifest
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


def build_cnn_store(path: Path, n_clips: int, segments: int) -> Path:
    """A store of one ``logmel`` set with a class pattern (made once; an existing complete one is reused)."""
    from featurestore import ClipRecord, Manifest
    from featurestore.store import create_store

    if (path / "zarr.json").exists():
        return path
    shutil.rmtree(path, ignore_errors=True)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(CLASSES), n_clips)
    clips = [ClipRecord(f"c{i}", label=CLASSES[labels[i]],
                        splits=frozenset({"fold1_train" if (i // 10) % 10 < 7 else "fold1_evaluate"}))
             for i in range(n_clips)]
    store = create_store(path, Manifest("bench-cnn", CLASSES, clips, audio_segments=segments, video_frames=segments))
    info = store.create_feature_set("logmel", segments, CNN_SHAPE, {"encoder": "logmel", "config": {"modality": "audio"},
                                                                    "weights": {"kind": "parameter-free"}})
    patterns = rng.normal(size=(len(CLASSES), *CNN_SHAPE)).astype(np.float32)
    step = info.chunk_clips * max(1, 256 // info.chunk_clips)  # whole chunks per write
    for start in range(0, n_clips, step):
        n = min(step, n_clips - start)
        x = patterns[labels[start:start + n]][:, None] * 3 + rng.standard_normal((n, segments, *CNN_SHAPE), dtype=np.float32)
        store.write_rows("logmel", start, (x * 10 - 40).astype(np.float16))
    store.close()
    return path


def _cnn_config(store: Path, out: Path, epochs: int, lr: float = CNN_LRS[0], seed: int = SEEDS[0]):
    from heads.config import TrainConfig

    return TrainConfig(head=CNN, features=["logmel"], store=str(store), out=str(out), epochs=epochs, lr=lr, seed=seed,
                       head_config=CNN_HEAD, progress=False, device="cpu")


def _cnn_seeds(trials: int) -> list[int]:
    """The seeds of ``trials`` CNN trials, ``trials / len(CNN_LRS)`` of `SEEDS` (at least one, at most all)."""
    return SEEDS[:max(1, trials // len(CNN_LRS))]


def run_cnn_case(case: str, store: Path, work: Path, epochs: int, trials: int) -> dict:
    """One CNN case in this process: seconds, peak RSS, and the feature rows this process read from the store
    (0 when the workers read it themselves)."""
    import torch

    import heads
    from featurestore.store.store import FeatureStore

    shutil.rmtree(work, ignore_errors=True)
    torch.set_num_threads(1)
    heads.train(_cnn_config(store, work / "warm-up", 1))  # untimed, as for the small heads
    rows, original = [0], FeatureStore.read_rows

    def counted(self, name, start, stop, **kwargs):  # noqa: ANN001, ANN202 - a counting wrapper
        rows[0] += stop - start
        return original(self, name, start, stop, **kwargs)

    FeatureStore.read_rows = counted
    started = time.perf_counter()
    if case == "one":
        heads.train(_cnn_config(store, work / "one", epochs))
    else:
        heads.sweep(_cnn_config(store, work, epochs), {"lr": CNN_LRS}, seeds=_cnn_seeds(trials), out=work / "sweep",
                    jobs=1 if case == "sequential" else 2)
    seconds = time.perf_counter() - started
    FeatureStore.read_rows = original
    return {"case": case, "seconds": round(seconds, 3), "peak_rss_mb": round(_peak_rss_kb() / 1024, 1),
            "parent_rows_read": rows[0]}


def _lrs(head: str) -> list[float]:
    return HEAD_LRS.get(head, LRS)


def _config(store: Path, out: Path, epochs: int, head: str, lr: float | None = None, seed: int = SEEDS[0]):
    from heads.config import TrainConfig

    lr = _lrs(head)[0] if lr is None else lr
    return TrainConfig(head=head, features=[FEATURE], store=str(store), out=str(out), epochs=epochs, lr=lr,
                       seed=seed, progress=False, device="cpu")


def compute_floor(store: Path, head: str, epochs: int) -> Callable[[], None]:
    """The sweep's 16 stacked training steps per epoch on in-memory random tensors of the training split's shape,
    as a function to time (the tensors and the 16 heads are made here, untimed)."""
    from featurestore.store import open_store
    from featurestore.torchdata import StoreDataset, TensorBatches
    import torch

    from heads._registry import create_head
    from heads._stacked import _Group, _Trial, trainer_internals

    with open_store(store, mode="r") as opened:
        n = StoreDataset(opened, [FEATURE], split="fold1_train", level="segment").n_samples
        dim = opened.feature_info(FEATURE).feature_shape[0]
    x, labels = torch.randn(n, dim), torch.randint(0, len(CLASSES), (n,))
    loaders = {seed: TensorBatches([x], labels, 48, shuffle=True, seed=seed, drop_last=True) for seed in SEEDS}
    trials = []
    for seed in SEEDS:
        for lr in _lrs(head):
            torch.manual_seed(seed)
            cfg = _config(store, Path("/nonexistent"), epochs, head, lr, seed)
            trials.append(_Trial(cfg, create_head(head, input_dims=[dim], n_classes=len(CLASSES)), loaders[seed], {}))
    group = _Group(trials, None, torch.device("cpu"), trainer_internals())

    def steps() -> None:
        try:
            for epoch in range(1, epochs + 1):
                group._epoch(epoch)
        finally:
            group.writer.shutdown()

    return steps


def run_case(case: str, head: str, store: Path, work: Path, epochs: int) -> dict:
    """One case in this process: seconds of training and peak RSS."""
    import torch

    import heads
    import heads._stacked  # noqa: F401 - imported untimed, as the other cases' modules are by the warm-up

    torch.set_num_threads(1)
    shutil.rmtree(work, ignore_errors=True)
    heads.train(_config(store, work / "warm-up", 1, head))  # untimed: first-call costs (lazy torch init, page cache)
    floor = compute_floor(store, head, epochs) if case == "floor" else None
    started, cpu = time.perf_counter(), time.process_time()
    if case == "one":
        heads.train(_config(store, work / "one", epochs, head))
    elif case == "separate":
        for lr in _lrs(head):
            for seed in SEEDS:
                heads.train(_config(store, work / f"lr={lr}" / f"seed_{seed}", epochs, head, lr, seed))
    elif floor is not None:
        floor()
    else:
        heads.sweep(_config(store, work, epochs, head), {"lr": _lrs(head)}, seeds=SEEDS, out=work / "sweep",
                    share_reads=case == "sweep")
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"case": case, "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
            "peak_rss_mb": round(_peak_rss_kb() / 1024, 1)}


def _peak_rss_kb() -> int:
    """This process's own peak RSS (VmHWM; ru_maxrss would start from the forking parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", default=",".join(HEADS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--clips", type=int, default=12291, help="clips of linear's store (default: %(default)s)")
    parser.add_argument("--mlp-clips", type=int, default=2000, help="clips of the MLP heads' store (default: %(default)s)")
    parser.add_argument("--segments", type=int, default=10)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="rounds of the short cases; each case's fastest "
                        "run counts (default: %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/avscene-bench-sweep"))
    parser.add_argument("--cnn-clips", type=int, default=300, help=f"clips of {CNN}'s store (default: %(default)s)")
    parser.add_argument("--cnn-trials", type=int, default=4, help=f"{CNN} trials: lr {CNN_LRS} x the first "
                        "N/2 seeds (default: %(default)s)")
    parser.add_argument("--case", choices=sorted({*CASES, *CNN_CASES}), help=argparse.SUPPRESS)
    parser.add_argument("--head", choices=(*HEADS, CNN), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.case:
        store, work = _store_path(args, args.head), args.cache_dir / f"work-{args.case}"
        print(json.dumps(run_cnn_case(args.case, store, work, args.epochs, args.cnn_trials) if args.head == CNN
                         else run_case(args.case, args.head, store, work, args.epochs)))
        return 0
    load_before, results = os.getloadavg(), {}
    for head in [h.strip() for h in args.heads.split(",")]:
        if head == CNN:
            build_cnn_store(_store_path(args, head), args.cnn_clips, args.segments)
            results[head] = _rounds(args, head, CNN_CASES, CNN_CASES)
            _print_cnn(args, results[head])
            continue
        store = build_store(_store_path(args, head), _clips(args, head), args.segments, args.dim)
        results[head] = _rounds(args, head)
        _print_head(args, head, results[head])
    print(f"load average {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                                         "loadavg": load_before}, indent=2))
    return 0


def _rounds(args: argparse.Namespace, head: str, cases: tuple[str, ...] = CASES,
            repeated: tuple[str, ...] = ("one", "sweep", "floor")) -> dict[str, dict]:
    """Every case once, then ``--repeat - 1`` more rounds of the short ones (``repeated``), interleaved so that a
    burst of load on the shared machine hits all of them; each case's fastest run (and highest peak RSS)."""
    cases = tuple(c for c in cases if c != "unshared" or head == "linear")
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    for round_ in range(args.repeat):
        for case in cases:
            if round_ == 0 or case in repeated:
                runs[case].append(_run(args, head, case))
    return {c: {**min(r, key=lambda x: x["seconds"]), **{k: max(x[k] for x in r) for k in r[0] if k.endswith("_mb")},
                "runs": len(r)} for c, r in runs.items()}


def _clips(args: argparse.Namespace, head: str) -> int:
    return args.clips if head == "linear" else args.mlp_clips


def _store_path(args: argparse.Namespace, head: str) -> Path:
    if head == CNN:
        return args.cache_dir / f"store-logmel-{args.cnn_clips}x{args.segments}x{CNN_SHAPE[0]}x{CNN_SHAPE[1]}.zarr"
    return args.cache_dir / f"store-{_clips(args, head)}x{args.segments}x{args.dim}.zarr"


def _run(args: argparse.Namespace, head: str, case: str) -> dict:
    cmd = [sys.executable, __file__, "--case", case, "--head", head, "--clips", str(args.clips), "--mlp-clips",
           str(args.mlp_clips), "--segments", str(args.segments), "--dim", str(args.dim), "--epochs", str(args.epochs),
           "--cnn-clips", str(args.cnn_clips), "--cnn-trials", str(args.cnn_trials), "--cache-dir", str(args.cache_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench_sweep: case {case} of {head} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _print_head(args: argparse.Namespace, head: str, results: dict) -> None:
    one, floor, sweep = results["one"], results["floor"], results["sweep"]
    print(f"\n{head}, {_clips(args, head)} clips x {args.segments} segments x {args.dim}-d float16, {args.epochs} "
          f"epoch(s), 16 trials = lr {_lrs(head)} x seeds {SEEDS}; load average now {os.getloadavg()[0]:.2f}")
    print("| case | seconds | x one trial | x compute floor | CPU seconds | x one trial | peak RSS MB | x one trial |")
    print("|---|---|---|---|---|---|---|---|")
    labels = {"one": "one trial (heads.train)", "sweep": "16 trials, one sweep (shared read, stacked)",
              "floor": "compute floor: the 16 stacked steps on in-memory tensors",
              "unshared": "16 trials, one sweep (--no-shared-reads)", "separate": "16 trials, 16 separate runs"}
    for case, r in results.items():
        print(f"| {labels[case]} | {r['seconds']:.2f} | {r['seconds'] / one['seconds']:.2f} | "
              f"{r['seconds'] / floor['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['cpu_seconds'] / one['cpu_seconds']:.2f} | "
              f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / one['peak_rss_mb']:.2f} |")
    print(f"sweep / one trial {sweep['seconds'] / one['seconds']:.2f}x; sweep / compute floor "
          f"{sweep['seconds'] / floor['seconds']:.2f}x; separate / sweep {results['separate']['seconds'] / sweep['seconds']:.2f}x; "
          f"sweep peak RSS / one trial {sweep['peak_rss_mb'] / one['peak_rss_mb']:.2f}x")


def _print_cnn(args: argparse.Namespace, results: dict) -> None:
    one, seq, jobs = results["one"], results["sequential"], results["jobs"]
    n = len(CNN_LRS) * len(_cnn_seeds(args.cnn_trials))
    print(f"\n{CNN} (test_resnet), {args.cnn_clips} clips x {args.segments} segments x {list(CNN_SHAPE)} float16, "
          f"{args.epochs} epoch(s), {n} trials = lr {CNN_LRS} x seeds; {os.cpu_count()} cores; "
          f"load average now {os.getloadavg()[0]:.2f}")
    print("| case | seconds | x one trial | peak RSS MB (this process) | feature rows this process read |")
    print("|---|---|---|---|---|")
    labels = {"one": "one trial (heads.train)", "sequential": f"{n} trials, one sweep, --jobs 1",
              "jobs": f"{n} trials, one sweep, --jobs 2 (worker processes)"}
    for case, r in results.items():
        print(f"| {labels[case]} | {r['seconds']:.2f} | {r['seconds'] / one['seconds']:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['parent_rows_read']} |")
    print(f"sequential / jobs 2: {seq['seconds'] / jobs['seconds']:.2f}x; jobs 2 / (N x one trial): "
          f"{jobs['seconds'] / (n * one['seconds']):.2f}")


if __name__ == "__main__":
    sys.exit(main())
