"""Video files -> frames at equal intervals, by seeking (see the package doc)."""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from featurestore.decode._errors import DecodeError, PathLike


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` found out about a file's video stream (:func:`video_stream`).

    Attributes:
        duration: seconds covered by the frames (first frame's start to last frame's end).
        fps: average frame rate.
        width: frame width in pixels, as stored (before a display rotation turns the frames).
        height: frame height in pixels, as stored.
        n_frames: number of frames (counted by the container, else estimated from duration * fps).
        duration_source: where ``duration`` came from: ``"stream"``, ``"container"``,
            ``"frame_count"`` or ``"packets"`` (a demux pass, for streams without metadata).
    """

    duration: float
    fps: float
    width: int
    height: int
    n_frames: int
    duration_source: str


def probe_video(path: PathLike) -> VideoInfo:
    """Duration, frame rate, size and frame count of a video's stream (:func:`video_stream`).

    Falls back from the stream's duration to the container's, to the frame count, and finally to
    demuxing all packets (no decoding), so streams without duration metadata (raw H.264,
    some Matroska/MPEG-TS files) still work.

    Raises:
        DecodeError: missing, unreadable, or without a video stream.
    """
    with _open_video(path) as container:
        return _probe(container, path)


def sample_times(duration: float, n_frames: int) -> list[float]:
    """The sampling times ``(i + 0.5) * duration / n_frames``: the centres of n equal intervals."""
    return [(i + 0.5) * duration / n_frames for i in range(n_frames)]


def sample_frames(path: PathLike, n_frames: int, *, method: str = "seek", threads: int = 1) -> np.ndarray:
    """``n_frames`` RGB frames at the times :func:`sample_times` gives for the clip's duration.

    For each time the frame on screen at that moment is returned (the last frame starting at or
    before it). The frames do not depend on ``method`` or ``threads``.

    Args:
        path: video file.
        n_frames: frames to return (12 for TAU development clips, 5 for evaluation clips).
        method: ``"seek"`` (default) seeks to the keyframe before each time and decodes forward
            to it; ``"decode_all"`` decodes every frame and keeps the wanted ones (the reference
            the benchmark compares with; also used automatically for streams without timestamps).
        threads: decoding threads for this one clip. 1 (default) decodes in the calling thread
            only, which is right when many clips are decoded at once (extraction's worker
            processes). More: ``"seek"`` splits the times into groups that share no keyframe and
            seeks each group in its own opened copy of the file, in parallel (no extra decoding);
            when there are fewer groups than threads, or with ``"decode_all"``, FFmpeg's frame
            threading uses the rest.

    Returns:
        ``np.ndarray[uint8]`` of shape ``[n_frames, height, width, 3]``.

    Raises:
        DecodeError: missing, unreadable or truncated video.
    """
    frames, _ = _sample_frames(path, n_frames, method, threads)
    return frames


@dataclass(frozen=True)
class _Counts:
    """What sampling cost, for tests and benchmarks.

    Attributes:
        frames: frames the decoder handed out.
        packets: packets sent to the decoder (including those it dropped as skippable and those
            it decoded but had not handed out when a seek reset it).
    """

    frames: int
    packets: int


def _sample_frames(path: PathLike, n_frames: int, method: str, threads: int = 1) -> tuple[np.ndarray, _Counts]:
    """:func:`sample_frames` plus what the decoder did (for tests/benchmarks)."""
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    if method not in ("seek", "decode_all"):
        raise ValueError(f"method must be 'seek' or 'decode_all', got {method!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    for attempt in dict.fromkeys((method, "decode_all")):  # a stream that cannot seek: decode all
        try:
            if attempt == "seek" and threads > 1:  # only benchmarks and callers outside extraction
                from featurestore.decode._parallel_seek import seek_in_parallel

                arrays, counts = seek_in_parallel(path, n_frames, threads)
            else:
                arrays, counts = _sample_with(path, n_frames, attempt, threads)
            return _stacked(path, arrays), counts
        except _CannotSeek:
            continue
    # timestamps out of order (e.g. B-frames in AVI): decode everything and count frames instead
    arrays, counts = _sample_with(path, n_frames, "decode_all_by_index", threads)
    return _stacked(path, arrays), counts


def _sample_with(path: PathLike, want: int | list[float], method: str, threads: int = 1) -> tuple[list, _Counts]:
    """RGB arrays of the frames at ``want`` (a list of times, or a number of frames for
    :func:`sample_times` of the file's duration), decoded from one opened copy of the file."""
    with _open_video(path) as container:
        info = _probe(container, path)
        stream = video_stream(container)
        _set_decoder_threads(stream, threads)
        times = sample_times(info.duration, want) if isinstance(want, int) else want
        sampler = _Sampler(container, stream, path, info.fps)
        try:
            if method == "seek":
                picked = sampler.by_seeking(times)
            else:
                picked = sampler.by_decoding_all(times, info.fps, by_index=method == "decode_all_by_index")
            arrays = [_upright(path, f) for f in picked]
        except (DecodeError, _CannotSeek):
            raise
        except Exception as exc:  # av.error.*: corrupt data in the middle of the file
            raise DecodeError(path, f"corrupt or truncated video data ({type(exc).__name__}: {exc})") from exc
    return arrays, _Counts(sampler.n_decoded, sampler.n_packets)


def _upright(path: PathLike, frame) -> np.ndarray:
    """The frame's RGB pixels as players show them: turned by the stream's display rotation.

    Phones store portrait video as landscape frames plus a display matrix saying "turn by 90";
    ffmpeg, players and torchcodec apply it, so without it these frames came out sideways (and
    differed from ``--decoder torchcodec``'s). Only quarter turns exist in practice; any other
    angle is refused rather than guessed.
    """
    array = frame.to_ndarray(format="rgb24")
    rotation = int(getattr(frame, "rotation", 0) or 0)  # degrees counterclockwise (PyAV >= 14)
    if rotation % 90:
        raise DecodeError(path, f"display rotation of {rotation} degrees is not a multiple of 90 "
                                f"(the frames cannot be turned upright exactly)")
    turns = (rotation // 90) % 4
    return np.ascontiguousarray(np.rot90(array, turns)) if turns else array


def _set_decoder_threads(stream, threads: int) -> None:
    """One thread: plain decoding. More: FFmpeg frame + slice threading with that many threads."""
    ctx = stream.codec_context
    ctx.thread_count = threads
    ctx.thread_type = "AUTO" if threads > 1 else "SLICE"


def _stacked(path: PathLike, arrays: list) -> np.ndarray:
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DecodeError(path, f"frame size changes within the clip: {sorted(shapes)}")
    return np.stack(arrays)


def target_tick(t: float, start: int, time_base: Fraction) -> int:
    """The pts tick the sampler looks for at ``t`` seconds after the stream's ``start`` (a thousandth of
    a tick of slack, so that a time computed to fall on a frame's start does not round to the tick before)."""
    return start + int(math.floor(Fraction(t) / time_base + Fraction(1, 1000)))


class _CannotSeek(Exception):
    """The frame timestamps cannot be trusted for seeking (missing, out of order, or the demuxer
    refuses to seek): decode everything instead."""


@contextmanager
def _open_video(path: PathLike) -> Iterator:
    """``av.open`` for reading, with every failure to open turned into a DecodeError."""
    import av

    path = Path(path)
    if not path.is_file():
        raise DecodeError(path, "file not found" if not path.exists() else "not a regular file")
    if path.stat().st_size == 0:
        raise DecodeError(path, "empty file (0 bytes)")
    try:
        container = av.open(str(path), mode="r")
    except Exception as exc:  # av.error.InvalidDataError, av.error.FFmpegError, ...
        raise DecodeError(path, f"unreadable video ({type(exc).__name__}: {exc})") from exc
    try:
        if not container.streams.video:
            raise DecodeError(path, "no video stream in file")
        yield container
    finally:
        container.close()


def video_stream(container):
    """The video stream a player shows, as FFmpeg picks it (``av_find_best_stream``: not a cover picture,
    the default track before others, then the one with most frames), which is torchcodec's too.

    The first video stream was taken before: in a Matroska file whose first track is a one-frame
    cover or thumbnail, that track was sampled (a false "truncated", or its frames), while
    ``--decoder torchcodec`` decoded the film. With one video stream nothing changes.
    """
    best = container.streams.best("video")
    return best if best is not None else container.streams.video[0]


def _probe(container, path: PathLike) -> VideoInfo:
    stream = video_stream(container)
    ctx = stream.codec_context
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    if stream.duration and stream.time_base:
        duration, source = float(stream.duration * stream.time_base), "stream"
    elif container.duration and not _starts_late(container, stream):
        duration, source = container.duration / 1_000_000, "container"  # AV_TIME_BASE units
    elif stream.frames and fps > 0:
        duration, source = stream.frames / fps, "frame_count"
    else:
        duration, n_packets = _scan_packets(path)
        fps = n_packets / duration if duration else 0.0  # the stream's rate fields are guesses here
        source = "packets"
    if not duration or duration <= 0 or fps <= 0:
        raise DecodeError(path, f"cannot tell the video's duration or frame rate "
                                f"(duration {duration}, fps {fps:.3g}); the file may be truncated")
    n_frames = int(stream.frames) if stream.frames else int(round(duration * fps))
    return VideoInfo(duration, fps, int(ctx.width), int(ctx.height), n_frames, source)


def _starts_late(container, stream) -> bool:
    """Whether the file's timestamps start after 0, which makes a container's duration ambiguous.

    Matroska's segment duration is the last timestamp, not the span: a clip whose stream starts
    at 0.3 s (``ffmpeg -itsoffset``, cut recordings) claims 4.3 s for 4 s of frames, which spread
    the sampling times over 4.3 s and picked other frames without a word. The packets are
    measured instead (a demux pass, nothing decoded).
    """
    return bool(container.start_time or stream.start_time)


def _scan_packets(path: PathLike) -> tuple[float | None, int]:
    """``(duration, n_packets)`` from a demux pass over a separate handle (nothing is decoded).

    Uses the span of packet timestamps, or the sum of packet durations when there are none
    (raw elementary streams).
    """
    with _open_video(path) as container:
        stream = video_stream(container)
        first = last_end = None
        total = n = 0
        try:
            for packet in container.demux(stream):
                if not packet.size:
                    continue
                n += 1
                total += packet.duration or 0
                if packet.pts is not None:
                    end = packet.pts + (packet.duration or 0)
                    first = packet.pts if first is None else min(first, packet.pts)
                    last_end = end if last_end is None else max(last_end, end)
        except Exception as exc:  # av.error.*: the demuxer hit corrupt data
            raise DecodeError(path, f"corrupt or truncated video data ({type(exc).__name__}: {exc})") from exc
        if not stream.time_base or n == 0:
            return None, n
        ticks = (last_end - first) if first is not None else total
        return float(ticks * stream.time_base), n


class _Sampler:
    """Picks frames out of an open container, keeping decoder state between targets.

    Times are converted to pts ticks once; the frame for a target is the last frame whose pts
    is at or before it.
    """

    def __init__(self, container, stream, path: PathLike, fps: float):
        self.container = container
        self.stream = stream
        self.path = Path(path)
        self.n_decoded = 0
        self.n_packets = 0
        self._tb = stream.time_base
        self._start = stream.start_time or 0
        self._fps = fps
        self._frame_ticks = max(1, int(round(1 / (fps * self._tb)))) if self._tb else 1
        self._frames: Iterator | None = None
        self._prev = None  # last decoded frame with pts <= the current target
        self._pending = None  # first decoded frame past the current target
        self._eof = False
        self._wanted: list[int] | None = None  # the targets (pts ticks) being sampled
        self._current = 0  # the target being looked for; ranges before it are finished
        self._drain_for: int | None = None  # target whose packet ends decoding (the next one seeks)
        self._drained = False  # the decoder was drained: only a seek can continue
        self._index_offset = self._pts_minus_index_ts()
        self._ends: dict[int, int] = {}  # frame start -> next frame's start (_index_intervals)
        self._last: int | None = None  # the last frame's start

    def _ticks(self, t: float) -> int:
        return target_tick(t, self._start, self._tb)

    def _seconds(self, ticks: int) -> float:
        return float((ticks - self._start) * self._tb)

    # -- seeking --------------------------------------------------------------------------------
    def by_seeking(self, times: list[float]) -> list:
        if not self._tb:
            raise _CannotSeek()
        self._index_intervals()
        targets = [self._ticks(t) for t in times]
        self._wanted = targets
        out = []
        for target, drain in zip(targets, self._drain_plan(targets)):
            self._current = target
            self._drain_for = target if drain else None
            if self._must_seek(target):
                self._seek(target)
            frame = self._frame_at(target)
            if frame is None or (self._prev is None and frame.pts > target):
                frame = self._seek_earlier(target)
            out.append(self._checked(frame, target))
        return out

    def _index_intervals(self) -> None:
        """Learn when each frame stops being on screen: the next frame's start, from one demux pass
        (nothing decoded).

        Seeking stops decoding at the frame on screen at a target and skips non-reference frames
        that are on screen at none. It used to take that interval from the packet's duration, or,
        without one, to assume the frame on screen starts within three frames of the target. In
        variable frame rate video (phones, screen recordings) neither holds: MP4 packet durations
        are decode-order steps, Matroska's a rounded default, so frames several positions off came
        back without a word (and one tick off in 29.97 fps Matroska). The gaps between the
        frames' own timestamps are the intervals; the last frame keeps its packet's duration.
        """
        starts = sorted({p.pts: p.duration or 0 for p in self.container.demux(self.stream)
                         if p.size and p.pts is not None}.items())
        self._ends = {pts: next_pts for (pts, _), (next_pts, _) in zip(starts, starts[1:])}
        if starts:
            last, duration = starts[-1]
            self._ends[last] = last + (duration or self._frame_ticks)
            self._last = last

    def _shows(self, pts: int | None, target: int) -> bool:
        """Whether the frame starting at ``pts`` is on screen at ``target`` (False when unknown)."""
        return pts is not None and pts <= target < self._ends.get(pts, pts)

    def _must_seek(self, target: int) -> bool:
        """Seek unless the keyframe before ``target`` is at or behind the decoder's position."""
        position = next((f.pts for f in (self._pending, self._prev) if f is not None), None)
        if self._frames is None or position is None or self._eof or self._drained:
            return True
        keyframe = self._keyframe_before(target)
        return keyframe is None or keyframe > position

    def _keyframe_before(self, target: int) -> int | None:
        """pts of the demuxer-indexed keyframe at or before ``target`` (None: no index entry)."""
        entries = self.stream.index_entries
        idx = entries.search_timestamp(target - self._index_offset, backward=True) if len(entries) else -1
        return entries[idx].timestamp + self._index_offset if idx >= 0 else None

    def _drain_plan(self, targets: list[int]) -> list[bool]:
        """For each target, whether decoding may stop at its frame's packet.

        A decoder holds frames back for reordering (two with x264's B-frame pyramid), so the
        frame on screen at a target normally comes out only after one or two more packets are
        decoded - often the next GOP's keyframe, the most expensive frame there is. When the
        next target lies beyond the next keyframe (or there is none), those packets would be
        thrown away by the seek anyway, so the decoder is drained instead: it hands out the
        frames it holds without decoding anything more. Without an index (no keyframe
        positions) nothing is drained.
        """
        plan = []
        for i, target in enumerate(targets):
            if i + 1 == len(targets):
                plan.append(True)
                continue
            keyframe = self._keyframe_before(targets[i + 1])
            plan.append(keyframe is not None and keyframe > target)
        return plan

    def _pts_minus_index_ts(self) -> int:
        """How far pts run ahead of the demuxer's index timestamps.

        MP4 indexes frames by decode time, which B-frames put a constant delay behind the
        presentation time; Matroska indexes by pts (offset 0). Only used to decide whether to
        seek, so a wrong guess costs time, never correctness.
        """
        entries = self.stream.index_entries
        if not len(entries) or self.stream.start_time is None:
            return 0
        return max(0, self.stream.start_time - entries[0].timestamp)

    def _seek(self, ticks: int) -> None:
        try:
            self.container.seek(ticks, stream=self.stream, backward=True, any_frame=False)
        except Exception as exc:  # e.g. raw elementary streams: "Operation not permitted"
            raise _CannotSeek(str(exc)) from exc
        self._frames = self._decode_iter()
        self._prev = self._pending = None
        self._eof = self._drained = False

    def _seek_earlier(self, target: int):
        """Recover from a seek that landed past the target or at the end of the stream.

        Happens with B-frames (a keyframe's pts is later than its decode time) and with demuxers
        that seek by byte position (MPEG-TS). Seek further back, doubling the distance, until the
        decoder starts at or before the target.
        """
        back = self._frame_ticks * 8
        while True:
            point = target - back
            if point <= self._start:
                point = min(self._start, 0)  # the very beginning of the file
            self._seek(point)
            frame = self._frame_at(target)
            if frame is not None and (self._prev is not None or frame.pts <= target):
                return frame
            if point <= self._start:
                if frame is not None and self._seconds(frame.pts) < 0.5 / self._fps:
                    return frame  # the target lies before the first frame: that frame is on screen
                raise _CannotSeek(f"no seek reaches t={self._seconds(target):.3f} s")
            back *= 2

    def _checked(self, frame, target: int):
        """The frame for ``target``, or a DecodeError when the stream ended well before it."""
        if frame is None:
            raise DecodeError(self.path, f"truncated: no frame could be decoded at "
                                         f"t={self._seconds(target):.3f} s")
        if self._eof and self._pending is None:
            end = frame.pts + (frame.duration or self._frame_ticks)
            if end + self._frame_ticks // 2 < target:
                raise DecodeError(self.path, f"truncated: frames end at {self._seconds(end):.3f} s, "
                                             f"needed one at {self._seconds(target):.3f} s")
        return frame

    def _frame_at(self, target: int):
        """The last frame with pts <= target, decoding forward from the current position."""
        if self._pending is not None and self._pending.pts > target:
            return self._prev if self._prev is not None else self._pending
        while True:
            frame = self._pending if self._pending is not None else next(self._frames, None)
            self._pending = None
            if frame is None:
                self._eof = True
                return self._prev
            if frame.pts is None:
                raise _CannotSeek("frames carry no timestamps")
            if self._prev is not None and frame.pts <= self._prev.pts:
                raise _CannotSeek("frame timestamps out of order")
            if frame.pts > target:
                self._pending = frame
                return self._prev if self._prev is not None else frame
            self._prev = frame
            if self._shows(frame.pts, target):
                return frame  # still on screen at the target: no need to decode the next frame

    def _decode_iter(self) -> Iterator:
        """Decoded frames from the current position on.

        While seeking, packets of non-reference frames that cannot be the answer to any remaining
        target are dropped by the decoder (``skip_frame="NONREF"``): no other frame depends on
        them, so skipping them changes nothing but the time spent. Once the packet of the frame
        on screen at a target planned for draining (:meth:`_drain_plan`) has been sent, the
        decoder is drained and iteration ends; the next target seeks.
        """
        ctx = self.stream.codec_context
        skipping = False
        try:
            for packet in self.container.demux(self.stream):
                skip = self._wanted is not None and not self._near_target(packet)
                if skip != skipping:
                    ctx.skip_frame = "NONREF" if skip else "DEFAULT"
                    skipping = skip
                self.n_packets += 1
                for frame in packet.decode():
                    self.n_decoded += 1
                    yield frame
                if self._drain_for is not None and self._shows(packet.pts, self._drain_for):
                    self._drained = True
                    for frame in ctx.decode(None):
                        self.n_decoded += 1
                        yield frame
                    return
        finally:
            if skipping:
                ctx.skip_frame = "DEFAULT"

    def _near_target(self, packet) -> bool:
        """Whether the packet's frame could be the frame shown at one of the remaining targets: it is
        on screen at one (:meth:`_index_intervals`), or it is the last frame and a target lies at or
        after its start (a target just past the end still gets it). A packet without a timestamp,
        or one the index did not see, is decoded."""
        pts = packet.pts
        if pts is None or pts not in self._ends:
            return True
        remaining = [target for target in self._wanted if target >= self._current]
        return any(self._shows(pts, target) or (pts == self._last and target >= pts) for target in remaining)

    # -- reference: decode everything ---------------------------------------------------------------
    def by_decoding_all(self, times: list[float], fps: float, by_index: bool = False) -> list:
        """Decode every frame; frame times come from pts, or from the frame index when absent
        (or when ``by_index``)."""
        out: list = []
        prev, prev_end = None, 0.0
        k = 0
        for index, frame in enumerate(self._decode_iter()):
            if frame.pts is not None and self._tb and not by_index:
                if prev is not None and prev.pts is not None and frame.pts <= prev.pts:
                    raise _CannotSeek("frame timestamps out of order")
                t = self._seconds(frame.pts)
                length = float(frame.duration * self._tb) if frame.duration else 1 / fps
            else:
                t, length = index / fps, 1 / fps
            while k < len(times) and t > times[k] + 1e-6:
                out.append(prev if prev is not None else frame)
                k += 1
            prev, prev_end = frame, t + length
        if k < len(times):
            if prev is None or prev_end + 0.5 / fps < times[-1]:
                raise DecodeError(self.path, f"truncated: frames end at {prev_end:.3f} s, "
                                             f"needed one at {times[-1]:.3f} s")
            out.extend([prev] * (len(times) - k))
        return out
