"""Exceptions raised by the feature store.

Every error says what was expected and what was found, and names the store, feature set or clip
involved, so that a failure deep inside a training loop still points at the data that caused it.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class FeatureStoreError(Exception):
    """Base class of every error the feature store raises on purpose."""


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


class MissingFeatureError(FeatureStoreError):
    """A clip's row exists but its ``done`` flag is false: the data is not there, never zeros."""

    def __init__(self, feature: str, clip_ids: list[str]):
        self.feature = feature
        self.clip_ids = clip_ids
        shown = ", ".join(clip_ids[:5]) + (f" and {len(clip_ids) - 5} more" if len(clip_ids) > 5 else "")
        super().__init__(
            f"feature set {feature!r} has not been computed for clip(s) {shown} "
            f"(done flag is false; run extraction for them first)"
        )


class FingerprintMismatchError(FeatureStoreError):
    """An existing feature set was made with a different configuration than the one given."""

    def __init__(self, feature: str, existing: dict, requested: dict):
        self.feature = feature
        self.existing = existing
        self.requested = requested
        super().__init__(
            f"feature set {feature!r} already exists with a different configuration.\n"
            f"  existing:  {_short(existing)}\n  requested: {_short(requested)}\n"
            f"Use another name, or overwrite=True (--overwrite) to replace it."
        )


class CorruptChunkError(FeatureStoreError):
    """A chunk failed its checksum or could not be decoded."""

    def __init__(self, where: str, start: int, stop: int, cause: BaseException):
        self.where, self.start, self.stop = where, start, stop
        super().__init__(f"{where}: rows {start}:{stop} could not be read ({type(cause).__name__}: {cause})")


def _short(config: dict) -> str:
    import json

    text = json.dumps(config, sort_keys=True, default=str)
    return text if len(text) < 400 else text[:400] + "..."
