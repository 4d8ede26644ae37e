"""A plain CSV manifest, for datasets that are not laid out like TAU.

Columns (comma- or tab-separated, header required)::

    clip_id, audio, video[, label][, split][, city][, location]

A manifest without a ``label`` column (``clip_id,audio,video``) has no classes of its own: give them
with ``classes=`` (``featurestore extract --classes a,b,c``), or a head's predictions bring them.
``audio``/``video`` are paths relative to the CSV's directory, which is the dataset root: an absolute
path, or one with a ``..`` component, is refused unless the reader is called with
``allow_outside_root=True`` (``featurestore extract --allow-outside-root``); symlinks under the root
(``audio -> /data/tau/audio``) are followed. One of
the two columns may be absent or a cell empty for clips without that modality. ``split`` holds
split names separated by ``;`` (a clip may be in several). ``location`` lets location-level
splits and cross-fitting work as they do for TAU. A ``dataset.json`` next to the CSV (see
``DatasetSidecar``) may give the clip length or the segment and frame counts.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from featurestore.clip_table import ClipRecord
from featurestore.datasets._common import (
    DatasetFormatError,
    PathLike,
    check_count,
    check_inside_root,
    checked_clip_id,
    clip_counts,
    read_table,
)
from featurestore.manifest import Manifest, check_classes

_KNOWN = ("clip_id", "audio", "video", "label", "split", "city", "location")
#: Without an argument or a ``dataset.json``: TAU-like 10 s clips, 12 frames.
DEFAULT_SEGMENTS, DEFAULT_FRAMES = 10, 12


def read_csv_manifest(
    path: PathLike,
    classes: Sequence[str] | None = None,
    *,
    audio_segments: int | None = None,
    segment_seconds: float = 1.0,
    video_frames: int | None = None,
    name: str | None = None,
    allow_outside_root: bool = False,
) -> Manifest:
    """Read a CSV manifest.

    Args:
        path: the CSV file.
        classes: ordered class names (every label must be one of them); None takes the sorted
            unique labels of the file, which is no classes at all for a file without labels.
        audio_segments: audio segments per clip for extraction. None derives it: from the
            ``dataset.json`` next to the CSV when there is one (``clip_seconds / segment_seconds``,
            or its ``audio_segments``), else 10.
        segment_seconds: length of one audio segment.
        video_frames: frames sampled per clip (None: ``dataset.json``'s, else 12).
        name: dataset name for the store (default: the CSV's stem).
        allow_outside_root: accept absolute paths and paths with ``..`` (symlinks under the CSV's
            directory are followed either way).

    Raises:
        DatasetFormatError: missing columns, duplicate ids, a label not in ``classes``, a path
            outside the dataset root (naming the file and line), a malformed ``dataset.json``.
        ValueError: ``audio_segments``/``video_frames`` not an integer >= 1.
    """
    check_count("audio_segments", audio_segments)
    check_count("video_frames", video_frames)
    table = read_table(path)
    header = [h.lower() for h in table.header or []]
    if "clip_id" not in header or not ({"audio", "video"} & set(header)):
        raise DatasetFormatError(table.path, 1, f"need a clip_id column and an audio and/or video column; "
                                                f"header is {table.header}")
    unknown = [h for h in header if h not in _KNOWN]
    if unknown:
        raise DatasetFormatError(table.path, 1, f"unknown column(s) {unknown}; known: {', '.join(_KNOWN)}")
    base = table.path.parent.absolute()
    clips, lines = [], {}
    for line, row in table.rows:
        cell = dict(zip(header, row, strict=True))  # read_table checked every row's width
        clip = _record(cell)
        checked_clip_id(table.path, line, clip.clip_id)
        if clip.clip_id in lines:
            raise DatasetFormatError(table.path, line, f"clip {clip.clip_id!r} already listed on line "
                                                       f"{lines[clip.clip_id]}")
        lines[clip.clip_id] = line
        for listed in (cell.get("audio", ""), cell.get("video", "")):
            check_inside_root(base, listed, table.path, line, clip.clip_id, allow_outside_root)
        clips.append(clip)
    classes = _classes(table.path, clips, lines, classes)
    audio_segments, video_frames = clip_counts([base], audio_segments, video_frames, default_segments=DEFAULT_SEGMENTS,
                                               default_frames=DEFAULT_FRAMES, segment_seconds=segment_seconds)
    return Manifest(name or table.path.stem, classes, clips, base, audio_segments=audio_segments,
                    segment_seconds=segment_seconds, video_frames=video_frames)


def _record(cell: dict[str, str]) -> ClipRecord:
    splits = frozenset(s.strip() for s in cell.get("split", "").split(";") if s.strip())
    return ClipRecord(
        clip_id=cell["clip_id"],
        audio=Path(cell["audio"]) if cell.get("audio") else None,
        video=Path(cell["video"]) if cell.get("video") else None,
        label=cell.get("label") or None,
        city=cell.get("city", ""),
        location=cell.get("location", ""),
        splits=splits,
    )


def _classes(path: Path, clips: list[ClipRecord], lines: dict[str, int],
             classes: Sequence[str] | None) -> list[str]:
    labels = {c.label for c in clips if c.label is not None}
    if classes is None:
        return sorted(labels)
    classes = check_classes(classes)
    for clip in clips:
        if clip.label is not None and clip.label not in classes:
            raise DatasetFormatError(path, lines[clip.clip_id], f"label {clip.label!r} of clip {clip.clip_id!r} "
                                                                f"is not one of the classes {classes}")
    return classes
