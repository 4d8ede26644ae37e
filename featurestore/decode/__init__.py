"""Decoding: audio files -> fixed-length mono segments, video files -> frames at equal intervals.

Everything an encoder sees comes through here, so the policies live in one place:

* Audio is read with soundfile, averaged to mono over all channels and resampled to the requested
  rate with a polyphase filter (``scipy.signal.resample_poly``) when the file's rate differs.
  librosa is deliberately not used: its first call spends ~20 s compiling.
* Audio is streamed in blocks and decoded no further than the clip needs: a header that says the
  file is too long is refused before any sample is read, and no header's frame count sizes an
  allocation, so memory is bounded by the clip whatever a file holds or claims.
* A clip shorter or longer than ``n_segments * segment_seconds`` by at most ``tolerance_seconds``
  is zero-padded or trimmed at the end; beyond that it is a :class:`DecodeError` (a clip of the
  wrong length usually means the wrong dataset or a broken file, and silently padding 4 s of a
  10 s clip would put 6 s of silence into the features).
* All-zero audio is a :class:`DecodeError` unless ``allow_silent=True``.
* Video frames are taken at times ``(i + 0.5) * duration / n`` by seeking to the keyframe before
  each time and decoding forward to it, so a 10 s clip costs a few GOPs, not every frame. When the
  next time lies in the GOP already being decoded, decoding simply continues instead of seeking.
  Non-reference frames that are not on screen at a time are not decoded, and when the next time
  needs a seek the decoder is drained at the wanted frame instead of being fed the next GOP's
  first packets (which its reordering delay would otherwise ask for). None of this changes a
  pixel: every frame that is decoded, and every frame it depends on, is decoded exactly.
* The frame on screen at a time is found from the frames' own timestamps (one demux pass per clip,
  nothing decoded), never from packet durations, which variable frame rate video (phones, screen
  recorders) does not keep. Frames come out upright: a display rotation (portrait phone video) is
  applied as ffmpeg and torchcodec apply it. The stream sampled is the one FFmpeg would play
  (``video_stream``: not a cover picture).
* Decoding is single-threaded unless ``threads`` asks for more (extraction already decodes many
  clips at once in worker processes, and never asks); then groups of times that share no keyframe
  are sought in parallel, each in its own opened copy of the file (``_parallel_seek``, loaded only
  then; ``scripts/bench/bench_frames.py`` reports it beside the single-threaded sampler).

Every failure is a :class:`DecodeError` naming the file and what was wrong.
"""
from __future__ import annotations

from featurestore.decode._errors import DecodeError
from featurestore.decode.audio import DEFAULT_TOLERANCE_SECONDS, load_audio, load_audio_segments, resample
from featurestore.decode.video import VideoInfo, probe_video, sample_frames, sample_times

__all__ = [
    "DEFAULT_TOLERANCE_SECONDS", "DecodeError", "VideoInfo", "load_audio", "load_audio_segments",
    "probe_video", "resample", "sample_frames", "sample_times",
]
