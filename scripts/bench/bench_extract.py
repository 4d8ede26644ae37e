"""Benchmark of featurestore.extract: time per stage vs wall time, and peak memory vs dataset size.

What it measures, on a synthetic TAU-layout dataset of 4N clips (real WAV + MP4, 10 s each):

* **Overlap.** Per-stage busy time (decode, preprocess, each encoder, write) summed, against the
  pipeline's wall time, for the same N clips with decode workers and with decoding in the encoding
  thread (``--num-workers 0``): the ratio stages/wall > 1 and the speed-up over the serial run
  are the overlap.
* **Memory.** Peak resident memory of an extraction of N clips and of 4N clips, each in a fresh
  subprocess: the sum over the process tree (main process + decode workers), sampled every 20 ms,
  and the main process's own peak (``ru_maxrss``). Extraction holds a bounded number of blocks,
  so 4N should cost at most 1.2x the memory of N.

Every run is a fresh ``python`` process, so model loading and imports are in the wall time but
counted separately (``startup``). Ratios from one run of this script are what to compare.

* **Feed** (``--feed``): frames per second one core hands a no-op encoder, from 720p MP4s and from
  a stored ``frames/224`` set, projected to 16 cores (see ``feed``).

Usage:
    python scripts/bench/bench_extract.py --clips 10 --encoders logmel,timm/test_vit@none --workers 1
    python scripts/bench/bench_extract.py --feed --clips 20 --batch-size 8
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MEMORY_LIMIT_RATIO = 1.2


# ------------------------------------------------------------------------------------- child
def _tree_rss() -> int:
    """Resident bytes of this process and all its descendants."""
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            continue
    return total


class _PeakSampler(threading.Thread):
    """Samples the process tree's RSS until stopped; keeps the maximum."""

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True)
        self.interval, self.peak, self._stop_event = interval, 0, threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _tree_rss())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, _tree_rss())


class _GpuSampler(threading.Thread):
    """Samples the GPU's utilisation with ``nvidia-smi`` while an extraction runs on CUDA.

    nvidia-smi rather than ``torch.cuda.utilization`` (which needs pynvml) because it is there on
    every machine with an NVIDIA driver; on a machine without one this records nothing.
    """

    def __init__(self, interval: float = 0.25):
        super().__init__(daemon=True)
        self.interval, self.samples = interval, []
        self._stop_event = threading.Event()

    def run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"]
        while not self._stop_event.is_set():
            try:
                out = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout.strip()
                self.samples.append(float(out.splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return
            time.sleep(self.interval)

    def stop(self) -> dict | None:
        self._stop_event.set()
        self.join()
        if not self.samples:
            return None
        return {"mean": sum(self.samples) / len(self.samples), "max": max(self.samples), "n": len(self.samples)}


def child(args: argparse.Namespace) -> None:
    """One extraction in this (fresh) process; prints a JSON line with the summary and memory."""
    t0 = time.perf_counter()
    sampler = _PeakSampler()
    sampler.start()
    from featurestore.extract import extract

    import torch

    imported = time.perf_counter() - t0
    gpu = _GpuSampler() if torch.cuda.is_available() and args.device in ("auto", "cuda") else None
    if gpu:
        gpu.start()
    summary = extract(args.dataset, args.store, args.encoders, device=args.device, batch_size=args.batch_size,
                      num_workers=args.workers, limit=args.limit, frames=args.frames, progress=False)
    gpu_util = gpu.stop() if gpu else None
    peak_tree = sampler.stop()
    self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    workers_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"summary": summary.to_dict(), "stages_total": summary.stages_total(),
                      "import_seconds": imported, "peak_tree_bytes": peak_tree, "peak_main_bytes": self_peak,
                      "peak_worker_bytes": workers_peak, "gpu_utilisation": gpu_util}))


# ------------------------------------------------------------------------------------ parent
def run_child(dataset: Path, store: Path, args: argparse.Namespace, limit: int | None, workers: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--dataset", str(dataset), "--store", str(store),
           "--encoders", args.encoders, "--device", args.device, "--batch-size", str(args.batch_size),
           "--workers", str(workers), "--frames", str(args.frames)]
    if limit:
        cmd += ["--limit", str(limit)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - started
    return result


def describe(label: str, r: dict) -> str:
    s = r["summary"]
    stages = ", ".join(f"{k} {v:.2f}" for k, v in s["stage_seconds"].items())
    wall = s["pipeline_seconds"]
    return (f"{label:<22} clips {s['clips_done']:>4}  pipeline {wall:7.2f} s (run {s['wall_seconds']:.1f} s, "
            f"process {r['process_seconds']:.1f} s)  stages {r['stages_total']:7.2f} s  "
            f"stages/pipeline {r['stages_total'] / wall:4.2f}  {s['clips_done'] / wall:6.2f} clips/s  "
            f"peak RSS {r['peak_tree_bytes'] / 2**20:7.1f} MiB (main {r['peak_main_bytes'] / 2**20:.1f})  "
            f"{_gpu_text(r.get('gpu_utilisation'))}\n"
            f"{'':<22} [{stages}]")


def _gpu_text(util: dict | None) -> str:
    if not util:
        return "GPU utilisation: not measured (no CUDA device)"
    return f"GPU utilisation mean {util['mean']:.0f}% max {util['max']:.0f}% ({util['n']} samples)"


def parent(args: argparse.Namespace) -> None:
    from featurestore.demo import make_demo_dataset

    n = args.clips
    with tempfile.TemporaryDirectory(prefix="bench_extract_", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        dataset = make_demo_dataset(tmp / "data", clips_per_class=math.ceil(4 * n / 10), duration=10.0,
                                    progress=False)
        print(f"dataset: {math.ceil(4 * n / 10) * 10} clips of 10 s written in {time.perf_counter() - t0:.1f} s")
        print(f"encoders {args.encoders}; batch {args.batch_size} clips; {args.frames} frames/clip; "
              f"device {args.device}; {os.cpu_count()} CPUs")
        small = run_child(dataset, tmp / "n.zarr", args, n, args.workers)
        large = run_child(dataset, tmp / "4n.zarr", args, 4 * n, args.workers)
        serial = run_child(dataset, tmp / "serial.zarr", args, n, 0)
    print(describe(f"N={n}, {args.workers} workers", small))
    print(describe(f"4N={4 * n}, {args.workers} workers", large))
    print(describe(f"N={n}, serial decode", serial))
    speedup = serial["summary"]["pipeline_seconds"] / small["summary"]["pipeline_seconds"]
    mem_ratio = large["peak_tree_bytes"] / small["peak_tree_bytes"]
    main_ratio = large["peak_main_bytes"] / small["peak_main_bytes"]
    ratio = {k: r["stages_total"] / r["summary"]["pipeline_seconds"] for k, r in (("n", small), ("s", serial))}
    print(f"overlap: busy stages / pipeline time = {ratio['n']:.2f} with {args.workers} decode worker(s) vs "
          f"{ratio['s']:.2f} with serial decode; pipeline speed-up over serial decode {speedup:.2f}x")
    verdict = "OK" if mem_ratio <= MEMORY_LIMIT_RATIO else "OVER THE LIMIT"
    print(f"memory: peak RSS 4N/N = {mem_ratio:.3f} (process tree: {large['peak_tree_bytes'] / 2**20:.1f} / "
          f"{small['peak_tree_bytes'] / 2**20:.1f} MiB), main process {main_ratio:.3f}; limit "
          f"{MEMORY_LIMIT_RATIO} -> {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps({"n": small, "4n": large, "serial": serial, "speedup": speedup,
                                               "memory_ratio": mem_ratio}, indent=2))


# ------------------------------------------------------------------------------------- feed
def feed(args: argparse.Namespace) -> None:
    """Frames per second one core feeds a no-op encoder (issue 21's CPU floor), from MP4s and from a
    stored ``frames/224`` set, and that rate projected to 16 cores (15 feeding, one encoding).

    From MP4s: what a decode worker does per decode batch (seek-decode ``--frames`` frames per clip,
    hand the uint8 frames over into a reused shared buffer), timed as process CPU time in one thread.
    From the store: reading the frames set's rows (zstd chunks) for the same clips, what an image
    encoder would read instead of decoding (issue 21 item 2: not wired into extraction yet).
    """
    import torch

    from featurestore.demo import make_demo_dataset
    from featurestore.encoders.clip import clip_frame_preprocessor
    from featurestore.extract import extract
    from featurestore.extract.buffer_pool import BufferPool
    from featurestore.extract.plan import Source
    from featurestore.extract.workers import ClipDecoder, make_job
    from featurestore.datasets import open_dataset
    from featurestore.store import open_store

    torch.set_num_threads(1)
    print(f"/proc/loadavg before: {Path('/proc/loadavg').read_text().strip()}")
    with tempfile.TemporaryDirectory(prefix="bench_feed_", dir=args.tmp) as tmp:
        root = make_demo_dataset(Path(tmp) / "data", clips_per_class=math.ceil(args.clips / 10), duration=10.0,
                                 width=1280, height=720, fps=10, progress=False)
        manifest = open_dataset(root)
        videos = [str(Path(manifest.root) / c.video) for c in manifest.clips]
        pre = clip_frame_preprocessor({"size": 224, "mean": (0.5,) * 3, "std": (0.5,) * 3,
                                       "interpolation": "bicubic", "resize_mode": "shortest"})
        job = make_job(0, "clip", "frames@k", pre, args.frames, on_device=True)  # uint8 frames, as on a GPU
        decoder = ClipDecoder({"frames@k": Source("frames", args.frames)}, [job],
                              {r: (0,) for r in range(len(videos))}, [""] * len(videos), videos)
        pool, batch = BufferPool(1, 2), args.batch_size
        t0 = time.process_time()
        for lo in range(0, len(videos), batch):
            results = [decoder[r] for r in range(lo, min(lo + batch, len(videos)))]
            x, slot = pool.stack([r.inputs[0] for r in results], 0)
            pool.release(slot)
        mp4_rate = len(videos) * args.frames / (time.process_time() - t0)
        store = Path(tmp) / "s.zarr"
        extract(root, store, "frames/224", device="cpu", num_workers=1, frames=args.frames, progress=False)
        with open_store(store, "r") as fs:
            t0 = time.process_time()
            n = 0
            for lo in range(0, fs.n_clips, batch):
                n += fs.read_rows("frames/224", lo, min(lo + batch, fs.n_clips)).shape[0] * args.frames
            store_rate = n / (time.process_time() - t0)
    for label, rate in (("MP4s (1280x720, seek-decode + hand-over)", mp4_rate),
                        ("stored frames/224 set (read + zstd)", store_rate)):
        print(f"fed from {label}: {rate:,.0f} frames/s per core -> {rate * 15:,.0f} frames/s on 16 cores "
              f"(15 feeding)")
    print(f"stored set vs MP4s: {store_rate / mp4_rate:.1f}x per core; /proc/loadavg after: "
          f"{Path('/proc/loadavg').read_text().strip()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--feed", action="store_true", help="measure frames/s fed per core to a no-op encoder instead")
    p.add_argument("--clips", type=int, default=10, help="N (the large run has 4N clips)")
    p.add_argument("--encoders", default="logmel,timm/test_vit@none")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)))
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--tmp", default=None, help="where the dataset and stores go (default: the system temp)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dataset", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.feed:
        feed(args)
    elif args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
