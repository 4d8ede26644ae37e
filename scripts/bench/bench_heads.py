"""Benchmark the heads: a late-fusion epoch streamed from the store vs the same epoch on in-memory tensors,
and seconds per epoch of each head family on this machine, with the peak RSS of each run.

    python scripts/bench/bench_heads.py                    # full size: 12,291 clips x 12 frames
    python scripts/bench/bench_heads.py --clips 2000       # quicker

The store (CLIP-sized feature sets 640/512/512, float16 random values, TAU-sized splits) is made once
into ``--cache-dir`` and reused. Every case runs in its own process so that its peak RSS is its own;
the store-vs-memory cases alternate ``--repeats`` times and the fastest of each is compared, so the
ratio comes from one invocation on the same machine state. Prints a Markdown table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLIP_SETS = {"clip/RN50x4": 640, "clip/RN101": 512, "clip/ViT-B-32": 512}
TRAIN_FRACTION = 8646 / 12291  # fold1_train / all development clips
CLASSES = ["airport", "bus", "metro", "metro_station", "park", "public_square", "shopping_mall",
           "street_pedestrian", "street_traffic", "tram"]


# ------------------------------------------------------------------------------------- stores
def _manifest(n_clips: int, segments: int, seed: int):
    from featurestore import ClipRecord, Manifest

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), n_clips)
    # splits by groups of 10 consecutive clips (like TAU's locations), so train rows are interleaved
    train_group = rng.random(n_clips // 10 + 1) < TRAIN_FRACTION
    clips = [ClipRecord(f"{CLASSES[labels[i]]}-bench-{i // 10}-{i}", label=CLASSES[labels[i]],
                        splits=frozenset({"fold1_train" if train_group[i // 10] else "fold1_evaluate"}))
             for i in range(n_clips)]
    return Manifest("bench", CLASSES, clips, audio_segments=segments, video_frames=segments)


def _fill(store, name: str, segments: int, shape: tuple[int, ...], seed: int, encoder: str) -> None:
    from tqdm.auto import tqdm

    info = store.create_feature_set(name, segments, shape, {"encoder": encoder, "weights": {"kind": "random", "seed": 0}})
    rng = np.random.default_rng(seed)
    step = info.chunk_clips * max(1, 4096 // info.chunk_clips)
    for start in tqdm(range(0, store.n_clips, step), desc=f"write {name}", unit="block"):
        n = min(step, store.n_clips - start)
        store.write_rows(name, start, rng.standard_normal((n, segments, *shape), dtype=np.float32).astype(np.float16))


def build_clip_store(path: Path, n_clips: int, frames: int) -> Path:
    """The CLIP-sized store (made once; an existing complete one is reused)."""
    from featurestore.store import create_store, open_store

    if (path / "zarr.json").exists():
        with open_store(path) as store:
            sets = store.feature_sets()
            if store.n_clips == n_clips and all(n in sets and sets[n].n_done == n_clips for n in CLIP_SETS):
                return path
    started = time.perf_counter()
    store = create_store(path, _manifest(n_clips, frames, 0))
    for i, (name, dim) in enumerate(CLIP_SETS.items()):
        _fill(store, name, frames, (dim,), i, name + "@bench-random")
    text = np.random.default_rng(9).standard_normal((len(CLASSES), 512)).astype(np.float32)
    store.write_class_features("cliptext/ViT-B-32", text, {"encoder": "cliptext/ViT-B-32@bench-random",
                                                           "weights": {"kind": "random", "seed": 9}})
    store.close()
    print(f"built {path} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return path


def build_logmel_store(path: Path, n_clips: int) -> Path:
    """A small log-mel store [n_clips, 10, 256, 94] for the spectrogram CNN (a full one would be 5.9 GB)."""
    from featurestore.store import create_store, open_store

    if (path / "zarr.json").exists():
        with open_store(path) as store:
            sets = store.feature_sets()
            if store.n_clips == n_clips and "logmel" in sets and sets["logmel"].n_done == n_clips:
                return path
    store = create_store(path, _manifest(n_clips, 10, 1))
    _fill(store, "logmel", 10, (256, 94), 3, "logmel")
    store.close()
    return path


# -------------------------------------------------------------------------------------- cases
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_DEVICE = "auto"  # set from --device in run_case: every case trains where the user asked


def _train_cfg(head: str, features: list[str], out: Path, **kw):
    from heads.config import TrainConfig

    return TrainConfig(head=head, features=features, train_split="fold1_train", val_split=None, out=str(out),
                       epochs=1, progress=False, device=_DEVICE, **kw)


def _train_segments(store, feature: str) -> int:
    """Segments in the training split (samples of one epoch, before dropping the last partial batch)."""
    return len(store.select(split="fold1_train")) * store.feature_sets()[feature].n_segments


def _epoch_seconds(result) -> float:
    return float(result.history[-1]["seconds"])


def case_late_fusion_memory(store_path: Path, out: Path) -> dict:
    """The trainer's epoch on float32 tensors loaded beforehand (loading not timed)."""
    import torch

    import heads
    from featurestore.store import open_store
    from featurestore.torchdata import StoreDataset, TensorBatches
    from heads.train import build_head

    with open_store(store_path) as store:
        ds = StoreDataset(store, list(CLIP_SETS), split="fold1_train", batch_size=100_000, require_labels=True)
        parts = list(ds)
        inputs = [torch.cat([b.inputs[i] for b in parts]) for i in range(len(CLIP_SETS))]
        labels = torch.cat([b.labels for b in parts])
        head, identity = build_head(_train_cfg("late_fusion", list(CLIP_SETS), out), store)
    cfg = _train_cfg("late_fusion", list(CLIP_SETS), out)
    loader = TensorBatches(inputs, labels, head.default_batch_size, shuffle=True, drop_last=True)
    result = heads.fit(head, loader, None, cfg, identity, overwrite=True)
    return {"seconds": _epoch_seconds(result), "samples": int(labels.shape[0])}


def case_late_fusion_store(store_path: Path, out: Path, cache: bool = False) -> dict:
    """The trainer's epoch streamed from the store (``cache=True``: loaded into memory first, not timed),
    with the loaders ``heads train`` builds: batches in the stored float16, made float32 on the device."""
    import heads
    from featurestore.encoders import resolve_device
    from featurestore.store import open_store
    from heads.train import build_head, make_loaders

    with open_store(store_path) as store:
        cfg = _train_cfg("late_fusion", list(CLIP_SETS), out, cache=cache)
        head, identity = build_head(cfg, store)
        train_loader, _ = make_loaders(cfg, store, head, resolve_device(cfg.device))
        if cache:
            train_loader._load_cache()
        result = heads.fit(head, train_loader, None, cfg, identity, overwrite=True)
        return {"seconds": _epoch_seconds(result), "samples": train_loader.n_samples}


def case_read_only(store_path: Path, out: Path) -> dict:
    """Only the reading: one shuffled epoch of late-fusion batches from the store, no model."""
    from featurestore.store import open_store
    from featurestore.torchdata import StoreDataset

    with open_store(store_path) as store:
        ds = StoreDataset(store, list(CLIP_SETS), split="fold1_train", batch_size=48, shuffle=True, drop_last=True)
        started = time.perf_counter()
        n = sum(len(b) for b in ds)
        return {"seconds": time.perf_counter() - started, "samples": n}


def case_embedding(store_path: Path, out: Path, head: str) -> dict:
    import heads
    from featurestore.store import open_store

    with open_store(store_path) as store:
        result = heads.train(_train_cfg(head, ["clip/ViT-B-32"], out), store, overwrite=True)
        return {"seconds": _epoch_seconds(result), "samples": _train_segments(store, "clip/ViT-B-32")}


def case_zero_shot(store_path: Path, out: Path) -> dict:
    """Zero-shot has no epoch: the time of one pass over the training split's frames."""
    import heads
    from featurestore.store import open_store

    with open_store(store_path) as store:
        cfg = _train_cfg("zero_shot", ["clip/ViT-B-32"], out, head_config={"class_features": "cliptext/ViT-B-32"})
        cfg.val_split = "fold1_train"
        result = heads.train(cfg, store, overwrite=True)
        return {"seconds": _epoch_seconds(result), "samples": _train_segments(store, "clip/ViT-B-32")}


def case_spectrogram(store_path: Path, out: Path, backbone: str) -> dict:
    import heads
    from featurestore.store import open_store

    with open_store(store_path) as store:
        cfg = _train_cfg("spectrogram_cnn", ["logmel"], out, head_config={"backbone": backbone})
        result = heads.train(cfg, store, overwrite=True)
        return {"seconds": _epoch_seconds(result), "samples": _train_segments(store, "logmel")}


def run_case(name: str, args: argparse.Namespace) -> dict:
    import torch

    import featurestore.store  # noqa: F401  (the imports-only case measures the RSS of these imports)
    import heads  # noqa: F401

    global _DEVICE
    _DEVICE = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    cache_dir = Path(args.cache_dir)
    clip_store = cache_dir / f"clip_{args.clips}x{args.frames}.zarr"
    logmel_store = cache_dir / f"logmel_{args.spec_clips}.zarr"
    out = cache_dir / "runs" / name
    shutil.rmtree(out, ignore_errors=True)  # a finished run directory would be returned, not retrained
    cases = {
        "imports-only": lambda: {"seconds": 0.0, "samples": None},
        "late_fusion/memory": lambda: case_late_fusion_memory(clip_store, out),
        "late_fusion/store": lambda: case_late_fusion_store(clip_store, out),
        "late_fusion/store-cache": lambda: case_late_fusion_store(clip_store, out, cache=True),
        "read-only/store": lambda: case_read_only(clip_store, out),
        "embedding_mlp/store": lambda: case_embedding(clip_store, out, "embedding_mlp"),
        "linear/store": lambda: case_embedding(clip_store, out, "linear"),
        "zero_shot/store": lambda: case_zero_shot(clip_store, out),
        "spectrogram_cnn/store": lambda: case_spectrogram(logmel_store, out, args.backbone),
    }
    result = cases[name]()
    from featurestore.encoders import resolve_device

    result.update({"case": name, "peak_rss_mb": round(_peak_rss_mb(), 1), "threads": torch.get_num_threads(),
                   "device": str(resolve_device(args.device))})
    return result


# ------------------------------------------------------------------------------------- driver
def _subprocess(name: str, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv, "--case", name], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"case {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default="build/bench_heads", help="where the benchmark stores are made once")
    parser.add_argument("--clips", type=int, default=12291)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--spec-clips", type=int, default=240, help="clips of the log-mel subset store")
    parser.add_argument("--backbone", default="mobilenetv3_small_050", help="timm backbone of the spectrogram CNN case")
    parser.add_argument("--repeats", type=int, default=2, help="alternating store/memory repeats")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per case (0: torch default)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--late-fusion-only", action="store_true",
                        help="only the store-vs-memory late_fusion cases (the hot path), not the other heads")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return 0
    cache_dir = Path(args.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    build_clip_store(cache_dir / f"clip_{args.clips}x{args.frames}.zarr", args.clips, args.frames)
    build_logmel_store(cache_dir / f"logmel_{args.spec_clips}.zarr", args.spec_clips)
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    results: list[dict] = []
    for _ in range(args.repeats):
        for name in ("late_fusion/memory", "late_fusion/store", "late_fusion/store-cache"):
            results.append(_subprocess(name, passthrough))
            print(json.dumps(results[-1]), file=sys.stderr)
    others = () if args.late_fusion_only else ("imports-only", "read-only/store", "embedding_mlp/store",
                                               "linear/store", "zero_shot/store", "spectrogram_cnn/store")
    for name in others:
        results.append(_subprocess(name, passthrough))
        print(json.dumps(results[-1]), file=sys.stderr)
    report(results, args)
    return 0


def report(results: list[dict], args: argparse.Namespace) -> None:
    best: dict[str, dict] = {}
    for r in results:
        if r["case"] not in best or r["seconds"] < best[r["case"]]["seconds"]:
            best[r["case"]] = r
    ratio = best["late_fusion/store"]["seconds"] / best["late_fusion/memory"]["seconds"]
    print(f"\nlate_fusion epoch, store / in-memory tensors: {ratio:.3f}x (floor <= 1.1x); "
          f"{args.clips} clips x {args.frames} frames, fastest of {args.repeats} alternating runs each\n")
    print("| case | device | seconds / epoch | samples / epoch | ms / 1000 samples | peak RSS (MB) | torch threads |")
    print("|---|---|---|---|---|---|---|")
    for name, r in best.items():
        n = r.get("samples")
        per_k = f"{1e6 * r['seconds'] / n:.0f}" if n else ""
        print(f"| {name} | {r['device']} | {r['seconds']:.2f} | {n or ''} | {per_k} | {r['peak_rss_mb']:.0f} | {r['threads']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"ratio_store_over_memory": ratio, "args": vars(args),
                                               "runs": results}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
