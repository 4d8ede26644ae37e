"""Benchmark ``heads classify`` of one 10 s clip against the encoders' own time on the same files.

    python scripts/bench/bench_classify.py                          # 1280x720, 12 frames, 1 torch thread
    python scripts/bench/bench_classify.py --width 128 --height 96  # the demo's size

Floor (issue 10): classifying one clip with ``logmel`` + one small frame encoder costs at most 1.3x
what the encoders themselves cost on that clip.

Setup, made once under ``--cache-dir``: a small synthetic TAU-layout training set (``make_demo_dataset``,
10 clips of 10 s at the demo's 128x96), extracted with ``logmel`` and ``--frame-encoder`` (12 frames per
clip), two runs trained on it for a few steps, ``A`` (spectrogram_cnn on log-mel, backbone
``--backbone``) and ``V`` (embedding_mlp on the frame embeddings), and the clip to classify: one 10 s
clip at ``--width`` x ``--height`` (``make_demo_eval_dataset``; 48 kHz stereo WAV, H.264 MP4). The frame
encoder resizes every frame to its own input size, so runs trained at 128x96 take 720p frames. Audio
and video runs are separate because a head takes feature sets of one segment count (10 audio
segments, 12 frames).

Measured, warm (each ``Classifier`` built once, one untimed call first), alternating ``--repeats``
times, fastest of each:

* ``classify``: ``Classifier(A).classify([x.wav])`` + ``Classifier(V).classify([x.mp4])`` (decode,
  preprocess, encode and cast through ``FileEncoder``, the head per segment, the segment mean);
* ``encoders``: the same encoders (``create_encoder`` of the same specs) called directly on the same
  files: ``load_audio_segments`` + the log-mel preprocessor + ``encode``, and ``sample_frames`` + the
  frame preprocessor + ``encode``; nothing else.

* ``heads``: the two heads' ``predict_proba`` alone on the clip's features (part of ``classify``, not of
  the encoders: what is left of classify after encoders and heads is the plumbing).

The ratio classify / encoders is printed with the stage times behind it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

FLOOR = 1.3
FRAMES = 12


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/avscene-bench-classify"),
                   help="where the dataset, store and runs are made once (default: %(default)s)")
    p.add_argument("--width", type=int, default=1280, help="video width (default: %(default)s)")
    p.add_argument("--height", type=int, default=720, help="video height (default: %(default)s)")
    p.add_argument("--fps", type=int, default=10, help="video frame rate (default: %(default)s)")
    p.add_argument("--frame-encoder", default="timm/mobilenetv3_small_050@none",
                   help="frame encoder spec (default: %(default)s)")
    p.add_argument("--backbone", default="test_resnet", help="spectrogram_cnn backbone (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--json", type=Path, help="also write the numbers as JSON")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[Path, Path, dict[str, Path]]:
    """The clip to classify, the training store and the two runs under the cache directory (reused)."""
    from featurestore.demo import make_demo_dataset, make_demo_eval_dataset
    from featurestore.extract import extract

    import heads

    clip = args.cache_dir / f"clip-{args.width}x{args.height}@{args.fps}"
    if not (clip / "video" / "0.mp4").exists():
        make_demo_eval_dataset(clip, n_clips=1, duration=10.0, width=args.width, height=args.height, fps=args.fps,
                               progress=False)
    root = args.cache_dir / "train-128x96"
    if not (root / "meta.csv").exists():
        make_demo_dataset(root, clips_per_class=1, duration=10.0, clips_per_location=1, progress=False)
    store = args.cache_dir / f"store-{args.frame_encoder.replace('/', '_').replace('@', '_')}.zarr"
    if extract(root, store, f"logmel,{args.frame_encoder}", frames=FRAMES, num_workers=0,
               progress=False).exit_code:
        raise SystemExit(f"extraction into {store} failed")
    frame_set = args.frame_encoder.split("@")[0]
    common = dict(store=str(store), train_split="fold1_train", val_split=None, device="cpu", progress=False,
                  batch_size=4, epochs=1, max_steps_per_epoch=2)
    runs = {"A": heads.TrainConfig(head="spectrogram_cnn", features=["logmel"],
                                   head_config={"backbone": args.backbone}, **common),
            "V": heads.TrainConfig(head="embedding_mlp", features=[frame_set], **common)}
    out = {}
    for name, cfg in runs.items():
        cfg.out = str(store.with_name(store.stem + f"-run{name}"))
        heads.train(cfg)
        out[name] = Path(cfg.out)
    return clip, store, out


def encoders_alone(audio: Path, video: Path, logmel, frames, n_segments: int) -> dict[str, float]:
    """Decode, preprocess and encode one clip with the encoders themselves; seconds per stage."""
    from featurestore.decode import load_audio_segments, sample_frames

    t = {}
    t0 = time.perf_counter()
    segments = load_audio_segments(audio, logmel.sample_rate, n_segments, logmel.segment_seconds)
    t["decode audio"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    x = logmel.preprocessor()(segments)
    t["preprocess audio"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    logmel.encode(x)
    t["encode logmel"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pictures = sample_frames(video, FRAMES)
    t["decode frames"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    y = frames.preprocessor()(pictures)
    t["preprocess frames"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    frames.encode(y)
    t["encode frames"] = time.perf_counter() - t0
    return t


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    root, store, runs = prepare(args)
    setup = time.perf_counter() - started

    from featurestore import open_store
    from featurestore.encoders import create_encoder
    from heads.classify import Classifier

    with open_store(store) as fs:
        n_segments = fs.feature_info("logmel").n_segments
    clip = "0"
    audio, video = root / "audio" / "0.wav", root / "video" / "0.mp4"
    classifiers = {name: Classifier(run, "cpu") for name, run in runs.items()}
    logmel, frames = create_encoder("logmel", "cpu"), create_encoder(args.frame_encoder, "cpu")

    def classify_once() -> tuple[float, dict[str, float]]:
        t0 = time.perf_counter()
        a = classifiers["A"].classify([audio])
        v = classifiers["V"].classify([video])
        seconds = time.perf_counter() - t0
        if a.errors or v.errors or len(a.clips) != 1 or len(v.clips) != 1:
            raise SystemExit(f"classify failed: {a.errors or v.errors}")
        return seconds, {}

    features = {"A": classifiers["A"].encoder.encode([audio]).features,
                "V": classifiers["V"].encoder.encode([video]).features}

    def heads_once() -> float:
        t0 = time.perf_counter()
        for name, c in classifiers.items():
            c.trained.predict_proba(features[name])
        return time.perf_counter() - t0

    classify_once()  # warm: first calls allocate, build the CSR filterbank, fill caches
    encoders_alone(audio, video, logmel, frames, n_segments)
    heads_once()
    best_classify, best_encoders, best_heads, stages = float("inf"), float("inf"), float("inf"), {}
    for _ in range(args.repeats):
        best_classify = min(best_classify, classify_once()[0])
        t = encoders_alone(audio, video, logmel, frames, n_segments)
        if sum(t.values()) < best_encoders:
            best_encoders, stages = sum(t.values()), t
        best_heads = min(best_heads, heads_once())
    ratio = best_classify / best_encoders
    plumbing = best_classify - best_encoders - best_heads
    result = {"clip": clip, "video": f"{args.width}x{args.height} @ {args.fps} fps, {FRAMES} frames",
              "audio_segments": n_segments, "frame_encoder": args.frame_encoder, "backbone": args.backbone,
              "threads": args.threads, "repeats": args.repeats, "classify_s": round(best_classify, 4),
              "encoders_s": round(best_encoders, 4), "heads_s": round(best_heads, 4),
              "plumbing_s": round(plumbing, 4), "encoder_stages_s": {k: round(v, 4) for k, v in stages.items()},
              "ratio": round(ratio, 3), "floor": FLOOR, "met": ratio <= FLOOR, "setup_s": round(setup, 1),
              "load_average": [round(x, 2) for x in os.getloadavg()]}
    print(f"classify one {args.width}x{args.height} 10 s clip (logmel + {args.frame_encoder}, {args.threads} thread): "
          f"{best_classify * 1000:.0f} ms vs the encoders alone {best_encoders * 1000:.0f} ms -> {ratio:.2f}x "
          f"(floor {FLOOR}x: {'met' if ratio <= FLOOR else 'NOT met'})")
    print("  encoder stages: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in stages.items()))
    print(f"  inside classify: heads' forward {best_heads * 1000:.0f} ms (spectrogram_cnn on {n_segments} segments + "
          f"embedding_mlp), the rest (grouping, decoder, batching, cast, mean) {plumbing * 1000:.0f} ms")
    print(f"  setup (dataset, extraction, 2 runs; cached): {setup:.1f} s; load average "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
