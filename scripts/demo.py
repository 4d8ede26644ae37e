"""The main job, end to end, on generated demo data (CPU, random encoder weights, < 10 minutes).

demo dataset (real 48 kHz WAVs + H.264 MP4s in the TAU layout)
  -> featurestore extract  (the paper's encoder set: logmel, frames/64 (the sampled frames themselves; the
                            paper: frames/448), timm/regnetx_064, clip/RN50x4, clip/RN101, clip/ViT-B-32,
                            plus cliptext prompt embeddings; all @none = random weights)
  -> heads train/predict   (A01 log-mel CNN, V01 frame CNN fine-tuned on the stored frames, V01_frozen
                            frame-embedding MLP (the cheap alternative), C04 CLIP late fusion, C03 zero-shot)
  -> fusion report/submit  (E01, E02 = E01 + equation (1), temperature scaling and stacking)

Rerunning resumes: the dataset is kept, extraction skips finished clips, finished training runs are kept.
``--fresh`` starts over. Usage: ``.venv/bin/python scripts/demo.py [--out demo] [--device auto]``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _steps import StepFailed, Transcript, banner, fail, train_and_predict  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "scripts" / "recipes"
# The paper's encoder set with random weights (no model hub is reachable here), plus the text
# towers the zero-shot head needs.
DEMO_ENCODERS = ("logmel,frames/64,timm/regnetx_064@none,clip/RN50x4@none,clip/RN101@none,clip/ViT-B-32@none,"
                 "cliptext/ViT-B-32@none")
HEADS = (("A01", "demo_spectrogram_cnn.json"), ("V01", "demo_frame_cnn.json"),
         ("V01_frozen", "demo_embedding_mlp.json"), ("C04", "demo_late_fusion.json"), ("C03", "demo_zero_shot.json"))
DISCLAIMER = ("These numbers are for the synthetic demo data and RANDOM encoder weights: they say that the "
              "pipeline runs end to end, not how well the paper's system works (paper E02: log-loss 0.149, "
              "accuracy 96.1 % on TAU 2021 fold1).")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "demo", help="working directory (default: ./demo)")
    p.add_argument("--clips-per-class", type=int, default=5, help="demo dataset size (10 classes)")
    p.add_argument("--clips-per-location", type=int, default=2, help="demo clips per recording location")
    p.add_argument("--duration", type=float, default=10.0, help="demo clip length in seconds (TAU: 10)")
    p.add_argument("--frames", type=int, default=2, help="video frames per clip (the paper: 12)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--encoders", default=DEMO_ENCODERS, help="encoder specs for extraction")
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    return p.parse_args(argv)


def make_dataset(data: Path, args: argparse.Namespace) -> None:
    from featurestore.demo import add_dataset_file, make_demo_dataset

    if (data / "meta.csv").exists():
        print(f"demo dataset: reusing {data}")
        add_dataset_file(data)  # a directory from before dataset.json: its clip length for the readers
        return
    if data.exists():
        shutil.rmtree(data)
    print(f"demo dataset: writing {args.clips_per_class * 10} clips of {args.duration:g} s to {data}")
    make_demo_dataset(data, clips_per_class=args.clips_per_class, duration=args.duration,
                      clips_per_location=args.clips_per_location, seed=0)


def run(args: argparse.Namespace) -> Path:
    out = args.out.resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    data, store, runs, report = out / "data", out / "store.zarr", out / "runs", out / "report"
    t = Transcript()

    banner("1/4 demo dataset")
    make_dataset(data, args)
    banner("2/4 extraction into the store (random encoder weights)")
    t.run("featurestore", "extract", data, store, "--encoders", args.encoders, "--frames", str(args.frames),
          "--device", args.device)
    t.run("featurestore", "ls", store)
    banner("3/4 heads: train on fold1_train, pick the best epoch on fold1_evaluate, predict every clip")
    for run_id, recipe in HEADS:
        train_and_predict(t, store, RECIPES / recipe, run_id, runs, args.device, ("--no-progress",))
    banner("4/4 fusion: the paper's rules, equation (1), calibration; report and submission")
    fusion_recipe = RECIPES / "fusion" / "demo_E02.json"
    t.run("fusion", "evaluate", "--store", store, "--recipe", fusion_recipe)
    t.run("fusion", "report", "--store", store, "--recipe", fusion_recipe, "--out", report,
          "--calibration-split", "fold1_evaluate", "--cross-fit", "3")
    t.run("fusion", "submit", "--store", store, "--recipe", fusion_recipe, "--split", "fold1_test",
          "--out", out / "submission.csv")
    print("\n" + t.summary())
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    try:
        report = run(args)
    except StepFailed as err:
        return fail(err)
    banner(f"demo finished in {time.perf_counter() - start:.0f} s\n"
           f"report:     {report / 'report.md'}\n"
           f"submission: {report.parent / 'submission.csv'}\n\n{DISCLAIMER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
