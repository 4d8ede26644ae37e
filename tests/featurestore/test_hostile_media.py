"""Hostile but realistic media and manifests, made here as real files: phone videos (a rotation in the
display matrix, variable frame rate), Matroska clips whose timestamps start late, odd WAVs, and CSV
manifests as other tools write them. Each test names the wrong data or the escape it caught.

The frame tests read a frame's index off its grey level (frame i is a flat grey of ``10 + step * i``),
and compare with an independent reference: every frame decoded by PyAV in order, or the ``ffmpeg``
command line.
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from featurestore.datasets import DatasetFormatError, open_dataset, read_csv_manifest, read_tau, read_tau_eval
from featurestore.decode import DecodeError, load_audio_segments, probe_video, sample_frames, sample_times
from featurestore.decode.video import _sample_frames

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg command line")

# ------------------------------------------------------------------------------------------ video


def _grey_video(path: Path, pts_ms: list[int], step: int, fmt: str | None = None, gop: int = 250) -> Path:
    """H.264 (B-frames on) whose frame i is a flat grey of ``10 + step * i``, shown from ``pts_ms[i]``
    milliseconds on (any spacing: variable frame rate, or a first frame after 0)."""
    container = av.open(str(path), "w", format=fmt)
    stream = container.add_stream("libx264", rate=10, options={"preset": "fast", "bframes": "3"})
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
    stream.codec_context.gop_size = gop
    for i, pts in enumerate(pts_ms):
        frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 10 + step * i, np.uint8), format="rgb24")
        frame.pts, frame.time_base = pts, Fraction(1, 1000)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def _torchcodec_agrees(path: Path, n_frames: int) -> None:
    """Where torchcodec can run, its frames (``--decoder torchcodec``, which FFmpeg's rules drive) are
    the PyAV sampler's, bit for bit (docs/datasets-and-decoding.md promises it)."""
    from featurestore.decode import torchcodec_video as tcv

    try:
        tcv.check_decoder("torchcodec")
    except tcv.DecoderUnavailable:
        return
    np.testing.assert_array_equal(tcv.sample_frames_torchcodec(path, n_frames).numpy(), sample_frames(path, n_frames))


def _indices(frames: np.ndarray, step: int) -> list[int]:
    return [int(round((level - 10) / step)) for level in frames.reshape(len(frames), -1).mean(axis=1)]


def _on_screen(path: Path, times: list[float]) -> list[int]:
    """Reference: decode every frame in order; at each time, the last frame starting at or before it."""
    with av.open(str(path)) as container:
        starts = [float(f.pts * f.time_base) for f in container.decode(video=0)]
    return [max(i for i, s in enumerate(starts) if s - starts[0] <= t + 1e-9) for t in times]


@pytest.mark.parametrize("fmt", ["mp4", "matroska"])
def test_variable_frame_rate_video_gives_the_frame_on_screen_at_each_time(tmp_path, fmt):
    """Phones and screen recorders write variable frame rate video. The seeking sampler took a frame's
    time on screen from its packet's duration (MP4: a decode-order step; Matroska: a default), so it
    stopped early or skipped the frame on screen: 3-14 of 5-30 frames came back from other times
    (frame 5 for frame 10, ...), where decoding everything gave the right ones."""
    rng = np.random.default_rng(1)
    gaps = rng.choice([20, 40, 100, 600], size=40, p=[0.4, 0.3, 0.2, 0.1])
    pts = [0, *np.cumsum(gaps)[:-1].astype(int).tolist()]
    path = _grey_video(tmp_path / f"vfr.{'mkv' if fmt == 'matroska' else 'mp4'}", pts, step=5, fmt=fmt)
    duration = probe_video(path).duration
    for n in (5, 12, 30):
        want = _on_screen(path, sample_times(duration, n))
        assert _indices(_sample_frames(path, n, "decode_all")[0], 5) == want  # the reference agrees
        assert _indices(sample_frames(path, n), 5) == want
        assert _indices(sample_frames(path, n, threads=3), 5) == want
    for n in (5, 12):
        _torchcodec_agrees(path, n)


def test_a_matroska_clip_whose_timestamps_start_late_gives_the_same_frames(tmp_path):
    """A Matroska file's duration is its last timestamp: a 4 s clip starting at 0.3 s (``ffmpeg
    -itsoffset``, a cut recording) claimed 4.3 s, so the sampling times were spread over 4.3 s and
    frames 21, 30, 38 came back for 20, 28, 36, silently (and 43 frames were reported)."""
    plain = _grey_video(tmp_path / "plain.mkv", [100 * i for i in range(40)], step=6, fmt="matroska", gop=5)
    late = _grey_video(tmp_path / "late.mkv", [300 + 100 * i for i in range(40)], step=6, fmt="matroska", gop=5)
    with av.open(str(late)) as container:  # the file really is what the test is about
        assert container.start_time == 300_000 and container.duration == 4_300_000
    info = probe_video(late)
    assert info.duration == pytest.approx(4.0) and info.n_frames == 40
    assert _indices(sample_frames(plain, 5), 6) == [4, 12, 20, 28, 36]
    for frames in (sample_frames(late, 5), sample_frames(late, 5, threads=2),
                   sample_frames(late, 5, method="decode_all")):
        assert _indices(frames, 6) == [4, 12, 20, 28, 36]
    _torchcodec_agrees(late, 5)


def _asymmetric_mp4(path: Path) -> Path:
    """Ten frames of a picture that no turn maps onto itself: a bright right half, a green top half."""
    picture = np.zeros((48, 64, 3), np.uint8)
    picture[:, 32:] = 200
    picture[:24, :, 1] = 100
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=10)
    stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
    for _ in range(10):
        for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


@needs_ffmpeg
@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_a_rotated_phone_video_comes_out_upright_as_ffmpeg_shows_it(tmp_path, degrees):
    """Phones store portrait video as landscape frames plus "rotate by 90" in the display matrix. The
    frames came out as stored: sideways 64x48 where ffmpeg (and ``--decoder torchcodec``) give the
    upright 48x64 picture."""
    source = _asymmetric_mp4(tmp_path / "source.mp4")
    rotated = tmp_path / f"rotated{degrees}.mp4"
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-i", str(source), "-c", "copy",
                    "-metadata:s:v:0", f"rotate={degrees}", str(rotated)], check=True)
    shown = subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(rotated), "-frames:v", "1",
                            "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], check=True, capture_output=True).stdout
    upright = (48, 64) if degrees == 180 else (64, 48)
    reference = np.frombuffer(shown, np.uint8).reshape(*upright, 3)
    for frames in (sample_frames(rotated, 2), sample_frames(rotated, 2, threads=2),
                   sample_frames(rotated, 2, method="decode_all")):
        assert frames.shape == (2, *upright, 3)
        assert np.abs(frames[0].astype(int) - reference).max() <= 3
    _torchcodec_agrees(rotated, 2)


def test_a_matroska_file_whose_first_track_is_a_cover_picture_samples_the_film(tmp_path):
    """A one-frame picture track (a cover, a thumbnail) before the film: the first video stream was
    taken, so the clip failed as "truncated: frames end at 0.040 s" (or, with a longer picture
    track, its frames were sampled), while ffmpeg and ``--decoder torchcodec`` show the film."""
    path = tmp_path / "cover_first.mkv"
    container = av.open(str(path), "w")
    cover = container.add_stream("mjpeg", rate=25)
    cover.width, cover.height, cover.pix_fmt = 32, 32, "yuvj444p"
    film = container.add_stream("libx264", rate=10, options={"preset": "fast"})
    film.width, film.height, film.pix_fmt = 64, 48, "yuv420p"
    picture = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 250, np.uint8), format="rgb24")
    for packet in [*cover.encode(picture), *cover.encode()]:
        container.mux(packet)
    for i in range(20):
        frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 10 + 12 * i, np.uint8), format="rgb24")
        for packet in film.encode(frame):
            container.mux(packet)
    for packet in film.encode():
        container.mux(packet)
    container.close()
    with av.open(str(path)) as check:  # the picture really is the first video stream
        assert check.streams.video[0].codec_context.name == "mjpeg"
    info = probe_video(path)
    assert (info.width, info.height, info.fps) == (64, 48, 10)
    for frames in (sample_frames(path, 5), sample_frames(path, 5, threads=2),
                   sample_frames(path, 5, method="decode_all")):
        assert _indices(frames, 12) == [2, 6, 10, 14, 18]
    _torchcodec_agrees(path, 5)


@needs_ffmpeg
def test_torchcodec_gives_the_last_frame_of_a_clip_cut_with_stream_copy_as_the_sampler_does(tmp_path):
    """``ffmpeg -ss 0.55 -c copy`` cuts at the keyframe before and hides the frames before 0.55 s with an
    edit list: the stream's duration (1.45 s) runs past its frames (1.4 s). The PyAV sampler gives the
    last frame for the times in between (within half a frame); ``--decoder torchcodec`` failed the clip
    ("frame pts is 1.413721; must be less than 1.400000") for 20 frames or more."""
    from featurestore.decode import torchcodec_video as tcv

    try:
        tcv.check_decoder("torchcodec")
    except tcv.DecoderUnavailable as err:
        pytest.skip(str(err))
    whole = _grey_video(tmp_path / "whole.mp4", [100 * i for i in range(20)], step=12, gop=5)
    cut = tmp_path / "cut.mp4"
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-ss", "0.55", "-i", str(whole), "-c", "copy", str(cut)],
                   check=True)
    assert probe_video(cut).duration > 1.41  # the stream runs past its last frame's end (1.4 s)
    for n in (12, 20, 30):
        frames = sample_frames(cut, n)
        assert _indices(frames, 12)[-1] == 19
        np.testing.assert_array_equal(tcv.sample_frames_torchcodec(cut, n).numpy(), frames)


# ------------------------------------------------------------------------------------------ datasets

TAU_HEADER = "filename_audio\tfilename_video\tscene_label\tidentifier\n"
TAU_ROWS = ["audio/airport-lisbon-1-10.wav\tvideo/airport-lisbon-1-10.mp4\tairport\tlisbon-1\n",
            "audio/park-lisbon-2-20.wav\tvideo/park-lisbon-2-20.mp4\tpark\tlisbon-2\n"]
FOLD_HEADER = "filename_audio\tfilename_video\tscene_label\n"


def _tau(root: Path, folds: dict[str, str]) -> Path:
    (root / "evaluation_setup").mkdir(parents=True)
    (root / "meta.csv").write_text(TAU_HEADER + "".join(TAU_ROWS))
    for name, text in folds.items():
        (root / "evaluation_setup" / name).write_text(text)
    return root


def test_a_clip_in_a_folds_training_and_scored_split_is_refused(tmp_path):
    """fold1_train.csv and fold1_evaluate.csv listing the same clip (split files concatenated or edited
    by hand) were read without a word: a head trained on the clip was then scored on it."""
    airport = TAU_ROWS[0].rsplit("\t", 1)[0] + "\n"
    park = TAU_ROWS[1].rsplit("\t", 1)[0] + "\n"
    for scored in ("fold1_evaluate.csv", "fold1_test.csv"):
        root = _tau(tmp_path / scored, {"fold1_train.csv": FOLD_HEADER + airport + park,
                                        scored: FOLD_HEADER + park})
        with pytest.raises(DatasetFormatError) as err:
            read_tau(root)
        assert err.value.path == root / "evaluation_setup" / "fold1_train.csv"
        assert f"1 clip(s) listed here are also in {Path(scored).stem}: 'park-lisbon-2-20'" in str(err.value)
    # the official layout: evaluate and test list the same clips, apart from train; other folds are apart
    root = _tau(tmp_path / "ok", {"fold1_train.csv": FOLD_HEADER + airport, "fold1_evaluate.csv": FOLD_HEADER + park,
                                  "fold1_test.csv": "filename_audio\tfilename_video\n" + park.rsplit("\t", 1)[0] + "\n",
                                  "fold2_train.csv": FOLD_HEADER + park, "fold2_evaluate.csv": FOLD_HEADER + airport})
    splits = {c.clip_id: sorted(c.splits) for c in read_tau(root).clips}
    assert splits == {"airport-lisbon-1-10": ["fold1_train", "fold2_evaluate"],
                      "park-lisbon-2-20": ["fold1_evaluate", "fold1_test", "fold2_train"]}


def test_an_evaluation_set_copied_on_a_mac_reads_without_its_hidden_files(tmp_path):
    """A copy made on a Mac holds ``.DS_Store`` and an AppleDouble ``._0.wav`` per file: the listing
    took them for clips and refused the whole set ("clip id '._0' starts with '.'")."""
    root = tmp_path / "eval"
    for kind, suffix in (("audio", "wav"), ("video", "mp4")):
        (root / kind).mkdir(parents=True)
        for i in (0, 1):
            (root / kind / f"{i}.{suffix}").write_bytes(b"media")
            (root / kind / f"._{i}.{suffix}").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        (root / kind / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    manifest = read_tau_eval(root)
    assert manifest.clip_ids == ["0", "1"]
    assert [(str(c.audio), str(c.video)) for c in manifest.clips] == [("audio/0.wav", "video/0.mp4"),
                                                                       ("audio/1.wav", "video/1.mp4")]


@pytest.mark.parametrize("column, value", [("label", "park\u00a0"), ("label", "\u2003park"),
                                           ("location", "lyon-1\u00a0"), ("city", "lyon\u000b")])
def test_a_label_or_location_padded_with_invisible_white_space_is_refused(tmp_path, column, value):
    """A no-break space after a label (spreadsheets, text copied from the web) survives the CSV's own
    stripping of spaces and tabs: ``park\\u00a0`` became a class beside ``park`` (a head with a class
    more), and such a location one beside the real one (location-disjoint folds split them)."""
    cells = {"label": "park", "city": "lyon", "location": "lyon-1"}
    path = tmp_path / "clips.csv"
    rows = [f"a,audio/a.wav,{cells['label']},{cells['city']},{cells['location']}",
            f"b,audio/b.wav,{value if column == 'label' else 'park'},{value if column == 'city' else 'lyon'},"
            f"{value if column == 'location' else 'lyon-1'}"]
    path.write_text("clip_id,audio,label,city,location\n" + "\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError) as err:
        read_csv_manifest(path)
    assert err.value.path == path and err.value.line == 3
    assert f"{column} {value!r} of clip 'b' starts or ends with white space" in str(err.value)
    path.write_text("clip_id,audio,label,city,location\n" + rows[0] + "\n", encoding="utf-8")
    assert read_csv_manifest(path).classes == ["park"]


def test_a_utf16_manifest_is_named_and_its_encoding_said(tmp_path):
    """A spreadsheet's "Unicode text" export is UTF-16. ``open_dataset`` (and so ``featurestore
    extract``) let a bare UnicodeDecodeError out, naming no file ("'utf-8' codec can't decode byte
    0xff in position 0"), for the file given and for a folder holding it."""
    folder = tmp_path / "clips"
    folder.mkdir()
    path = folder / "clips.csv"
    path.write_bytes("clip_id\taudio\r\na\taudio/a.wav\r\n".encode("utf-16"))
    for given in (path, folder):
        with pytest.raises(DatasetFormatError) as err:
            open_dataset(given)
        assert err.value.path == path
        assert "UTF-16 text" in str(err.value) and "save it as UTF-8" in str(err.value)
    path.write_bytes(b"clip_id,audio\n\xff\xfe\x00a,a.wav\n")
    with pytest.raises(DatasetFormatError, match="not UTF-8 text: save it as UTF-8") as err:
        open_dataset(path)
    assert err.value.path == path


# ------------------------------------------------------------------------------------------ audio


def _pcm16_wav(path: Path, rate: int, samples: np.ndarray) -> Path:
    """A mono 16-bit PCM WAV written byte by byte, so that any rate can stand in its header."""
    data = samples.astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, (2 * rate) % 2**32, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


_CAPPED = """
import json, resource, sys
import scipy.signal
from featurestore.decode import DecodeError, load_audio_segments
with open("/proc/self/status") as f:
    size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + 300 * 2**20, resource.RLIM_INFINITY))
try:
    load_audio_segments(sys.argv[1], 48000, 1)
    print(json.dumps(["no error", ""]))
except Exception as exc:
    print(json.dumps([type(exc).__name__, str(exc)]))
"""


def test_a_wav_header_claiming_a_huge_sample_rate_is_a_decode_error_in_bounded_memory(tmp_path):
    """A rate field of 536870912 Hz (a damaged header) made resampling design an 84 M-tap filter: a
    MemoryError traceback in a process with 300 MB to spare (640 MB asked for), never an error
    naming the file. Refused from the header now, before any sample is read."""
    path = _pcm16_wav(tmp_path / "damaged.wav", 2**29, np.random.default_rng(0).integers(-3000, 3000, 48000))
    done = subprocess.run([sys.executable, "-c", _CAPPED, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    kind, message = json.loads(done.stdout.strip().splitlines()[-1])
    assert kind == "DecodeError", message
    assert message.startswith(f"{path}: sample rate 536870912 Hz cannot be resampled to 48000 Hz")
    with pytest.raises(DecodeError, match=r"999983 Hz cannot be resampled to 48000 Hz: the exact ratio 48000/999983"):
        load_audio_segments(_pcm16_wav(tmp_path / "prime.wav", 999983, np.ones(999983)), 48000, 1)
    odd_clock = load_audio_segments(_pcm16_wav(tmp_path / "odd.wav", 48001, np.full(48001, 1000)), 48000, 1)
    assert odd_clock.shape == (1, 48000) and abs(float(np.median(odd_clock)) - 1000 / 32768) < 1e-4
