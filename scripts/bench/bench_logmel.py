"""Benchmark: the torch ``logmel`` encoder against librosa on one 10 s, 48 kHz clip (10 segments).

Measures, in one run, each part in a fresh child process whose thread count (torch, BLAS, OpenMP)
is fixed by ``--threads`` (default 1: both libraries get one core, which is also what a worker on a
shared machine should use; with 2 threads on a loaded 2-core box every torch op waits for the
descheduled second thread):
  * warm: median time per clip over ``--repeats`` runs, both libraries loaded and warmed up, timed
    alternately so that load from other processes hits both alike;
  * first clip: a fresh Python process per library (two subprocesses), timing from after the
    library import to the finished first clip. For torch that includes building the encoder (mel
    matrix, window); for librosa it includes its lazy submodule imports and numba compilation
    (numba caches compiled code on disk, so only the very first run after installing librosa pays
    the full ~15 s; later fresh processes pay about a second). Import times are printed too.
It also prints the largest dB difference between the two on the clip, so a fast wrong answer shows.

Usage:
    .venv/bin/python scripts/bench/bench_logmel.py [--repeats 30] [--device cpu|cuda|auto] [--threads 1] [--check]
``--check`` exits with status 1 when warm < 3x or first clip < 10x.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

SR, N_FFT, HOP, N_MELS, SEGMENTS = 48000, 4096, 512, 256, 10
WARM_TARGET, FIRST_TARGET = 3.0, 10.0
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


def make_clip(seed: int = 0) -> np.ndarray:
    """10 s of noise plus tones, as ``float32 [10, 48000]`` one-second segments."""
    rng = np.random.default_rng(seed)
    t = np.arange(SR * SEGMENTS) / SR
    audio = 0.05 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 2500 * t)
    return audio.astype(np.float32).reshape(SEGMENTS, SR)


def librosa_clip(librosa, segments: np.ndarray) -> np.ndarray:
    """The paper's way: one melspectrogram + power_to_db call per segment."""
    return np.stack([
        librosa.power_to_db(librosa.feature.melspectrogram(y=s, sr=SR, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS),
                            ref=1.0)
        for s in segments])


def torch_clip(encoder, segments: np.ndarray) -> np.ndarray:
    """Preprocess + encode the 10 segments in one batch and bring the result back to the host."""
    return encoder.encode(encoder.preprocessor()(segments)).cpu().numpy()


def first_clip_child(library: str, device: str) -> dict:
    """Run in a fresh process: time the import, then the first clip."""
    segments = make_clip()
    t0 = time.perf_counter()
    if library == "torch":
        from featurestore.encoders import create_encoder

        t1 = time.perf_counter()
        out = torch_clip(create_encoder("logmel", device=device), segments)
    else:
        import librosa

        t1 = time.perf_counter()
        out = librosa_clip(librosa, segments)
    t2 = time.perf_counter()
    return {"import_s": t1 - t0, "first_clip_s": t2 - t1, "shape": list(out.shape)}


def warm_child(device: str, repeats: int) -> dict:
    """Both libraries in one process, warmed up, timed alternately so load changes hit both alike."""
    import librosa
    import torch

    from featurestore.encoders import create_encoder

    encoder = create_encoder("logmel", device=device)
    segments = make_clip()
    runs = {"torch": lambda: torch_clip(encoder, segments), "librosa": lambda: librosa_clip(librosa, segments)}
    max_db = float(np.abs(runs["torch"]() - runs["librosa"]()).max())
    for _ in range(3):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {"torch": statistics.median(times["torch"]), "librosa": statistics.median(times["librosa"]),
            "max_db": max_db, "device": str(encoder.device), "torch_threads": torch.get_num_threads()}


def run_child(args: argparse.Namespace, role: str) -> dict:
    """Run one measurement in a fresh interpreter with the thread count fixed before numpy loads."""
    env = dict(os.environ, **{name: str(args.threads) for name in _THREAD_VARS})
    command = [sys.executable, __file__, "--child", role, "--device", args.device, "--repeats", str(args.repeats),
               "--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark child {role!r} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads for torch, BLAS and OpenMP in every measuring process (default 1)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target ratio is missed")
    parser.add_argument("--child", choices=["first-torch", "first-librosa", "warm"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = warm_child(args.device, args.repeats) if args.child == "warm" else \
            first_clip_child(args.child.split("-", 1)[1], args.device)
        print(json.dumps(result))
        return 0

    first = {lib: run_child(args, f"first-{lib}") for lib in ("torch", "librosa")}
    warm = run_child(args, "warm")
    warm_ratio = warm["librosa"] / warm["torch"]
    first_ratio = first["librosa"]["first_clip_s"] / first["torch"]["first_clip_s"]

    print(f"logmel benchmark: one 10 s clip = {SEGMENTS} x 1 s at {SR} Hz, n_fft {N_FFT}, hop {HOP}, "
          f"n_mels {N_MELS}; device {warm['device']}, {warm['torch_threads']} thread(s) per process")
    print(f"{'':28s}{'torch':>12s}{'librosa':>12s}{'ratio':>9s}")
    print(f"{'warm, median per clip':28s}{warm['torch'] * 1e3:10.2f}ms{warm['librosa'] * 1e3:10.2f}ms"
          f"{warm_ratio:8.1f}x   (target >= {WARM_TARGET:g}x, {args.repeats} repeats)")
    print(f"{'first clip, fresh process':28s}{first['torch']['first_clip_s'] * 1e3:10.1f}ms"
          f"{first['librosa']['first_clip_s'] * 1e3:10.1f}ms{first_ratio:8.1f}x   (target >= {FIRST_TARGET:g}x)")
    print(f"{'import (not in the above)':28s}{first['torch']['import_s'] * 1e3:10.1f}ms"
          f"{first['librosa']['import_s'] * 1e3:10.1f}ms")
    print(f"max |torch - librosa| on this clip: {warm['max_db']:.4f} dB")
    ok = warm_ratio >= WARM_TARGET and first_ratio >= FIRST_TARGET
    print(f"summary: warm {warm_ratio:.1f}x, first clip {first_ratio:.1f}x faster than librosa -> "
          f"{'targets met' if ok else 'TARGET MISSED'}")
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
