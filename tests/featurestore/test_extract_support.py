"""Shared helpers of the extraction tests: tiny real datasets (WAV + MP4 + meta.csv) and store readers.

Clips are short and small (2 s of 48 kHz stereo noise, 48x64 MPEG-4 video at 4 fps) so that a
whole extraction of a few clips takes about a second on two cores.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from featurestore import TAU_CLASSES, ClipRecord, Manifest, demo
from featurestore.store import open_store

#: Light encoders: the torch log-mel transform and a 0.3M-parameter timm test ViT with seeded weights.
ENCODERS = "logmel,timm/test_vit@none"
FAST = dict(device="cpu", batch_size=2, num_workers=1, chunk_clips=2, progress=False)


def write_wav(path: Path, seconds: float, seed: int, rate: int = 48000) -> Path:
    """Stereo 16-bit noise (a different signal per seed), written by the demo generator's writer."""
    rng = np.random.default_rng(seed)
    data = (0.1 * rng.standard_normal((int(round(seconds * rate)), 2))).astype(np.float32)
    demo.write_wav(path, data, rate, subtype="PCM_16")
    return path


def write_mp4(path: Path, seconds: float, seed: int, fps: int = 4, size: tuple[int, int] = (48, 64)) -> Path:
    """MPEG-4 video of random frames (a different one per seed), written by the demo generator's writer."""
    rng = np.random.default_rng(seed)
    frames = (rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(int(round(seconds * fps))))
    demo.write_mp4(path, frames, fps, width=size[1], height=size[0], codec="mpeg4")
    return path


def clip_id(i: int) -> str:
    """TAU-style name ``scene-city-location-segment``; locations differ per clip."""
    return f"{TAU_CLASSES[i % len(TAU_CLASSES)]}-london-{i}-{100 + i}"


def make_dataset(root: Path, n_clips: int, seconds: float = 2.0, frames: int = 2, rate: int = 48000,
                 fps: int = 4) -> Manifest:
    """Write ``n_clips`` clips and a TAU-style meta.csv under ``root``; return their Manifest.

    Paths in the manifest are relative to ``root`` (as dataset readers give them). With
    ``seconds=10`` the directory is a valid TAU development layout for ``open_dataset``; a low
    ``rate`` keeps such files small (decoding resamples them to the encoders' rate).
    """
    root = Path(root)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    (root / "video").mkdir(parents=True, exist_ok=True)
    clips, lines = [], ["filename_audio\tfilename_video\tscene_label\tidentifier"]
    for i in range(n_clips):
        cid = clip_id(i)
        label = TAU_CLASSES[i % len(TAU_CLASSES)]
        write_wav(root / "audio" / f"{cid}.wav", seconds, seed=i, rate=rate)
        write_mp4(root / "video" / f"{cid}.mp4", seconds, seed=i, fps=fps)
        clips.append(ClipRecord(cid, Path("audio") / f"{cid}.wav", Path("video") / f"{cid}.mp4", label,
                                "london", f"london-{i}", frozenset({"fold1_train"})))
        lines.append(f"audio/{cid}.wav\tvideo/{cid}.mp4\t{label}\tlondon-{i}")
    (root / "meta.csv").write_text("\n".join(lines) + "\n")
    return Manifest("tiny", list(TAU_CLASSES), clips, root, audio_segments=int(round(seconds)),
                    segment_seconds=1.0, video_frames=frames)


def read_all(path: Path | str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every feature set of a store: ``(data of all rows, done mask)``, read without the done check."""
    with open_store(path, "r") as store:
        return {name: (store.read_rows(name, 0, store.n_clips, check_done=False), store.done_mask(name))
                for name in store.feature_sets()}


def assert_same_arrays(a: dict, b: dict) -> None:
    """Same feature sets, same done masks, bit-identical data on done rows."""
    if sorted(a) != sorted(b):
        raise AssertionError(f"feature sets differ: {sorted(a)} vs {sorted(b)}")
    for name in a:
        (da, ma), (db, mb) = a[name], b[name]
        np.testing.assert_array_equal(ma, mb, err_msg=f"{name}: done masks differ")
        np.testing.assert_array_equal(da[ma].view(np.uint16) if da.dtype == np.float16 else da[ma],
                                      db[mb].view(np.uint16) if db.dtype == np.float16 else db[mb],
                                      err_msg=f"{name}: data differ bitwise")
