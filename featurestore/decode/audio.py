"""Audio files -> mono float32 at a requested rate, cut into fixed-length segments (see the package doc).

Files are read in blocks of :data:`_BLOCK_FRAMES` frames and averaged to mono block by block, and a
clip is never read further than its segments need: a file's header is only believed as far as it
makes the work smaller (a header that claims hours is refused before anything is read; one that
claims seconds while the stream goes on for hours is read no further than the clip allows). So
memory stays bounded by the clip, whatever a file holds or claims.
"""
from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from featurestore.decode._errors import DecodeError, PathLike

#: Default slack on a clip's length before it counts as too short / too long (seconds).
DEFAULT_TOLERANCE_SECONDS = 0.1
#: Frames read (all channels) per call: 262144 x 8 channels x 4 bytes = 8 MiB at a time.
_BLOCK_FRAMES = 1 << 18
#: Header frame counts from here on mean "unknown" (libsndfile's SF_COUNT_MAX for streams).
_UNKNOWN_FRAMES = 1 << 62


def load_audio(path: PathLike, sample_rate: int = 48000, *, allow_silent: bool = False) -> np.ndarray:
    """Read a whole audio file as mono float32 at ``sample_rate``.

    Channels are averaged (stereo, binaural and multichannel alike), because the paper's
    pipeline works on mono. Files at another rate are resampled, not rejected. The file is read
    in blocks, so only the mono signal is ever held whole (not all of its channels).

    Args:
        path: audio file (anything libsndfile reads: WAV, FLAC, OGG, ...).
        sample_rate: rate of the returned signal in Hz.
        allow_silent: accept a file whose samples are all zero.

    Returns:
        ``np.ndarray[float32]`` of shape ``[n_samples]``.

    Raises:
        DecodeError: missing, empty, unreadable, truncated, silent or non-finite audio.
    """
    with _open_audio(path) as f:
        file_rate = int(f.samplerate)
        _check_ratio(path, file_rate, sample_rate)
        mono, _ = _read_mono(f, path, None)
    _check_samples(path, mono, allow_silent)
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

    Only what the segments need is decoded: a file whose header says it is too long is refused
    before any sample is read, and no file is read past the longest clip that would be accepted
    (with ``trim_long``, past the segments plus the resampling filter's reach). The segments are
    the same, bit for bit, as cutting the whole file's decoded and resampled signal; the silence
    and finiteness checks cover the part read.

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
    seg_len = int(round(segment_seconds * sample_rate))
    want = seg_len * n_segments
    slack = tolerance_seconds * sample_rate
    expected = f"expected {_secs(want, sample_rate)} s ({n_segments} segments of {segment_seconds:g} s"
    with _open_audio(path) as f:
        file_rate = int(f.samplerate)
        _check_ratio(path, file_rate, sample_rate)
        claimed = _resampled_len(int(f.frames), file_rate, sample_rate) if 0 <= f.frames < _UNKNOWN_FRAMES else 0
        if not trim_long and claimed - want > slack:  # the header says so: nothing is read
            raise DecodeError(path, f"too long: {_secs(claimed, sample_rate)} s, {expected}; "
                                    f"trim_long=True keeps the start)")
        limit = (_trim_frames(want, file_rate, sample_rate) if trim_long
                 else math.ceil((want + slack) * file_rate / sample_rate) + 1)
        mono, more = _read_mono(f, path, limit)
    if more and not trim_long:  # the header said less than the stream holds
        raise DecodeError(path, f"too long: more than {_secs(limit, file_rate)} s, {expected}; "
                                f"trim_long=True keeps the start)")
    _check_samples(path, mono, allow_silent)
    audio = resample(mono, file_rate, sample_rate)
    missing = want - len(audio)
    if missing > slack:
        raise DecodeError(path, f"too short: {_secs(len(audio), sample_rate)} s, {expected})")
    if -missing > slack and not trim_long:
        raise DecodeError(path, f"too long: {_secs(len(audio), sample_rate)} s, {expected}; "
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


#: The largest term of the reduced rate ratio ``to/from`` resampling takes (44.1 -> 48 kHz is 160/147,
#: an odd clock like 48001 Hz is 48000/48001). ``resample_poly`` designs a filter of ``20 * max(up, down)``
#: taps: this bounds it to 1.3 M taps, 10 MB.
MAX_RATIO_TERM = 1 << 16


def _check_ratio(path: PathLike, from_rate: int, to_rate: int) -> None:
    """Refuse, before any sample is read, a file whose rate cannot be resampled in bounded memory.

    The filter grows with the reduced ratio's terms: a header claiming 536870912 Hz (a damaged or
    hostile rate field) asked for an 84 M-tap filter, a MemoryError traceback (and 999983 Hz for
    20 M taps and seconds of work) instead of an error naming the file.
    """
    g = math.gcd(int(from_rate), int(to_rate))
    up, down = int(to_rate) // g, int(from_rate) // g
    if from_rate != to_rate and max(up, down) > MAX_RATIO_TERM:
        raise DecodeError(path, f"sample rate {from_rate} Hz cannot be resampled to {to_rate} Hz: the exact ratio "
                                f"{up}/{down} needs a filter of {20 * max(up, down) + 1} taps (at most "
                                f"{20 * MAX_RATIO_TERM + 1}); a damaged header?")


def _secs(n_samples: int, rate: int) -> str:
    return f"{n_samples / rate:.3g}"


def _resampled_len(n_frames: int, from_rate: int, to_rate: int) -> int:
    """Samples :func:`resample` returns for ``n_frames`` (``ceil(n * to / from)``, exactly)."""
    return n_frames if from_rate == to_rate else -(-n_frames * int(to_rate) // int(from_rate))


def _trim_frames(want: int, from_rate: int, to_rate: int) -> int:
    """Input frames that give the first ``want`` resampled samples exactly as the whole file would.

    ``resample_poly``'s filter has ``10 * max(up, down)`` taps on each side at the upsampled rate,
    which is ``10 * max(up, down) / up`` input frames: an output sample depends on no frame further
    away, so frames past this many change none of the first ``want`` samples.
    """
    if from_rate == to_rate:
        return want
    g = math.gcd(int(from_rate), int(to_rate))
    up, down = int(to_rate) // g, int(from_rate) // g
    return math.ceil(want * down / up) + math.ceil(10 * max(up, down) / up) + 16


def _check_samples(path: PathLike, mono: np.ndarray, allow_silent: bool) -> None:
    if not np.all(np.isfinite(mono)):
        raise DecodeError(path, "audio contains NaN or infinite samples")
    if not allow_silent and not np.any(mono):
        raise DecodeError(path, f"silent: all {len(mono)} samples are zero (allow_silent=True accepts it)")


@contextmanager
def _open_audio(path: PathLike) -> Iterator:
    """An open ``soundfile.SoundFile``; every failure to open becomes a DecodeError."""
    import soundfile as sf

    p = Path(path)
    if not p.is_file():
        raise DecodeError(p, "file not found" if not p.exists() else "not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise DecodeError(p, "empty file (0 bytes)")
    _check_wav_not_truncated(p, size)
    try:
        f = sf.SoundFile(str(p))
    except (sf.SoundFileError, RuntimeError, ValueError) as exc:
        raise DecodeError(p, f"unreadable audio ({exc})") from exc
    with f:
        yield f


def _read_mono(f, path: PathLike, limit: int | None) -> tuple[np.ndarray, bool]:
    """``(mono float32 of at most limit frames, whether the stream holds more)``, read block by block.

    Each block is averaged over its channels as the whole file would be (row by row: the same
    float32 sums), so the result equals averaging the file read at once, bit for bit. The header's
    frame count is never used to size anything: reading stops at the stream's end or at ``limit``.
    """
    import soundfile as sf

    channels = int(f.channels)
    buffer = np.empty((_BLOCK_FRAMES, channels), dtype=np.float32)
    parts: list[np.ndarray] = []
    n = 0
    try:
        while limit is None or n <= limit:
            block = f.read(_BLOCK_FRAMES if limit is None else min(_BLOCK_FRAMES, limit + 1 - n),
                           dtype="float32", always_2d=True, out=buffer)
            if not len(block):
                break
            parts.append(block.mean(axis=1, dtype=np.float32) if channels > 1 else block[:, 0].copy())
            n += len(block)
    except (sf.SoundFileError, RuntimeError, ValueError) as exc:
        raise DecodeError(path, f"unreadable audio ({exc})") from exc
    if n == 0:
        raise DecodeError(path, "no audio samples in file")
    mono = np.concatenate(parts) if len(parts) != 1 else parts[0]
    more = limit is not None and n > limit
    return (mono[:limit] if more else mono), more


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
