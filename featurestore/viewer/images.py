"""PNG pictures of a clip: its frames as one strip, its log-mel as a heat map.

Frames come from a stored ``frames/<size>`` set when the store holds one (no decoding), else they are
decoded from the clip's video file (only a file `featurestore.viewer.media` allows). Pictures are
made with Pillow, which torchvision and matplotlib already need.
"""
from __future__ import annotations

import io
from typing import Any

import numpy as np


def png(rgb: np.ndarray) -> bytes:
    """``uint8 [H, W, 3]`` -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def frame_sets(store: Any) -> list[str]:
    """Stored sets of frames (``uint8 [K, 3, H, W]`` per clip), by name."""
    return [name for name, info in store.feature_sets().items()
            if info.dtype == "uint8" and len(info.feature_shape) == 3 and info.feature_shape[0] == 3]


def logmel_sets(store: Any) -> list[str]:
    """Sets that hold one spectrogram ``[n_mels, frames]`` per segment (the logmel encoder's)."""
    return [name for name, info in store.feature_sets().items()
            if len(info.feature_shape) == 2 and str((info.provenance or {}).get("encoder", name)).startswith("logmel")]


def frame_strip(frames: np.ndarray, channels_first: bool) -> np.ndarray:
    """``[K, 3, H, W]`` or ``[K, H, W, 3]`` -> one ``[H, K*W, 3]`` image, the frames side by side."""
    if channels_first:
        frames = frames.transpose(0, 2, 3, 1)
    return np.concatenate(list(frames), axis=1)


def logmel_image(segments: np.ndarray, height: int = 128) -> np.ndarray:
    """``[n_segments, n_mels, frames]`` -> an RGB heat map (time left to right, low bands at the
    bottom), the segments side by side, scaled to the clip's own range, magma colours."""
    from matplotlib import colormaps

    spec = np.concatenate(list(np.asarray(segments, dtype=np.float32)), axis=1)[::-1]
    finite = np.isfinite(spec)
    lo, hi = (float(spec[finite].min()), float(spec[finite].max())) if finite.any() else (0.0, 1.0)
    scaled = np.where(finite, (spec - lo) / max(hi - lo, 1e-9), 0.0)
    rows = max(1, height // max(1, scaled.shape[0]))
    rgb = colormaps["magma"](np.repeat(scaled, rows, axis=0))[..., :3]
    return (rgb * 255).astype(np.uint8)
