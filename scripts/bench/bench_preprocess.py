"""Benchmark of frame preprocessing: the per-frame float path in the decode workers (before issue 21)
against uint8 frames handed over and preprocessed in batches on the encoder's device (now).

On the same decoded 720p frames, per frame, one thread, best of ``--rounds`` (the rounds interleave
the variants, so a busy machine slows them alike):

* **host (worker) cost**: what a decode worker spends per frame after decoding, shared-memory hand-over
  included: before, resize + crop + normalise in float32 per frame, ``torch.cat`` and
  ``share_memory_`` of the float crops; now, ``as_uint8_frames`` and one ``torch.cat`` of the uint8
  frames into a shared buffer the worker reuses (``featurestore.extract.buffer_pool``); shown beside
  it, the same into fresh shared memory (a worker whose slots are all busy). This is the CPU's feed
  cost of a GPU run, where the device half runs on the GPU.
* **device half on the CPU**: ``FramePreprocessor.batched`` on an encode batch of frames, i.e. the
  cost when the "device" is the CPU itself. It is the same float32 arithmetic as before (checked bit
  for bit here and in tests/featurestore/test_uint8_frames.py), so it cannot be much cheaper; this
  is why extraction on the CPU keeps preprocessing in the decode workers, in parallel
  (``featurestore.extract.workers.PREPROCESS_ON_DEVICE``).
* **uint8 antialiased resize** (torch's AVX2 uint8 kernel): the fast CPU kernel, for reference; its
  output differs from the float path's (max level difference printed), which is why the bit-exact
  device half does not use it.
* **bytes per frame through shared memory**, before and now.
* with ``--device cuda``: ``FramePreprocessor.batched`` on the GPU (ms per frame, synchronised) and
  its largest difference from the CPU output, in uint8 levels before normalising (issue 21 asks for
  at most one).

Usage:
    python scripts/bench/bench_preprocess.py --frames 8 --rounds 7 [--device cuda]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from featurestore.decode import sample_frames
from featurestore.demo import write_mp4
from featurestore.encoders import FramePreprocessor
from featurestore.encoders._preprocess import as_uint8_frames
from featurestore.encoders.clip import clip_frame_preprocessor
from featurestore.encoders.timm_frames import frame_preprocessor
from featurestore.extract.buffer_pool import BufferPool
from featurestore.extract.workers import _cat
from featurestore.testing import per_frame_preprocessing

CLIP = {"mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711),
        "interpolation": "bicubic", "resize_mode": "shortest"}
CONFIGS = {
    "clip/ViT-B-32 (224, bicubic)": clip_frame_preprocessor({"size": 224, **CLIP}),
    "clip/RN50x4 (288, bicubic)": clip_frame_preprocessor({"size": 288, **CLIP}),
    "timm 224 (bilinear, crop_pct 0.875)": frame_preprocessor(
        {"input_size": (3, 224, 224), "crop_pct": 0.875, "interpolation": "bilinear",
         "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}),
}


def decoded_720p(n: int, workdir: Path) -> np.ndarray:
    """``n`` frames decoded from a real 1280x720 MPEG-4 file of smooth noise (so resizing has texture)."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (n, 45, 80, 3), dtype=np.uint8)
    frames = np.repeat(np.repeat(coarse, 16, axis=1), 16, axis=2)
    frames = np.clip(frames.astype(np.int16) + rng.integers(-12, 13, frames.shape), 0, 255).astype(np.uint8)
    path = workdir / "720p.mp4"
    write_mp4(path, list(frames), fps=n, width=1280, height=720, codec="mpeg4")
    return sample_frames(path, n)


def best_per_frame(variants: dict[str, Callable[[], object]], n_frames: int, rounds: int) -> dict[str, float]:
    """Best milliseconds per frame of each variant, the rounds interleaving the variants."""
    best = {name: float("inf") for name in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - t0) * 1000.0 / n_frames)
    return best


def old_handover(tensors: list[torch.Tensor]) -> torch.Tensor:
    """What ``collate`` did in a worker before: stack, then move into shared memory (a second copy)."""
    return torch.cat(tensors).share_memory_()


def fresh_handover(tensors: list[torch.Tensor]) -> torch.Tensor:
    """What ``collate`` does in a worker whose pool slots are all busy: stack straight into new
    shared memory (what it always did before the buffer pool)."""
    return _cat(tensors, _Fresh())


class _Fresh:
    """A ``workers._Sharer`` without a pool: always fresh shared memory."""

    pool, worker, pooled = None, 0, []


def pooled_handover(pool: BufferPool, tensors: list[torch.Tensor]) -> torch.Tensor:
    """What ``collate`` does in a worker now: stack into a reused slot of its buffer pool (the main
    process frees the slot when it lets go of the batch; here at once)."""
    x, slot = pool.stack(tensors, 0)
    pool.release(slot)
    return x


def measure_device(pre: FramePreprocessor, stack: torch.Tensor, cpu: torch.Tensor, device: torch.device,
                   rounds: int) -> None:
    """The batched path on ``device``: ms per frame and its distance from the CPU output in uint8 levels."""
    on_device = stack.to(device)

    def run() -> torch.Tensor:
        out = pre.batched(on_device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    got = run().cpu()
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    levels = float(((got - cpu).abs() * std * 255.0).max())
    ms = best_per_frame({"device": run}, len(stack), rounds)["device"]
    print(f"  on {device}: {ms:8.3f} ms/frame batched; largest difference from the CPU: {levels:.3f} uint8 levels")


def measure(name: str, pre: FramePreprocessor, frames: np.ndarray, rounds: int,
            device: torch.device | None = None) -> None:
    n = len(frames)
    clips = [frames[i:i + 2] for i in range(0, n, 2)]  # clips of 2 frames, as a decode batch holds them
    stack = torch.from_numpy(frames)
    old = per_frame_preprocessing(pre, frames)
    new = pre.batched(stack)
    if not torch.equal(old, new):
        raise SystemExit(f"{name}: the batched path differs from the per-frame one: not bit-exact")
    size = pre.resized_size(*frames.shape[1:3])
    u8 = F.interpolate(stack.permute(0, 3, 1, 2), size=size, mode=pre.interpolation, antialias=True)
    ref = F.interpolate(stack.permute(0, 3, 1, 2).float(), size=size, mode=pre.interpolation,
                        antialias=True).clamp(0, 255).round()
    levels = int((u8.float() - ref).abs().max())
    pool = BufferPool(1, slots_per_worker=1)
    times = best_per_frame({
        "before: host (per-frame float + cat + share)": lambda: old_handover([per_frame_preprocessing(pre, c) for c in clips]),
        "now: host (uint8 into a reused shared buffer)": lambda: pooled_handover(pool, [as_uint8_frames(c) for c in clips]),
        "host, uint8 into fresh shared memory (no pool)": lambda: fresh_handover([as_uint8_frames(c) for c in clips]),
        "now: device half on the CPU (batched)": lambda: pre.batched(stack),
        "uint8 antialiased resize alone (not bit-exact)": lambda: F.interpolate(
            stack.permute(0, 3, 1, 2), size=size, mode=pre.interpolation, antialias=True),
    }, n, rounds)
    before = times["before: host (per-frame float + cat + share)"]
    print(f"\n{name}: {frames.shape[2]}x{frames.shape[1]} frames -> {pre.crop[1]}x{pre.crop[0]}; batched == "
          f"per-frame bit for bit: yes")
    for label, ms in times.items():
        ratio = f"  ({before / ms:.1f}x cheaper than before)" if label != next(iter(times)) else ""
        print(f"  {label:<50} {ms:8.3f} ms/frame{ratio}")
    print(f"  uint8 resize vs float resize: up to {levels} uint8 levels apart")
    if device is not None:
        measure_device(pre, stack, new, device, rounds)
    print(f"  bytes per frame through shared memory: before {old[0].numel() * 4:,} (float32 crop, per encoder "
          f"with its own preprocessing), now {frames[0].size:,} (H x W x 3 uint8, once for every image encoder)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=8, help="decoded 720p frames per measurement")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds; the best is reported")
    parser.add_argument("--device", default=None, help="also run the batched path there (e.g. cuda)")
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else None
    if device is not None and device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; /proc/loadavg before: {Path('/proc/loadavg').read_text().strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        frames = decoded_720p(args.frames, Path(tmp))
    for name, pre in CONFIGS.items():
        measure(name, pre, frames, args.rounds, device)
    print(f"\n/proc/loadavg after: {Path('/proc/loadavg').read_text().strip()}")


if __name__ == "__main__":
    main()
