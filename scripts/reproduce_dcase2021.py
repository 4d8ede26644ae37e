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

Before any work it checks, in seconds: that --encoders extracts every feature set the recipes read, that
the development set (labelled fold1_train and fold1_evaluate) and the evaluation set (fold1_test) read and
have every listed file, and that a store left in --out by an earlier run holds the same dataset.

Usage: .venv/bin/python scripts/reproduce_dcase2021.py --dataset /data/TAU-urban-audio-visual-scenes-2021-development
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _steps import PreflightError, StepFailed, Transcript, banner, fail, train_and_predict  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "scripts" / "recipes" / "paper"
FUSION = REPO / "scripts" / "recipes" / "fusion"
FROZEN = REPO / "scripts" / "recipes" / "frozen"
PAPER_ENCODERS = ("logmel,frames/448,clip/RN50x4,clip/RN101,clip/ViT-B-32,"
                  "cliptext/RN50x4,cliptext/RN101,cliptext/ViT-B-32")
FROZEN_ENCODERS = "timm/regnetx_064,timm/resnest50d,timm/hrnet_w18"
FUSION_RECIPES = ("E01.json", "E02.json", "E02_temperature.json", "A04_V04.json")
DEV_STORE, EVAL_STORE = "tau2021-dev.zarr", "tau2021-eval.zarr"
EVAL_SPLIT = "fold1_test"  # the evaluation set's one split (no labels): what the submission covers


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


def needed_features(recipe: Path) -> set[str]:
    """The feature sets (and class-prompt sets, for zero-shot) a heads recipe reads from the store."""
    import heads

    try:
        cfg = heads.TrainConfig.from_json(recipe)
    except (OSError, ValueError, TypeError) as err:
        raise PreflightError(f"recipe {recipe}: {err}") from None
    extra = cfg.head_config.get("class_features")
    return set(cfg.features) | ({extra} if extra else set())


def check_encoders(encoders: str, recipes: list[Path]) -> None:
    """Every feature set the recipes train on is extracted: a missing one would stop the run at its
    recipe, after hours of extraction and of the recipes before it."""
    from featurestore.extract.request import requests

    try:
        extracted = {r.name for r in requests(encoders)}
    except ValueError as err:
        raise PreflightError(f"--encoders: {err}") from None
    missing = {}
    for recipe in recipes:
        for name in sorted(needed_features(recipe) - extracted):
            missing.setdefault(name, []).append(recipe.name)
    if missing:
        shown = "; ".join(f"{name} (needed by {', '.join(names)})" for name, names in missing.items())
        raise PreflightError(f"--encoders does not extract {shown}: add them to --encoders")


def check_dataset(path: Path, flag: str, splits: tuple[str, ...], labelled: bool) -> Path | None:
    """Read ``path`` as the extraction will (its CSVs, every listed file present) and check that it has the
    splits the run uses, labelled where the heads train or score on them: seconds now, not hours later."""
    from featurestore.datasets import check_files, open_dataset

    try:
        manifest = open_dataset(path)
        check_files(manifest)
    except (OSError, ValueError) as err:
        raise PreflightError(f"{flag} {path}: {err}") from None
    lacking = [s for s in splits if s not in manifest.split_names]
    if lacking:
        raise PreflightError(f"{flag} {path}: no split {', '.join(lacking)} (it has: "
                             f"{', '.join(manifest.split_names) or 'none'})")
    if labelled:
        unlabelled = [c.clip_id for c in manifest.clips if c.label is None and c.splits & set(splits)]
        if unlabelled:
            raise PreflightError(f"{flag} {path}: {len(unlabelled)} clip(s) of {', '.join(splits)} have no label "
                                 f"(e.g. {unlabelled[0]}); the heads train and are scored on these splits")
    return Path(manifest.root).resolve() if manifest.root else None


def check_store_dataset(store: Path, root: Path | None, flag: str) -> None:
    """An existing store (an earlier run into this --out) must hold this dataset only: extract would add
    another dataset's clips to it, and the heads would then train and be scored on both."""
    from featurestore import open_store
    from featurestore.errors import FeatureStoreError

    if root is None or not store.exists():
        return
    try:
        with open_store(store, mode="r") as opened:
            roots = {d.get("dataset_root") for d in opened.attrs.get("datasets", [])} - {"", None}
    except (FeatureStoreError, OSError, ValueError, KeyError):  # left unopenable by a killed run: extract says why
        return
    others = sorted(r for r in roots if Path(r).resolve() != root)
    if others:
        raise PreflightError(f"{store} holds clips of {', '.join(others)}, not of {flag} {root}: choose another "
                             f"--out (extract would add these clips to that store)")


def preflight(args: argparse.Namespace) -> None:
    """What can be checked in seconds before hours of work: recipes against --encoders, and (not for a
    dry run) the development and evaluation sets."""
    encoders = f"{args.encoders},{FROZEN_ENCODERS}" if args.frozen_video else args.encoders
    check_encoders(encoders, recipes(args))
    if args.dry_run:
        return
    out = args.out.resolve()
    root = check_dataset(args.dataset, "--dataset", ("fold1_train", "fold1_evaluate"), labelled=True)
    check_store_dataset(out / DEV_STORE, root, "--dataset")
    if args.eval_dataset:
        root = check_dataset(args.eval_dataset, "--eval-dataset", (EVAL_SPLIT,), labelled=False)
        check_store_dataset(out / EVAL_STORE, root, "--eval-dataset")


def extract(t: Transcript, dataset: Path, store: Path, args: argparse.Namespace, frames: str | None) -> None:
    extra = ["--num-workers", args.num_workers] if args.num_workers else []
    extra += ["--frames", frames] if frames else []
    encoders = f"{args.encoders},{FROZEN_ENCODERS}" if args.frozen_video else args.encoders
    t.run("featurestore", "extract", dataset, store, "--encoders", encoders, "--device", args.device,
          "--batch-size", args.batch_size, *extra)
    t.run("featurestore", "verify", store)


def run(args: argparse.Namespace) -> None:
    out = args.out.resolve()
    store, runs, reports = out / DEV_STORE, out / "runs", out / "reports"
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
        eval_store = out / EVAL_STORE
        banner("evaluation set: extraction, predictions with the trained heads, submission")
        extract(t, args.eval_dataset, eval_store, args, frames="5")  # the paper used 5 frames per test clip
        for recipe in recipes(args):
            name = run_id(recipe)
            t.run("heads", "predict", "--store", eval_store, "--run", runs / name, "--name", name,
                  "--device", args.device, "--overwrite")
        t.run("fusion", "submit", "--store", eval_store, "--recipe", FUSION / "E02.json", "--split", EVAL_SPLIT,
              "--out", out / "submission_E02.csv")
    print("\n" + t.summary())
    print(f"\nreports: {reports}/*/report.md")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        preflight(args)
        run(args)
    except PreflightError as err:
        print(f"reproduce_dcase2021: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # between steps (the steps report their own)
        print("\nreproduce_dcase2021: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except StepFailed as err:
        return fail(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
