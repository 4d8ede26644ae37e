"""Files given on a command line, grouped into clips: ``x.wav x.mp4`` is clip ``x`` with audio and video.

Kept free of torch and the encoders, so that ``fusion classify`` can check and group the files it
hands to ``heads classify`` without loading any model library itself.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from featurestore.errors import FeatureStoreError

__all__ = ["AUDIO_SUFFIXES", "VIDEO_SUFFIXES", "ClipFiles", "FilesError", "group_files"]

#: File name endings read as audio (libsndfile) and as video (FFmpeg through PyAV).
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".aif", ".aiff", ".mp3")
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts")


class FilesError(FeatureStoreError, ValueError):
    """Files given for encoding cannot be used: missing, of an unknown kind, two of one kind in a
    clip, or without the modality a feature set needs."""


@dataclass(frozen=True)
class ClipFiles:
    """The files of one clip: its name (the files' common stem) and its audio and/or video file."""

    name: str
    audio: Path | None = None
    video: Path | None = None

    @property
    def files(self) -> list[Path]:
        return [p for p in (self.audio, self.video) if p is not None]

    def describe(self) -> str:
        """``x.wav+x.mp4``: how tables and errors name the clip."""
        return "+".join(str(p) for p in self.files)


def group_files(paths: Iterable[str | Path]) -> list[ClipFiles]:
    """Group files into clips by stem, in the order the stems first appear.

    ``a/x.wav b/x.mp4 y.wav`` gives clip ``x`` (audio and video) and clip ``y`` (audio only). The
    kind of a file comes from its ending (:data:`AUDIO_SUFFIXES`, :data:`VIDEO_SUFFIXES`).

    Raises:
        FilesError: no files, directories or missing files (all named at once), an unknown ending,
            or two audio (or two video) files with one stem.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise FilesError("no files given: expected audio (.wav) and/or video (.mp4) files")
    directories = [str(p) for p in paths if p.is_dir()]
    if directories:  # said before "not found": a folder given for its files is the likelier mistake
        raise FilesError(f"{len(directories)} argument(s) are directories, not files: {_listed(directories)}; "
                         f"give the audio and video files in them (e.g. DIR/*.wav DIR/*.mp4)")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FilesError(f"{len(missing)} file(s) not found: {_listed(missing)}")
    special = [str(p) for p in paths if not p.is_file()]
    if special:
        raise FilesError(f"{len(special)} argument(s) are not regular files (a FIFO, a device?): {_listed(special)}")
    found: dict[str, dict[str, Path]] = {}
    for path in paths:
        kind = _kind(path)
        clip = found.setdefault(path.stem, {})
        if kind in clip:
            raise FilesError(f"clip {path.stem!r}: two {kind} files, {clip[kind]} and {path}; a clip is all the "
                             f"files given with one stem, at most one audio and one video file")
        clip[kind] = path
    return [ClipFiles(stem, kinds.get("audio"), kinds.get("video")) for stem, kinds in found.items()]


def _listed(paths: list[str]) -> str:
    """The first ten paths, and how many more."""
    return ", ".join(paths[:10]) + (f" and {len(paths) - 10} more" if len(paths) > 10 else "")


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in AUDIO_SUFFIXES:
        return "audio"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    raise FilesError(f"{path}: unknown kind of file {suffix or '(no ending)'!r}; expected audio "
                     f"({', '.join(AUDIO_SUFFIXES)}) or video ({', '.join(VIDEO_SUFFIXES)})")
