"""Exceptions raised by the feature store.

Every error says what was expected and what was found, and names the store, feature set or clip
involved, so that a failure deep inside a training loop still points at the data that caused it.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class FeatureStoreError(Exception):
    """Base class of every error the feature store raises on purpose.

    Pickles as its message and attributes, not by calling ``__init__`` again: the subclasses that
    build their message from several arguments (``MissingFeatureError(feature, clip_ids)``) cannot
    be rebuilt from it, and an error raised in a Dask task, a joblib trial or a DataLoader worker
    reached the caller as a TypeError from unpickling instead of itself."""

    def __reduce__(self) -> tuple:
        return pickled_by_state(self)


def pickled_by_state(err: BaseException) -> tuple:
    """``__reduce__`` for an exception whose ``__init__`` takes other arguments than its message: it
    is rebuilt from its ``args`` and attributes (errors outside ``FeatureStoreError`` use it too)."""
    return _rebuilt, (type(err), err.args, err.__dict__)


def _rebuilt(cls: type, args: tuple, state: dict) -> FeatureStoreError:
    """``cls`` with ``args`` and the attributes ``state``, ``__init__`` not called (see ``__reduce__``)."""
    err = cls.__new__(cls, *args)
    err.args = args
    err.__dict__.update(state)
    return err


class StoreFormatError(FeatureStoreError):
    """The path is not a feature store, or was written by an incompatible schema version."""


class ReadOnlyStoreError(FeatureStoreError):
    """A write was attempted on a store opened with ``mode="r"``."""


class UnknownClipError(FeatureStoreError, KeyError):
    """A clip id is not in the store's index."""

    def __init__(self, clip_id: str, known: Iterable[str]):
        self.clip_id = clip_id
        near = difflib.get_close_matches(str(clip_id), list(known), n=3)
        hint = f"; nearest ids: {', '.join(near)}" if near else ""
        super().__init__(f"clip id {clip_id!r} is not in the store{hint}")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


class UnknownFeatureError(FeatureStoreError, KeyError):
    """A feature set, prediction run or index column name does not exist."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        self.name = name
        known = sorted(known)
        near = difflib.get_close_matches(name, known, n=3)
        listing = ", ".join(known) if known else "(none)"
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        super().__init__(f"no {kind} named {name!r}; the store has: {listing}.{hint}")

    def __str__(self) -> str:
        return self.args[0]


class UnknownValueError(UnknownFeatureError):
    """A value asked of an index column (a split, city, location or label) that no clip has.

    A subclass of ``UnknownFeatureError`` (itself a ``KeyError``), so code that caught unknown
    splits before still does.

    Attributes:
        column: what was asked of: ``split``, ``city``, ``location`` or ``label``.
        value: the value that is not there.
        known: the values the store has (for an integer label: the valid indices' range is named).
    """

    def __init__(self, column: str, value: object, known: Iterable[object], detail: str = ""):
        self.column, self.value, self.name = column, value, str(value)
        self.known = sorted({str(k) for k in known})
        near = difflib.get_close_matches(str(value), self.known, n=3)
        listing = ", ".join(self.known) if self.known else "(none)"
        hint = f" Did you mean {', '.join(near)}?" if near else ""
        extra = f" {detail}" if detail else ""
        KeyError.__init__(self, f"no clip has {column} {value!r}; the store's {column} values: {listing}.{extra}{hint}")

    def __str__(self) -> str:
        return self.args[0]


class MissingFeatureError(FeatureStoreError):
    """A clip's row exists but its ``done`` flag is false: the data is not there, never zeros.

    ``kind`` is what holds the rows ("feature set" or "prediction run"): the message names the
    command that fills them, extraction or ``heads predict``.
    """

    def __init__(self, feature: str, clip_ids: list[str], kind: str = "feature set"):
        self.feature = feature
        self.clip_ids = list(dict.fromkeys(clip_ids))  # each once, in the order asked (a batch may repeat one)
        clip_ids = self.clip_ids
        shown = ", ".join(clip_ids[:5]) + (f" and {len(clip_ids) - 5} more" if len(clip_ids) > 5 else "")
        remedy = "run `heads predict` for them first" if kind == "prediction run" else "run extraction for them first"
        super().__init__(f"{kind} {feature!r} has not been computed for clip(s) {shown} "
                         f"(done flag is false; {remedy})")


class FingerprintMismatchError(FeatureStoreError):
    """An existing feature set was made with a different configuration than the one given.

    The message is one line that names the settings that differ (dotted paths into the provenance),
    since two configurations of one encoder share most of their text and a dump would hide them;
    ``existing`` and ``requested`` hold the whole configurations for code that wants them.
    """

    def __init__(self, feature: str, existing: dict, requested: dict, kind: str = "feature set"):
        self.feature = feature
        self.existing = existing
        self.requested = requested
        diffs = _differences(existing, requested)
        shown = [f"{key}: existing {_value(old)}, requested {_value(new)}" for key, old, new in diffs[:4]]
        if len(diffs) > 4:
            shown.append(f"and {len(diffs) - 4} more")
        super().__init__(
            f"{kind} {feature!r} already exists with a different configuration ({'; '.join(shown)}); "
            f"use another name, or overwrite=True (--overwrite) to replace it"
        )


def _differences(existing, requested, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(dotted key, existing value, requested value)`` for every leaf that differs."""
    if not (isinstance(existing, dict) and isinstance(requested, dict)):
        return [] if existing == requested else [(prefix or "(value)", existing, requested)]
    out = []
    for key in sorted(set(existing) | set(requested), key=str):
        path = f"{prefix}.{key}" if prefix else str(key)
        out += _differences(existing.get(key, _ABSENT), requested.get(key, _ABSENT), path)
    return out


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


def _value(value) -> str:
    return "<absent>" if value is _ABSENT else _short(value, 80)


class StoreChangedError(FeatureStoreError):
    """Another process kept replacing what was being read (a feature set created again on every
    try): nothing consistent could be read."""


class CorruptChunkError(FeatureStoreError):
    """A chunk failed its checksum or could not be decoded."""

    def __init__(self, where: str, start: int, stop: int, cause: BaseException):
        self.where, self.start, self.stop = where, start, stop
        super().__init__(f"{where}: rows {start}:{stop} could not be read ({type(cause).__name__}: {cause})")


class MissingChunkError(CorruptChunkError):
    """Rows that were written (index rows, clips marked done) have no chunk in storage.

    Zarr reads a missing chunk as fill values; the store refuses instead, since a deleted chunk
    file would otherwise turn finished features into zeros and labels into "unknown".
    """

    def __init__(self, where: str, start: int, stop: int):
        self.where, self.start, self.stop = where, start, stop
        FeatureStoreError.__init__(self, f"{where}: rows {start}:{stop} were written but their chunk is missing "
                                         f"from storage (deleted or lost); recompute those rows")


def _short(config, limit: int = 400) -> str:
    import json

    text = json.dumps(config, sort_keys=True, default=str)
    return text if len(text) < limit else text[:limit] + "..."
