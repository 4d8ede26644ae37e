"""A tiny real Zarr store with class-separable features, built by the heads tests and their fixtures.

Features have class-dependent means (plus noise), so a head that learns anything is well above
chance; class-prompt embeddings are the class means, so zero-shot works too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from featurestore import ClipRecord, Manifest
from featurestore.store import create_store

CLASSES = ["airport", "bus", "park", "tram"]
N_CLIPS = 64
SEGMENTS = 4
EMBEDDINGS = {"clip/RN50x4": 24, "clip/RN101": 16, "clip/ViT-B-32": 16, "timm/test_resnet": 12}
LOGMEL_SHAPE = (20, 16)  # [n_mels, frames]: small, but at least the delta width (9) in time
FRAMES_SHAPE = (3, 16, 16)  # stored frames (uint8 RGB), for frame_cnn


def provenance(encoder: str, modality: str, seed: int = 0, kind: str = "pretrained") -> dict:
    weights = {"kind": "random", "seed": seed} if kind == "random" else {"kind": "pretrained", "tag": "openai"}
    return {"encoder": encoder, "config": {"modality": modality}, "weights": weights}


def _manifest(n_clips: int) -> Manifest:
    clips = []
    for i in range(n_clips):
        label = CLASSES[i % len(CLASSES)]
        split = "val" if (i // len(CLASSES)) % 4 == 3 else "train"
        clips.append(ClipRecord(clip_id=f"{label}-city-{i // 8}-{i}", label=label, city="city",
                                location=f"city-{i // 8}", splits=frozenset({split})))
    return Manifest("tiny", list(CLASSES), clips, audio_segments=SEGMENTS, video_frames=SEGMENTS)


def build_store(path: Path, n_clips: int = N_CLIPS, seed: int = 0, separation: float = 3.0) -> Path:
    """Write the tiny store at ``path``; the class means are seeded, so rebuilding gives the same store."""
    rng = np.random.default_rng(seed)
    store = create_store(path, _manifest(n_clips))
    labels = np.asarray(store.labels, dtype=np.int64)
    for name, dim in EMBEDDINGS.items():
        means = rng.normal(size=(len(CLASSES), dim))
        data = means[labels][:, None, :] * separation / np.sqrt(dim) * 2 + rng.normal(size=(n_clips, SEGMENTS, dim))
        modality = "video"
        store.create_feature_set(name, SEGMENTS, (dim,), provenance(name + "@openai", modality), chunk_clips=16)
        store.write_rows(name, 0, data.astype(np.float16))
        if name.startswith("clip/"):
            text = "cliptext/" + name.split("/", 1)[1]
            store.write_class_features(text, means.astype(np.float32), provenance(text + "@openai", "text"))
    pattern = rng.normal(size=(len(CLASSES), *LOGMEL_SHAPE))
    logmel = pattern[labels][:, None] * separation + rng.normal(size=(n_clips, SEGMENTS, *LOGMEL_SHAPE))
    store.create_feature_set("logmel", SEGMENTS, LOGMEL_SHAPE,
                             {"encoder": "logmel", "config": {"modality": "audio"}, "weights": {"kind": "parameter-free"}},
                             chunk_clips=16)
    store.write_rows("logmel", 0, (logmel * 10 - 40).astype(np.float16))
    colours = rng.uniform(40, 215, size=(len(CLASSES), 3, 1, 1))  # one colour per class, plus noise
    frames = colours[labels][:, None] + rng.normal(scale=20, size=(n_clips, SEGMENTS, *FRAMES_SHAPE))
    store.create_feature_set("frames/16", SEGMENTS, FRAMES_SHAPE,
                             {"encoder": "frames/16", "config": {"modality": "video"}, "weights": {"kind": "parameter-free"}},
                             dtype="uint8", chunk_clips=16)
    store.write_rows("frames/16", 0, np.clip(frames, 0, 255).astype(np.uint8))
    store.close()
    return path
