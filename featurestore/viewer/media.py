"""Which media file a clip's URL may serve: only what the store's index lists, under its dataset root.

A URL names a clip id and a kind (``audio``/``video``), never a path. The path comes from the
store's index (relative to the dataset root recorded for the clip's rows) and is served only when

* the clip id is in the index (``..``, ``/etc/passwd`` or ``a%2Fb`` are unknown clip ids),
* the stored relative path is relative and has no ``..`` part (a crafted store cannot list ``/etc``),
* the real path, every symbolic link resolved, lies inside the real dataset root (a link inside the
  dataset that points elsewhere is refused), and it is a regular file.

Anything else is `MediaRefused` (served as 404 with the reason) or `MediaMissing` (the file the index
lists is not there: the page shows a note instead of a player).
"""
from __future__ import annotations

import os
import stat
from collections.abc import Callable
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

from featurestore.errors import FeatureStoreError

KINDS = {"audio": "audio_path", "video": "video_path"}
CONTENT_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg", ".ogg": "audio/ogg",
                 ".mp4": "video/mp4", ".webm": "video/webm", ".mkv": "video/x-matroska"}


class MediaRefused(FeatureStoreError):
    """A media request that names no file the store lists under its dataset root."""


class MediaMissing(FeatureStoreError):
    """The file the index lists is not where the dataset root says (moved, unmounted, not copied)."""


def row_root(store: Any, row: int, attrs: dict | None = None) -> str:
    """The dataset root recorded for ``row`` (the ``datasets`` attribute; else the store's root).
    ``attrs``: the store's root attributes when the caller holds them (reading them costs a metadata read)."""
    attrs = store.attrs if attrs is None else attrs
    root = str(attrs.get("dataset_root") or "")
    for added in attrs.get("datasets", []):
        start, stop = added.get("rows", (0, 0))
        if start <= row < stop:
            root = str(added.get("dataset_root") or "")
    return root


def media_path(store: Any, clip_id: str, kind: str, attrs: dict | None = None,
               value: Callable[[str, int], str] | None = None) -> Path:
    """The real path of a clip's audio or video file, checked as the module docstring says.

    ``attrs``: the store's root attributes, and ``value(column, row)``: a reader of index values,
    when the caller keeps them (a running app: each read is a request to the store).

    Raises:
        MediaRefused: unknown kind or clip, no recorded root, a path that leaves the root.
        MediaMissing: the listed file does not exist.
    """
    if kind not in KINDS:
        raise MediaRefused(f"unknown media kind {kind!r} (audio or video)")
    row = _row(store, clip_id)
    relative = (value or partial(index_value, store))(KINDS[kind], row)
    if not relative:
        raise MediaMissing(f"clip {clip_id!r} has no {kind} file in the store's index")
    root = row_root(store, row, attrs)
    if not root:
        raise MediaMissing(f"the store records no dataset root for clip {clip_id!r}, so its {kind} file "
                           f"{relative!r} cannot be found")
    parts = PurePosixPath(relative)
    if parts.is_absolute() or ".." in parts.parts or "\\" in relative:
        raise MediaRefused(f"the index lists {relative!r} for clip {clip_id!r}: not a path inside the dataset root")
    return _inside(Path(root), relative, clip_id, kind)


def index_value(store: Any, column: str, row: int) -> str:
    """One row of a string column of the index, reading only its chunk (the clip page's fields)."""
    return str(store.arrays.read(f"index/{column}", row, row + 1)[0])


def _row(store: Any, clip_id: str) -> int:
    try:
        return int(store.row(clip_id))
    except KeyError as err:
        raise MediaRefused(f"no clip {clip_id!r} in the store") from err


def _inside(root: Path, relative: str, clip_id: str, kind: str) -> Path:
    """``root/relative`` with every link resolved, when it is a regular file inside the real root."""
    real_root = Path(os.path.realpath(root))
    candidate = root / relative
    real = Path(os.path.realpath(candidate))
    if not real.is_relative_to(real_root):
        raise MediaRefused(f"the {kind} file of clip {clip_id!r} ({candidate}) resolves to {real}, "
                           f"outside the dataset root {real_root}")
    try:
        info = os.stat(real)
    except FileNotFoundError as err:
        raise MediaMissing(f"the {kind} file of clip {clip_id!r} is not at {candidate}") from err
    except OSError as err:  # a link loop, a file we may not read: nothing to serve
        raise MediaRefused(f"the {kind} file of clip {clip_id!r} ({candidate}) cannot be read: {err.strerror}") from err
    if not stat.S_ISREG(info.st_mode):
        raise MediaRefused(f"the {kind} file of clip {clip_id!r} ({candidate}) is not a regular file")
    return real


def content_type(path: Path) -> str:
    return CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
