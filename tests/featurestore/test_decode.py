"""Decoding of real WAV and video files written by the tests themselves."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from featurestore.decode import DecodeError, load_audio, load_audio_segments, probe_video, sample_frames, sample_times
from featurestore.decode._parallel_seek import _balanced_split, independent_groups
from featurestore.decode.video import _open_video, _sample_frames, _Sampler

SR = 48000


def _wav(path: Path, data: np.ndarray, rate: int = SR, subtype: str = "PCM_24") -> Path:
    sf.write(str(path), data, rate, subtype=subtype)
    return path


def _noise(seconds: float, channels: int = 2, rate: int = SR, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-0.5, 0.5, (int(round(seconds * rate)), channels))


# ------------------------------------------------------------------------------------------ audio


def test_stereo_24bit_ten_seconds_gives_ten_mono_segments(tmp_path):
    data = _noise(10.0)
    path = _wav(tmp_path / "a.wav", data)
    segs = load_audio_segments(path, SR, 10)
    assert segs.shape == (10, SR) and segs.dtype == np.float32
    expected = data.mean(axis=1).reshape(10, SR)
    np.testing.assert_allclose(segs, expected, atol=2.0 ** -22)  # 24-bit quantisation, not 16-bit


def test_mono_and_six_channel_files_are_averaged(tmp_path):
    mono = _noise(1.0, channels=1)
    six = _noise(1.0, channels=6, seed=1)
    np.testing.assert_allclose(load_audio(_wav(tmp_path / "m.wav", mono), SR), mono[:, 0], atol=2.0 ** -22)
    np.testing.assert_allclose(load_audio(_wav(tmp_path / "s.wav", six), SR), six.mean(axis=1), atol=2.0 ** -22)


@pytest.mark.parametrize("rate", [44100, 22050])
def test_other_rates_are_resampled_keeping_the_pitch(tmp_path, rate):
    t = np.arange(2 * rate) / rate
    tone = 0.5 * np.sin(2 * np.pi * 1000.0 * t)
    segs = load_audio_segments(_wav(tmp_path / "r.wav", np.stack([tone, tone], 1), rate), SR, 2)
    assert segs.shape == (2, SR)
    spectrum = np.abs(np.fft.rfft(segs[0] * np.hanning(SR)))
    assert abs(np.argmax(spectrum) * SR / SR - 1000.0) <= 1.0  # 1 Hz bins for a 1 s segment
    assert 0.3 < np.abs(segs[0]).max() < 0.6


def test_too_short_is_an_error_naming_the_file_and_lengths(tmp_path):
    path = _wav(tmp_path / "short.wav", _noise(4.2))
    with pytest.raises(DecodeError) as err:
        load_audio_segments(path, SR, 10)
    assert err.value.path == path
    assert err.value.reason == "too short: 4.2 s, expected 10 s (10 segments of 1 s)"
    assert str(path) in str(err.value)


def test_within_tolerance_is_padded_or_trimmed(tmp_path):
    short = load_audio_segments(_wav(tmp_path / "s.wav", _noise(1.95, seed=2)), SR, 2)
    assert short.shape == (2, SR)
    assert not short[1, -2400:].any() and short[1, -2500:-2400].any()  # 50 ms of zero padding
    long = load_audio_segments(_wav(tmp_path / "l.wav", _noise(2.05, seed=3)), SR, 2)
    assert long.shape == (2, SR)


def test_too_long_is_an_error_unless_trimming_is_asked_for(tmp_path):
    data = _noise(10.5)
    path = _wav(tmp_path / "long.wav", data)
    with pytest.raises(DecodeError, match=r"too long: 10.5 s, expected 10 s"):
        load_audio_segments(path, SR, 10)
    segs = load_audio_segments(path, SR, 10, trim_long=True)
    np.testing.assert_allclose(segs.reshape(-1), data.mean(1)[: 10 * SR], atol=2.0 ** -22)


def test_one_second_evaluation_clip_gives_one_segment(tmp_path):
    segs = load_audio_segments(_wav(tmp_path / "0.wav", _noise(1.0)), SR, 1)
    assert segs.shape == (1, SR)


def test_silent_file_is_an_error_unless_allowed(tmp_path):
    path = _wav(tmp_path / "silent.wav", np.zeros((SR, 2)))
    with pytest.raises(DecodeError, match="silent"):
        load_audio(path, SR)
    assert not load_audio(path, SR, allow_silent=True).any()


def test_non_finite_samples_are_an_error(tmp_path):
    data = _noise(0.5, channels=1)
    data[100] = np.nan
    with pytest.raises(DecodeError, match="NaN"):
        load_audio(_wav(tmp_path / "nan.wav", data, subtype="FLOAT"), SR)


def test_truncated_wav_is_reported_as_truncated(tmp_path):
    whole = _wav(tmp_path / "whole.wav", _noise(2.0)).read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DecodeError, match="truncated WAV") as err:
        load_audio_segments(cut, SR, 2)
    assert err.value.path == cut


@pytest.mark.parametrize("content, reason", [
    (b"this is not audio at all" * 100, "unreadable audio"),
    (b"", "empty file"),
    (b"RIFF\x24\x00\x00\x00WAVEfmt ", "unreadable audio"),
])
def test_garbage_and_empty_files_are_decode_errors(tmp_path, content, reason):
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(DecodeError, match=reason) as err:
        load_audio(path, SR)
    assert str(path) in str(err.value)


def test_missing_file_is_a_decode_error(tmp_path):
    with pytest.raises(DecodeError, match="file not found") as err:
        load_audio(tmp_path / "nope.wav", SR)
    assert err.value.path == tmp_path / "nope.wav"


# ------------------------------------------------------------------------------------------ video

FPS, N_VIDEO_FRAMES, W, H = 10, 20, 64, 48


def _brightness(i: int, step: int = 12) -> int:
    return 10 + step * i  # frame index i is written as a flat grey level


def _video(path: Path, fmt: str | None = None, gop: int = 5, n: int = N_VIDEO_FRAMES, step: int = 12) -> Path:
    """A real H.264 video whose frame i is a flat grey of ``_brightness(i)`` (B-frames on)."""
    container = av.open(str(path), "w", format=fmt)
    stream = container.add_stream("libx264", rate=FPS, options={"preset": "fast"})
    stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
    stream.codec_context.gop_size = gop
    for i in range(n):
        img = np.full((H, W, 3), _brightness(i, step), np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


@pytest.fixture(scope="module")
def mp4(tmp_path_factory) -> Path:
    return _video(tmp_path_factory.mktemp("video") / "clip.mp4")


def _frame_indices(frames: np.ndarray, step: int = 12) -> list[int]:
    levels = frames.reshape(len(frames), -1).mean(axis=1)
    return [int(round((v - 10) / step)) for v in levels]


def test_probe_reports_duration_rate_and_size(mp4):
    info = probe_video(mp4)
    assert info.duration == pytest.approx(2.0)
    assert info.fps == pytest.approx(FPS)
    assert (info.width, info.height, info.n_frames) == (W, H, N_VIDEO_FRAMES)
    assert info.duration_source == "stream"


def test_sample_times_are_interval_centres():
    assert sample_times(10.0, 5) == pytest.approx([1.0, 3.0, 5.0, 7.0, 9.0])


@pytest.mark.parametrize("n, expected", [
    (5, [2, 6, 10, 14, 18]),                              # t = 0.2, 0.6, ... 1.8 s
    (12, [0, 2, 4, 5, 7, 9, 10, 12, 14, 15, 17, 19]),     # t = (i + 0.5) / 6 s
    (1, [10]),
])
def test_seeking_returns_the_frames_on_screen_at_the_sample_times(mp4, n, expected):
    frames = sample_frames(mp4, n)
    assert frames.shape == (n, H, W, 3) and frames.dtype == np.uint8
    assert _frame_indices(frames) == expected
    # flat grey in, flat grey out: H.264 keeps these within a couple of levels
    for frame, i in zip(frames, expected):
        assert np.abs(frame.astype(int) - _brightness(i)).max() <= 3


def test_seeking_decodes_fewer_frames_than_decoding_everything(tmp_path):
    path = _video(tmp_path / "long.mp4", gop=5, n=60, step=4)  # 6 s; targets at frames 10, 30, 50
    seek, n_seek = _sample_frames(path, 3, "seek")
    full, n_full = _sample_frames(path, 3, "decode_all")
    np.testing.assert_array_equal(seek, full)
    assert _frame_indices(seek, step=4) == [10, 30, 50]
    assert (n_full.frames, n_full.packets) == (60, 61)  # the demuxer's final empty packet flushes
    # the targets are keyframes: each is sent, the decoder drained, and the next target seeks
    assert (n_seek.frames, n_seek.packets) == (3, 3)


def _textured_video(path: Path, gop: int, n: int = 90, fps: int = 30) -> Path:
    """Moving noisy texture, B-frame pyramid (x264 "fast": some B-frames are references), so that
    a frame decoded from a wrong or skipped reference would come out with different pixels."""
    rng = np.random.default_rng(gop)
    base = rng.integers(0, 256, (64, 96 + n, 3)).astype(np.uint8)
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=fps, options={"preset": "fast", "crf": "18"})
    stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
    stream.codec_context.gop_size = gop
    stream.codec_context.thread_type = "FRAME"  # one slice per frame, like the ffmpeg command line
    for i in range(n):
        img = np.clip(base[:, i:i + 96].astype(int) + rng.integers(-12, 13, (64, 96, 3)), 0, 255)
        for packet in stream.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


@pytest.mark.parametrize("gop", [10, 250])
@pytest.mark.parametrize("n", [12, 5])
def test_seeking_returns_exactly_the_pixels_of_a_plain_full_decode(tmp_path, gop, n):
    """Skipping non-reference frames and draining the decoder at a target must not change a
    single pixel: compare with PyAV decoding every frame, picked by index (30 fps, 3 s)."""
    path = _textured_video(tmp_path / f"g{gop}.mp4", gop)
    with av.open(str(path)) as container:
        every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(every) == 90
    wanted = [int(t * 30 + 1e-9) for t in sample_times(3.0, n)]
    seek, n_seek = _sample_frames(path, n, "seek")
    np.testing.assert_array_equal(seek, np.stack([every[i] for i in wanted]))
    assert n_seek.frames < 90 if gop == 250 else n_seek.frames <= 6 * n  # short GOPs: ~half a GOP per target
    # parallel groups (cut where the sampler seeks anyway) decode exactly the same frames
    parallel, n_parallel = _sample_frames(path, n, "seek", threads=3)
    np.testing.assert_array_equal(parallel, seek)
    assert n_parallel == n_seek
    np.testing.assert_array_equal(sample_frames(path, n, method="decode_all", threads=2), seek)


def test_parallel_groups_share_no_keyframe_and_are_balanced(tmp_path):
    path = _textured_video(tmp_path / "g10.mp4", 10)
    with av.open(str(path)) as container:
        keyframes = [i for i, f in enumerate(container.decode(video=0)) if f.key_frame]
    assert len(keyframes) >= 6
    times = sample_times(3.0, 12)
    with _open_video(path) as container:
        sampler = _Sampler(container, container.streams.video[0], path, 30.0)
        planned = independent_groups(sampler, times, 3)
        assert [g for g, _ in independent_groups(sampler, times, 1)] == [times]
    groups = [g for g, _ in planned]
    assert [t for g in groups for t in g] == times and len(groups) == 3
    assert sum(work for _, work in planned) <= 90
    for before, after in zip(groups, groups[1:]):  # the keyframe each group starts from lies
        first = int(after[0] * 30)                 # after the previous group's last frame
        assert max(k for k in keyframes if k <= first) > int(before[-1] * 30)
    assert max(len(g) for g in groups) <= 6
    assert _balanced_split([13, 8, 3, 28, 3], 2) == [(0, 3), (3, 5)]
    assert _balanced_split([237, 37], 4) == [(0, 1), (1, 2)]
    assert _balanced_split([5], 2) == [(0, 1)]
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        sample_frames(path, 2, threads=0)


@pytest.mark.parametrize("name, fmt, source", [
    ("clip.mkv", "matroska", "container"),   # Matroska: no per-stream duration
    ("clip.ts", "mpegts", "stream"),         # MPEG-TS: no index, seeks by byte position
    ("clip.h264", "h264", "packets"),        # raw H.264: no duration, no timestamps at all
    ("clip.avi", "avi", "stream"),           # AVI: B-frames get out-of-order timestamps
])
def test_other_containers_and_streams_without_duration(tmp_path, name, fmt, source):
    path = _video(tmp_path / name, fmt)
    info = probe_video(path)
    assert info.duration_source == source
    assert info.duration == pytest.approx(2.0, abs=0.01)
    assert info.fps == pytest.approx(FPS)
    assert _frame_indices(sample_frames(path, 5)) == [2, 6, 10, 14, 18]
    assert _frame_indices(sample_frames(path, 5, threads=2)) == [2, 6, 10, 14, 18]  # same fallbacks


@pytest.mark.parametrize("faststart", [False, True])
def test_truncated_mp4_is_a_decode_error(tmp_path, faststart):
    whole = tmp_path / "whole.mp4"
    container = av.open(str(whole), "w", options={"movflags": "faststart"} if faststart else {})
    stream = container.add_stream("libx264", rate=FPS)
    stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
    rng = np.random.default_rng(0)
    for i in range(N_VIDEO_FRAMES):  # noisy frames, so the data is most of the file
        img = np.clip(rng.normal(_brightness(i), 25, (H, W, 3)), 0, 255).astype(np.uint8)
        for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    data = whole.read_bytes()
    assert (data.find(b"moov") < data.find(b"mdat")) == faststart
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(DecodeError) as err:
        sample_frames(cut, 5)
    assert err.value.path == cut
    assert "truncated" in err.value.reason or "unreadable" in err.value.reason


@pytest.mark.parametrize("content, reason", [
    (b"\x00\x01garbage" * 500, "unreadable video"),
    (b"", "empty file"),
])
def test_garbage_empty_and_missing_videos_are_decode_errors(tmp_path, content, reason):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(DecodeError, match=reason):
        sample_frames(path, 3)
    with pytest.raises(DecodeError, match="file not found"):
        probe_video(tmp_path / "missing.mp4")


def test_a_file_without_video_stream_is_a_decode_error(tmp_path):
    path = _wav(tmp_path / "audio_only.wav", _noise(0.5))
    with pytest.raises(DecodeError, match="no video stream"):
        sample_frames(path, 2)
