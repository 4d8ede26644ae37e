"""Reproduce the paper's Table 2 pipeline on the real TAU Urban Audio-Visual Scenes 2021 data.

Needs the development set on disk, pretrained weights (the hub cache, or local checkpoints given as
``--encoders clip/RN101@/path/RN101.pt,...``) and, realistically, a GPU:

  TAU dev set -> featurestore extract (logmel; frames/448 = the 12 sampled frames per clip, whole frame
                 resized to 448x448, uint8; CLIP RN50x4/RN101/ViT-B-32 image and text towers)
              -> heads: A01-A03 (spectrogram CNNs), V01-V03 (frame_cnn: RegNetX-6.4GF, ResNeSt-50d,
                 HRNet-W18 fine-tuned on the stored frames with the paper's augmentation),
                 C01-C03 (zero-shot), C04 (CLIP late fusion), recipes in scripts/recipes/paper/
              -> fusion: E01, E02 (equation (1)), E02-T (temperature scaling): reports in --out/reports
              -> optional: the evaluation set (--eval-dataset) -> a DCASE submission file.

frames/448 takes 7.2 MB per development clip (12 x 3 x 448 x 448 bytes before compression), about
89 GB for the 12,291 development clips: see docs/encoders.md. ``--frozen-video`` also extracts the
frozen timm embeddings (timm/regnetx_064, timm/resnest50d, timm/hrnet_w18) and trains the cheap
MLP alternatives of scripts/recipes/frozen/ (runs V01_frozen...; not the paper's method).

Usage: .venv/bin/python scripts/reproduce_dcase2021.py --dataset /data/TAU-urban-audio-visual-scenes-2021-development
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _steps import StepFailed, Transcript, banner, fail, train_and_predict  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "scripts" / "recipes" / "paper"
FUSION = REPO / "scripts" / "recipes" / "fusion"
FROZEN = REPO / "scripts" / "recipes" / "frozen"
PAPER_ENCODERS = ("logmel,frames/448,clip/RN50x4,clip/RN101,clip/ViT-B-32,"
                  "cliptext/RN50x4,cliptext/RN101,cliptext/ViT-B-32")
FROZEN_ENCODERS = "timm/regnetx_064,timm/resnest50d,timm/hrnet_w18"
FUSION_RECIPES = ("E01.json", "E02.json", "E02_temperature.json", "A04_V04.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", type=Path, required=True, help="TAU 2021 development directory")
    p.add_argument("--eval-dataset", type=Path, help="TAU 2021 evaluation directory (for a submission)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "dcase2021", help="working directory")
    p.add_argument("--encoders", default=PAPER_ENCODERS,
                   help="encoder specs; add @TAG or @/path/to/checkpoint to each to choose weights")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", default="16", help="clips per extraction batch")
    p.add_argument("--num-workers", default=None, help="decoding processes for extraction")
    p.add_argument("--frozen-video", action="store_true",
                   help=f"also extract {FROZEN_ENCODERS} and train the frozen-embedding MLPs (scripts/recipes/frozen/)")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    return p.parse_args(argv)


def recipes(args: argparse.Namespace) -> list[Path]:
    """The heads recipes this run trains: the paper's, plus the frozen-embedding MLPs when asked."""
    return sorted(PAPER.glob("*.json")) + (sorted(FROZEN.glob("*.json")) if args.frozen_video else [])


def run_id(recipe: Path) -> str:
    """``V01_frame_cnn_...`` -> ``V01``; ``frozen/V01_embedding_mlp_...`` -> ``V01_frozen`` (its ``out``)."""
    head = recipe.name.split("_")[0]
    return f"{head}_frozen" if recipe.parent == FROZEN else head


def extract(t: Transcript, dataset: Path, store: Path, args: argparse.Namespace, frames: str | None) -> None:
    extra = ["--num-workers", args.num_workers] if args.num_workers else []
    extra += ["--frames", frames] if frames else []
    encoders = f"{args.encoders},{FROZEN_ENCODERS}" if args.frozen_video else args.encoders
    t.run("featurestore", "extract", dataset, store, "--encoders", encoders, "--device", args.device,
          "--batch-size", args.batch_size, *extra)
    t.run("featurestore", "verify", store)


def run(args: argparse.Namespace) -> None:
    out = args.out.resolve()
    store, runs, reports = out / "tau2021-dev.zarr", out / "runs", out / "reports"
    t = Transcript(dry_run=args.dry_run)
    banner("1/3 extraction (resumable: rerun the same command after an interruption)")
    extract(t, args.dataset, store, args, frames="12")
    banner("2/3 heads: the paper's A01-A03, V01-V03, C01-C04")
    for recipe in recipes(args):
        train_and_predict(t, store, recipe, run_id(recipe), runs, args.device)
    banner("3/3 fusion: E01, E02, E02 with temperature scaling, and the A04/V04 ablation")
    for name in FUSION_RECIPES:
        t.run("fusion", "report", "--store", store, "--recipe", FUSION / name, "--out", reports / Path(name).stem)
    if args.eval_dataset:
        eval_store = out / "tau2021-eval.zarr"
        banner("evaluation set: extraction, predictions with the trained heads, submission")
        extract(t, args.eval_dataset, eval_store, args, frames="5")  # the paper used 5 frames per test clip
        for recipe in recipes(args):
            name = run_id(recipe)
            t.run("heads", "predict", "--store", eval_store, "--run", runs / name, "--name", name,
                  "--device", args.device, "--overwrite")
        t.run("fusion", "submit", "--store", eval_store, "--recipe", FUSION / "E02.json",
              "--out", out / "submission_E02.csv")
    print("\n" + t.summary())
    print(f"\nreports: {reports}/*/report.md")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except StepFailed as err:
        return fail(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
