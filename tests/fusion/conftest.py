"""A tiny real store (Zarr v3) with feature-set provenance and synthetic prediction runs.

Splits: fold1_train (24 clips), fold1_val (40), fold1_evaluate (40), fold1_test (8, unlabelled).
Runs follow the paper's naming: A01/A02 (log-mel audio, 10 segments, weaker), V01/V02 (frame CNN on
a RANDOM-weight timm encoder, 12 frames, stronger but dark "night" clips are near-uniform), C04 (CLIP
late fusion, pretrained tag). Probabilities are softmax of (signal x one-hot + noise), seeded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featurestore import ClipRecord, Manifest, TAU_CLASSES, create_store
from featurestore.provenance import fingerprint

SPLITS = {"fold1_train": 24, "fold1_val": 40, "fold1_evaluate": 40, "fold1_test": 8}
FEATURES = {
    "logmel": {"encoder": "logmel", "config": {"sr": 48000}, "weights": {}, "segments": {"n": 10}},
    "timm/test_vit": {"encoder": "timm/test_vit@none", "config": {}, "weights": {"kind": "random", "seed": 0},
                      "segments": {"n": 12}},
    "clip/ViT-B-32": {"encoder": "clip/ViT-B-32@openai", "config": {},
                      "weights": {"kind": "pretrained", "tag": "openai"}, "segments": {"n": 12}},
}
RUNS = {  # run -> (feature, n_segments, signal strength, family, fails at night)
    "A01": ("logmel", 10, 2.2, "audio", False),
    "A02": ("logmel", 10, 2.0, "audio", False),
    "V01": ("timm/test_vit", 12, 3.0, "video", True),
    "V02": ("timm/test_vit", 12, 2.6, "video", True),
    "C04": ("clip/ViT-B-32", 12, 2.8, "clip", True),
}


def _manifest() -> Manifest:
    clips = []
    for split, n in SPLITS.items():
        for i in range(n):
            label = TAU_CLASSES[i % len(TAU_CLASSES)]
            city = ["lisbon", "vienna"][i % 2]
            clip_id = f"{label}-{city}-{split}-{i}"
            clips.append(ClipRecord(clip_id=clip_id, label=None if split == "fold1_test" else label,
                                    city=city, location=f"{city}-{split}-{i % 3}", splits=frozenset({split}),
                                    audio=Path("audio") / f"{clip_id}.wav"))
    return Manifest("tiny", list(TAU_CLASSES), clips, root=None, audio_segments=10, video_frames=12)


def _segment_probs(rng: np.random.Generator, labels: np.ndarray, n_segments: int, strength: float,
                   night: np.ndarray) -> np.ndarray:
    n, c = len(labels), len(TAU_CLASSES)
    onehot = np.zeros((n, 1, c))
    onehot[np.arange(n), 0, np.where(labels < 0, 0, labels)] = 1.0
    signal = strength * np.where(night, 0.05, 1.0)[:, None, None]
    clip_noise = rng.normal(0.0, 1.0, size=(n, 1, c))  # shared by the segments: errors that averaging cannot fix
    logits = signal * onehot + clip_noise + rng.normal(0.0, 1.0, size=(n, n_segments, c))
    e = np.exp(logits - logits.max(axis=2, keepdims=True))
    return (e / e.sum(axis=2, keepdims=True)).astype(np.float32)


def build_tiny_store(path: Path, seed: int = 0) -> Path:
    """Write the tiny store at ``path`` and return the path."""
    manifest = _manifest()
    store = create_store(path, manifest)
    rng = np.random.default_rng(seed)
    for name, prov in FEATURES.items():
        store.create_feature_set(name, prov["segments"]["n"], (4,), prov)
    labels = np.asarray(store.labels, dtype=np.int64)
    night = rng.random(len(labels)) < 0.25
    for run, (feature, n_seg, strength, family, fails_at_night) in RUNS.items():
        prov = FEATURES[feature]
        random = prov["weights"].get("kind") == "random"
        attrs = {"head": "embedding_mlp" if family != "audio" else "spectrogram_cnn",
                 "head_config": {"backbone": "test_resnet"} if family == "audio" else {},
                 "features": {feature: fingerprint(prov)}, "train_split": "fold1_train",
                 "val_split": "fold1_val", "family": family, "random_weights": random,
                 "weights_identity": {feature: "RANDOM(seed=0)" if random else "openai"}}
        store.create_predictions(run, n_seg, attrs)
        probs = _segment_probs(rng, labels, n_seg, strength, night & fails_at_night)
        store.write_predictions(run, np.arange(len(labels)), probs)
    store.close()
    return path


@pytest.fixture(scope="session")
def tiny_store_path(tmp_path_factory) -> Path:
    return build_tiny_store(tmp_path_factory.mktemp("fusion") / "tiny.zarr")


@pytest.fixture()
def tiny_store(tiny_store_path):
    from featurestore import open_store

    store = open_store(tiny_store_path, mode="r")
    yield store
    store.close()


@pytest.fixture()
def paper_recipe_dict() -> dict:
    """The paper's E02 on the tiny store's runs."""
    return {
        "name": "E02-tiny",
        "families": {"A04": ["A01", "A02"], "V04": ["V01", "V02"], "C04": ["C04"]},
        "replacement": {"source": "A04", "targets": ["V04", "C04"], "margin": 0.2},
        "class_weights": {"select": {"A04": ["bus", "park", "tram"]}},
        "postprocess": {"method": "eq1"},
    }
