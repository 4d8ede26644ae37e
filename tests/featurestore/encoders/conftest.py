"""Fixtures shared by the encoder tests: a registry snapshot, a tiny CLIP config, test signals."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from featurestore.encoders import Encoder, _registry, create_encoder

TINY_CLIP = "fs-test-tiny-clip"


@pytest.fixture
def clean_registry() -> Iterator[dict]:
    """Let a test register families; restore the registry and the plugin table afterwards."""
    saved = dict(_registry._REGISTRY)
    _registry.refresh_plugins()
    yield _registry._REGISTRY
    _registry._REGISTRY.clear()
    _registry._REGISTRY.update(saved)
    _registry.refresh_plugins()


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Register a CLIP config small enough to build in milliseconds (32 px ViT, 2-layer text tower).

    open_clip reads architecture configs from JSON files; this adds one, as a user would for a
    custom model, so checkpoint and text tests do not need 150M-parameter models.
    """
    import open_clip

    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    path = tmp_path_factory.mktemp("clipcfg") / f"{TINY_CLIP}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return TINY_CLIP


@pytest.fixture(scope="session")
def shared_encoder() -> Callable[[str], Encoder]:
    """Build each (random-weights) spec once per session: big CLIP models take seconds to build."""
    cache: dict[str, Encoder] = {}

    def get(spec: str) -> Encoder:
        if spec not in cache:
            cache[spec] = create_encoder(spec)
        return cache[spec]

    return get


@pytest.fixture(scope="session")
def smooth_frames() -> Callable[..., np.ndarray]:
    """Factory of smooth uint8 frames (see ``make_smooth_frames``)."""
    return make_smooth_frames


@pytest.fixture(scope="session")
def audio_segments() -> Callable[..., np.ndarray]:
    """Factory of test audio segments (see ``make_audio``)."""
    return make_audio


def make_smooth_frames(k: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB frames [k, h, w, 3] made of low-frequency sinusoids (like natural images, unlike noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    frames = []
    for _ in range(k):
        fx, fy, phase = rng.uniform(8, 30), rng.uniform(8, 30), rng.uniform(0, 6)
        frame = np.stack([128 + 100 * np.sin(xx / fx + phase), 128 + 100 * np.cos(yy / fy),
                          128 + 60 * np.sin((xx + yy) / (fx + fy) + phase)], axis=-1)
        frames.append(frame)
    return np.clip(np.round(frames), 0, 255).astype(np.uint8)


def make_audio(n_seg: int = 4, sample_rate: int = 48000, seed: int = 0) -> np.ndarray:
    """float32 [n_seg, sr] segments: white noise, two tones over faint noise, a quiet hum, silence."""
    rng = np.random.default_rng(seed)
    t = np.arange(sample_rate) / sample_rate
    kinds = [
        0.1 * rng.standard_normal(sample_rate),
        np.sin(2 * np.pi * 440 * t) + 0.5 * np.sin(2 * np.pi * 3000 * t) + 0.01 * rng.standard_normal(sample_rate),
        1e-3 * np.sin(2 * np.pi * 100 * t) + 1e-4 * rng.standard_normal(sample_rate),
        np.zeros(sample_rate),
    ]
    return np.stack([kinds[i % len(kinds)] for i in range(n_seg)]).astype(np.float32)

