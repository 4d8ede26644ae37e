"""The clip manifest: what a dataset reader produces and what a store's index is created from.

It is plain data (no I/O) so that readers, the store, the extractor and tests can all build one.
"""
from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import repeat
from numbers import Real
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.checks import is_int_in
from featurestore.clip_table import ClipRecord, ClipTable, distinct_split_sets

# The DCASE2021 Task 1B classes in the baseline's order (index 0-9).
TAU_CLASSES: tuple[str, ...] = (
    "airport", "bus", "metro", "metro_station", "park",
    "public_square", "shopping_mall", "street_pedestrian", "street_traffic", "tram",
)


#: The largest clip shape a dataset may declare (``dataset.json``, a reader's arguments, a Manifest):
#: every size read from a file is checked against these before anything is allocated or created, so
#: ``clip_seconds: 1e12`` is a one-line error, not a feature set of 1e12 segments. An hour of audio
#: in 1 s segments, and a thousand frames (12 per clip in the paper's setup, 5 in evaluation).
MAX_CLIP_SECONDS = 3600.0
MAX_AUDIO_SEGMENTS = 3600
MAX_VIDEO_FRAMES = 1000

#: Clip ids (docs/store.md, "Clip ids"): they are store keys, file stems, CSV cells and command-line
#: arguments, so only what survives all of these unchanged is accepted.
MAX_CLIP_ID_LENGTH = 255
_ID_PUNCTUATION = "._-+=@,"
_CLIP_ID = re.compile(r"(?![.-])(?!.*\.\.)[\w.+=@,-]{1,%d}" % MAX_CLIP_ID_LENGTH)
CLIP_ID_GRAMMAR = (f"a clip id is 1-{MAX_CLIP_ID_LENGTH} letters, digits or any of {_ID_PUNCTUATION!r}, not "
                   f"starting with '.' or '-', without '..' (docs/store.md, 'Clip ids')")


def clip_id_problem(clip_id: object) -> str | None:
    """What is wrong with ``clip_id`` in words (the id shown with repr, cut at 60 characters), or
    None for a valid id. Kept apart from :func:`check_clip_id` so readers can name their file and line."""
    if isinstance(clip_id, str) and _CLIP_ID.fullmatch(clip_id):
        return None
    if not isinstance(clip_id, str):
        return f"clip id must be a string, found {type(clip_id).__name__} {clip_id!r:.60}; {CLIP_ID_GRAMMAR}"
    shown = repr(clip_id[:60]) + ("..." if len(clip_id) > 60 else "")
    if not clip_id:
        why = "is empty"
    elif len(clip_id) > MAX_CLIP_ID_LENGTH:
        why = f"has {len(clip_id)} characters"
    elif clip_id[0] in ".-":
        why = f"starts with {clip_id[0]!r}"
    elif ".." in clip_id:
        why = "holds '..'"
    else:
        bad = next(c for c in clip_id if not (c.isalnum() or c in _ID_PUNCTUATION or c == "_"))
        why = f"holds {bad!r}"
    return f"clip id {shown} {why}; {CLIP_ID_GRAMMAR}"


# per ASCII byte: allowed in a clip id (``\w`` on ASCII is letters, digits and '_'; the newline joins
# ids for the check below), and not allowed to start one
_ID_BYTE = np.zeros(256, dtype=bool)
_ID_BYTE[list((string.ascii_letters + string.digits + "_" + _ID_PUNCTUATION + "\n").encode())] = True
_NOT_FIRST = np.zeros(256, dtype=bool)
_NOT_FIRST[list(b".-")] = True


def all_plain_ids(ids: list) -> bool:
    """True when every id is an ASCII string following the clip id grammar, checked on all the ids
    joined by newlines as one byte array (a million ids in ~0.15 s, where the grammar's regular
    expression took ~0.5 s, one id at a time). False where any is not (or is not ASCII): the caller
    then checks the ids one by one, which decides (and names the wrong one)."""
    if not ids or not all(map(isinstance, ids, repeat(str))):
        return False
    joined = "\n".join(ids)
    if not joined.isascii():
        return False
    text = np.frombuffer(joined.encode("ascii"), dtype=np.uint8)
    breaks = np.flatnonzero(text == ord("\n"))
    if len(breaks) != len(ids) - 1:  # an id holds a newline
        return False
    starts, stops = np.r_[0, breaks + 1], np.r_[breaks, len(text)]
    lengths = stops - starts
    if lengths.min() < 1 or lengths.max() > MAX_CLIP_ID_LENGTH or not _ID_BYTE[text].all():
        return False
    dots = text == ord(".")
    return not (_NOT_FIRST[text[starts]].any() or (dots[1:] & dots[:-1]).any())


def _split_names(clips: Sequence[ClipRecord]) -> set[str]:
    """Every split name the clips list: the union of their distinct split sets."""
    return set(clips.splits) if isinstance(clips, ClipTable) else set().union(*distinct_split_sets(clips))


def _labels(clips: Sequence[ClipRecord]) -> list[str | None]:
    return clips.label.tolist() if isinstance(clips, ClipTable) else list(map(attrgetter("label"), clips))


def check_clip_id(clip_id: object) -> str:
    """``clip_id`` when it follows the clip id grammar (:data:`CLIP_ID_GRAMMAR`), else ValueError.

    A newline, tab, ``/``, ``..`` or 5,000 characters in an id would be silently changed or
    misread by some consumer (CSV files, paths, shells, terminals), so they are refused where the
    id enters: every reader and every :class:`Manifest`.
    """
    problem = clip_id_problem(clip_id)
    if problem:
        raise ValueError(problem)
    return clip_id


def check_classes(classes: Sequence[str], what: str = "classes") -> list[str]:
    """The class list as a list of names; refuses an empty list, empty or non-string names and
    repeats, because a label index is a position in this list."""
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise ValueError(f"{what} must be a list of class names, got {type(classes).__name__} {classes!r}")
    names = list(classes)
    bad = [c for c in names if not isinstance(c, str) or not c.strip() or c != c.strip()]
    if not names or bad:
        raise ValueError(f"{what} must be non-empty class names without surrounding spaces, got {names!r}")
    twice = sorted({c for c in names if names.count(c) > 1})
    if twice:
        raise ValueError(f"{what} name {', '.join(map(repr, twice))} more than once: {names}")
    return names


#: the columns of the index's tables (``to_pandas``, Parquet exports): no split may take one's name
INDEX_COLUMN_NAMES = ("clip_id", "label", "label_index", "city", "location", "audio_path", "video_path")


@dataclass
class Manifest:
    """An ordered list of clips plus what is shared by all of them.

    Readers build one from ``ClipRecord`` s; a dataset of millions of clips is better built from its
    columns (:meth:`from_columns`), which skips a Python object per clip.

    Attributes:
        name: the dataset's name, stored in the store's root attributes.
        classes: ordered class names; a clip's label index is its position here.
        clips: the clips, in store row order: a list of ``ClipRecord`` or a ``ClipTable``.
        root: dataset directory the paths are relative to (None when paths are absolute).
        audio_segments: audio segments per clip (10 for 10 s development clips, 1 for evaluation).
        segment_seconds: length of one audio segment.
        video_frames: frames sampled per clip (12 in the paper's development setup, 5 for evaluation).
    """

    name: str
    classes: list[str]
    clips: Sequence[ClipRecord]
    root: Path | None = None
    audio_segments: int = 10
    segment_seconds: float = 1.0
    video_frames: int = 12

    def __post_init__(self) -> None:
        """Refuse, before any store is created from it, a clip id or split name outside the grammar and a clip
        shape beyond the maxima (one line naming the dataset, the field and the allowed range)."""
        ids = self.clip_ids
        if not all_plain_ids(ids):  # else each id is checked to name the first wrong one
            for i, clip_id in enumerate(ids):
                problem = clip_id_problem(clip_id)
                if problem:
                    raise ValueError(f"dataset {self.name!r}, clip {i}: {problem}")
        for split in _split_names(self.clips):
            # a split is an array's name in the store (index/split/<name>) and a --train-split argument
            if not (isinstance(split, str) and _CLIP_ID.fullmatch(split)):
                raise ValueError(f"dataset {self.name!r}: split name {split!r:.60} cannot be a store key; split "
                                 f"names follow the clip id grammar: {CLIP_ID_GRAMMAR.replace('a clip id is ', '')}")
            if split in INDEX_COLUMN_NAMES:  # tables of the index (to_pandas, Parquet) name a column after each split
                raise ValueError(f"dataset {self.name!r}: split name {split!r} is the name of an index column "
                                 f"({', '.join(INDEX_COLUMN_NAMES)}), whose values its column would replace in "
                                 f"every table of the index; choose another")
        for name, value, most in (("audio_segments", self.audio_segments, MAX_AUDIO_SEGMENTS),
                                  ("video_frames", self.video_frames, MAX_VIDEO_FRAMES)):
            if not is_int_in(value, 1, most):
                raise ValueError(f"dataset {self.name!r}: {name} must be an integer with 1 <= {name} <= {most}, "
                                 f"got {value!r}")
        seconds = self.segment_seconds
        if (isinstance(seconds, bool) or not isinstance(seconds, Real) or not math.isfinite(seconds)
                or not 0 < seconds * self.audio_segments <= MAX_CLIP_SECONDS):
            raise ValueError(f"dataset {self.name!r}: segment_seconds must be a number with 0 < segment_seconds x "
                             f"audio_segments ({self.audio_segments}) <= {MAX_CLIP_SECONDS:g} s, got {seconds!r}")

    def __len__(self) -> int:
        return len(self.clips)

    @property
    def clip_ids(self) -> list[str]:
        if isinstance(self.clips, ClipTable):
            return self.clips.clip_id.tolist()
        return [c.clip_id for c in self.clips]

    def has_media(self, kind: str) -> bool:
        """Whether any clip has a file of ``kind`` (``"audio"`` or ``"video"``); a table answers from
        its column, without building a record per clip."""
        if isinstance(self.clips, ClipTable):
            return getattr(self.clips, kind) is not None
        return any(getattr(c, kind) for c in self.clips)

    @property
    def split_names(self) -> list[str]:
        return sorted(_split_names(self.clips))

    def label_index(self, label: str | None) -> int:
        """Index of a class name, -1 for an unknown label; an unlisted name is an error."""
        if label is None:
            return -1
        try:
            return self.classes.index(label)
        except ValueError:
            raise ValueError(f"label {label!r} is not one of the classes {self.classes}") from None

    def with_classes(self, classes: Sequence[str]) -> "Manifest":
        """The same manifest with the given class order, e.g. for clips without labels
        (``extract --classes``), so that the store, its labels and every head agree on one order.

        Raises:
            ValueError: bad class names (see `check_classes`), or a labelled clip whose label is
                not among them (one line naming the dataset, the clip and the label).
        """
        names = check_classes(classes)
        known = {*names, None}
        labels = _labels(self.clips)
        if not known.issuperset(labels):
            clip_id, label = next((c, label) for c, label in zip(self.clip_ids, labels) if label not in known)
            raise ValueError(f"dataset {self.name!r}: clip {clip_id!r} has label {label!r}, "
                             f"which is not one of the given classes {names}")
        return replace(self, classes=names)

    def subset(self, clip_ids: list[str]) -> "Manifest":
        """The same manifest restricted to ``clip_ids`` (kept in the given order)."""
        row_of = {cid: row for row, cid in enumerate(self.clip_ids)}
        missing = [i for i in clip_ids if i not in row_of]
        if missing:
            raise KeyError(f"clip ids not in manifest {self.name!r}: {missing[:5]}")
        rows = [row_of[i] for i in clip_ids]
        clips = self.clips.take(rows) if isinstance(self.clips, ClipTable) else [self.clips[r] for r in rows]
        return Manifest(self.name, list(self.classes), clips, self.root,
                        self.audio_segments, self.segment_seconds, self.video_frames)

    @classmethod
    def from_columns(cls, name: str, classes: Sequence[str], clip_id: Sequence[str], *,
                     label: Sequence[str | None] | None = None, city: Sequence[str] | None = None,
                     location: Sequence[str] | None = None, audio: Sequence[Any] | None = None,
                     video: Sequence[Any] | None = None, splits: Mapping[str, Sequence[bool]] | None = None,
                     root: str | Path | None = None, audio_segments: int = 10, segment_seconds: float = 1.0,
                     video_frames: int = 12) -> Manifest:
        """A manifest from one column per attribute (lists, numpy arrays or pandas columns), without
        building a ``ClipRecord`` per clip: a million clips in well under a second, where records
        took ~3 s to build. The result is the manifest of the equivalent records, and the store made
        from it is the same, column for column; ``manifest.clips`` builds records on demand.

        Args:
            name, classes, root, audio_segments, segment_seconds, video_frames: as for ``Manifest``.
            clip_id: the ids, in store row order.
            label: class names (None, NaN or pandas' NA: unknown); None: no clip is labelled.
            city, location: texts ('' where unknown; None, NaN or NA read as ''); None: all ''.
            audio, video: paths (str or os.PathLike), relative to ``root`` or absolute; None, NaN, NA
                or '' where the clip has none; None: no clip has one.
            splits: split name -> one boolean per clip (``df["split"] == "train"``).

        Raises:
            ValueError: a column of another length, an entry of the wrong type (naming the column,
                row and clip), a split mask that is not boolean, and what ``Manifest`` refuses.
        """
        table = ClipTable.from_columns(clip_id, label=label, city=city, location=location, audio=audio, video=video,
                                       splits=splits)
        return cls(name, list(classes), table, None if root is None else Path(root), audio_segments, segment_seconds,
                   video_frames)
