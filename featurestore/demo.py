"""A synthetic TAU-layout demo dataset with real WAV and MP4 files, made from a seed.

Why it exists: the real dataset is 34 hours and cannot be downloaded here, yet every part of the
project (readers, decoding, extraction, heads, fusion) should run end to end on real files. The
demo set has the TAU development layout exactly (``audio/``, ``video/``, ``meta.csv``,
``evaluation_setup/fold1_{train,evaluate,test}.csv``) and content a classifier can learn but not
trivially:

* **Sound**: each class has a noise band at its own centre frequency, a tone and an amplitude
  modulation rate; clips jitter all three (neighbouring classes overlap), add a location-specific
  band and pink background noise at a random SNR.
* **Picture**: each class has a hue and a drifting grating of its own orientation and spatial
  frequency; clips jitter them, add a location-specific coloured patch and per-frame noise.
* **Night clips** (``night_fraction``): the picture is dark and low-contrast, nearly uninformative,
  while the sound is unchanged - a case where audio must carry the decision. Which clips are night
  clips is recorded in ``demo_truth.csv``.
* **Locations never cross splits**: every location (``city-locationID``) is entirely in
  ``fold1_train`` or in ``fold1_evaluate``.

Class signatures depend only on the class, not on the seed, so a model trained on one seed's
data applies to another seed's (e.g. :func:`make_demo_eval_dataset`). Everything else is drawn
from ``seed``: the same seed gives byte-identical WAVs and metadata and hands the video encoder
identical frames. The MP4 bytes are not promised: libx264 (single-threaded) encoded identical
frames differently from run to run on a busy machine (up to ~40 levels on a pixel, about 2-4 on
average), so only the decoded pictures' closeness to the synthesized frames is.

Besides the TAU files, a demo directory holds ``demo_truth.csv`` (labels and night flags),
``demo_config.json`` (the generator's parameters, for people: no reader looks at it) and the
generic ``dataset.json`` sidecar with the clip length, which every dataset reader honours, so
that a set of 3 s clips is cut into 3 audio segments. :func:`add_dataset_file` gives a directory
written before the sidecar existed its ``dataset.json``.
"""
from __future__ import annotations

import colorsys
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from featurestore.datasets import DATASET_FILE, DatasetSidecar
from featurestore.manifest import TAU_CLASSES

__all__ = [
    "CITIES", "CONFIG_FILE", "TRUTH_FILE", "DemoClip", "DemoConfig", "add_dataset_file", "class_style",
    "make_demo_dataset", "make_demo_eval_dataset", "plan_clips", "read_demo_truth", "synth_audio",
    "synth_frames", "write_mp4", "write_wav",
]

PathLike = str | os.PathLike

CITIES = ("barcelona", "helsinki", "lisbon", "london", "lyon", "milan", "paris", "prague", "stockholm", "vienna")
TRUTH_FILE = "demo_truth.csv"
CONFIG_FILE = "demo_config.json"  # the generator's parameters; readers use dataset.json instead
#: Encoder options by codec (others get the codec's defaults).
_CODEC_OPTIONS = {"libx264": {"preset": "veryfast", "crf": "23"}}


@dataclass(frozen=True)
class DemoConfig:
    """Parameters of a generated demo dataset (written to ``demo_config.json``).

    Attributes:
        clips_per_class: clips of each of the 10 classes.
        duration: seconds per clip.
        n_cities: cities used (the first n of TAU's ten).
        seed: the seed everything but the class signatures is drawn from.
        sample_rate: audio rate in Hz (files are stereo, 24-bit PCM).
        width: video width in pixels (even).
        height: video height in pixels (even).
        fps: video frame rate.
        night_fraction: share of clips whose picture is dark and nearly uninformative.
        clips_per_location: clips recorded at one location (a location never crosses splits).
        evaluate_fraction: share of each class's locations put into fold1_evaluate.
    """

    clips_per_class: int = 4
    duration: float = 10.0
    n_cities: int = 3
    seed: int = 0
    sample_rate: int = 48000
    width: int = 128
    height: int = 96
    fps: int = 10
    night_fraction: float = 0.2
    clips_per_location: int = 2
    evaluate_fraction: float = 0.3

    def validate(self) -> None:
        """Raise ValueError naming the first parameter that cannot work."""
        checks = [
            (self.clips_per_class >= 1, f"clips_per_class must be >= 1, got {self.clips_per_class}"),
            (self.duration > 0, f"duration must be > 0 s, got {self.duration}"),
            (1 <= self.n_cities <= len(CITIES), f"n_cities must be 1..{len(CITIES)}, got {self.n_cities}"),
            (self.sample_rate >= 8000, f"sample_rate must be >= 8000 Hz, got {self.sample_rate}"),
            (self.width >= 16 and self.height >= 16 and self.width % 2 == 0 and self.height % 2 == 0,
             f"width and height must be even and >= 16 (H.264 4:2:0), got {self.width}x{self.height}"),
            (self.fps >= 1, f"fps must be >= 1, got {self.fps}"),
            (0.0 <= self.night_fraction <= 1.0, f"night_fraction must be in [0, 1], got {self.night_fraction}"),
            (self.clips_per_location >= 1, f"clips_per_location must be >= 1, got {self.clips_per_location}"),
            (0.0 <= self.evaluate_fraction < 1.0, f"evaluate_fraction must be in [0, 1), got {self.evaluate_fraction}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class DemoClip:
    """One planned clip: its id and everything its content is drawn from."""

    clip_id: str
    label: str
    city: str
    location: str
    split: str  # fold1_train or fold1_evaluate ("" for evaluation-layout clips)
    night: bool
    seed: tuple[int, ...]
    location_seed: tuple[int, ...]


# ------------------------------------------------------------------------------------ public API


def make_demo_dataset(
    root: PathLike,
    clips_per_class: int = 4,
    duration: float = 10.0,
    n_cities: int = 3,
    seed: int = 0,
    sample_rate: int = 48000,
    width: int = 128,
    height: int = 96,
    fps: int = 10,
    night_fraction: float = 0.2,
    *,
    clips_per_location: int = 2,
    evaluate_fraction: float = 0.3,
    progress: bool = True,
) -> Path:
    """Write a TAU-development-layout demo dataset under ``root`` (created; must be empty or new).

    Args:
        root: output directory.
        clips_per_class: clips per class (10 classes).
        duration: seconds per clip (TAU: 10).
        n_cities: cities used.
        seed: seed for everything but the class signatures.
        sample_rate: audio sample rate (TAU: 48000).
        width: video width (even).
        height: video height (even).
        fps: video frame rate.
        night_fraction: share of clips with a dark, nearly uninformative picture.
        clips_per_location: clips per recording location.
        evaluate_fraction: share of each class's locations that go to fold1_evaluate (at least
            one location per class whenever a class has two or more).
        progress: show a progress bar and a summary line.

    Returns:
        ``root`` as a Path.
    """
    cfg = DemoConfig(clips_per_class, duration, n_cities, seed, sample_rate, width, height, fps,
                     night_fraction, clips_per_location, evaluate_fraction)
    cfg.validate()
    root = _prepare(root)
    clips = plan_clips(cfg)
    started = time.perf_counter()
    for clip in tqdm(clips, desc="demo dataset", unit="clip", disable=not progress):
        _write_clip(root, clip, cfg)
    _write_metadata(root, clips, cfg)
    n_eval = sum(c.split == "fold1_evaluate" for c in clips)
    if progress and n_eval == 0 and evaluate_fraction > 0:
        print(f"demo dataset: warning: {empty_evaluate_reason(cfg)}", file=sys.stderr)
    if progress:
        print(f"demo dataset: {len(clips)} clips ({len(clips) - n_eval} train, {n_eval} evaluate, "
              f"{sum(c.night for c in clips)} night) of {duration:g} s written to {root} "
              f"in {time.perf_counter() - started:.1f} s")
    return root


def make_demo_eval_dataset(
    root: PathLike,
    n_clips: int = 20,
    duration: float = 1.0,
    seed: int = 1,
    sample_rate: int = 48000,
    width: int = 128,
    height: int = 96,
    fps: int = 10,
    night_fraction: float = 0.2,
    *,
    progress: bool = True,
) -> Path:
    """Write a TAU-evaluation-layout demo set: ``audio/0.wav``, ``video/0.mp4``... and
    ``evaluation_setup/fold1_test.csv`` without labels. The true labels (for scoring a
    submission on demo data) are in ``demo_truth.csv``.
    """
    cfg = DemoConfig(max(1, n_clips // len(TAU_CLASSES)), duration, len(CITIES), seed, sample_rate,
                     width, height, fps, night_fraction, 1, 0.0)
    cfg.validate()
    if n_clips < 1:
        raise ValueError(f"n_clips must be >= 1, got {n_clips}")
    root = _prepare(root)
    rng = np.random.default_rng([seed, 7])
    night = set(rng.permutation(n_clips)[: round(night_fraction * n_clips)].tolist())
    clips = []
    for i in range(n_clips):
        label = TAU_CLASSES[int(rng.integers(len(TAU_CLASSES)))]
        city = CITIES[int(rng.integers(len(CITIES)))]
        clips.append(DemoClip(str(i), label, city, f"{city}-{100 + i}", "", i in night,
                              (seed, 2, i), (seed, 3, i)))
    for clip in tqdm(clips, desc="demo eval dataset", unit="clip", disable=not progress):
        _write_clip(root, clip, cfg)
    _write_table(root / "evaluation_setup" / "fold1_test.csv", ["filename_audio", "filename_video"],
                 [[f"audio/{c.clip_id}.wav", f"video/{c.clip_id}.mp4"] for c in clips])
    _write_truth(root, clips)
    _write_config(root, {**asdict(cfg), "layout": "evaluation", "n_clips": n_clips})
    if progress:
        print(f"demo eval dataset: {n_clips} clips of {duration:g} s written to {root}")
    return root


def read_demo_truth(root: PathLike) -> dict[str, dict[str, object]]:
    """``clip_id -> {scene_label, city, location, split, night}`` from a demo set's truth file."""
    lines = (Path(root) / TRUTH_FILE).read_text().splitlines()
    header = lines[0].split("\t")
    out: dict[str, dict[str, object]] = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split("\t")))
        out[row["clip_id"]] = {"scene_label": row["scene_label"], "city": row["city"],
                               "location": row["location"], "split": row["split"],
                               "night": row["night"] == "1"}
    return out


def add_dataset_file(root: PathLike) -> Path:
    """Write ``dataset.json`` into a demo directory made before the generator wrote one.

    Readers read only ``dataset.json``, so such a directory of clips shorter than 10 s is read
    with TAU's shapes (and extraction finds every clip too short) until this is run once. The
    clip length comes from the directory's ``demo_config.json``; an existing sidecar is kept.

    Returns:
        the sidecar's path.

    Raises:
        ValueError: no readable ``demo_config.json`` with a ``duration`` under ``root``.
    """
    root = Path(root)
    if (root / DATASET_FILE).is_file():
        return root / DATASET_FILE
    config = root / CONFIG_FILE
    try:
        duration = json.loads(config.read_text(encoding="utf-8"))["duration"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{config}: not a demo config with a clip 'duration' ({exc!r})") from exc
    return DatasetSidecar(clip_seconds=duration).write(root)


def empty_evaluate_reason(cfg: DemoConfig) -> str:
    """Why a configuration gives an empty fold1_evaluate, and what to change (heads validate on it)."""
    return (f"fold1_evaluate is empty: clips_per_class={cfg.clips_per_class} with clips_per_location="
            f"{cfg.clips_per_location} gives each class one recording location, and a location never crosses "
            f"splits; heads train validates on fold1_evaluate by default, so use --clips-per-location 1 or "
            f"--clips-per-class {2 * cfg.clips_per_location - 1} or more")


def plan_clips(cfg: DemoConfig) -> list[DemoClip]:
    """Ids, locations, splits and night flags of every clip, before anything is written."""
    rng = np.random.default_rng([cfg.seed, 0])
    cities = CITIES[: cfg.n_cities]
    next_location_id = {city: 1 for city in cities}
    clips: list[DemoClip] = []
    for c, label in enumerate(TAU_CLASSES):
        n_locations = math.ceil(cfg.clips_per_class / cfg.clips_per_location)
        evaluate = set(rng.permutation(n_locations)[: _n_evaluate(n_locations, cfg.evaluate_fraction)].tolist())
        for loc in range(n_locations):
            city = cities[(c + loc) % len(cities)]
            location = f"{city}-{next_location_id[city]}"
            next_location_id[city] += 1
            split = "fold1_evaluate" if loc in evaluate else "fold1_train"
            first = loc * cfg.clips_per_location
            for j in range(first, min(first + cfg.clips_per_location, cfg.clips_per_class)):
                segment = 100 * (c + 1) + j
                clips.append(DemoClip(f"{label}-{location}-{segment}", label, city, location, split, False,
                                      (cfg.seed, 1, c, j), (cfg.seed, 4, c, loc)))
    n_night = round(cfg.night_fraction * len(clips))
    night = set(rng.permutation(len(clips))[:n_night].tolist())
    return [DemoClip(**{**asdict(clip), "night": i in night}) for i, clip in enumerate(clips)]


# ------------------------------------------------------------------------------------ content


@dataclass(frozen=True)
class _ClassStyle:
    """A class's signature in sound and picture (fixed per class, independent of any seed)."""

    band_hz: float        # centre of the class's noise band
    tone_hz: float        # a steady tone
    am_hz: float          # amplitude modulation rate
    hue: float            # 0..1
    angle: float          # grating orientation, radians
    cycles: float         # grating cycles across the frame width
    drift: float          # grating phase speed, cycles per second


def class_style(label: str) -> _ClassStyle:
    """The fixed signature of a TAU class (neighbouring classes are close, on purpose)."""
    c = TAU_CLASSES.index(label)
    return _ClassStyle(
        band_hz=150.0 * 2.0 ** (0.55 * c),
        tone_hz=300.0 * 2.0 ** (0.3 * ((7 * c) % 10)),
        am_hz=0.5 + 0.7 * c,
        hue=c / len(TAU_CLASSES),
        angle=math.radians(18.0 * c),
        cycles=3.0 + 2.0 * (c % 3),
        drift=0.2 + 0.15 * c,
    )


def synth_audio(clip: DemoClip, cfg: DemoConfig) -> np.ndarray:
    """Stereo float audio ``[n, 2]`` in [-1, 1] for one clip."""
    style = class_style(clip.label)
    rng = np.random.default_rng(clip.seed)
    loc_rng = np.random.default_rng(clip.location_seed)
    sr, n = cfg.sample_rate, int(round(cfg.duration * cfg.sample_rate))
    t = np.arange(n) / sr
    band = _band_noise(rng, n, sr, style.band_hz * 2.0 ** rng.normal(0, 0.25), octaves=0.6)
    am = 1.0 + rng.uniform(0.3, 0.6) * np.sin(2 * np.pi * style.am_hz * (1 + rng.normal(0, 0.05)) * t
                                            + rng.uniform(0, 2 * np.pi))
    tone = rng.uniform(0.0, 0.5) * np.sin(2 * np.pi * style.tone_hz * 2.0 ** rng.normal(0, 0.05) * t)
    signal = _unit(band * am) + tone
    location = _unit(_band_noise(loc_rng, n, sr, 2.0 ** loc_rng.uniform(np.log2(100), np.log2(8000)), 0.3))
    background = _unit(_pink_noise(rng, n))
    snr_db = rng.uniform(-3.0, 6.0)
    mix = signal + 0.5 * location + background * 10.0 ** (-snr_db / 20.0)
    delay = int(rng.integers(1, 24))  # a little interaural delay, like a binaural recording
    right = np.roll(mix, delay) + 0.05 * rng.normal(0, 1, n)
    stereo = np.stack([mix, right], axis=1)
    return (stereo / np.abs(stereo).max() * rng.uniform(0.3, 0.9)).astype(np.float64)


def synth_frames(clip: DemoClip, cfg: DemoConfig):
    """Yield ``[height, width, 3]`` uint8 RGB frames of one clip."""
    style = class_style(clip.label)
    rng = np.random.default_rng(clip.seed + (1,))
    loc_rng = np.random.default_rng(clip.location_seed + (1,))
    h, w = cfg.height, cfg.width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    hue = (style.hue + rng.normal(0, 0.04)) % 1.0
    base = np.array(colorsys.hsv_to_rgb(hue, 0.55, 0.75), np.float32) * 255
    angle = style.angle + math.radians(rng.normal(0, 8))
    freq = style.cycles * 2.0 ** rng.normal(0, 0.2) / w
    proj = (xx * math.cos(angle) + yy * math.sin(angle)) * freq
    patch_color = np.array(colorsys.hsv_to_rgb(loc_rng.uniform(), 0.8, 0.9), np.float32) * 255
    py, px = int(loc_rng.integers(0, h // 2)), int(loc_rng.integers(0, w // 2))
    phase0 = rng.uniform(0, 1)
    night_level = rng.uniform(6.0, 20.0)  # drawn for every clip, so day clips' noise is unchanged
    for i in range(int(round(cfg.duration * cfg.fps))):
        grating = np.sin(2 * np.pi * (proj + phase0 + style.drift * i / cfg.fps))[..., None]
        img = base + 45.0 * grating
        img[py:py + h // 4, px:px + w // 4] = 0.5 * img[py:py + h // 4, px:px + w // 4] + 0.5 * patch_color
        if clip.night:  # dark, colourless, almost flat: only a trace of the grating survives
            lum = img @ np.array([0.299, 0.587, 0.114], np.float32)
            img = (night_level + 0.003 * (lum - lum.mean()))[..., None] + rng.normal(0, 4.0, img.shape)
        else:
            img = img + rng.normal(0, 12.0, img.shape)
        yield np.clip(img, 0, 255).astype(np.uint8)


def write_wav(path: Path, stereo: np.ndarray, sample_rate: int, *, subtype: str = "PCM_24") -> None:
    """Stereo PCM WAV; the default 24 bits at TAU's 48 kHz is the TAU audio format."""
    import soundfile as sf

    sf.write(str(path), stereo, sample_rate, subtype=subtype, format="WAV")


def write_mp4(path: Path, frames, fps: int, width: int, height: int, *, codec: str = "libx264") -> None:
    """MP4 of RGB frames: yuv420p, a keyframe at least every second, single-threaded for reproducibility.

    The default codec is H.264 (libx264), as TAU's video; tests use ``"mpeg4"`` for speed.
    """
    import av

    container = av.open(str(path), "w")
    try:
        stream = container.add_stream(codec, rate=fps, options=_CODEC_OPTIONS.get(codec, {}))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = fps
        stream.codec_context.thread_count = 1
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()


# ------------------------------------------------------------------------------------ files


def _n_evaluate(n_locations: int, fraction: float) -> int:
    if n_locations < 2 or fraction <= 0:
        return 0
    return min(n_locations - 1, max(1, round(fraction * n_locations)))


def _prepare(root: PathLike) -> Path:
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not empty; the demo dataset needs a new directory")
    for sub in ("audio", "video", "evaluation_setup"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def _write_clip(root: Path, clip: DemoClip, cfg: DemoConfig) -> None:
    write_wav(root / "audio" / f"{clip.clip_id}.wav", synth_audio(clip, cfg), cfg.sample_rate)
    write_mp4(root / "video" / f"{clip.clip_id}.mp4", synth_frames(clip, cfg), cfg.fps, cfg.width, cfg.height)


def _write_metadata(root: Path, clips: list[DemoClip], cfg: DemoConfig) -> None:
    files = {c.clip_id: [f"audio/{c.clip_id}.wav", f"video/{c.clip_id}.mp4"] for c in clips}
    _write_table(root / "meta.csv", ["filename_audio", "filename_video", "scene_label", "identifier"],
                 [files[c.clip_id] + [c.label, c.location] for c in clips])
    for split, with_label in (("fold1_train", True), ("fold1_evaluate", True), ("fold1_test", False)):
        members = [c for c in clips if c.split == ("fold1_train" if split == "fold1_train" else "fold1_evaluate")]
        header = ["filename_audio", "filename_video"] + (["scene_label"] if with_label else [])
        _write_table(root / "evaluation_setup" / f"{split}.csv", header,
                     [files[c.clip_id] + ([c.label] if with_label else []) for c in members])
    _write_truth(root, clips)
    _write_config(root, {**asdict(cfg), "layout": "development"})


def _write_config(root: Path, config: dict[str, object]) -> None:
    """The generator's parameters, and the clip length in the sidecar every reader honours."""
    (root / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    DatasetSidecar(clip_seconds=config["duration"]).write(root)


def _write_truth(root: Path, clips: list[DemoClip]) -> None:
    _write_table(root / TRUTH_FILE, ["clip_id", "scene_label", "city", "location", "split", "night"],
                 [[c.clip_id, c.label, c.city, c.location, c.split, str(int(c.night))] for c in clips])


def _write_table(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


def _band_noise(rng: np.random.Generator, n: int, sr: int, centre_hz: float, octaves: float) -> np.ndarray:
    """White noise shaped by a Gaussian bump in log-frequency around ``centre_hz``."""
    spectrum = np.fft.rfft(rng.normal(0, 1, n))
    f = np.fft.rfftfreq(n, 1 / sr)
    f[0] = f[1]
    spectrum *= np.exp(-0.5 * (np.log2(f / centre_hz) / octaves) ** 2)
    return np.fft.irfft(spectrum, n)


def _pink_noise(rng: np.random.Generator, n: int) -> np.ndarray:
    spectrum = np.fft.rfft(rng.normal(0, 1, n))
    k = np.arange(len(spectrum), dtype=np.float64)
    k[0] = 1.0
    return np.fft.irfft(spectrum / np.sqrt(k), n)
