"""Sizes taken from files are bounded before anything is allocated: audio longer than a clip (real
30-minute, 8-channel FLAC files, and headers that lie about their length) is refused or cut while
streaming, in a subprocess whose address space is capped; ``dataset.json`` counts are checked with
their allowed range when the manifest is read, before any store exists."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from featurestore.datasets import DatasetFormatError, DatasetSidecar, open_dataset
from featurestore.decode import load_audio_segments, resample
from featurestore.manifest import MAX_AUDIO_SEGMENTS, MAX_CLIP_SECONDS, MAX_VIDEO_FRAMES

RATE = 16000  # not the encoders' 48 kHz: the resampling path is the one exercised
LONG_SECONDS, CHANNELS, SOUND_SECONDS = 30 * 60, 8, 3
ROOT = Path(__file__).resolve().parents[2]
#: What a 30-minute 8-channel file costs decoded whole: 30 * 60 * 16000 * 8 * 4 bytes = 0.9 GB (3.3 GB at 48 kHz).
HEADROOM_MB = 300


@pytest.fixture(scope="module")
def long_flac(tmp_path_factory) -> Path:
    """A real 30 min x 8 channel FLAC: 3 s of quiet noise, then silence (about 1 MB on disk)."""
    path = tmp_path_factory.mktemp("long") / "long.flac"
    rng = np.random.default_rng(0)
    with sf.SoundFile(str(path), "w", RATE, CHANNELS, subtype="PCM_16", format="FLAC") as f:
        f.write(rng.uniform(-0.01, 0.01, (SOUND_SECONDS * RATE, CHANNELS)).astype(np.float32))
        zeros = np.zeros((1 << 20, CHANNELS), dtype=np.int16)
        left = (LONG_SECONDS - SOUND_SECONDS) * RATE
        while left > 0:
            f.write(zeros[:min(left, len(zeros))])
            left -= len(zeros)
    assert sf.info(str(path)).frames == LONG_SECONDS * RATE
    return path


_PRELUDE = """
import json, resource, sys
import numpy as np, scipy.signal, soundfile
from featurestore.decode import DecodeError, load_audio_segments
"""
_CAP = """
def vm_bytes():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + %d * 2**20, resource.RLIM_INFINITY))
def hwm_kib():  # this process's own peak RSS (ru_maxrss would start from the forking parent's)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
base = hwm_kib()
result = {}
""" % HEADROOM_MB
_REPORT = """
result["grew_mb"] = (hwm_kib() - base) / 1024
print(json.dumps(result))
"""


def _bounded(body: str, *args: str) -> dict:
    """Run ``body`` (setup, a ``# ---`` line, then the work, which fills ``result``) in a fresh
    interpreter whose address space is capped after the setup at its size then plus HEADROOM_MB;
    return ``result`` with ``grew_mb``, the peak RSS growth during the work."""
    setup, _, work = textwrap.dedent(body).partition("# ---\n")
    code = _PRELUDE + setup + _CAP + work + _REPORT
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_30_minute_8_channel_flac_is_refused_from_its_header_in_bounded_memory(long_flac):
    out = _bounded("""
        # ---
        try:
            load_audio_segments(sys.argv[1], 48000, 10)
        except DecodeError as exc:
            result["error"] = str(exc)
    """, str(long_flac))
    assert "too long: 1.8e+03 s, expected 10 s" in out["error"]
    assert out["grew_mb"] < 50


def test_trim_long_decodes_only_the_segments_of_a_30_minute_flac_as_the_whole_file_would(long_flac, tmp_path):
    saved = tmp_path / "segments.npy"
    out = _bounded("""
        # ---
        segments = load_audio_segments(sys.argv[1], 48000, 2, trim_long=True)
        np.save(sys.argv[2], segments)
    """, str(long_flac), str(saved))
    assert out["grew_mb"] < HEADROOM_MB
    segments = np.load(saved)
    # the existing way on the part that matters: decode, average and resample 20 s whole, then cut
    whole, _ = sf.read(str(long_flac), frames=20 * RATE, dtype="float32", always_2d=True)
    expected = resample(whole.mean(axis=1, dtype=np.float32), RATE, 48000)[:2 * 48000].reshape(2, 48000)
    assert segments.dtype == np.float32 and segments.any()
    np.testing.assert_array_equal(segments.view(np.uint32), expected.view(np.uint32))  # bit for bit


def _claiming(src: Path, dst: Path, frames: int) -> Path:
    """A copy of FLAC ``src`` whose STREAMINFO says it holds ``frames`` frames (the low 36 bits of
    the 8 bytes after the sample rate field start, at offset 18)."""
    data = bytearray(src.read_bytes())
    assert data[:4] == b"fLaC"
    fields = int.from_bytes(data[18:26], "big")
    data[18:26] = ((fields & ~((1 << 36) - 1)) | frames).to_bytes(8, "big")
    dst.write_bytes(bytes(data))
    return dst


def _noise_flac(path: Path, seconds: float, channels: int = 2) -> Path:
    rng = np.random.default_rng(1)
    sf.write(str(path), rng.uniform(-0.5, 0.5, (int(seconds * RATE), channels)), RATE, subtype="PCM_16")
    return path


def test_a_header_that_lies_about_the_length_never_sizes_an_allocation(tmp_path):
    real = _noise_flac(tmp_path / "real.flac", 12.0)
    huge = _claiming(real, tmp_path / "huge.flac", 1 << 35)  # claims weeks: 275 GB as float32 x 2
    assert sf.info(str(huge)).frames == 1 << 35
    out = _bounded("""
        # ---
        try:
            load_audio_segments(sys.argv[1], 48000, 10)
        except DecodeError as exc:
            result["error"] = str(exc)
        result["trimmed"] = list(load_audio_segments(sys.argv[1], 48000, 10, trim_long=True).shape)
    """, str(huge))
    assert f"too long: {(1 << 35) / RATE:.3g} s" in out["error"]  # refused from the header, nothing read
    assert out["trimmed"] == [10, 48000] and out["grew_mb"] < 50


def test_a_header_that_claims_less_than_the_stream_holds_is_read_no_further(long_flac, tmp_path):
    short = _claiming(long_flac, tmp_path / "short.flac", 10 * RATE)  # says 10 s, holds 30 min
    out = _bounded("""
        # ---
        result["shape"] = list(load_audio_segments(sys.argv[1], 48000, 10, allow_silent=True).shape)
    """, str(short))
    assert out["shape"] == [10, 48000] and out["grew_mb"] < 50


def test_normal_length_clips_decode_bit_for_bit_as_reading_the_whole_file(tmp_path):
    """Fingerprints and stored features must not change: the streamed read equals the whole read."""
    for name, seconds, channels, rate in (("a.wav", 10.0, 2, 48000), ("b.flac", 10.05, 6, 44100),
                                          ("c.wav", 9.95, 1, 22050)):
        path = tmp_path / name
        rng = np.random.default_rng(len(name) + channels)
        sf.write(str(path), rng.uniform(-0.5, 0.5, (int(seconds * rate), channels)), rate, subtype="PCM_24")
        whole, _ = sf.read(str(path), dtype="float32", always_2d=True)
        mono = whole.mean(axis=1, dtype=np.float32) if channels > 1 else whole[:, 0]
        audio = resample(mono, rate, 48000)
        expected = np.concatenate([audio, np.zeros(max(0, 480000 - len(audio)), np.float32)])[:480000]
        got = load_audio_segments(path, 48000, 10)
        np.testing.assert_array_equal(got.reshape(-1).view(np.uint32), expected.view(np.uint32))


def test_classify_decoding_of_a_30_minute_flac_fails_its_clip_in_bounded_memory(long_flac, tmp_path):
    """``heads classify`` / ``fusion classify`` encode files through FileEncoder (extraction's decoder)."""
    normal = _noise_flac(tmp_path / "normal.flac", 10.0)
    out = _bounded("""
        import torch
        from featurestore.encode_files import FileEncoder
        from featurestore.encoders import create_encoder
        torch.set_num_threads(1)
        prov = {**create_encoder("logmel", n_mels=32).provenance(),
                "segments": {"kind": "audio", "n_segments": 10, "segment_seconds": 1.0, "sample_rate": 48000}}
        encoder = FileEncoder({"logmel": prov}, "cpu")
        encoder.encode([sys.argv[2]])  # warm up: every library and thread pool is in place
        # ---
        done = encoder.encode([sys.argv[1], sys.argv[2]])
        result["ok"] = done.ok.tolist()
        result["errors"] = done.errors
    """, str(long_flac), str(normal))
    assert out["ok"] == [False, True]
    assert "too long: 1.8e+03 s" in out["errors"]["long"]
    assert out["grew_mb"] < HEADROOM_MB


# ----------------------------------------------------------------------- dataset.json bounds


def _csv_dataset(root: Path, sidecar: dict | str) -> Path:
    root.mkdir()
    (root / "clips.csv").write_text("clip_id,audio\nc1,c1.wav\n")
    (root / "dataset.json").write_text(sidecar if isinstance(sidecar, str) else json.dumps(sidecar))
    return root


@pytest.mark.parametrize("key, value, allowed", [
    ("clip_seconds", 1e12, f"0 < clip_seconds <= {MAX_CLIP_SECONDS:g}"),
    ("clip_seconds", 3601, f"0 < clip_seconds <= {MAX_CLIP_SECONDS:g}"),
    ("audio_segments", 10 ** 12, f"1 <= audio_segments <= {MAX_AUDIO_SEGMENTS}"),
    ("video_frames", 100_000_000, f"1 <= video_frames <= {MAX_VIDEO_FRAMES}"),
    ("video_frames", 0, f"1 <= video_frames <= {MAX_VIDEO_FRAMES}"),
    ("clip_seconds", "10", f"0 < clip_seconds <= {MAX_CLIP_SECONDS:g}"),
])
def test_dataset_json_sizes_out_of_range_are_one_line_errors_naming_file_key_value_and_range(
        tmp_path, key, value, allowed):
    root = _csv_dataset(tmp_path / "ds", {key: value})
    with pytest.raises(DatasetFormatError) as err:
        open_dataset(root)
    message = str(err.value)
    assert "\n" not in message and str(root / "dataset.json") in message
    assert repr(key) in message and repr(value) in message and allowed in message


def test_infinite_and_nan_clip_seconds_are_refused(tmp_path):
    for i, text in enumerate(('{"clip_seconds": Infinity}', '{"clip_seconds": NaN}', '{"clip_seconds": 1e400}')):
        root = _csv_dataset(tmp_path / f"ds{i}", text)
        with pytest.raises(DatasetFormatError, match="clip_seconds"):
            DatasetSidecar.read(root / "dataset.json")


def test_the_largest_allowed_sizes_are_accepted(tmp_path):
    root = _csv_dataset(tmp_path / "ds", {"clip_seconds": MAX_CLIP_SECONDS, "video_frames": MAX_VIDEO_FRAMES})
    manifest = open_dataset(root)
    assert manifest.audio_segments == MAX_AUDIO_SEGMENTS and manifest.video_frames == MAX_VIDEO_FRAMES


def test_extract_refuses_a_huge_clip_seconds_before_any_store_exists(tmp_path):
    root = _csv_dataset(tmp_path / "ds", {"clip_seconds": 1e12})
    store = tmp_path / "out.zarr"
    command = [sys.executable, "-m", "featurestore", "extract", str(root), str(store), "--encoders", "logmel"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "clip_seconds" in lines[0] and "1000000000000.0" in lines[0]
    assert not store.exists()


@pytest.mark.parametrize("field, value", [("audio_segments", 10 ** 9), ("video_frames", 10 ** 9),
                                          ("segment_seconds", float("nan")), ("segment_seconds", 1e9)])
def test_a_manifest_with_unbounded_counts_cannot_be_built(field, value):
    from featurestore import ClipRecord, Manifest

    with pytest.raises(ValueError, match=field):
        Manifest("toy", [], [ClipRecord("c1")], **{field: value})


def test_file_encoder_refuses_frame_and_segment_counts_beyond_the_maxima():
    pytest.importorskip("torch")
    from featurestore.encode_files import FileEncoder

    for option, value in (("frames", 100_000_000), ("segments", MAX_AUDIO_SEGMENTS + 1)):
        with pytest.raises(ValueError, match=option):
            FileEncoder({}, "cpu", **{option: value})
