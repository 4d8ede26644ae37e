"""The clip manifest: what a dataset reader produces and what a store's index is created from.

It is plain data (no I/O) so that readers, the store, the extractor and tests can all build one.
"""
from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import repeat
from numbers import Real
from operator import attrgetter
from pathlib import Path

import numpy as np

from featurestore.checks import is_int_in

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


def _all_plain_ids(ids: list) -> bool:
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


def distinct_split_sets(clips: Sequence[ClipRecord]) -> list[frozenset[str]]:
    """The clips' distinct split sets: clips share a few, so what is asked of splits (their names,
    each split's members) is asked of these few, not of a million sets. A set or list given where a
    frozenset belongs is taken as one."""
    try:
        return list(set(map(attrgetter("splits"), clips)))
    except TypeError:  # not hashable
        return list(set(map(frozenset, map(attrgetter("splits"), clips))))


def _split_names(clips: Sequence[ClipRecord]) -> set[str]:
    """Every split name the clips list: the union of their distinct split sets."""
    return set().union(*distinct_split_sets(clips))


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


@dataclass
class ClipRecord:
    """One clip of a dataset.

    Attributes:
        clip_id: the store key, the file stem (``airport-london-6-257``).
        audio: path of the audio file, or None when the dataset has no audio for it.
        video: path of the video file, or None.
        label: class name, or None when unknown (evaluation data).
        city: city parsed from the name ('' when unknown).
        location: ``city-locationID`` ('' when unknown); splits never share a location.
        splits: names of the split files that list this clip (``fold1_train`` ...).
    """

    clip_id: str
    audio: Path | None = None
    video: Path | None = None
    label: str | None = None
    city: str = ""
    location: str = ""
    splits: frozenset[str] = field(default_factory=frozenset)


@dataclass
class Manifest:
    """An ordered list of clips plus what is shared by all of them.

    Attributes:
        name: the dataset's name, stored in the store's root attributes.
        classes: ordered class names; a clip's label index is its position here.
        clips: the clips, in store row order.
        root: dataset directory the paths are relative to (None when paths are absolute).
        audio_segments: audio segments per clip (10 for 10 s development clips, 1 for evaluation).
        segment_seconds: length of one audio segment.
        video_frames: frames sampled per clip (12 in the paper's development setup, 5 for evaluation).
    """

    name: str
    classes: list[str]
    clips: list[ClipRecord]
    root: Path | None = None
    audio_segments: int = 10
    segment_seconds: float = 1.0
    video_frames: int = 12

    def __post_init__(self) -> None:
        """Refuse, before any store is created from it, a clip id or split name outside the grammar and a clip
        shape beyond the maxima (one line naming the dataset, the field and the allowed range)."""
        ids = self.clip_ids
        if not _all_plain_ids(ids):  # else each id is checked to name the first wrong one
            for i, clip_id in enumerate(ids):
                problem = clip_id_problem(clip_id)
                if problem:
                    raise ValueError(f"dataset {self.name!r}, clip {i}: {problem}")
        for split in _split_names(self.clips):
            # a split is an array's name in the store (index/split/<name>) and a --train-split argument
            if not (isinstance(split, str) and _CLIP_ID.fullmatch(split)):
                raise ValueError(f"dataset {self.name!r}: split name {split!r:.60} cannot be a store key; split "
                                 f"names follow the clip id grammar: {CLIP_ID_GRAMMAR.replace('a clip id is ', '')}")
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
        return [c.clip_id for c in self.clips]

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
        known = set(names)
        for clip in self.clips:
            if clip.label is not None and clip.label not in known:
                raise ValueError(f"dataset {self.name!r}: clip {clip.clip_id!r} has label {clip.label!r}, "
                                 f"which is not one of the given classes {names}")
        return replace(self, classes=names)

    def subset(self, clip_ids: list[str]) -> "Manifest":
        """The same manifest restricted to ``clip_ids`` (kept in the given order)."""
        by_id = {c.clip_id: c for c in self.clips}
        missing = [i for i in clip_ids if i not in by_id]
        if missing:
            raise KeyError(f"clip ids not in manifest {self.name!r}: {missing[:5]}")
        return Manifest(self.name, list(self.classes), [by_id[i] for i in clip_ids], self.root,
                        self.audio_segments, self.segment_seconds, self.video_frames)
