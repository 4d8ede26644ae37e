#!/usr/bin/env python
"""Benchmark: sampling 12 frames by seeking vs decoding every frame of a 10 s 720p30 H.264 clip.

The script writes the clip itself (1280x720, 30 fps, 10 s, libx264 CRF 20, a GOP of ``--gop``
frames, B-frames on; drifting colour waves plus sensor-like noise so that P/B-frames carry real
residuals), then times, in one run and alternating the methods:

* ``seek``: :func:`featurestore.decode.sample_frames` (seek to the keyframe before each time,
  decode forward to it, skip non-reference frames that no target needs);
* ``decode_all``: the same function with ``method="decode_all"`` (decode every frame, convert only
  the 12 wanted ones to RGB) - the strict baseline;
* ``decode_all+rgb``: decode every frame and convert every frame to RGB, what a reader that loads
  the whole clip as an array does (for reference).

Both sampling methods must return identical frames; the script checks that before timing.

Usage:
    python scripts/bench/bench_frames.py                  # GOP 15 (0.5 s)
    python scripts/bench/bench_frames.py --gops 15 30 250 # one line per GOP length
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from featurestore.decode import _sample_frames, sample_frames


def write_clip(path: Path, gop: int, width: int = 1280, height: int = 720, fps: int = 30,
               seconds: float = 10.0, seed: int = 0) -> Path:
    """A camera-like test clip: a few drifting sinusoid waves per channel plus noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    waves = [(rng.uniform(0.005, 0.08), rng.uniform(0.005, 0.08), rng.uniform(-2, 2), rng.uniform(15, 40),
              int(rng.integers(3))) for _ in range(9)]
    noise = [rng.normal(0, 4, (height, width, 3)).astype(np.float32) for _ in range(7)]
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "20"})
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.codec_context.gop_size = gop
    # Frame-threaded x264, as the ffmpeg command line runs it: one slice per frame. PyAV's default
    # (slice threads) would cut each frame into one slice per CPU core, which makes the decoder's
    # slice threading, and so the timings, depend on the machine that wrote the clip.
    stream.codec_context.thread_type = "FRAME"
    for i in range(int(seconds * fps)):
        t = i / fps
        img = np.full((height, width, 3), 110.0, np.float32)
        for fx, fy, speed, amp, channel in waves:  # sin(a + b) as outer products: cheap at 720p
            a, b = fx * x + speed * t, fy * y + 0.7 * speed * t
            img[..., channel] += amp * (np.sin(b) * np.cos(a) + np.cos(b) * np.sin(a))
        img += noise[i % len(noise)]
        frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def decode_all_rgb(path: Path) -> int:
    """Decode every frame and convert each to an RGB array (the whole-clip reader)."""
    with av.open(str(path)) as container:
        return sum(f.to_ndarray(format="rgb24").shape[0] > 0 for f in container.decode(video=0))


def bench(path: Path, n_frames: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per method over ``repeats`` alternating runs, after a warm-up.

    CPU time of this process is reported beside wall time because on a shared machine other
    processes inflate wall time unevenly; decoding here is single-threaded, so the two agree
    on an idle machine.
    """
    runs = {
        "seek": lambda: sample_frames(path, n_frames, method="seek"),
        "decode_all": lambda: sample_frames(path, n_frames, method="decode_all"),
        "decode_all+rgb": lambda: decode_all_rgb(path),
    }
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gops", type=int, nargs="+", default=[15], help="GOP lengths in frames (default 15)")
    p.add_argument("--frames", type=int, default=12, help="frames to sample (default 12)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per method (median reported)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for gop in args.gops:
            path = write_clip(Path(tmp) / f"clip_gop{gop}.mp4", gop)
            seek, n_seek = _sample_frames(path, args.frames, "seek")
            full, n_full = _sample_frames(path, args.frames, "decode_all")
            n_seek, n_full = n_seek.frames, n_full.frames
            if not np.array_equal(seek, full):
                print(f"GOP {gop}: seek and decode_all returned different frames", file=sys.stderr)
                return 1
            t = bench(path, args.frames, args.repeats)
            mbps = path.stat().st_size * 8 / 10 / 1e6
            print(f"720p30 10 s H.264 ({mbps:.1f} Mbit/s), GOP {gop}, {args.frames} frames; "
                  f"frames decoded: seek {n_seek}, decode_all {n_full}")
            for k, clock in enumerate(("wall", "cpu")):
                s, a, r = (t[m][k] * 1000 for m in ("seek", "decode_all", "decode_all+rgb"))
                print(f"  {clock:4s}: seek {s:6.0f} ms | decode_all {a:6.0f} ms | ratio {a / s:.2f}x | "
                      f"decode_all+rgb {r:6.0f} ms, ratio {r / s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
