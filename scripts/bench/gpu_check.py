"""GPU check of issue 21's extraction floor, for a session that is lent a GPU (< 8 minutes on an H100).

ViT-B/32 with random weights (``clip/ViT-B-32@none``: the same compute as the OpenAI weights, no
download) is fed uint8 frames the way extraction's encode lane feeds it (``featurestore.extract.
transfers``): pinned host batches, one non-blocking device copy each on a copy stream, the batched
resize/crop/normalise on the device, encode, cast, finiteness and non-blocking copies back into
pinned memory taken ``INFLIGHT_BATCHES`` batches later. Inputs: 224x224 frames (what a stored
``frames/224`` set holds) and 1280x720 frames (decoded MP4 frames). For each, in float32 and with
``precision="bfloat16"`` (bf16 autocast, ``Encoder.set_run_options``):

* frames/s over ``--seconds`` of steady state;
* GPU busy %: the union of the device's kernel and copy intervals over the profiled window's wall
  time (``torch.profiler``), whose Chrome trace is saved under ``--out`` (``$OUT`` on the device
  machine);
* host syncs: the loop runs under ``torch.cuda.set_sync_debug_mode("warn")``, and every warning
  (a synchronising call) is counted and printed once. The lane's one deliberate wait, on the event
  of an encode batch two batches old, is ``cudaEventSynchronize``; if this torch counts it as a
  sync, its message says so.

Floor (issue 21): >= 5,000 frames/s from a stored frames set with the GPU >= 90% busy and no sync
warning. Last, a short real ``extract`` of synthetic 720p MP4s on the GPU under the same sync
check, with its per-stage seconds (decode workers on this machine's cores).

Usage (on the device machine):
    python scripts/bench/gpu_check.py --out "$OUT" [--batch 512] [--seconds 20]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch


def _pinned_batches(n: int, size: tuple[int, int], count: int = 3) -> list[torch.Tensor]:
    """``count`` pinned uint8 frame batches of random texture (rotated so no copy is reused early)."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (n, *size, 3), dtype=torch.uint8, generator=gen).pin_memory() for _ in range(count)]


def _busy_fraction(prof: torch.profiler.profile, wall_us: float) -> float:
    """Union of device-side intervals (kernels, memcpy, memset) over the window's wall time."""
    spans = []
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA and evt.time_range.elapsed_us() > 0:
            spans.append((evt.time_range.start, evt.time_range.end))
    spans.sort()
    busy, end = 0.0, float("-inf")
    for lo, hi in spans:
        if hi <= end:
            continue
        busy += hi - max(lo, end)
        end = hi
    return busy / wall_us if wall_us > 0 else 0.0


def run_lane(encoder, size: tuple[int, int], batch: int, seconds: float, bf16: bool, out: Path, tag: str) -> dict:
    """Feed ``encoder`` like an extraction lane for ``seconds``; frames/s, busy %, sync warnings."""
    from featurestore.extract.plan import Source, Target
    from featurestore.extract.transfers import INFLIGHT_BATCHES, DeviceCopies, launch
    import numpy as np

    device = encoder.device
    encoder.set_run_options(precision="bfloat16" if bf16 else "float32")  # recorded in the fingerprint
    target = Target("clip/ViT-B-32", encoder, encoder.spec, Source("frames", 1), encoder.output_shape, "float16",
                    batch, {}, np.ones(batch, dtype=bool))
    pre = encoder.preprocessor()
    hosts = _pinned_batches(batch, size)
    copies = DeviceCopies(device)
    inflight: collections.deque = collections.deque()

    def step(k: int) -> None:
        x = hosts[k % len(hosts)]
        copies.prefetch(x)
        launched = launch(target, pre.batched(copies.get(x)), batch)
        inflight.append(launched)
        copies.keep(set())
        while len(inflight) > INFLIGHT_BATCHES:
            inflight.popleft().result(target, batch)

    for k in range(3):  # warm-up: kernels chosen, pinned blocks cached
        step(k)
    while inflight:
        inflight.popleft().result(target, batch)
    torch.cuda.synchronize()
    syncs: collections.Counter = collections.Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            step(k)
            k += 1
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            w0 = time.perf_counter()
            for j in range(8):
                step(k + j)
            while inflight:
                inflight.popleft().result(target, batch)
            window_us = (time.perf_counter() - w0) * 1e6
        torch.cuda.set_sync_debug_mode("default")
        elapsed = time.perf_counter() - t0
    others = collections.Counter()
    for w in caught:  # torch's sync-debug warnings name a synchronizing operation; other warnings are shown apart
        text = str(w.message).splitlines()[0][:120]
        (syncs if "synchroniz" in text.lower() else others)[text] += 1
    if others:
        print(f"{tag}: other warnings {dict(others)}", flush=True)
    trace = out / f"trace_{tag}.json"
    prof.export_chrome_trace(str(trace))
    result = {"input": f"{size[1]}x{size[0]}", "bf16": bf16, "batch": batch,
              "frames_per_s": (k + 8) * batch / elapsed, "gpu_busy": _busy_fraction(prof, window_us),
              "sync_warnings": dict(syncs), "trace": str(trace)}
    print(f"{tag}: {result['frames_per_s']:,.0f} frames/s, GPU busy {100 * result['gpu_busy']:.0f}% "
          f"(profiled window), sync warnings {sum(syncs.values())} {dict(syncs) or ''}", flush=True)
    return result


def run_extract(out: Path, clips: int) -> dict:
    """A real extraction of synthetic 720p MP4s on the GPU, under the sync check."""
    from featurestore.demo import make_demo_dataset
    from featurestore.extract import extract

    with tempfile.TemporaryDirectory() as tmp:
        root = make_demo_dataset(Path(tmp) / "data", clips_per_class=max(1, clips // 10), duration=10.0,
                                 width=1280, height=720, fps=10, progress=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            summary = extract(root, Path(tmp) / "s.zarr", "clip/ViT-B-32@none,frames/224", device="cuda",
                              batch_size=64, progress=False)
            torch.cuda.set_sync_debug_mode("default")
    syncs = collections.Counter(str(w.message).splitlines()[0][:120] for w in caught
                                if "synchroniz" in str(w.message).lower())
    result = {"clips": clips, "seconds": summary.wall_seconds, "sync_warnings": dict(syncs),
              "stages": getattr(summary, "seconds", None)}
    print(f"extract {clips} clips of 720p: {summary.wall_seconds:.1f} s; sync warnings {sum(syncs.values())} "
          f"{dict(syncs) or ''}", flush=True)
    print(summary.line(), flush=True)
    return result


def _guarded(tag: str, run) -> dict:
    """Run one measurement; a failure is printed and recorded, and the others still run (device
    time is scarce: one bad configuration must not cost the rest)."""
    try:
        return run()
    except Exception as err:  # noqa: BLE001 - reported, then the next configuration runs
        print(f"{tag}: FAILED: {type(err).__name__}: {err}", flush=True)
        torch.cuda.set_sync_debug_mode("default")
        return {"tag": tag, "error": f"{type(err).__name__}: {err}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="where traces and gpu_check.json go")
    p.add_argument("--batch", type=int, default=512, help="frames per encode batch")
    p.add_argument("--seconds", type=float, default=20.0, help="steady-state seconds per configuration")
    p.add_argument("--clips", type=int, default=16, help="720p clips of the end-to-end extract (0: skip)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run it on a machine with a GPU")
    from featurestore.encoders import create_encoder

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; {os.cpu_count()} CPUs; "
          f"/proc/loadavg {Path('/proc/loadavg').read_text().strip()}", flush=True)
    encoder = create_encoder("clip/ViT-B-32@none").to("cuda")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "lane": []}
    # 720p batches are 2.76 MB a frame: at most 256 frames, so the three pinned batches stay ~2 GB
    for size, label, batch in (((224, 224), "stored224", args.batch), ((720, 1280), "decoded720p", min(args.batch, 256))):
        for bf16 in (False, True):
            tag = f"{label}_{'bf16' if bf16 else 'fp32'}"
            results["lane"].append(_guarded(tag, lambda: run_lane(encoder, size, batch, args.seconds, bf16, out, tag)))
            (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    if args.clips:
        results["extract"] = _guarded("extract", lambda: run_extract(out, args.clips))
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    stored = [r for r in results["lane"] if r.get("input") == "224x224"]
    if not stored:
        raise SystemExit("gpu_check: no configuration from stored frames ran; see the errors above")
    best = max(stored, key=lambda r: r["frames_per_s"])
    verdict = "met" if best["frames_per_s"] >= 5000 and best["gpu_busy"] >= 0.9 and not best["sync_warnings"] \
        else "NOT met"
    print(f"floor (>= 5,000 frames/s from stored frames, >= 90% busy, no sync): {verdict} "
          f"({best['frames_per_s']:,.0f} frames/s, {100 * best['gpu_busy']:.0f}% busy, bf16={best['bf16']})")


if __name__ == "__main__":
    main()
