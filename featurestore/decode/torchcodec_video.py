"""Video frames through torchcodec: ``sample_frames``' frames, decoded on the CPU or on a GPU (NVDEC).

Why a second decoder: on a GPU host the CPU decode workers are what bounds extraction's feed
(issue 21); torchcodec decodes H.264/HEVC/AV1 on the GPU's own decoder and hands back frames
already in device memory. It is optional (``pip install 'avscene[torchcodec]'``, plus FFmpeg 4-9's
shared libraries, which torchcodec does not bundle) and chosen with ``extract(decoder="torchcodec")``.

The frames are taken at exactly the sampler's times: the file is probed with PyAV as
``sample_frames`` probes it (duration, stream start, time base), the same target ticks are
computed, and torchcodec is asked for the frame played at each ("exact" seek mode: the demuxer's
scan gives every frame's pts, and the frame played at a tick is the last one starting at or before
it, the PyAV sampler's rule). torchcodec's CPU decoder then gives the PyAV path's frames bit for bit
on the H.264 clips tested (tests/featurestore/test_decode_torchcodec.py); NVDEC converts YUV to RGB
with other arithmetic, so CUDA frames differ by a few levels and extraction records the decoder in
the fingerprint (``Source.scheme``).

Only MP4/MOV and Matroska/WebM files are taken (``CONTAINERS``): their frames carry presentation
timestamps that both libraries read alike. On others torchcodec's frame times are not the PyAV
sampler's (MPEG-TS: torchcodec's exact index starts half a second in, at frame 5 of a test clip;
AVI with B-frames stores no presentation times, which the PyAV sampler meets by counting frames),
so the frames would differ: such a file is a :class:`DecodeError` naming it and its container.
"""
from __future__ import annotations

from fractions import Fraction
from functools import cache

import torch

from featurestore.decode._errors import DecodeError, PathLike
from featurestore.decode.video import _open_video, _probe, sample_times, target_tick, video_stream
from featurestore.errors import FeatureStoreError

#: What to install for this decoder (named by every error saying it is missing).
EXTRA = "avscene[torchcodec]"
#: ``extract(decoder=)`` values: the default PyAV sampler, and torchcodec.
DECODERS = ("pyav", "torchcodec")
#: Containers (FFmpeg demuxer names) whose frame times torchcodec reads as the PyAV sampler does.
CONTAINERS = frozenset({"mov", "mp4", "matroska", "webm"})


class DecoderUnavailable(FeatureStoreError):
    """torchcodec is not installed, or cannot load FFmpeg's libraries (message: one line, what to
    install; the command line's exit 2, as for the other missing extras)."""


@cache
def _video_decoder_class() -> type:
    """torchcodec's ``VideoDecoder``, loaded once. Importing torchcodec loads ``torch._dynamo`` (seconds):
    ``extract`` checks the decoder, and so imports it, before it forks its decode workers, which inherit it."""
    try:
        import torchcodec
        from torchcodec.decoders import VideoDecoder
    except ImportError as err:
        raise DecoderUnavailable(f"decoder 'torchcodec': torchcodec is not installed ({err}); "
                                 f"pip install '{EXTRA}'") from None
    if torchcodec.ffmpeg_major_version is None:
        raise DecoderUnavailable(
            f"decoder 'torchcodec': torchcodec {getattr(torchcodec, '__version__', '?')} is installed but cannot "
            f"load FFmpeg's shared libraries (it needs FFmpeg 4-9: libavutil.so.56-61, not bundled); install them, "
            f"e.g. apt-get install libavcodec59 libavformat59 libavdevice59 libavfilter8 libswscale6")
    return VideoDecoder


def check_decoder(decoder: str) -> None:
    """Refuse an unknown decoder name, or torchcodec when it cannot run here (one line each)."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if decoder == "torchcodec":
        _video_decoder_class()


def sample_frames_torchcodec(path: PathLike, n_frames: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """``n_frames`` RGB frames at :func:`~featurestore.decode.sample_times` of the clip, by torchcodec.

    Args:
        path: video file.
        n_frames: frames to return.
        device: ``"cpu"`` (FFmpeg's software decoders) or ``"cuda[:N]"`` (NVDEC).

    Returns:
        ``uint8 [n_frames, height, width, 3]`` tensor on ``device`` (the layout ``sample_frames`` gives).

    Raises:
        DecoderUnavailable: torchcodec is missing or cannot load FFmpeg.
        DecodeError: missing, unreadable or truncated video, or a stream without timestamps.
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    seconds, half_frame = _targets(path, n_frames)
    video_decoder = _video_decoder_class()
    try:
        decoder = video_decoder(str(path), device=str(device), seek_mode="exact", dimension_order="NHWC")
        end = decoder.metadata.end_stream_seconds
        inside = [s for s in seconds if end is None or s < end]
        parts = [decoder.get_frames_played_at(inside).data] if inside else []
        if len(inside) < len(seconds):
            last = _last_frame(path, decoder, seconds[-1], half_frame)
            parts.append(last.repeat(len(seconds) - len(inside), 1, 1, 1))
        frames = parts[0] if len(parts) == 1 else torch.cat(parts)
    except DecodeError:
        raise
    except Exception as exc:  # torchcodec raises RuntimeError/IndexError/ValueError with FFmpeg's words
        raise DecodeError(path, f"torchcodec could not decode it ({type(exc).__name__}: "
                                f"{' '.join(str(exc).split())[:300]})") from exc
    return frames.contiguous()


def _last_frame(path: PathLike, decoder, latest: float, half_frame: float) -> torch.Tensor:
    """The last frame ``[1, H, W, 3]``, for times at or after torchcodec's end of stream.

    torchcodec refuses any time at or after its end ("frame pts is 1.389594; must be less than
    1.300000"), and its end is sometimes the last frame's start (clips cut with ``ffmpeg -ss ... -c
    copy``, variable frame rate MP4), where the PyAV sampler gives the last frame while it is on
    screen and for half a frame after: so a clip the sampler decodes failed with ``--decoder
    torchcodec``. The sampler's rule is applied here: the last frame, or "truncated" past that.
    """
    last = decoder.get_frame_at(len(decoder) - 1)
    frame_end = last.pts_seconds + (last.duration_seconds or 2 * half_frame)
    if latest > frame_end + half_frame:
        raise DecodeError(path, f"truncated: frames end at {frame_end:.3f} s, needed one at {latest:.3f} s")
    return last.data.unsqueeze(0)


def target_seconds(path: PathLike, n_frames: int) -> list[float]:
    """The stream times (seconds, as pts count them) at which the PyAV sampler picks its frames.

    Each is the sampler's target tick plus half a tick, so that the frame starting exactly at the
    target is "played at" it whatever rounding torchcodec applies to seconds.
    """
    return _targets(path, n_frames)[0]


def _targets(path: PathLike, n_frames: int) -> tuple[list[float], float]:
    """:func:`target_seconds` and half a frame's length in seconds (the sampler's slack at the end)."""
    with _open_video(path) as container:
        info = _probe(container, path)
        stream = video_stream(container)
        base, start = stream.time_base, stream.start_time or 0
        container_name = container.format.name
    if not CONTAINERS & set(container_name.split(",")):
        raise DecodeError(path, f"decoder 'torchcodec' takes MP4/MOV and Matroska/WebM files only, this is "
                                f"{container_name!r} (its frame times would not be the default sampler's): "
                                f"decode it with the default decoder (pyav)")
    if not base:
        raise DecodeError(path, "the video stream has no time base (frames without timestamps): decode it "
                                "with the default decoder (pyav)")
    ticks = [target_tick(t, start, base) for t in sample_times(info.duration, n_frames)]
    return [float((tick + Fraction(1, 2)) * base) for tick in ticks], 0.5 / info.fps
