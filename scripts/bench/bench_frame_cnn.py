"""Benchmark frame_cnn's data path: one training epoch fed from the stored frames set vs the same epoch
decoding the MP4s every time vs the same frames held in RAM; and peak memory over N vs 4N clips.

    python scripts/bench/bench_frame_cnn.py                       # defaults below
    python scripts/bench/bench_frame_cnn.py --clips 20 --size 64 --backbone mobilenetv3_small_050

Speed cases (same backbone, same frames, same batches of ``--batch-size`` frames, one epoch each,
through ``heads.train.fit``, the trainer every head uses):

* ``mp4``: each clip's 12 frames are decoded from its MP4 by seeking (``featurestore.decode``) and
  resized to ``--size`` (``frames/<size>``'s own preprocessor) in a DataLoader worker, then shuffled
  within a window of clips and batched: what training without a frames store has to do every epoch.
* ``store``: ``StoreDataset`` over ``frames/<size>`` (what ``heads train`` builds).
* ``store_long`` / ``ram_long``: the store-vs-RAM pair, on a longer epoch: the same real frames repeated
  ``--ram-tile`` times (a store of ``clips x ram-tile`` clips, made once from ``frames/<size>``), read by
  ``StoreDataset`` vs held in RAM by ``TensorBatches`` (loaded and converted to float beforehand, the
  in-memory reference). A 12-batch epoch is too short to compare: fixed costs and scheduler noise on
  a loaded machine swamp it.

Augmentation case (``augment``): the head's training-time input pipeline (``FrameCNN.images``:
scaling, the paper's RandomAffine, GaussianBlur(11), normalisation and RandomErasing) on one batch of
``--batch-size`` random frames at ``--aug-size`` px, batched on the device (ours) vs the same
torchvision v2 transforms called once per frame (what the head did before issue 21, kept here as the
reference), alternating, best of ``--aug-repeats``.

Memory cases: a store of random 448 px frames (``--mem-clips`` N and 4N clips, the paper's frame size),
one frame_cnn epoch streamed from it through ``heads.train`` (default shuffle window cap: 256 MiB of
stored clips, i.e. 37 clips; at most two windows are held, plus the store's 256 MiB chunk cache).
N must be several windows for the comparison to mean anything (default 160 vs 640 clips: 1.2 vs
4.6 GB of frames on disk). To keep CPU time down the head resizes frames to 32 px on the device
before its tiny backbone: the data path carries the full 448 px frames, which is what the memory
question is about.

The dataset (synthetic TAU layout, real H.264 MP4s, ``--width`` x ``--height`` at ``--fps``, 10 s) and
the stores are made once under ``--cache-dir``. Each case runs in its own process for its own peak
RSS; speed cases alternate ``--repeats`` times and the fastest of each is compared.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
FRAMES_PER_CLIP = 12


# ------------------------------------------------------------------------------------- data
def build_dataset(root: Path, args: argparse.Namespace) -> Path:
    from featurestore.demo import make_demo_dataset

    if (root / "meta.csv").exists():
        with open(root / "meta.csv") as f:
            have = sum(1 for _ in f) - 1
        if have != math.ceil(args.clips / 10) * 10:
            raise SystemExit(f"{root} holds {have} clips, not {args.clips}: choose another --cache-dir")
        return root
    make_demo_dataset(root, clips_per_class=math.ceil(args.clips / 10), duration=10.0, width=args.width,
                      height=args.height, fps=args.fps, clips_per_location=1, seed=0, progress=False)
    return root


def build_frames_store(dataset: Path, path: Path, size: int) -> Path:
    from featurestore.datasets import read_tau
    from featurestore.extract import extract

    extract(read_tau(dataset), path, f"frames/{size}", device="cpu", frames=FRAMES_PER_CLIP, progress=False)
    return path


def build_random_store(path: Path, n_clips: int, size: int) -> Path:
    """``n_clips`` clips of random 12-frame uint8 frames at ``size`` (made once)."""
    from featurestore import ClipRecord, Manifest
    from featurestore.store import create_store, open_store

    name = f"frames/{size}"
    if path.exists():
        with open_store(path) as store:
            if name in store.feature_sets() and store.feature_sets()[name].n_done == n_clips:
                return path
    classes = [f"c{i}" for i in range(10)]
    clips = [ClipRecord(f"c{i % 10}-x-{i}-{i}", label=f"c{i % 10}", splits=frozenset({"train"}))
             for i in range(n_clips)]
    store = create_store(path, Manifest("bench", classes, clips, video_frames=FRAMES_PER_CLIP))
    prov = {"encoder": name, "config": {"modality": "video"}, "weights": {"kind": "parameter-free"}}
    info = store.create_feature_set(name, FRAMES_PER_CLIP, (3, size, size), prov, dtype="uint8")
    rng = np.random.default_rng(0)
    step = info.chunk_clips * 8
    for start in range(0, n_clips, step):
        n = min(step, n_clips - start)
        store.write_rows(name, start, rng.integers(0, 256, (n, FRAMES_PER_CLIP, 3, size, size), dtype=np.uint8))
    store.close()
    return path


def build_tiled_store(source: Path, path: Path, size: int, tile: int) -> Path:
    """The clips of ``source`` repeated ``tile`` times (same real frames and labels, made once)."""
    from featurestore import ClipRecord, Manifest
    from featurestore.store import create_store, open_store

    name = f"frames/{size}"
    with open_store(source) as src:
        n = src.n_clips
        data, labels, classes = src.read_rows(name, 0, n), list(src.labels), list(src.classes)
        info = src.feature_info(name)
        prov = info.provenance
    if path.exists():
        with open_store(path) as store:
            if name in store.feature_sets() and store.feature_sets()[name].n_done == n * tile:
                return path
    clips = [ClipRecord(f"{classes[labels[i % n]]}-t-{i}-{i}", label=classes[labels[i % n]],
                        splits=frozenset({"train"})) for i in range(n * tile)]
    store = create_store(path, Manifest("bench", classes, clips, video_frames=FRAMES_PER_CLIP))
    store.create_feature_set(name, FRAMES_PER_CLIP, (3, size, size), prov, dtype="uint8")
    store.write_rows(name, 0, np.concatenate([data] * tile))  # one write: blocks must be whole chunks
    store.close()
    return path


# ------------------------------------------------------------------------------------ loaders
class Mp4Batches:
    """Frames decoded from the MP4s every epoch: a DataLoader worker decodes + resizes clips in a
    shuffled order; frames are shuffled within windows of ``window`` clips and cut into batches."""

    level = "segment"

    def __init__(self, videos: list[str], labels: list[int], size: int, batch_size: int, workers: int,
                 window: int = 8, seed: int = 0):
        self.videos, self.labels, self.size, self.batch_size = videos, labels, size, batch_size
        self.workers, self.window, self.seed, self.epoch = workers, window, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.videos) * FRAMES_PER_CLIP // self.batch_size

    def __iter__(self):
        import torch
        from torch.utils.data import DataLoader

        from featurestore.torchdata import Batch

        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.videos))
        dataset = _DecodedClips([self.videos[i] for i in order], [int(r) for r in order], self.size)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.workers, prefetch_factor=2 if self.workers else None)
        frames, rows = [], []
        emitted = 0
        for x, row in loader:
            frames.append(x)
            rows.append(row)
            if len(frames) < self.window and len(frames) + emitted < len(self.videos):
                continue
            x = torch.cat(frames)
            r = torch.tensor(rows).repeat_interleave(FRAMES_PER_CLIP)
            emitted += len(frames)
            frames, rows = [], []
            perm = torch.from_numpy(rng.permutation(len(x)))
            for pos in range(0, len(x) - self.batch_size + 1, self.batch_size):
                idx = perm[pos:pos + self.batch_size]
                labels = torch.tensor([self.labels[int(i)] for i in r[idx]])
                yield Batch([x[idx].float()], labels, r[idx], torch.zeros(len(idx), dtype=torch.long))


class _DecodedClips:
    """Map-style dataset: clip i -> (uint8 [12, 3, S, S] frames, store row)."""

    def __init__(self, videos: list[str], rows: list[int], size: int):
        self.videos, self.rows, self.size = videos, rows, size

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int):
        from featurestore.decode import sample_frames
        from featurestore.encoders import FrameResize

        return FrameResize(self.size)(sample_frames(self.videos[i], FRAMES_PER_CLIP)), self.rows[i]


# -------------------------------------------------------------------------------------- cases
def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _fit_one_epoch(loader, args: argparse.Namespace, out: Path, size: int, image_size: int | None = None) -> float:
    import heads
    from heads.train import fit

    head_config = {"backbone": args.backbone, "n_classes": 10, "input_shape": [3, size, size],
                   "image_size": image_size}
    cfg = heads.TrainConfig(head="frame_cnn", features=[f"frames/{size}"], out=str(out), epochs=1, val_split=None,
                            batch_size=args.batch_size, lr=0.01, device="cpu", progress=False, head_config=head_config)
    import torch

    torch.manual_seed(0)
    head = heads.create_head("frame_cnn", **head_config)
    started = time.perf_counter()
    fit(head, loader, None, cfg, {"head": "frame_cnn", "bench": True}, overwrite=True)
    return time.perf_counter() - started


def case_speed(kind: str, args: argparse.Namespace) -> dict:
    import torch

    from featurestore.datasets import read_tau
    from featurestore.store import open_store
    from featurestore.torchdata import StoreDataset, TensorBatches

    cache = Path(args.cache_dir)
    store_path = cache / f"frames{args.size}.zarr"
    if kind.endswith("_long"):
        store_path = cache / f"frames{args.size}_x{args.ram_tile}.zarr"
        kind = kind[:-len("_long")]
    name = f"frames/{args.size}"
    out = cache / f"run_{kind}"
    with open_store(store_path) as store:
        rows = np.arange(store.n_clips)
        labels = np.asarray(store.labels, dtype=np.int64)
        if kind == "store":
            loader = StoreDataset(store, [name], level="segment", batch_size=args.batch_size, shuffle=True,
                                  drop_last=True)
            seconds = _fit_one_epoch(loader, args, out, args.size)
        elif kind == "ram":
            data = torch.from_numpy(store.read_rows(name, 0, store.n_clips))
            frames = data.reshape(-1, 3, args.size, args.size)
            loader = TensorBatches([frames], torch.from_numpy(labels).repeat_interleave(FRAMES_PER_CLIP),
                                   args.batch_size, shuffle=True, drop_last=True)
            seconds = _fit_one_epoch(loader, args, out, args.size)
        else:
            manifest = read_tau(cache / "dataset")
            by_id = {c.clip_id: str(manifest.root / c.video) for c in manifest.clips}
            videos = [by_id[cid] for cid in store.clip_ids]
            loader = Mp4Batches(videos, [int(labels[r]) for r in rows], args.size, args.batch_size, args.workers)
            seconds = _fit_one_epoch(loader, args, out, args.size)
        n_frames = len(rows) * FRAMES_PER_CLIP
    case = kind if store_path.name == f"frames{args.size}.zarr" else f"{kind}_long"
    return {"case": case, "seconds": seconds, "frames": n_frames, "peak_rss_mb": _peak_rss_mb()}


def case_memory(n_clips: int, args: argparse.Namespace) -> dict:
    import heads
    from featurestore.store import open_store

    path = Path(args.cache_dir) / f"random{args.mem_size}_{n_clips}.zarr"
    name = f"frames/{args.mem_size}"
    cfg = heads.TrainConfig(head="frame_cnn", features=[name], train_split="train", val_split=None,
                            out=str(Path(args.cache_dir) / f"run_mem{n_clips}"), epochs=1, batch_size=args.batch_size,
                            device="cpu", progress=False,
                            head_config={"backbone": args.backbone, "image_size": 32})
    started = time.perf_counter()
    with open_store(path) as store:
        heads.train(cfg, store, overwrite=True)
    return {"case": f"memory_{n_clips}", "seconds": time.perf_counter() - started,
            "frames": n_clips * FRAMES_PER_CLIP, "peak_rss_mb": _peak_rss_mb()}


def per_frame_reference(head):
    """The per-frame torchvision v2 pipeline the head used before issue 21 (the reference)."""
    from torchvision.transforms import v2

    cfg = head.cfg
    geometric = v2.Compose([v2.RandomAffine(degrees=cfg.affine_degrees, translate=tuple(cfg.affine_translate),
                                            scale=tuple(cfg.affine_scale)),
                            v2.GaussianBlur(cfg.blur_kernel, sigma=tuple(cfg.blur_sigma))])
    erase = v2.RandomErasing(p=cfg.erasing_p)

    def images(frames):
        import torch

        x = torch.stack([geometric(frame) for frame in frames.float() / 255.0])
        return torch.stack([erase(frame) for frame in (x - head.mean) / head.std])

    return images


def case_augment(args: argparse.Namespace) -> dict:
    import torch

    import heads

    size = args.aug_size
    head = heads.create_head("frame_cnn", backbone=args.backbone, n_classes=10, input_shape=[3, size, size]).train()
    frames = torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8).float()
    reference = per_frame_reference(head)
    best = {"batched": math.inf, "per_frame": math.inf}
    for _ in range(args.aug_repeats):
        for kind, fn in (("batched", head.images), ("per_frame", reference)):
            started = time.perf_counter()
            fn(frames)
            best[kind] = min(best[kind], time.perf_counter() - started)
    return {"case": "augment", "seconds": best["batched"], "reference_seconds": best["per_frame"],
            "frames": args.batch_size, "peak_rss_mb": _peak_rss_mb()}


def run_case(name: str, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    if name == "augment":
        return case_augment(args)
    if name.startswith("memory_"):
        return case_memory(int(name.split("_")[1]), args)
    return case_speed(name, args)


def _subprocess(name: str, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv, "--case", name], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache-dir", default=str(REPO / "build" / "bench_frame_cnn"))
    p.add_argument("--clips", type=int, default=20, help="clips of the speed cases (10 s MP4s)")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--size", type=int, default=64, help="stored frame size of the speed cases")
    p.add_argument("--backbone", default="mobilenetv3_small_050")
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers decoding MP4s in the mp4 case")
    p.add_argument("--ram-tile", type=int, default=10,
                   help="the store-vs-RAM pair runs on the speed clips repeated this many times")
    p.add_argument("--mem-clips", type=int, default=160, help="N of the memory cases (N and 4N clips)")
    p.add_argument("--mem-size", type=int, default=448)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--aug-size", type=int, default=448, help="frame size of the augmentation case (the paper's)")
    p.add_argument("--aug-repeats", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    return args, passthrough


def main(argv: list[str] | None = None) -> int:
    args, passthrough = parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return 0
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dataset = build_dataset(cache / "dataset", args)
    store = cache / f"frames{args.size}.zarr"
    if not store.exists():
        build_frames_store(dataset, store, args.size)
    build_tiled_store(store, cache / f"frames{args.size}_x{args.ram_tile}.zarr", args.size, args.ram_tile)
    print(f"data ready in {time.perf_counter() - t0:.0f} s", flush=True)
    results = [_subprocess("augment", passthrough)]
    print(json.dumps(results[-1]), flush=True)
    for _ in range(args.repeats):
        for name in ("mp4", "store", "store_long", "ram_long"):
            results.append(_subprocess(name, passthrough))
            print(json.dumps(results[-1]), flush=True)
    if not args.skip_memory:
        for n in (args.mem_clips, 4 * args.mem_clips):
            build_random_store(cache / f"random{args.mem_size}_{n}.zarr", n, args.mem_size)
            results.append(_subprocess(f"memory_{n}", passthrough))
            print(json.dumps(results[-1]), flush=True)
    summary = summarise(results, args)
    print(summary["text"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, **summary}, indent=2))
    return 0 if summary["floors_met"] else 1


def summarise(results: list[dict], args: argparse.Namespace) -> dict:
    best = {k: min(r["seconds"] for r in results if r["case"] == k)
            for k in ("mp4", "store", "store_long", "ram_long")}
    mp4_ratio = best["mp4"] / best["store"]
    ram_ratio = best["store_long"] / best["ram_long"]
    lines = [f"frame_cnn epoch, {args.clips} clips x {FRAMES_PER_CLIP} frames at {args.size} px, {args.backbone}, "
             f"batch {args.batch_size}, {args.threads} thread(s), fastest of {args.repeats}:",
             f"  decoding MP4s {best['mp4']:.2f} s | stored frames {best['store']:.2f} s",
             f"  store is {mp4_ratio:.1f}x faster than decoding MP4s (floor >= 5x)",
             f"  {args.clips * args.ram_tile} clips (x{args.ram_tile}): stored frames {best['store_long']:.2f} s | "
             f"in RAM {best['ram_long']:.2f} s",
             f"  store / RAM = {ram_ratio:.2f}x (floor <= 1.2x)"]
    ok = mp4_ratio >= 5 and ram_ratio <= 1.2
    augment = next((r for r in results if r["case"] == "augment"), None)
    aug_ratio = None
    if augment is not None:
        aug_ratio = augment["reference_seconds"] / augment["seconds"]
        lines.append(f"  augmentation of a batch of {augment['frames']} frames at {args.aug_size} px: batched "
                     f"{augment['seconds'] * 1e3:.0f} ms | per-frame torchvision "
                     f"{augment['reference_seconds'] * 1e3:.0f} ms: {aug_ratio:.1f}x faster (best of {args.aug_repeats})")
    memory = [r for r in results if r["case"].startswith("memory_")]
    mem_ratio = None
    if len(memory) == 2:
        mem_ratio = memory[1]["peak_rss_mb"] / memory[0]["peak_rss_mb"]
        lines.append(f"  peak RSS {memory[0]['case']} {memory[0]['peak_rss_mb']:.0f} MB, {memory[1]['case']} "
                     f"{memory[1]['peak_rss_mb']:.0f} MB: {mem_ratio:.2f}x (floor <= 1.2x)")
        ok = ok and mem_ratio <= 1.2
    return {"best_seconds": best, "mp4_over_store": mp4_ratio, "store_over_ram": ram_ratio,
            "augment_speedup": aug_ratio,
            "memory_ratio": mem_ratio, "floors_met": ok, "text": "\n".join(lines)}


if __name__ == "__main__":
    sys.exit(main())
