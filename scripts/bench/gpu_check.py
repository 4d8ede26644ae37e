"""GPU check of every GPU floor of issue 21, for a session lent a GPU (estimated ~5 min on an H100; not yet run).

1. **Encode lane** (``lane``): ViT-B/32 with random weights (``clip/ViT-B-32@none``: the OpenAI
   weights' compute, no download) fed uint8 frames the way extraction's encode lane feeds it
   (``featurestore.extract.transfers``): pinned host batches, one non-blocking device copy each,
   the batched resize/crop/normalise on the device, encode, cast, finiteness and non-blocking
   copies back into pinned memory taken ``INFLIGHT_BATCHES`` batches later; 224x224 frames (what a
   stored ``frames/224`` set holds) and 1280x720 frames (decoded MP4 frames), in float32 and bf16.
   The run options are the encoder's own (``Encoder.set_run_options``: precision and
   ``cudnn_benchmark``, both recorded in the fingerprint; nothing is set process-wide). Reported:
   frames/s over ``--seconds`` of steady state; GPU busy % (the union of the device's kernel and
   copy intervals over a profiled window's wall time, whose Chrome trace is saved under ``--out``);
   host syncs (the loop runs under ``torch.cuda.set_sync_debug_mode("warn")``; every warning is
   counted and printed once).
2. **Extraction from a stored frames set** (``stored_extract``): a store of ``--stored-clips``
   clips of random ``frames/224``, then ``extract(frames_from="frames/224")`` of ViT-B/32 in bf16
   with cudnn_benchmark (as ``--encoder-option`` gives them), end to end under the sync check:
   frames/s over the pipeline's seconds (decode workers read the stored frames).
3. **Extraction from MP4s** (``mp4_extract``): synthetic 720p clips, ``clip/ViT-B-32@none,frames/224``
   decoded by PyAV in the decode workers, and, when torchcodec is installed, again with
   ``decoder="torchcodec"`` (NVDEC on the GPU): per-stage seconds, sync warnings, and how far the
   NVDEC frames/224 are from PyAV's (max and mean absolute uint8 difference).
4. **torchcodec decode** (``torchcodec``, when installed): frames/s of ``sample_frames_torchcodec``
   on the device vs the PyAV sampler on the same 720p clips, and the frames' max/mean difference.
5. **Training input** (``training``): one ``frame_cnn`` (stored ``frames/448``, the paper's size) and
   one ``spectrogram_cnn`` (stored float16 log-mel [256, 94]) run of two epochs each through
   ``heads.train.fit``, the loader timed: seconds blocked waiting for the next batch over the epoch's
   seconds (the second epoch; the first includes start-up).

Floors (issue 21): lane from stored 224 frames >= 5,000 frames/s with the GPU >= 90% busy and no
sync warning; loader wait < 5% of each training epoch. Every measurement runs on its own (a failure
is printed and recorded, the rest still run) and ``gpu_check.json`` is rewritten after each.

``--dry-run`` runs every step on the CPU at toy sizes (a test model, a few clips, the lane in bf16
only, one training epoch), so the script's code paths are checked without a GPU
(tests/featurestore/test_gpu_check.py); its numbers mean nothing.

Usage (on the device machine):
    python scripts/bench/gpu_check.py --out "$OUT" [--batch 512] [--seconds 10]
    python scripts/bench/gpu_check.py --dry-run --out /tmp/gpu_check
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FRAMES_PER_CLIP = 12
VIT = "clip/ViT-B-32@none"


@dataclass(frozen=True)
class Sizes:
    """What each step runs on: the GPU check's sizes, or ``--dry-run``'s toy ones (CPU)."""

    device: str
    encoder: str  # the lane's and the extractions' image encoder
    lane_inputs: tuple[tuple[tuple[int, int], str, int], ...]  # ((H, W), label, batch)
    profiled_steps: int  # lane steps in the profiled window
    bf16: tuple[bool, ...]  # the lane's precisions: float32 (False) and/or bf16 (True)
    stored_clips: int  # clips of the random frames set extracted from (step 2)
    stored_size: int  # its frame size
    mp4: dict  # make_demo_dataset arguments
    mp4_limit: int | None  # clips of it extracted (None: all)
    train_clips: int  # clips of the random training store
    frame_size: int  # stored frames of the frame_cnn run
    logmel_shape: tuple[int, int]  # stored log-mel [mels, frames] of the spectrogram_cnn run
    backbone: str  # both heads' timm backbone
    frame_batch: int  # frame_cnn batch (frames)
    logmel_batch: int  # spectrogram_cnn batch (segments)
    epochs: int = 2  # training epochs per head; the last one's loader wait is reported

    @classmethod
    def gpu(cls, batch: int, stored_clips: int, clips: int) -> Sizes:
        # 720p batches are 2.76 MB a frame: at most 256 frames, so the three pinned batches stay ~2 GB
        lane = (((224, 224), "stored224", batch), ((720, 1280), "decoded720p", min(batch, 256)))
        mp4 = dict(clips_per_class=max(1, clips // 10), duration=10.0, width=1280, height=720, fps=10)
        return cls(device="cuda", encoder=VIT, lane_inputs=lane, profiled_steps=8, bf16=(False, True),
                   stored_clips=stored_clips, stored_size=224, mp4=mp4, mp4_limit=None, train_clips=96,
                   frame_size=448, logmel_shape=(256, 94), backbone="regnetx_064", frame_batch=48, logmel_batch=24,
                   epochs=2)

    @classmethod
    def dry_run(cls) -> Sizes:
        lane = (((32, 32), "stored32", 2),)
        mp4 = dict(clips_per_class=1, duration=1.0, width=64, height=48, fps=4)
        return cls(device="cpu", encoder="timm/test_vit@none", lane_inputs=lane, profiled_steps=2, bf16=(True,),
                   stored_clips=2, stored_size=32, mp4=mp4, mp4_limit=2, train_clips=2, frame_size=16,
                   logmel_shape=(16, 20), backbone="test_resnet", frame_batch=8, logmel_batch=8, epochs=1)


# ------------------------------------------------------------------------------------ checks
@contextlib.contextmanager
def sync_check(device: str) -> Iterator[collections.Counter]:
    """Count host syncs on CUDA (``set_sync_debug_mode("warn")``) by their first line; other
    warnings are printed apart. On the CPU there is nothing to count."""
    syncs: collections.Counter = collections.Counter()
    cuda = device.startswith("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield syncs
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    others: collections.Counter = collections.Counter()
    for w in caught:
        text = str(w.message).splitlines()[0][:120]
        (syncs if "synchroniz" in text.lower() else others)[text] += 1
    if others:
        print(f"  other warnings: {dict(others)}", flush=True)


def busy_fraction(prof: torch.profiler.profile, wall_us: float) -> float:
    """Union of device-side intervals (kernels, memcpy, memset) over the window's wall time."""
    spans = sorted((evt.time_range.start, evt.time_range.end) for evt in prof.events()
                   if evt.device_type == torch.autograd.DeviceType.CUDA and evt.time_range.elapsed_us() > 0)
    busy, end = 0.0, float("-inf")
    for lo, hi in spans:
        if hi > end:
            busy += hi - max(lo, end)
            end = hi
    return busy / wall_us if wall_us > 0 else 0.0


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------- 1. lane
def _pinned_batches(n: int, size: tuple[int, int], pin: bool, count: int = 3) -> list[torch.Tensor]:
    """``count`` uint8 frame batches of random texture (rotated so no copy is reused early)."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (n, *size, 3), dtype=torch.uint8, generator=gen) for _ in range(count)]
    return [b.pin_memory() for b in batches] if pin else batches


def run_lane(encoder, size: tuple[int, int], batch: int, seconds: float, bf16: bool, out: Path, tag: str,
             profiled: int = 8) -> dict:
    """Feed ``encoder`` like an extraction lane for ``seconds``; frames/s, busy %, sync warnings."""
    from featurestore.extract.plan import Source, Target
    from featurestore.extract.transfers import INFLIGHT_BATCHES, DeviceCopies, launch

    device = str(encoder.device)
    cuda = device.startswith("cuda")
    encoder.set_run_options(precision="bfloat16" if bf16 else "float32", cudnn_benchmark=cuda)
    target = Target(encoder.name, encoder, encoder.spec, Source("frames", 1), encoder.output_shape, "float16",
                    batch, {}, np.ones(batch, dtype=bool))
    pre, hosts = encoder.preprocessor(), _pinned_batches(batch, size, cuda)
    copies, inflight = DeviceCopies(encoder.device), collections.deque()

    def step(k: int) -> None:
        x = hosts[k % len(hosts)]
        copies.prefetch(x)
        inflight.append(launch(target, pre.batched(copies.get(x)), batch))
        copies.keep(set())
        while len(inflight) > INFLIGHT_BATCHES:
            inflight.popleft().result(target, batch)

    for k in range(3):  # warm-up: kernels chosen, pinned blocks cached
        step(k)
    while inflight:
        inflight.popleft().result(target, batch)
    _synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with sync_check(device) as syncs:
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            step(k)
            k += 1
        with torch.profiler.profile(activities=activities) as prof:
            w0 = time.perf_counter()
            for j in range(profiled):
                step(k + j)
            while inflight:
                inflight.popleft().result(target, batch)
            window_us = (time.perf_counter() - w0) * 1e6
        elapsed = time.perf_counter() - t0
    trace = out / f"trace_{tag}.json"
    prof.export_chrome_trace(str(trace))
    result = {"input": f"{size[1]}x{size[0]}", "bf16": bf16, "batch": batch,
              "frames_per_s": (k + profiled) * batch / elapsed,
              "gpu_busy": busy_fraction(prof, window_us), "sync_warnings": dict(syncs), "trace": str(trace),
              "fingerprint_options": {"precision": encoder.precision, "cudnn_benchmark": encoder.cudnn_benchmark}}
    print(f"{tag}: {result['frames_per_s']:,.0f} frames/s, GPU busy {100 * result['gpu_busy']:.0f}% "
          f"(profiled window), sync warnings {sum(syncs.values())} {dict(syncs) or ''}", flush=True)
    return result


# ------------------------------------------------------------------------ 2. stored frames
def random_store(path: Path, sets: dict[str, tuple[int, tuple[int, ...], str]], n_clips: int):
    """A store of ``n_clips`` labelled training clips with feature sets of random values:
    ``{name: (segments per clip, per-segment shape, dtype)}`` (no media files: nothing decodes them)."""
    from featurestore import ClipRecord, Manifest
    from featurestore.store import create_store

    classes = [f"c{i}" for i in range(10)]
    clips = [ClipRecord(f"c{i % 10}-x-{i}-{i}", label=f"c{i % 10}", splits=frozenset({"train"}))
             for i in range(n_clips)]
    manifest = Manifest("gpu_check", classes, clips, video_frames=FRAMES_PER_CLIP)
    rng = np.random.default_rng(0)
    with create_store(path, manifest) as store:
        for name, (segments, shape, dtype) in sets.items():
            modality = "video" if dtype == "uint8" else "audio"
            prov = {"encoder": name, "config": {"modality": modality}, "weights": {"kind": "parameter-free"}}
            info = store.create_feature_set(name, segments, shape, prov, dtype=dtype)
            step = info.chunk_clips * 4
            for start in range(0, n_clips, step):
                n = min(step, n_clips - start)
                values = rng.integers(0, 256, (n, segments, *shape), dtype=np.uint8) if dtype == "uint8" \
                    else rng.standard_normal((n, segments, *shape), dtype=np.float32).astype(dtype)
                store.write_rows(name, start, values)
    return manifest


def run_stored_extract(sizes: Sizes, tmp: Path) -> dict:
    """ViT-B/32 (bf16, cudnn_benchmark as run options) extracted from a stored frames set, end to end."""
    from featurestore.extract import extract

    name = f"frames/{sizes.stored_size}"
    store = tmp / "stored.zarr"
    manifest = random_store(store, {name: (FRAMES_PER_CLIP, (3, sizes.stored_size, sizes.stored_size), "uint8")},
                            sizes.stored_clips)
    options = {sizes.encoder: {"precision": "bfloat16", "cudnn_benchmark": sizes.device.startswith("cuda")}}
    with sync_check(sizes.device) as syncs:
        summary = extract(manifest, store, sizes.encoder, device=sizes.device, frames_from=name,
                          encoder_options=options, progress=False)
    frames = summary.clips_done * FRAMES_PER_CLIP
    result = {"clips": summary.clips_done, "failed": summary.clips_failed, "frames": frames,
              "frames_per_s": frames / summary.pipeline_seconds, "wall_seconds": summary.wall_seconds,
              "stages": summary.stage_seconds, "sync_warnings": dict(syncs)}
    print(f"stored_extract: {frames} frames from {name} in {summary.pipeline_seconds:.1f} s (pipeline): "
          f"{result['frames_per_s']:,.0f} frames/s; sync warnings {sum(syncs.values())} {dict(syncs) or ''}",
          flush=True)
    return result


# -------------------------------------------------------------------------------- 3. MP4s
def torchcodec_reason() -> str:
    """'' when the torchcodec decoder can run here, else why not (one line)."""
    from featurestore.decode.torchcodec_video import DecoderUnavailable, check_decoder

    try:
        check_decoder("torchcodec")
    except DecoderUnavailable as err:
        return str(err)
    return ""


def run_mp4_extract(sizes: Sizes, dataset: Path, tmp: Path) -> dict:
    """Extraction from the MP4s with PyAV (decode workers), and with torchcodec when installed."""
    from featurestore.extract import extract
    from featurestore.store import open_store

    encoders = f"{sizes.encoder},frames/224"
    result: dict = {}
    decoders = ["pyav"] + ([] if torchcodec_reason() else ["torchcodec"])
    for decoder in decoders:
        with sync_check(sizes.device) as syncs:
            summary = extract(dataset, tmp / f"mp4_{decoder}.zarr", encoders, device=sizes.device, decoder=decoder,
                              limit=sizes.mp4_limit, progress=False)
        result[decoder] = {"clips": summary.clips_done, "failed": summary.clips_failed,
                           "pipeline_seconds": summary.pipeline_seconds, "stages": summary.stage_seconds,
                           "sync_warnings": dict(syncs)}
        print(f"mp4_extract[{decoder}]: {summary.clips_done} clips in {summary.pipeline_seconds:.1f} s; stages "
              f"{ {k: round(v, 2) for k, v in summary.stage_seconds.items()} }; sync warnings {sum(syncs.values())}",
              flush=True)
    if "torchcodec" in result:
        with open_store(tmp / "mp4_pyav.zarr") as a, open_store(tmp / "mp4_torchcodec.zarr") as b:
            ids = a.clip_ids[:sizes.mp4_limit]
            diff = np.abs(a.get_many("frames/224", ids).astype(np.int16) - b.get_many("frames/224", ids))
        result["frames224_diff"] = {"max": int(diff.max()), "mean": float(diff.mean())}
        print(f"mp4_extract: frames/224 torchcodec vs pyav: max |diff| {diff.max()}, mean {diff.mean():.3f}",
              flush=True)
    return result


def run_torchcodec(sizes: Sizes, videos: list[Path], repeats: int = 3) -> dict:
    """``sample_frames_torchcodec`` on the device vs the PyAV sampler, same clips: frames/s and difference."""
    from featurestore.decode import sample_frames
    from featurestore.decode.torchcodec_video import sample_frames_torchcodec

    def codec() -> list:
        got = [sample_frames_torchcodec(v, FRAMES_PER_CLIP, sizes.device) for v in videos]
        _synchronize(sizes.device)
        return got

    calls = {"pyav": lambda: [sample_frames(v, FRAMES_PER_CLIP) for v in videos], "torchcodec": codec}
    first = {name: fn() for name, fn in calls.items()}  # warm-up, and the frames compared
    diff = np.concatenate([np.abs(a.astype(np.int16) - b.cpu().numpy()).ravel()
                           for a, b in zip(first["pyav"], first["torchcodec"])])
    best = {name: min(_timed(fn) for _ in range(repeats)) for name, fn in calls.items()}
    frames = len(videos) * FRAMES_PER_CLIP
    result = {"device": sizes.device, "frames": frames, "max_diff": int(diff.max()), "mean_diff": float(diff.mean()),
              **{f"{name}_frames_per_s": frames / s for name, s in best.items()}}
    print(f"torchcodec on {sizes.device}: {result['torchcodec_frames_per_s']:,.0f} frames/s vs PyAV (1 thread) "
          f"{result['pyav_frames_per_s']:,.0f} frames/s: {best['pyav'] / best['torchcodec']:.2f}x; "
          f"max |diff| {diff.max()}, mean {diff.mean():.3f}", flush=True)
    return result


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------- 5. training
class TimedLoader:
    """A training loader whose time blocked in ``next`` is summed per epoch (``set_epoch`` starts one)."""

    def __init__(self, loader):
        self.loader, self.waits = loader, []

    def __getattr__(self, name: str):
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.waits.append(0.0)
        self.loader.set_epoch(epoch)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                self.waits[-1] += time.perf_counter() - t0
            yield batch


def run_training(sizes: Sizes, tmp: Path) -> dict:
    """frame_cnn and spectrogram_cnn trained from stored features; the last epoch's loader wait."""
    frames = f"frames/{sizes.frame_size}"
    store_path = tmp / "train.zarr"
    random_store(store_path, {frames: (FRAMES_PER_CLIP, (3, sizes.frame_size, sizes.frame_size), "uint8"),
                              "logmel": (10, sizes.logmel_shape, "float16")}, sizes.train_clips)
    runs = {"frame_cnn": (frames, {"input_shape": [3, sizes.frame_size, sizes.frame_size]}, sizes.frame_batch),
            "spectrogram_cnn": ("logmel", {"input_shape": list(sizes.logmel_shape),
                                           "resize_to": list(sizes.logmel_shape),
                                           "freq_mask_width": min(32, sizes.logmel_shape[0] // 2)}, sizes.logmel_batch)}
    return {head: _train_one(head, feature, config, batch, sizes, store_path, tmp)
            for head, (feature, config, batch) in runs.items()}


def _train_one(head_name: str, feature: str, config: dict, batch: int, sizes: Sizes, store_path: Path,
               tmp: Path) -> dict:
    import heads
    from heads.train import fit

    from featurestore.store import open_store
    from featurestore.torchdata import StoreDataset

    config = {"backbone": sizes.backbone, "n_classes": 10, **config}
    cuda = sizes.device.startswith("cuda")
    cfg = heads.TrainConfig(head=head_name, features=[feature], train_split="train", val_split=None,
                            out=str(tmp / f"run_{head_name}"), epochs=sizes.epochs, batch_size=batch,
                            device=sizes.device,
                            precision="bf16" if cuda else "fp32", progress=False, head_config=config)
    torch.manual_seed(0)
    head = heads.create_head(head_name, **config)
    with open_store(store_path) as store, sync_check(sizes.device) as syncs:
        loader = TimedLoader(StoreDataset(store, [feature], split="train", level="segment", batch_size=batch,
                                          shuffle=True, drop_last=True, require_labels=True, keep_dtype=True,
                                          pin_memory=cuda))
        history = fit(head, loader, None, cfg, {"head": head_name, "gpu_check": True}, overwrite=True).history
    seconds = history[-1]["seconds"]
    result = {"steps": len(loader), "batch": batch, "epoch_seconds": seconds, "loader_wait_seconds": loader.waits[-1],
              "wait_fraction": loader.waits[-1] / seconds, "sync_warnings": dict(syncs)}
    print(f"training {head_name}: epoch {seconds:.2f} s over {len(loader)} steps of {batch}, loader wait "
          f"{loader.waits[-1]:.3f} s = {100 * result['wait_fraction']:.1f}% (floor < 5%); sync warnings "
          f"{sum(syncs.values())}", flush=True)
    return result


# ------------------------------------------------------------------------------------ main
def _guarded(tag: str, run) -> dict:
    """Run one measurement; a failure is printed and recorded, and the others still run (device
    time is scarce: one bad configuration must not cost the rest)."""
    try:
        return run()
    except Exception as err:  # noqa: BLE001 - reported, then the next measurement runs
        print(f"{tag}: FAILED: {type(err).__name__}: {' '.join(str(err).split())[:500]}", flush=True)
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        return {"tag": tag, "error": f"{type(err).__name__}: {err}"}


def floors(results: dict) -> list[str]:
    """One line per floor of issue 21: met, NOT met, or not measured."""
    lines = []
    stored = [r for r in results.get("lane", []) if r.get("input") == "224x224"]
    if stored:
        best = max(stored, key=lambda r: r["frames_per_s"])
        ok = best["frames_per_s"] >= 5000 and best["gpu_busy"] >= 0.9 and not best["sync_warnings"]
        lines.append(f"lane from stored 224 frames (>= 5,000 frames/s, >= 90% busy, no sync): "
                     f"{'met' if ok else 'NOT met'} ({best['frames_per_s']:,.0f} frames/s, "
                     f"{100 * best['gpu_busy']:.0f}% busy, bf16={best['bf16']}, trace {best['trace']})")
    else:
        lines.append("lane from stored 224 frames: not measured")
    for head, r in (results.get("training") or {}).items():
        if isinstance(r, dict) and "wait_fraction" in r:
            lines.append(f"{head} loader wait (< 5% of the epoch): {'met' if r['wait_fraction'] < 0.05 else 'NOT met'}"
                         f" ({100 * r['wait_fraction']:.1f}%)")
    if "training" not in results or "error" in results["training"]:
        lines.append("training loader wait: not measured")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="where traces and gpu_check.json go")
    p.add_argument("--batch", type=int, default=512, help="frames per encode batch of the lane")
    p.add_argument("--seconds", type=float, default=10.0, help="steady-state seconds per lane configuration")
    p.add_argument("--stored-clips", type=int, default=400, help="clips of the stored frames/224 extraction")
    p.add_argument("--clips", type=int, default=10, help="720p MP4 clips of the decoded extraction (0: skip)")
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU at toy sizes (checks the script)")
    args = p.parse_args(argv)
    if args.dry_run:
        sizes, seconds = Sizes.dry_run(), 0.0
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run it on a machine with a GPU (or --dry-run)")
    else:
        sizes, seconds = Sizes.gpu(args.batch, args.stored_clips, args.clips), args.seconds
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if sizes.device == "cuda" else "cpu (dry run)"
    print(f"{name}; torch {torch.__version__}; {os.cpu_count()} CPUs; /proc/loadavg "
          f"{Path('/proc/loadavg').read_text().strip()}", flush=True)
    results: dict = {"device": name, "torch": torch.__version__, "lane": []}
    save = lambda: (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))  # noqa: E731
    from featurestore.encoders import create_encoder

    encoder = create_encoder(sizes.encoder, sizes.device)
    for size, label, batch in sizes.lane_inputs:
        for bf16 in sizes.bf16:
            tag = f"{label}_{'bf16' if bf16 else 'fp32'}"
            results["lane"].append(_guarded(tag, lambda: run_lane(encoder, size, batch, seconds, bf16, out, tag,
                                                                       sizes.profiled_steps)))
            save()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        results["stored_extract"] = _guarded("stored_extract", lambda: run_stored_extract(sizes, tmp))
        save()
        if args.clips or args.dry_run:
            from featurestore.demo import make_demo_dataset

            dataset = make_demo_dataset(tmp / "data", **sizes.mp4, progress=False)
            results["mp4_extract"] = _guarded("mp4_extract", lambda: run_mp4_extract(sizes, dataset, tmp))
            save()
            reason = torchcodec_reason()
            videos = sorted((dataset / "video").glob("*.mp4"))[:4]
            results["torchcodec"] = {"skipped": reason} if reason else \
                _guarded("torchcodec", lambda: run_torchcodec(sizes, videos))
            if reason:
                print(f"torchcodec: skipped: {reason}", flush=True)
            save()
        results["training"] = _guarded("training", lambda: run_training(sizes, tmp))
        save()
    for line in floors(results):
        print(f"floor: {line}", flush=True)
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    failed += [r["tag"] for r in results["lane"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
