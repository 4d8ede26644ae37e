"""Readers for TAU Urban Audio-Visual Scenes 2021 (DCASE2021 Task 1B), development and evaluation.

The development layout (see docs/datasets-and-decoding.md)::

    TAU-urban-audio-visual-scenes-2021-development/
        audio/airport-london-6-257.wav   video/airport-london-6-257.mp4
        meta.csv                         (tab-separated: filename_audio filename_video scene_label identifier)
        evaluation_setup/fold1_train.csv fold1_evaluate.csv fold1_test.csv

The metadata may also sit in a sibling ``...-development.meta/`` directory (how the metadata archive
unpacks) or the two directories may sit side by side under a common parent; :func:`locate_tau`
searches these places and says what it found. A ``dataset.json`` next to meta.csv, the split files
or the media directories may say how long the clips are (see ``DatasetSidecar``).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from featurestore.clip_table import ClipRecord
from featurestore.datasets._common import (
    DatasetFormatError,
    PathLike,
    Table,
    check_count,
    check_inside_root,
    checked_clip_id,
    clip_counts,
    read_table,
)
from featurestore.manifest import TAU_CLASSES, Manifest

log = logging.getLogger(__name__)

_AUDIO_COLUMNS = ("filename_audio", "filename")
_VIDEO_COLUMNS = ("filename_video",)
_LABEL_COLUMNS = ("scene_label",)
_HEADER_FIRST = _AUDIO_COLUMNS + _VIDEO_COLUMNS

#: TAU's fixed shapes: 10 s development clips cut into 10 segments of 1 s with 12 frames (the
#: paper's setup); 1 s evaluation clips, 1 segment, 5 frames.
SEGMENT_SECONDS = 1.0
DEV_SEGMENTS, DEV_FRAMES = 10, 12
EVAL_SEGMENTS, EVAL_FRAMES = 1, 5


@dataclass
class TauLayout:
    """Where the parts of a TAU-style dataset were found.

    Attributes:
        root: the path the user gave.
        media_dir: directory holding ``audio/`` and/or ``video/``; the manifest's ``root``, which
            its relative clip paths (``audio/x.wav``, as in meta.csv) are relative to. None when
            neither directory was found (the metadata directory serves as root then).
        meta_csv: ``meta.csv`` (None for evaluation data without one).
        fold_files: ``evaluation_setup/*.csv``, sorted by name.
        searched: directories looked at, in order.
    """

    root: Path
    media_dir: Path | None
    meta_csv: Path | None
    fold_files: list[Path] = field(default_factory=list)
    searched: list[Path] = field(default_factory=list)

    @property
    def name(self) -> str:
        base = self.media_dir or (self.meta_csv.parent if self.meta_csv else self.root)
        return base.name.removesuffix(".meta")

    def describe(self) -> str:
        """One paragraph saying what was found where (logged by the readers)."""
        media = (f"audio/video under {self.media_dir}" if self.media_dir
                 else "no audio/ or video/ directory (paths resolved against the metadata directory)")
        meta = f"meta.csv at {self.meta_csv}" if self.meta_csv else "no meta.csv"
        folds = ", ".join(p.name for p in self.fold_files) or "no evaluation_setup/*.csv"
        return f"{self.root}: {meta}; {media}; split files: {folds}"


def locate_tau(root: PathLike) -> TauLayout:
    """Find meta.csv, the split files and the media directory of a TAU-style dataset.

    Looks in ``root``, then its ``.meta`` sibling (or, for a ``.meta`` directory, the sibling
    without the suffix), then ``root``'s immediate subdirectories.
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset directory {root} does not exist")
    candidates = _candidates(root)
    meta = next((d / "meta.csv" for d in candidates if (d / "meta.csv").is_file()), None)
    setup = next((d / "evaluation_setup" for d in candidates if _fold_files(d / "evaluation_setup")), None)
    media = next((d for d in candidates if (d / "audio").is_dir() or (d / "video").is_dir()), None)
    return TauLayout(root, media, meta, _fold_files(setup) if setup else [], candidates)


def read_tau(root: PathLike, *, audio_segments: int | None = None,
             video_frames: int | None = None, allow_outside_root: bool = False,
             classes: Sequence[str] | None = None) -> Manifest:
    """Read the TAU Urban Audio-Visual Scenes 2021 development set into a Manifest.

    Every ``evaluation_setup/*.csv`` present becomes a split named by its stem (``fold1_train``).
    The clip id is the file stem; city and location come from the name
    ``scene-city-locationID-segmentID`` (location = ``city-locationID``).

    Args:
        root: the dataset directory (or its ``.meta`` sibling, or their common parent).
        audio_segments: 1 s audio segments per clip. None derives it: from ``dataset.json``
            when the dataset has one (``{"clip_seconds": 3}`` gives 3), else TAU's 10. Only
            ``dataset.json`` is read: a directory written by an old demo generator, with only
            ``demo_config.json``, gets TAU's 10 (``featurestore.demo.add_dataset_file`` fixes it).
        video_frames: frames sampled per clip (None: ``dataset.json``'s, else the paper's 12).
        allow_outside_root: accept listed paths that are absolute or hold ``..``; refused by
            default (see ``check_inside_root``). Symlinks under the media directory (a symlinked
            ``audio/``, or single files) are followed either way.
        classes: the class order of the store (default: the DCASE order, ``TAU_CLASSES``); every
            label must be one of them.

    Raises:
        FileNotFoundError: no meta.csv near ``root``.
        DatasetFormatError: malformed metadata, an unknown scene label, a name that does not
            parse, a split file listing an unknown clip, a path outside the dataset root (each
            naming the file and line), or a malformed ``dataset.json``.
        ValueError: ``audio_segments``/``video_frames`` not an integer >= 1.
    """
    check_count("audio_segments", audio_segments)
    check_count("video_frames", video_frames)
    layout = locate_tau(root)
    if layout.meta_csv is None:
        raise FileNotFoundError("no meta.csv found for a TAU development set; looked in: "
                                + ", ".join(str(d) for d in layout.searched))
    _log_layout(layout)
    base = layout.media_dir or layout.meta_csv.parent
    clips = _read_meta(read_table(layout.meta_csv, "\t"), base, allow_outside_root)
    by_id = {c.clip_id: c for c in clips}
    for fold in layout.fold_files:
        _apply_split(read_table(fold, "\t", _HEADER_FIRST), by_id)
    _check_train_apart(layout.fold_files, clips)
    audio_segments, video_frames = clip_counts(_sidecar_places(layout), audio_segments, video_frames,
                                               default_segments=DEV_SEGMENTS, default_frames=DEV_FRAMES)
    manifest = Manifest(layout.name, list(TAU_CLASSES), clips, base, audio_segments=audio_segments,
                        segment_seconds=SEGMENT_SECONDS, video_frames=video_frames)
    return manifest if classes is None else manifest.with_classes(classes)


def read_tau_eval(root: PathLike, *, audio_segments: int | None = None,
                  video_frames: int | None = None, allow_outside_root: bool = False,
                  classes: Sequence[str] | None = None) -> Manifest:
    """Read a TAU-style evaluation set (1 s clips named ``0.wav``/``0.mp4``..., no labels).

    Clips come from ``evaluation_setup/*.csv`` when present (each file becomes a split), else
    from listing ``audio/`` and ``video/``; integer ids are sorted numerically. A clip found
    only under one of the two directories still gets the other's expected path, so that
    :func:`check_files` reports it as missing.

    Args:
        root: the dataset directory.
        audio_segments: 1 s audio segments per clip. None derives it: from ``dataset.json`` when
            present (``{"clip_seconds": 2}`` gives 2), else TAU's 1.
        video_frames: frames sampled per clip (None: ``dataset.json``'s, else 5).
        allow_outside_root: as for :func:`read_tau`.
        classes: the class list a store of these unlabelled clips gets (default: ``TAU_CLASSES``).

    Raises:
        FileNotFoundError: neither split files nor audio/video directories near ``root``.
        DatasetFormatError: an unreadable split file, a malformed ``dataset.json``, a path outside
            the dataset root.
        ValueError: ``audio_segments``/``video_frames`` not an integer >= 1.
    """
    check_count("audio_segments", audio_segments)
    check_count("video_frames", video_frames)
    layout = locate_tau(root)
    if not layout.fold_files and layout.media_dir is None:
        raise FileNotFoundError("no evaluation_setup/*.csv and no audio/ or video/ directory; looked in: "
                                + ", ".join(str(d) for d in layout.searched))
    _log_layout(layout)
    base = layout.media_dir or layout.fold_files[0].parent.parent
    if layout.fold_files:
        clips = _clips_from_folds(layout.fold_files, base, allow_outside_root)
    else:
        clips = _clips_from_listing(base)
    audio_segments, video_frames = clip_counts(_sidecar_places(layout), audio_segments, video_frames,
                                               default_segments=EVAL_SEGMENTS, default_frames=EVAL_FRAMES)
    manifest = Manifest(layout.name, list(TAU_CLASSES), clips, base, audio_segments=audio_segments,
                        segment_seconds=SEGMENT_SECONDS, video_frames=video_frames)
    return manifest if classes is None else manifest.with_classes(classes)


# ------------------------------------------------------------------------------------------------


def _candidates(root: Path) -> list[Path]:
    name = root.name
    sibling = root.with_name(name.removesuffix(".meta") if name.endswith(".meta") else name + ".meta")
    children = sorted(d for d in root.iterdir() if d.is_dir() and d.name not in ("audio", "video",
                                                                                  "evaluation_setup"))
    out = [root] + ([sibling] if sibling.is_dir() else []) + children
    return list(dict.fromkeys(out))


def _sidecar_places(layout: TauLayout) -> list[Path]:
    """Where a ``dataset.json`` may sit: next to meta.csv, the split files or the media directories."""
    places = [layout.meta_csv.parent if layout.meta_csv else None,
              layout.fold_files[0].parent.parent if layout.fold_files else None, layout.media_dir]
    return [d for d in places if d is not None]


def _fold_files(setup: Path) -> list[Path]:
    return sorted(setup.glob("*.csv")) if setup.is_dir() else []


def _log_layout(layout: TauLayout) -> None:
    log.info("%s", layout.describe())
    if layout.media_dir is None:
        log.warning("%s: no audio/ or video/ directory found; media paths point next to the metadata",
                    layout.root)


def _require(table: Table, names: tuple[str, ...], what: str) -> int:
    idx = table.column(names)
    if idx is None:
        found = "\t".join(table.header) if table.header else "(no header)"
        raise DatasetFormatError(table.path, 1, f"missing column {what}; header is {found!r}")
    return idx


def _read_meta(table: Table, base: Path, allow_outside_root: bool) -> list[ClipRecord]:
    ia = _require(table, _AUDIO_COLUMNS, "filename_audio")
    iv = _require(table, _VIDEO_COLUMNS, "filename_video")
    il = _require(table, _LABEL_COLUMNS, "scene_label")
    ii = table.column(("identifier",))
    clips: list[ClipRecord] = []
    seen: dict[str, int] = {}
    for line, row in table.rows:
        clip_id = _clip_id(table, line, row[ia], row[iv])
        if clip_id in seen:
            raise DatasetFormatError(table.path, line, f"clip {clip_id!r} already listed on line {seen[clip_id]}")
        seen[clip_id] = line
        for listed in (row[ia], row[iv]):
            check_inside_root(base, listed, table.path, line, clip_id, allow_outside_root)
        label = _label(table, line, row[il])
        city, location = _city_location(table, line, clip_id, label)
        if ii is not None and row[ii] and row[ii] != location:
            raise DatasetFormatError(table.path, line, f"identifier {row[ii]!r} does not match the location "
                                                       f"{location!r} in the file name")
        clips.append(ClipRecord(clip_id, Path(row[ia]), Path(row[iv]), label, city, location))
    if not clips:
        raise DatasetFormatError(table.path, None, "no clips listed")
    return clips


def _clip_id(table: Table, line: int, audio: str, video: str) -> str:
    a, v = Path(audio).stem, Path(video).stem
    if audio and video and a != v:
        raise DatasetFormatError(table.path, line, f"audio {audio!r} and video {video!r} name different clips")
    clip_id = a or v
    if not clip_id:
        raise DatasetFormatError(table.path, line, "no file name")
    return checked_clip_id(table.path, line, clip_id)


def _label(table: Table, line: int, label: str) -> str:
    if label not in TAU_CLASSES:
        raise DatasetFormatError(table.path, line, f"unknown scene label {label!r}; expected one of "
                                                   f"{', '.join(TAU_CLASSES)}")
    return label


def _city_location(table: Table, line: int, clip_id: str, label: str) -> tuple[str, str]:
    parts = clip_id.split("-")
    if len(parts) != 4 or not all(parts):
        raise DatasetFormatError(table.path, line, f"file name {clip_id!r} is not scene-city-locationID-segmentID")
    if parts[0] != label:
        raise DatasetFormatError(table.path, line, f"file name {clip_id!r} says scene {parts[0]!r} but "
                                                   f"scene_label is {label!r}")
    return parts[1], f"{parts[1]}-{parts[2]}"


def _positional_columns(table: Table) -> tuple[int | None, int | None, int | None]:
    """(audio, video, label) column indices of a split file, with or without a header."""
    if table.header is not None:
        return table.column(_AUDIO_COLUMNS), table.column(_VIDEO_COLUMNS), table.column(_LABEL_COLUMNS)
    first = table.rows[0][1] if table.rows else []
    audio = next((i for i, f in enumerate(first) if f.endswith(".wav")), None)
    video = next((i for i, f in enumerate(first) if f.endswith(".mp4")), None)
    label = next((i for i in range(len(first)) if i not in (audio, video)), None)
    return audio, video, label


def _apply_split(table: Table, by_id: dict[str, ClipRecord]) -> None:
    split = table.path.stem
    ia, iv, il = _positional_columns(table)
    if ia is None and iv is None:
        raise DatasetFormatError(table.path, 1, "no filename_audio or filename_video column")
    for line, row in table.rows:
        clip_id = _clip_id(table, line, _field(row, ia), _field(row, iv))
        clip = by_id.get(clip_id)
        if clip is None:
            raise DatasetFormatError(table.path, line, f"clip {clip_id!r} is not listed in meta.csv")
        label = _field(row, il)
        if label and label != clip.label:
            raise DatasetFormatError(table.path, line, f"clip {clip_id!r} is labelled {label!r} here but "
                                                       f"{clip.label!r} in meta.csv")
        clip.splits = clip.splits | {split}


def _check_train_apart(folds: list[Path], clips: list[ClipRecord]) -> None:
    """A fold's training clips are none of the clips it is scored on (``foldN_train`` against
    ``foldN_evaluate`` and ``foldN_test``).

    A clip in both (split files concatenated or edited by hand) was read without a word, and a head
    trained on it was then scored on it: numbers that look good and mean nothing.
    """
    members: dict[str, set[str]] = {}
    for clip in clips:
        for split in clip.splits:
            members.setdefault(split, set()).add(clip.clip_id)
    for fold in folds:
        if not fold.stem.endswith("_train"):
            continue
        prefix = fold.stem.removesuffix("_train")
        for scored in (f"{prefix}_evaluate", f"{prefix}_test"):
            shared = sorted(members.get(fold.stem, set()) & members.get(scored, set()))
            if shared:
                more = f" and {len(shared) - 5} more" if len(shared) > 5 else ""
                shown = ", ".join(repr(c) for c in shared[:5]) + more
                raise DatasetFormatError(fold, None, f"{len(shared)} clip(s) listed here are also in {scored}: "
                                                     f"{shown}; a fold's training and scored clips must differ")


def _field(row: list[str], idx: int | None) -> str:
    return row[idx] if idx is not None and idx < len(row) else ""


def _clips_from_folds(folds: list[Path], base: Path, allow_outside_root: bool) -> list[ClipRecord]:
    clips: dict[str, ClipRecord] = {}
    for fold in folds:
        table = read_table(fold, "\t", _HEADER_FIRST)
        ia, iv, il = _positional_columns(table)
        if ia is None and iv is None:
            raise DatasetFormatError(fold, 1, "no filename_audio or filename_video column")
        for line, row in table.rows:
            audio, video = _field(row, ia), _field(row, iv)
            clip_id = _clip_id(table, line, audio, video)
            for listed in (audio, video):
                check_inside_root(base, listed, fold, line, clip_id, allow_outside_root)
            label = _field(row, il) or None
            if label is not None:
                _label(table, line, label)
            clip = clips.get(clip_id)
            if clip is None:
                clip = clips[clip_id] = ClipRecord(clip_id, Path(audio or f"audio/{clip_id}.wav"),
                                                   Path(video or f"video/{clip_id}.mp4"), label)
            clip.splits = clip.splits | {fold.stem}
    return list(clips.values())


def _listed_files(directory: Path) -> dict[str, Path]:
    """The files of ``directory`` by stem, hidden ones left out with a warning.

    Copies made on a Mac leave ``.DS_Store`` and an AppleDouble ``._0.wav`` beside each file; their
    stems are no clip ids, so one of them made the whole evaluation set unreadable. No clip id
    starts with '.', so a hidden file is never a clip.
    """
    if not directory.is_dir():
        return {}
    files = [p for p in sorted(directory.iterdir()) if p.is_file()]
    hidden = [p.name for p in files if p.name.startswith(".")]
    if hidden:
        log.warning("%s: %d hidden file(s) left out of the clips (%s)", directory, len(hidden),
                    ", ".join(hidden[:5]) + (" ..." if len(hidden) > 5 else ""))
    return {p.stem: p for p in files if not p.name.startswith(".")}


def _clips_from_listing(base: Path) -> list[ClipRecord]:
    audio, video = _listed_files(base / "audio"), _listed_files(base / "video")
    ids = sorted(set(audio) | set(video), key=lambda s: (0, int(s), "") if s.isdigit() else (1, 0, s))
    for i in ids:
        checked_clip_id(audio.get(i) or video.get(i), None, i)
    # the listed paths are audio/<name> and video/<name> as found: under the root by construction; a
    # symlink among them (or a symlinked audio/ itself) is the dataset owner's and is followed
    return [ClipRecord(i, audio.get(i, base / "audio" / f"{i}.wav").relative_to(base),
                       video.get(i, base / "video" / f"{i}.mp4").relative_to(base)) for i in ids]
