"""Audio files -> mono float32 at a requested rate, cut into fixed-length segments (see the package doc)."""
from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np

from featurestore.decode._errors import DecodeError, PathLike

#: Default slack on a clip's length before it counts as too short / too long (seconds).
DEFAULT_TOLERANCE_SECONDS = 0.1


def load_audio(path: PathLike, sample_rate: int = 48000, *, allow_silent: bool = False) -> np.ndarray:
    """Read a whole audio file as mono float32 at ``sample_rate``.

    Channels are averaged (stereo, binaural and multichannel alike), because the paper's
    pipeline works on mono. Files at another rate are resampled, not rejected.

    Args:
        path: audio file (anything libsndfile reads: WAV, FLAC, OGG, ...).
        sample_rate: rate of the returned signal in Hz.
        allow_silent: accept a file whose samples are all zero.

    Returns:
        ``np.ndarray[float32]`` of shape ``[n_samples]``.

    Raises:
        DecodeError: missing, empty, unreadable, truncated, silent or non-finite audio.
    """
    data, file_rate = _read_audio_file(path)
    mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.all(np.isfinite(mono)):
        raise DecodeError(path, "audio contains NaN or infinite samples")
    if not allow_silent and not np.any(mono):
        raise DecodeError(path, f"silent: all {len(mono)} samples are zero (allow_silent=True accepts it)")
    return resample(mono, file_rate, sample_rate)


def load_audio_segments(
    path: PathLike,
    sample_rate: int,
    n_segments: int,
    segment_seconds: float = 1.0,
    *,
    tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
    trim_long: bool = False,
    allow_silent: bool = False,
) -> np.ndarray:
    """Read a clip and cut it into ``n_segments`` consecutive segments of ``segment_seconds``.

    Length policy: the clip is expected to last ``n_segments * segment_seconds``. Within
    ``tolerance_seconds`` of that it is zero-padded or trimmed at the end. Shorter than that is
    an error; longer is an error unless ``trim_long=True``, which keeps the first part.

    Args:
        path: audio file.
        sample_rate: rate of the returned segments in Hz.
        n_segments: segments per clip (10 for TAU development clips, 1 for evaluation clips).
        segment_seconds: length of one segment.
        tolerance_seconds: accepted difference between actual and expected length.
        trim_long: keep the start of clips that are longer than expected instead of failing.
        allow_silent: accept all-zero audio.

    Returns:
        ``np.ndarray[float32]`` of shape ``[n_segments, round(segment_seconds * sample_rate)]``.

    Raises:
        DecodeError: as :func:`load_audio`, plus a clip that is too short or too long.
    """
    if n_segments < 1 or segment_seconds <= 0:
        raise ValueError(f"need n_segments >= 1 and segment_seconds > 0, got {n_segments}, {segment_seconds}")
    audio = load_audio(path, sample_rate, allow_silent=allow_silent)
    seg_len = int(round(segment_seconds * sample_rate))
    want = seg_len * n_segments
    missing = want - len(audio)
    if missing > tolerance_seconds * sample_rate:
        raise DecodeError(path, f"too short: {_secs(len(audio), sample_rate)} s, "
                                f"expected {_secs(want, sample_rate)} s ({n_segments} segments of {segment_seconds:g} s)")
    if -missing > tolerance_seconds * sample_rate and not trim_long:
        raise DecodeError(path, f"too long: {_secs(len(audio), sample_rate)} s, expected "
                                f"{_secs(want, sample_rate)} s ({n_segments} segments of {segment_seconds:g} s; "
                                f"trim_long=True keeps the start)")
    if missing > 0:
        audio = np.concatenate([audio, np.zeros(missing, dtype=np.float32)])
    return np.ascontiguousarray(audio[:want].reshape(n_segments, seg_len))


def resample(signal: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample a mono float signal with a polyphase FIR filter (exact rational ratio).

    Args:
        signal: ``[n]`` samples.
        from_rate: rate of ``signal``.
        to_rate: wanted rate.

    Returns:
        float32 signal of ``ceil(n * to_rate / from_rate)`` samples (the input when the rates match).
    """
    if from_rate == to_rate:
        return signal.astype(np.float32, copy=False)
    from scipy.signal import resample_poly  # lazily: only needed for odd rates

    g = math.gcd(int(from_rate), int(to_rate))
    return resample_poly(signal, int(to_rate) // g, int(from_rate) // g).astype(np.float32)


def _secs(n_samples: int, rate: int) -> str:
    return f"{n_samples / rate:.3g}"


def _read_audio_file(path: PathLike) -> tuple[np.ndarray, int]:
    """``(data [n, channels] float32, sample_rate)``; every failure becomes a DecodeError."""
    import soundfile as sf

    p = Path(path)
    if not p.is_file():
        raise DecodeError(p, "file not found" if not p.exists() else "not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise DecodeError(p, "empty file (0 bytes)")
    _check_wav_not_truncated(p, size)
    try:
        data, rate = sf.read(str(p), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, ValueError) as exc:
        raise DecodeError(p, f"unreadable audio ({exc})") from exc
    if data.shape[0] == 0:
        raise DecodeError(p, "no audio samples in file")
    return data, int(rate)


def _check_wav_not_truncated(path: Path, size: int) -> None:
    """Compare a RIFF/WAVE file's declared data size with the bytes actually there.

    libsndfile quietly reads a truncated WAV as a shorter one; a clip cut in half by an
    interrupted copy should be reported as truncated, not as "too short".
    """
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return  # not a plain RIFF WAV (RF64, FLAC, ...): leave it to libsndfile
        offset = 12
        while offset + 8 <= size:
            f.seek(offset)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"data":
                available = size - offset - 8
                if chunk_size not in (0, 0xFFFFFFFF) and chunk_size > available:
                    raise DecodeError(path, f"truncated WAV: header declares {chunk_size} bytes of "
                                            f"audio data, file holds {available}")
                return
            offset += 8 + chunk_size + (chunk_size & 1)
