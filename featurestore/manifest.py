"""The clip manifest: what a dataset reader produces and what a store's index is created from.

It is plain data (no I/O) so that readers, the store, the extractor and tests can all build one.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

# The DCASE2021 Task 1B classes in the baseline's order (index 0-9).
TAU_CLASSES: tuple[str, ...] = (
    "airport", "bus", "metro", "metro_station", "park",
    "public_square", "shopping_mall", "street_pedestrian", "street_traffic", "tram",
)


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

    def __len__(self) -> int:
        return len(self.clips)

    @property
    def clip_ids(self) -> list[str]:
        return [c.clip_id for c in self.clips]

    @property
    def split_names(self) -> list[str]:
        return sorted({s for c in self.clips for s in c.splits})

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
