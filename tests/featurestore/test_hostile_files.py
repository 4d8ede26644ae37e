"""Real extraction over hostile and odd files: each clip is done or has a clear error; the run goes on.

A CSV manifest lists a good clip, a zero-byte WAV, a WAV with a garbage header, an MP4 without a
video stream, an MP4 cut in the middle, a video shorter than one second, 8 kHz mono and 96 kHz
6-channel audio, and names with non-ASCII letters and spaces. Refusals that must come before any
work (a row leading outside the dataset directory, duplicate clip ids) leave no store behind.
"""
from __future__ import annotations

import av
import numpy as np
import pytest
import soundfile as sf
from tests.featurestore.test_extract_support import write_mp4, write_wav

from featurestore.datasets import DatasetFormatError
from featurestore.decode import load_audio_segments, probe_video, resample, sample_frames
from featurestore.encoders import create_encoder
from featurestore.extract import extract
from featurestore.store import open_store

ENCODERS = "logmel,timm/test_vit@none"
FAST = dict(device="cpu", batch_size=2, num_workers=0, chunk_clips=2, progress=False, segments=1, frames=1)
# stored float16 log-mel against float32: the fp16 step at |x| < 128 dB is 1/16 (as in encoders/test_enc_logmel.py)
FP16_LOGMEL_TOLERANCE_DB = 0.07


def _audio_only_mp4(path, seconds: float = 1.0, rate: int = 16000):
    """An MP4 holding one AAC audio stream and no video stream."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        samples = (0.1 * np.sin(np.arange(int(seconds * rate)) / 5.0)).astype(np.float32)
        for start in range(0, len(samples), 1024):
            frame = av.AudioFrame.from_ndarray(samples[None, start:start + 1024], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _noise(path, seconds: float, rate: int, channels: int):
    rng = np.random.default_rng(rate + channels)
    sf.write(str(path), (0.1 * rng.standard_normal((int(seconds * rate), channels))).astype(np.float32), rate)
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """The dataset directory and its manifest rows ``{clip_id: (audio, video)}``."""
    root = tmp_path_factory.mktemp("hostile")
    good_mp4 = write_mp4(root / "good.mp4", 1.0, seed=0)
    write_wav(root / "good.wav", 1.0, seed=0)
    (root / "empty.wav").write_bytes(b"")
    (root / "garbage.wav").write_bytes(b"RIFX\x00\x00\x00\x00WAVEjunk" + bytes(range(256)) * 8)
    _audio_only_mp4(root / "audio_only.mp4")
    whole = write_mp4(root / "whole.mp4", 1.0, seed=1).read_bytes()
    (root / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    write_mp4(root / "short.mp4", 0.25, seed=2)
    _noise(root / "mono8k.wav", 1.0, 8000, 1)
    _noise(root / "six96k.wav", 1.0, 96000, 6)
    write_wav(root / "café scène ü.wav", 1.0, seed=3)
    write_mp4(root / "vidéo à espaces.mp4", 1.0, seed=3)
    rows = {
        "good": ("good.wav", "good.mp4"),
        "empty-wav": ("empty.wav", "good.mp4"),
        "garbage-wav": ("garbage.wav", "good.mp4"),
        "no-video-stream": ("good.wav", "audio_only.mp4"),
        "truncated-mp4": ("good.wav", "truncated.mp4"),
        "short-video": ("good.wav", "short.mp4"),
        "mono-8k": ("mono8k.wav", good_mp4.name),
        "six-channels-96k": ("six96k.wav", good_mp4.name),
        "non-ascii-café": ("café scène ü.wav", "vidéo à espaces.mp4"),
    }
    return root, rows


def _manifest(root, rows: dict, name: str = "clips.csv", extra: list[str] = ()):
    lines = ["clip_id,audio,video"] + [f"{cid},{a},{v}" for cid, (a, v) in rows.items()] + list(extra)
    path = root / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def extracted(hostile, tmp_path_factory):
    """The store extracted from the hostile manifest (once for the module) and the run's summary."""
    root, rows = hostile
    store = tmp_path_factory.mktemp("hostile_store") / "s.zarr"
    return store, extract(_manifest(root, rows), store, ENCODERS, **FAST)


def test_every_clip_is_done_or_has_a_clear_error_and_the_run_goes_on(hostile, extracted) -> None:
    root, rows = hostile
    store, summary = extracted
    with open_store(store) as fs:
        done = {name: dict(zip(fs.clip_ids, fs.done_mask(name))) for name in ("logmel", "timm/test_vit")}
        errors = {name: fs.errors(name) for name in ("logmel", "timm/test_vit")}
        for name in done:
            for cid in rows:
                assert done[name][cid] != (cid in errors[name]), (name, cid)  # one or the other
                if done[name][cid]:
                    assert np.all(np.isfinite(fs.get(name, cid).astype(np.float32))), (name, cid)
        for cid in ("good", "mono-8k", "six-channels-96k", "non-ascii-café"):
            assert done["logmel"][cid] and done["timm/test_vit"][cid], cid
        for cid, fragment in (("empty-wav", "empty.wav"), ("garbage-wav", "garbage.wav")):
            assert fragment in errors["logmel"][cid] and done["timm/test_vit"][cid]
        assert "no video stream" in errors["timm/test_vit"]["no-video-stream"]
        assert "truncated.mp4" in errors["timm/test_vit"]["truncated-mp4"]
        for message in [m for per_set in errors.values() for m in per_set.values()]:
            assert "\n" not in message and "Traceback" not in message and len(message) < 600
        assert fs.verify().ok
    assert summary.clips_failed == len({cid for per_set in errors.values() for cid in per_set})
    assert summary.clips_done == len(rows) - summary.clips_failed and summary.exit_code == 1


def test_a_row_outside_the_dataset_directory_is_refused_before_any_work(hostile, tmp_path) -> None:
    root, rows = hostile
    manifest = _manifest(root, rows, "outside.csv", extra=["escapee,../elsewhere.wav,good.mp4"])
    store = tmp_path / "s.zarr"
    with pytest.raises(DatasetFormatError, match=r"outside.csv, line 11: clip 'escapee': path '../elsewhere.wav'"):
        extract(manifest, store, ENCODERS, **FAST)
    assert not store.exists()


def test_duplicate_clip_ids_are_refused_before_any_work(hostile, tmp_path) -> None:
    root, rows = hostile
    manifest = _manifest(root, rows, "dups.csv", extra=["good,mono8k.wav,good.mp4"])
    store = tmp_path / "s.zarr"
    with pytest.raises(DatasetFormatError, match=r"dups.csv, line 11: clip 'good' already listed on line 2"):
        extract(manifest, store, ENCODERS, **FAST)
    assert not store.exists()


@pytest.mark.parametrize("clip, wav", [("mono-8k", "mono8k.wav"), ("six-channels-96k", "six96k.wav")])
def test_odd_rates_and_channels_store_the_log_mel_of_the_48k_mono_signal(hostile, extracted, clip, wav) -> None:
    """The stored log-mel is that of the file decoded the library's way: channels averaged to mono,
    resampled to 48 kHz (``load_audio_segments``), then the logmel encoder."""
    root, _ = hostile
    store, _ = extracted
    with open_store(store) as fs:
        stored = fs.get("logmel", clip).astype(np.float32)
    encoder = create_encoder("logmel")
    segments = load_audio_segments(root / wav, encoder.sample_rate, 1, encoder.segment_seconds)
    assert segments.shape == (1, 48000)
    expected = encoder.encode(encoder.preprocessor()(segments)).numpy()
    assert stored.shape == expected.shape == (1, 256, 94)
    diff = np.abs(stored - expected).max()
    assert diff < FP16_LOGMEL_TOLERANCE_DB, f"{clip}: max |stored - log-mel of 48 kHz mono| = {diff:.4f} dB"
    if clip == "six-channels-96k":  # the comparison tells channel averaging from taking the first channel
        data, rate = sf.read(str(root / wav), dtype="float32", always_2d=True)
        assert (rate, data.shape[1]) == (96000, 6)
        first = resample(data[:, 0], rate, 48000)[None, :48000]
        other = encoder.encode(encoder.preprocessor()(first)).numpy()
        assert np.abs(stored - other).max() > 1.0


def test_a_video_shorter_than_one_second_stores_the_frame_at_its_middle(hostile, extracted) -> None:
    """Video has no length policy (only audio does): the 0.25 s clip (one frame at 4 fps) is sampled at
    (0 + 0.5) * 0.25 s = 0.125 s, where its only frame is on screen, and that frame's embedding is stored."""
    root, _ = hostile
    store, _ = extracted
    info = probe_video(root / "short.mp4")
    assert (info.duration, info.n_frames) == (0.25, 1)
    with av.open(str(root / "short.mp4")) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    frames = sample_frames(root / "short.mp4", 1)
    assert len(decoded) == 1 and np.array_equal(frames, np.stack(decoded))
    with open_store(store) as fs:
        assert "short-video" not in fs.errors("timm/test_vit") and "short-video" not in fs.errors("logmel")
        assert fs.done_mask("timm/test_vit")[fs.row("short-video")]
        stored = fs.get("timm/test_vit", "short-video").astype(np.float32)
        good = fs.get("timm/test_vit", "good").astype(np.float32)
    encoder = create_encoder("timm/test_vit@none")
    expected = encoder.encode(encoder.preprocessor()(frames)).numpy()
    assert stored.shape == expected.shape and stored.shape[0] == 1
    np.testing.assert_allclose(stored, expected, rtol=1e-2, atol=1e-2)
    assert np.abs(good - expected).max() > 0.1  # another clip's frame would not pass the comparison
