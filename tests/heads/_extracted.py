"""A tiny store extracted from real files, for the tests of classifying files that are in no store.

The demo generator writes 20 clips of 2 s (16 kHz WAV, so decoding resamples to log-mel's 48 kHz, and
64x48 H.264); ``extract`` stores ``logmel`` and a random-weights timm encoder on 2 frames. Built with
featurestore alone, so both the heads and the fusion tests can use it.
"""
from __future__ import annotations

from pathlib import Path

from featurestore.demo import make_demo_dataset
from featurestore.extract import extract

ENCODERS = "logmel,timm/test_resnet@none"
VIDEO_SET = "timm/test_resnet"
FRAMES = 2
DEMO = dict(clips_per_class=2, clips_per_location=1, duration=2.0, sample_rate=16000, width=64, height=48, fps=5,
            progress=False)


def extracted_store(directory: Path) -> tuple[Path, Path]:
    """``(dataset root, store path)`` under ``directory``: every clip's features extracted."""
    root = make_demo_dataset(directory / "dataset", **DEMO)
    store = directory / "store.zarr"
    summary = extract(root, store, ENCODERS, frames=FRAMES, num_workers=0, progress=False)
    if summary.exit_code != 0:
        raise RuntimeError(f"extracting the test dataset failed: {summary.failures}")
    return root, store


def files_of(root: Path, clip_ids: list[str], audio: bool = True, video: bool = True) -> list[Path]:
    """The dataset's files of ``clip_ids``: all audio files first, then all video files."""
    return ([root / "audio" / f"{c}.wav" for c in clip_ids] if audio else []) + \
        ([root / "video" / f"{c}.mp4" for c in clip_ids] if video else [])
