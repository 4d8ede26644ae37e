"""Which media file a clip's URL may serve: only what the store's index lists, under its dataset root.

A URL names a clip id and a kind (``audio``/``video``), never a path. The path comes from the
store's index (relative to the dataset root recorded for the clip's rows) and is served only when

* the clip id is in the index (``..``, ``/etc/passwd`` or ``a%2Fb`` are unknown clip ids),
* the stored relative path is relative and has no ``..`` part (a crafted store cannot list ``/etc``),
* the real path, every symbolic link resolved, lies inside the real dataset root (a link inside the
  dataset that points elsewhere is refused), and it is a regular file.

Anything else is `MediaRefused` (served as 404 with the reason) or `MediaMissing` (the file the index
lists is not there: the page shows a note instead of a player).

What is served is the file `open_media` opened, never the path opened again later: the checked
path is walked down from the real root one name at a time without following a link, and the
open descriptor is what the response reads. Before, the path was checked and then reopened by the
response, so a file swapped for a link out of the dataset in between was served.
"""
from __future__ import annotations

import os
import stat
from collections.abc import Callable
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

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


def open_media(store: Any, clip_id: str, kind: str, attrs: dict | None = None,
               value: Callable[[str, int], str] | None = None) -> tuple[BinaryIO, os.stat_result, Path]:
    """The clip's media file opened for reading, with its ``fstat`` and its checked real path.

    `media_path` checks the path; the file is then opened from the real dataset root one name at
    a time with ``O_NOFOLLOW`` (`_open_beneath`), so what is opened is that checked file or
    nothing: a name swapped for a link (or a folder for a link) since the check is refused, not
    followed. ``O_NONBLOCK``: a file swapped for a FIFO cannot hang the app in ``open``.

    Raises:
        MediaRefused, MediaMissing: as `media_path`, or when the file changed since the check.
    """
    real = media_path(store, clip_id, kind, attrs, value)
    real_root = Path(os.path.realpath(row_root(store, _row(store, clip_id), attrs)))
    what = f"the {kind} file of clip {clip_id!r} ({real})"
    if not real.is_relative_to(real_root):
        raise MediaRefused(f"{what} left the dataset root {real_root} while being opened")
    file = os.fdopen(_open_beneath(real_root, real.relative_to(real_root).parts, what), "rb", buffering=0)
    info = os.fstat(file.fileno())
    if not stat.S_ISREG(info.st_mode):
        file.close()
        raise MediaRefused(f"{what} is not a regular file")
    return file, info, real


def _open_beneath(root: Path, parts: tuple[str, ...], what: str) -> int:
    """A read descriptor of ``root/parts...``, following no link on the way (see `open_media`)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        folder = os.open(root, flags | os.O_DIRECTORY)
    except OSError as err:
        raise MediaMissing(f"{what}: the dataset root {root} cannot be opened: {err.strerror}") from err
    try:
        for name in parts[:-1]:
            inner = os.open(name, flags | os.O_DIRECTORY, dir_fd=folder)
            os.close(folder)
            folder = inner
        return os.open(parts[-1], flags | os.O_NONBLOCK, dir_fd=folder)
    except FileNotFoundError as err:
        raise MediaMissing(f"{what} is gone") from err
    except OSError as err:  # ELOOP or ENOTDIR: a name became a link since the check
        raise MediaRefused(f"{what} changed since it was checked (a link now?): {err.strerror}") from err
    finally:
        os.close(folder)


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
