"""The main job, end to end, on generated demo data (CPU, random encoder weights, < 10 minutes).

demo dataset (real 48 kHz WAVs + H.264 MP4s in the TAU layout)
  -> featurestore extract  (the paper's encoder set: logmel, frames/64 (the sampled frames themselves; the
                            paper: frames/448), timm/regnetx_064, clip/RN50x4, clip/RN101, clip/ViT-B-32,
                            plus cliptext prompt embeddings; all @none = random weights)
  -> heads train/predict   (A01 log-mel CNN, V01 frame CNN fine-tuned on the stored frames, V01_frozen
                            frame-embedding MLP (the cheap alternative), C04 CLIP late fusion, C03 zero-shot)
  -> fusion report/submit  (E01, E02 = E01 + equation (1), temperature scaling and stacking)

Rerunning resumes: the dataset is kept, extraction skips finished clips, finished training runs are kept.
The settings a folder was made with are recorded in ``demo_settings.json``: a rerun with other settings
(size, duration, frames, encoders) is refused rather than mixed with the old outputs. ``--fresh`` starts
over (it deletes only a demo folder). Usage: ``.venv/bin/python scripts/demo.py [--out demo] [--device auto]``.
"""
from __future__ import annotations

import argparse
import json
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
SETTINGS_FILE = "demo_settings.json"
DEMO_SEED = 0
DISCLAIMER = ("These numbers are for the synthetic demo data and RANDOM encoder weights: they say that the "
              "pipeline runs end to end, not how well the paper's system works (paper E02: log-loss 0.149, "
              "accuracy 96.1 % on TAU 2021 fold1).")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "demo",
                   help="working directory (default: demo/ in the repository, wherever it is run from)")
    p.add_argument("--clips-per-class", type=int, default=5, help="demo dataset size (10 classes)")
    p.add_argument("--clips-per-location", type=int, default=2, help="demo clips per recording location")
    p.add_argument("--duration", type=float, default=10.0, help="demo clip length in seconds (TAU: 10)")
    p.add_argument("--frames", type=int, default=2, help="video frames per clip (the paper: 12)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--encoders", default=DEMO_ENCODERS, help="encoder specs for extraction")
    p.add_argument("--fresh", action="store_true", help="delete --out first (only a demo folder)")
    return p.parse_args(argv)


class DemoRefused(Exception):
    """--out cannot be used as asked (other settings, not a demo folder): one line says why and what to do."""


def settings(args: argparse.Namespace) -> dict[str, object]:
    """Every option the outputs depend on (the order of the encoders does not matter)."""
    return {"clips_per_class": args.clips_per_class, "clips_per_location": args.clips_per_location,
            "duration": args.duration, "frames": args.frames,
            "encoders": sorted(e.strip() for e in args.encoders.split(",") if e.strip())}


def is_demo_folder(out: Path) -> bool:
    """What ``--fresh`` may delete: an empty folder, or one this script (or an older one) wrote."""
    return (out / SETTINGS_FILE).is_file() or (out / "data" / "demo_config.json").is_file() or not any(out.iterdir())


def wipe(out: Path) -> None:
    """``--fresh``: delete ``out``, refusing anything that is not a demo folder (``--out ~`` would be a disaster)."""
    if not out.exists():
        return
    if not out.is_dir() or not is_demo_folder(out):
        raise DemoRefused(f"--fresh deletes only a demo folder: {out} holds neither {SETTINGS_FILE} nor "
                          f"data/demo_config.json; delete it yourself or choose another --out")
    print(f"--fresh: deleting {out}")
    shutil.rmtree(out)


def recorded_settings(out: Path) -> dict[str, object] | None:
    """The settings ``out`` was made with; None for a new or empty folder."""
    path = out / SETTINGS_FILE
    if out.exists() and not out.is_dir():
        raise DemoRefused(f"--out {out} is a file, not a folder")
    if not path.exists():
        if out.exists() and any(out.iterdir()):
            raise DemoRefused(f"{out} is not empty and has no {SETTINGS_FILE} (another folder, or a demo made by an "
                              f"older demo.py whose settings are unknown): choose another --out, or add --fresh "
                              f"if it is an old demo folder")
        return None
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DemoRefused(f"{path}: unreadable ({err}); add --fresh to start over") from None
    if not isinstance(recorded, dict):
        raise DemoRefused(f"{path}: expected a JSON object; add --fresh to start over")
    return recorded


def prepare_out(out: Path, wanted: dict[str, object], fresh: bool) -> None:
    """Check ``out`` against the settings asked for, then record them (before any work, so an interrupted
    run's rerun is checked too)."""
    from featurestore.atomic_files import atomic_write_text

    if fresh:
        wipe(out)
    recorded = recorded_settings(out)
    if recorded is not None and recorded != wanted:
        keys = list(wanted) + [k for k in recorded if k not in wanted]
        diffs = "; ".join(f"--{k.replace('_', '-')} {recorded.get(k)!r} there, {wanted.get(k)!r} asked"
                          for k in keys if recorded.get(k) != wanted.get(k))
        raise DemoRefused(f"{out} was made with other settings ({diffs}): rerun with its settings to resume, "
                          f"add --fresh to start over, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SETTINGS_FILE, json.dumps(wanted, indent=2) + "\n")


def dataset_complete(data: Path, wanted: dict[str, object]) -> bool:
    """The generator writes ``demo_config.json`` then ``dataset.json`` last: both readable and matching means
    every clip and CSV is there (``meta.csv`` alone is written before the split files)."""
    from featurestore.datasets import DatasetSidecar
    from featurestore.demo import CONFIG_FILE

    try:
        config = json.loads((data / CONFIG_FILE).read_text(encoding="utf-8"))
        DatasetSidecar.read(data / "dataset.json")
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and all(config.get(k) == v for k, v in wanted.items())


def make_dataset(data: Path, args: argparse.Namespace) -> None:
    from featurestore.demo import make_demo_dataset

    wanted = {"clips_per_class": args.clips_per_class, "duration": args.duration,
              "clips_per_location": args.clips_per_location, "seed": DEMO_SEED}
    if dataset_complete(data, wanted):
        print(f"demo dataset: reusing {data}")
        return
    if data.exists():
        print(f"demo dataset: {data} is incomplete (an interrupted run) or not this run's: writing it again")
        shutil.rmtree(data)
    print(f"demo dataset: writing {args.clips_per_class * 10} clips of {args.duration:g} s to {data}")
    make_demo_dataset(data, clips_per_class=args.clips_per_class, duration=args.duration,
                      clips_per_location=args.clips_per_location, seed=DEMO_SEED)


def run(args: argparse.Namespace) -> Path:
    out = args.out.resolve()
    prepare_out(out, settings(args), args.fresh)
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
    except DemoRefused as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # between steps or while writing the dataset (the steps report their own)
        print("\ndemo: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    banner(f"demo finished in {time.perf_counter() - start:.0f} s\n"
           f"report:     {report / 'report.md'}\n"
           f"submission: {report.parent / 'submission.csv'}\n\n{DISCLAIMER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
