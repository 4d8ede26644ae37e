#!/usr/bin/env python
"""Benchmark: sampling 12 frames by seeking vs decoding every frame of a 10 s 720p30 H.264 clip.

The script writes the clip itself (1280x720, 30 fps, 10 s, libx264 veryfast CRF 20, one slice
per frame, a GOP of ``--gop`` frames, B-frames on; drifting colour waves plus sensor-like noise
so that P/B-frames carry real residuals), checks that every method returns identical frames, then
times, in one run and alternating the methods (median of ``--repeats``, after a warm-up):

* ``seek``: :func:`featurestore.decode.sample_frames` (seek to the keyframe before each time,
  decode forward to it, skip non-reference frames that no target needs, drain the decoder at
  the target instead of decoding the next GOP's first frames);
* ``decode_all``: the same function with ``method="decode_all"``: decode every frame, convert
  only the 12 wanted ones to RGB. The strict baseline (decoding alone, nothing else);
* ``decode_all+rgb``: decode every frame and convert each to an RGB array, as a reader that
  loads the whole clip does (``[f.to_ndarray(format="rgb24") for f in container.decode(video=0)]``,
  then pick 12; the arrays are dropped at once here, so their 830 MB are not even allocated
  together - a favour to the baseline).

Beside them the script prints a bound that holds for any sampler returning exact frames: it
parses each packet's NAL headers (``nal_ref_idc``), keeps only the packets that must be decoded
(for every target, its keyframe, the reference frames after it in decode order, and the target
itself), and times FFmpeg decoding just those. ``decode_all`` over that time is the largest ratio
an exact sampler could reach on the clip (it ignores demuxing, seeking and RGB conversion).

Each is run single-threaded (``threads=1``: the sampler's default, and what extraction's worker
processes use) and with ``--threads`` threads: the sampler then seeks groups of times that share
no keyframe in parallel, one opened file per group; the baselines use FFmpeg frame threading.

With ``--torchcodec`` it also times the torchcodec decoder (``extract --decoder torchcodec``) on
the CPU against ``seek``, alternating, one thread each, after checking that it returns the same
frames bit for bit: frames/s of both and their ratio.

Usage:
    python scripts/bench/bench_frames.py                  # GOP 15 (0.5 s)
    python scripts/bench/bench_frames.py --gops 8 15 30 250 --repeats 7
    python scripts/bench/bench_frames.py --gops 15 250 --threads 1 --torchcodec
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np

from featurestore.decode import sample_frames, sample_times
from featurestore.decode.video import _sample_frames


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


def _nal_ref_idc(data: bytes) -> int:
    """Largest ``nal_ref_idc`` of the coded slices in one AVCC packet (4-byte length prefixes,
    as H.264 in MP4 stores them): 0 means no later frame refers to this one."""
    ref, i = 0, 0
    while i + 4 < len(data):
        size, header = int.from_bytes(data[i:i + 4], "big"), data[i + 4]
        if header & 0x1F in (1, 5):  # coded slice of a non-IDR / IDR picture
            ref = max(ref, header >> 5 & 3)
        i += 4 + size
    return ref


def required_packets(path: Path, n_frames: int) -> tuple[list, set[int], list[int]]:
    """All video packets in decode order, the indices an exact sampler must decode, and the
    index of each target's own packet.

    For each target (the frame on screen at each of :func:`sample_times`): the keyframe at or
    before it in decode order, every reference packet between that keyframe and the target, and
    the target's own packet.
    """
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = [p for p in container.demux(stream) if p.size]
        tb, start = stream.time_base, stream.start_time or 0
        duration = float(stream.duration * tb)
    by_pts = sorted(p.pts for p in packets)
    where = {p.pts: i for i, p in enumerate(packets)}
    needed: set[int] = set()
    targets = []
    for t in sample_times(duration, n_frames):
        tick = start + int(t / tb)
        target = where[max(pts for pts in by_pts if pts <= tick)]
        key = max(i for i in range(target + 1) if packets[i].is_keyframe)
        needed.update(i for i in range(key, target + 1) if i == target or _nal_ref_idc(bytes(packets[i])))
        targets.append(target)
    return packets, needed, targets


def decode_only(packets: list, indices: set[int], codec_context) -> int:
    """Decode the packets at ``indices`` (and flush): CPU work only, no demuxing."""
    n = sum(len(codec_context.decode(p)) for i, p in enumerate(packets) if i in indices)
    return n + len(codec_context.decode(None))


def exact_bound(path: Path, n_frames: int, repeats: int) -> tuple[int, float, float]:
    """``(frames any exact sampler decodes, ms decoding all, ms decoding only those)``, one
    thread, CPU time, median of ``repeats`` runs each on a fresh decoder."""
    packets, needed, _ = required_packets(path, n_frames)
    times: dict[str, list[float]] = {"all": [], "needed": []}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for _ in range(repeats + 1):  # the first round warms up
            for name, indices in (("all", set(range(len(packets)))), ("needed", needed)):
                ctx = av.CodecContext.create(stream.codec_context.name, "r")
                ctx.extradata = stream.codec_context.extradata
                ctx.thread_count, ctx.thread_type = 1, "SLICE"
                c0 = time.process_time()
                decode_only(packets, indices, ctx)
                times[name].append(time.process_time() - c0)
    med = {name: statistics.median(v[1:]) * 1000 for name, v in times.items()}
    return len(needed), med["all"], med["needed"]


def decode_all_rgb(path: Path, threads: int = 1) -> int:
    """Decode every frame and convert each to an RGB array (the whole-clip reader)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = threads
        stream.codec_context.thread_type = "AUTO" if threads > 1 else "SLICE"
        return sum(f.to_ndarray(format="rgb24").shape[0] > 0 for f in container.decode(stream))


METHODS = ("seek", "decode_all", "decode_all+rgb")


def runs(path: Path, n_frames: int, threads: int) -> dict[str, Callable[[], object]]:
    """The timed calls for one thread count."""
    return {
        "seek": lambda: sample_frames(path, n_frames, method="seek", threads=threads),
        "decode_all": lambda: sample_frames(path, n_frames, method="decode_all", threads=threads),
        "decode_all+rgb": lambda: decode_all_rgb(path, threads),
    }


def bench(path: Path, n_frames: int, repeats: int, thread_counts: tuple[int, ...] = (1,)
          ) -> dict[tuple[str, int], tuple[float, float]]:
    """Median (wall, CPU) seconds per (method, threads) over ``repeats`` alternating runs.

    CPU time of this process (all its threads) is reported beside wall time because on a shared
    machine other processes inflate wall time unevenly; single-threaded, the two agree on an
    idle machine. With more threads, only wall time can show a gain.
    """
    calls = {(name, t): fn for t in thread_counts for name, fn in runs(path, n_frames, t).items()}
    wall: dict[tuple[str, int], list[float]] = {key: [] for key in calls}
    cpu: dict[tuple[str, int], list[float]] = {key: [] for key in calls}
    for fn in calls.values():
        fn()
    for _ in range(repeats):
        for key, fn in calls.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[key].append(time.perf_counter() - w0)
            cpu[key].append(time.process_time() - c0)
    return {key: (statistics.median(wall[key]), statistics.median(cpu[key])) for key in calls}


def same_frames(path: Path, n_frames: int, threads: int) -> tuple[bool, object, object]:
    """Whether every method and thread count returns the frames of a full decode; the counts."""
    full, n_full = _sample_frames(path, n_frames, "decode_all")
    seek, n_seek = _sample_frames(path, n_frames, "seek")
    others = [_sample_frames(path, n_frames, "seek", threads)[0],
              _sample_frames(path, n_frames, "decode_all", threads)[0]]
    return all(np.array_equal(full, x) for x in [seek, *others]), n_seek, n_full


def report(gop: int, path: Path, n_frames: int, threads: int, n_seek, n_full,
           t: dict[tuple[str, int], tuple[float, float]]) -> None:
    """Print one block per GOP: single-threaded wall and CPU, then wall with ``threads``."""
    mbps = path.stat().st_size * 8 / 10 / 1e6
    print(f"720p30 10 s H.264 ({mbps:.1f} Mbit/s), GOP {gop}, {n_frames} frames; frames decoded: "
          f"seek {n_seek.frames} ({n_seek.packets} packets sent), decode_all {n_full.frames}")
    lines = [("1 thread, wall", 1, 0), ("1 thread, cpu ", 1, 1)]
    if threads > 1:
        lines.append((f"{threads} threads, wall", threads, 0))
    for label, n, k in lines:
        s, a, r = (t[(m, n)][k] * 1000 for m in METHODS)
        print(f"  {label}: seek {s:6.0f} ms | decode_all {a:6.0f} ms, ratio {a / s:.2f}x | "
              f"decode_all+rgb {r:6.0f} ms, ratio {r / s:.2f}x")
    if threads > 1:
        s1, st = t[("seek", 1)][0], t[("seek", threads)][0]
        a1, r1 = t[("decode_all", 1)][0], t[("decode_all+rgb", 1)][0]
        print(f"  seek with {threads} threads vs single-threaded baselines (wall): decode_all {a1 / st:.2f}x, "
              f"decode_all+rgb {r1 / st:.2f}x; seek itself {s1 / st:.2f}x faster than with 1 thread")


def torchcodec_vs_seek(path: Path, n_frames: int, repeats: int) -> tuple[float, float]:
    """Median wall seconds of ``seek`` and of torchcodec on the CPU, one thread each, alternating
    (after a warm-up); refuses (ValueError) when their frames differ."""
    from featurestore.decode.torchcodec_video import sample_frames_torchcodec

    calls = {"seek": lambda: sample_frames(path, n_frames),
             "torchcodec": lambda: sample_frames_torchcodec(path, n_frames).numpy()}
    if not np.array_equal(calls["seek"](), calls["torchcodec"]()):
        raise ValueError(f"{path}: torchcodec's frames differ from the PyAV sampler's")
    wall: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            w0 = time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - w0)
    return statistics.median(wall["seek"]), statistics.median(wall["torchcodec"])


def report_torchcodec(path: Path, n_frames: int, repeats: int) -> None:
    seek, codec = torchcodec_vs_seek(path, n_frames, repeats)
    print(f"  torchcodec (CPU, 1 thread; same frames bit for bit): {n_frames / codec:6.1f} frames/s vs seek "
          f"{n_frames / seek:6.1f} frames/s (PyAV): torchcodec/seek = {seek / codec:.2f}x")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gops", type=int, nargs="+", default=[15], help="GOP lengths in frames (default 15)")
    p.add_argument("--frames", type=int, default=12, help="frames to sample (default 12)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per method (median reported)")
    p.add_argument("--threads", type=int, default=2,
                   help="also time every method with this many threads (default 2; 1 = single-threaded only)")
    p.add_argument("--torchcodec", action="store_true",
                   help="also time the torchcodec decoder on the CPU against seek (needs avscene[torchcodec])")
    args = p.parse_args(argv)
    thread_counts = (1, args.threads) if args.threads > 1 else (1,)
    with tempfile.TemporaryDirectory() as tmp:
        for gop in args.gops:
            path = write_clip(Path(tmp) / f"clip_gop{gop}.mp4", gop)
            same, n_seek, n_full = same_frames(path, args.frames, max(thread_counts))
            if not same:
                print(f"GOP {gop}: the methods returned different frames", file=sys.stderr)
                return 1
            t = bench(path, args.frames, args.repeats, thread_counts)
            report(gop, path, args.frames, max(thread_counts), n_seek, n_full, t)
            n_needed, all_ms, needed_ms = exact_bound(path, args.frames, args.repeats)
            print(f"  bound for any exact sampler: it must decode {n_needed} of {n_full.frames} frames; "
                  f"decoding only those takes {needed_ms:.0f} ms vs {all_ms:.0f} ms for all "
                  f"(1 thread, CPU): at most {all_ms / needed_ms:.2f}x")
            if args.torchcodec:
                report_torchcodec(path, args.frames, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
