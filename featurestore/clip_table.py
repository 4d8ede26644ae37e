"""The clips of a manifest: one ``ClipRecord`` per clip, or a ``ClipTable`` of columns for datasets
of millions of clips.

A ``ClipRecord`` per clip costs ~3 us to build and ~1 us per attribute each time a store reads it
back out, so a million-clip manifest spent seconds in Python objects before its store was written.
``Manifest.from_columns`` keeps the columns instead (as pandas, a CSV reader or a Parquet file hands
them over), and the store writes its index from them without a Python step per clip.

A ``ClipTable`` is a ``Sequence[ClipRecord]``: ``table[i]`` and iteration build the record on
demand, so everything that reads ``manifest.clips`` works unchanged. The store reads either kind
through :meth:`ClipTable.of`, which turns a list of records into columns once.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter
from pathlib import Path
from typing import Any, overload

import numpy as np


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


_MEDIA = ("audio", "video")


class ClipTable(Sequence[ClipRecord]):
    """Clips as columns, one entry per clip in row order (see :meth:`Manifest.from_columns`).

    Attributes:
        clip_id: object array of ids.
        label: object array of class names, None where unknown.
        city, location: object arrays of texts ('' where unknown).
        audio, video: object arrays of paths (str or Path, None where absent), or None when no clip
            has that modality (a store of features made elsewhere).
        splits: split name -> bool array (membership), only splits with at least one member.
    """

    def __init__(self, clip_id: np.ndarray, label: np.ndarray, city: np.ndarray, location: np.ndarray,
                 audio: np.ndarray | None, video: np.ndarray | None, splits: dict[str, np.ndarray]):
        self.clip_id, self.label, self.city, self.location = clip_id, label, city, location
        self.audio, self.video, self.splits = audio, video, splits
        self._split_sets: tuple[np.ndarray, list[frozenset[str]]] | None = None

    # ------------------------------------------------------------------------------ building
    @classmethod
    def from_columns(cls, clip_id: Sequence[str], *, label: Sequence[str | None] | None = None,
                     city: Sequence[str] | None = None, location: Sequence[str] | None = None,
                     audio: Sequence[Any] | None = None, video: Sequence[Any] | None = None,
                     splits: Mapping[str, Sequence[bool]] | None = None) -> ClipTable:
        """Check and keep the columns (see :meth:`Manifest.from_columns` for what each holds).

        Raises:
            ValueError: a column of another length than ``clip_id``, an entry of the wrong type
                (naming the column, the row and the clip), a split mask that is not boolean.
        """
        ids = _object_column("clip_id", clip_id, None)
        n = len(ids)
        # clip ids are checked by Manifest against the id grammar (which names the wrong one)
        texts = {"label": _optional_texts("label", label, n, ids, None),
                 "city": _optional_texts("city", city, n, ids, ""),
                 "location": _optional_texts("location", location, n, ids, "")}
        media = {"audio": _media("audio", audio, n, ids), "video": _media("video", video, n, ids)}
        masks = {}
        for name, mask in (splits or {}).items():
            array = np.asarray(mask)
            if array.dtype != bool or array.shape != (n,):
                hint = " (missing values? fill them first: mask.fillna(False))" if array.dtype == object else ""
                raise ValueError(f"split {name!r}: expected {n} booleans (one per clip), got an array of "
                                 f"{array.dtype} with shape {array.shape}{hint}")
            if array.any():  # a split no clip is in is no split (as with records)
                masks[name] = array
        return cls(ids, texts["label"], texts["city"], texts["location"], media["audio"], media["video"], masks)

    @classmethod
    def of(cls, clips: Sequence[ClipRecord]) -> ClipTable:
        """``clips`` as columns: itself when it is a table, else one pass per attribute over the records
        (attribute getters and C loops, no Python call per clip)."""
        if isinstance(clips, ClipTable):
            return clips
        n = len(clips)

        def column(name: str) -> np.ndarray:
            return np.fromiter(map(attrgetter(name), clips), dtype=object, count=n)

        media = {}
        for name in _MEDIA:
            values = column(name)
            media[name] = values if any(map(_is_given, values.tolist())) else None
        return cls(column("clip_id"), column("label"), column("city"), column("location"), media["audio"],
                   media["video"], _record_split_masks(clips))

    # ------------------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.clip_id)

    @overload
    def __getitem__(self, index: int) -> ClipRecord: ...

    @overload
    def __getitem__(self, index: slice) -> ClipTable: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(np.arange(len(self))[index])
        i = range(len(self))[index]  # an IndexError as a list raises it
        codes, sets = self._sets()
        return self._record(i, sets[codes[i]])

    def __iter__(self) -> Iterator[ClipRecord]:
        codes, sets = self._sets()
        return map(self._record, range(len(self)), map(sets.__getitem__, codes.tolist()))

    def take(self, rows: Sequence[int] | np.ndarray) -> ClipTable:
        """The clips at ``rows``, in that order."""
        rows = np.asarray(rows, dtype=np.intp)
        media = [None if m is None else m[rows] for m in (self.audio, self.video)]
        splits = {name: mask[rows] for name, mask in self.splits.items()}
        return ClipTable(self.clip_id[rows], self.label[rows], self.city[rows], self.location[rows], *media,
                         {name: mask for name, mask in splits.items() if mask.any()})

    @property
    def split_names(self) -> list[str]:
        return sorted(self.splits)

    def _record(self, i: int, splits: frozenset[str]) -> ClipRecord:
        audio = None if self.audio is None else self.audio[i]
        video = None if self.video is None else self.video[i]
        return ClipRecord(self.clip_id[i], None if audio is None else Path(audio),
                          None if video is None else Path(video), self.label[i], self.city[i], self.location[i],
                          splits)

    def _sets(self) -> tuple[np.ndarray, list[frozenset[str]]]:
        """Each clip's split set as a number among the few distinct ones (built once)."""
        if self._split_sets is None:
            names = self.split_names
            if names:
                member = np.stack([self.splits[s] for s in names], axis=1)
                distinct, codes = np.unique(member, axis=0, return_inverse=True)
                sets = [frozenset(s for s, m in zip(names, row) if m) for row in distinct.tolist()]
            else:
                codes, sets = np.zeros(len(self), dtype=np.intp), [frozenset()]
            self._split_sets = np.asarray(codes).reshape(-1), sets
        return self._split_sets


def distinct_split_sets(clips: Sequence[ClipRecord]) -> list[frozenset[str]]:
    """The records' distinct split sets: clips share a few, so what is asked of splits (their names,
    each split's members) is asked of these few, not of a million sets. A set or list given where a
    frozenset belongs is taken as one."""
    try:
        return list(set(map(attrgetter("splits"), clips)))
    except TypeError:  # not hashable
        return list(set(map(frozenset, map(attrgetter("splits"), clips))))


def _record_split_masks(clips: Sequence[ClipRecord]) -> dict[str, np.ndarray]:
    """Membership of every split the records name. Each clip's split set is numbered among the few
    distinct ones (one dict lookup per clip; ``frozenset`` of a frozenset is itself), and a split's
    membership is a gather of its answers for those few."""
    distinct = distinct_split_sets(clips)
    number = {frozenset(s): i for i, s in enumerate(distinct)}
    of_clip = np.fromiter(map(number.__getitem__, map(frozenset, map(attrgetter("splits"), clips))),
                          dtype=np.intp, count=len(clips))
    return {split: np.fromiter((split in s for s in distinct), dtype=bool, count=len(distinct))[of_clip]
            for split in sorted(set().union(*distinct))}


def _object_column(name: str, values: Sequence[Any], n: int | None) -> np.ndarray:
    """``values`` as a 1-d object array (a list, a numpy or pandas column), of length ``n`` when given."""
    if isinstance(values, (str, bytes)):
        raise ValueError(f"column {name!r}: expected one value per clip, got the {type(values).__name__} "
                         f"{values!r:.60}")
    if not hasattr(values, "__len__"):  # a generator, a map: taken once
        values = list(values)
    if _ndim(values) != 1:
        raise ValueError(f"column {name!r}: expected one value per clip (a 1-d column), got "
                         f"{np.ndim(values)} dimensions, shape {np.shape(values)}")
    column = np.empty(len(values), dtype=object)
    column[:] = list(values) if not isinstance(values, np.ndarray) else values
    if n is not None and len(column) != n:
        raise ValueError(f"column {name!r} holds {len(column)} values for {n} clip ids")
    return column


#: what makes ``Path(text).as_posix()`` differ from ``text``, in texts framed by newlines: '//', a
#: trailing '/', a '.' component (inside, first, last, or alone). Plain substring searches: a regular
#: expression over a million paths' 20 MB took ~0.7 s, these ~0.05 s.
_UNCLEAN_MARKS = ("//", "/\n", "/./", "\n./", "/.\n", "\n.\n")


def joined_if_kept_by_path(texts: Sequence[Any]) -> str | None:
    """``texts`` joined by newlines when every one is a str that ``Path(text).as_posix()`` gives back
    unchanged (no '.' component, no '//', no trailing '/'), checked on all of them at once: a million
    clean paths in a few ms, where a ``Path`` each took ~5 us. None where any is not (or is no str, or
    holds a newline): the caller then takes the texts through ``Path`` one by one."""
    if not all(map(isinstance, texts, repeat(str))):
        return None
    joined = "\n".join(texts)
    if joined.count("\n") != len(texts) - 1:  # a text holds a newline
        return None
    framed = f"\n{joined}\n"
    return None if any(mark in framed for mark in _UNCLEAN_MARKS) else joined


def _ndim(values: Sequence[Any]) -> int:
    """How many dimensions ``values`` has: its own ``ndim`` (numpy, pandas), else 1 for a sequence whose
    first item is no sequence itself. ``np.ndim`` of a list makes an array of it first: a million
    strings as a numpy string array, ~0.13 s a column for nothing."""
    ndim = getattr(values, "ndim", None)
    if isinstance(ndim, int):
        return ndim
    first = next(iter(values), None)
    return np.ndim(values) if isinstance(first, (list, tuple, np.ndarray)) else 1


def _missing(value: Any) -> bool:
    """None, a float NaN (how pandas reads an empty cell) or pandas' ``NA`` (its nullable dtypes'),
    known by its type's name and module: pandas is not imported for it."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    kind = type(value)
    return kind.__name__ == "NAType" and kind.__module__.startswith("pandas")


def _is_given(value: Any) -> bool:
    return value is not None


def _not_texts(column: np.ndarray) -> list[int]:
    """Rows whose entry is not a str (a C loop over the usual all-str column, then a mask where not)."""
    if all(map(isinstance, column, repeat(str))):
        return []
    return np.flatnonzero(~np.fromiter(map(isinstance, column, repeat(str)), dtype=bool, count=len(column))).tolist()


def _optional_texts(name: str, values: Sequence[Any] | None, n: int, ids: np.ndarray, absent: str | None) -> np.ndarray:
    """A text column: str entries; None or NaN stored as ``absent``; anything else refused naming the row."""
    if values is None:
        return np.full(n, absent, dtype=object)
    column = _object_column(name, values, n)
    for i in _not_texts(column):
        if not _missing(column[i]):
            raise ValueError(f"column {name!r}, row {i} (clip {ids[i]!r}): expected a str or None, got the "
                             f"{type(column[i]).__name__} {column[i]!r:.60}")
        column[i] = absent
    return column


def _media(name: str, values: Sequence[Any] | None, n: int, ids: np.ndarray) -> np.ndarray | None:
    """A media column: paths (str or os.PathLike); None, NaN or '' where the clip has none; None for a
    column without any path."""
    if values is None:
        return None
    column = _object_column(name, values, n)
    for i in _not_texts(column):
        value = column[i]
        if _missing(value):
            column[i] = None
        elif isinstance(value, Path) or hasattr(value, "__fspath__"):
            column[i] = Path(value)
        else:
            raise ValueError(f"column {name!r}, row {i} (clip {ids[i]!r}): expected a path (str or os.PathLike) "
                             f"or None, got the {type(value).__name__} {value!r:.60}")
    empty = np.flatnonzero(column == "")
    column[empty] = None
    return column if any(map(_is_given, column.tolist())) else None
