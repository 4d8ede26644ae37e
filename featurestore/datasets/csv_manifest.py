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

import codecs
import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path

import numpy as np

from featurestore.clip_table import ClipTable
from featurestore.datasets._common import (
    DatasetFormatError,
    PathLike,
    check_count,
    check_inside_root,
    checked_clip_id,
    clip_counts,
    outside_root,
    read_table,
)
from featurestore.manifest import Manifest, all_plain_ids, check_classes, clip_id_problem

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

    The clips are kept as columns (a ``ClipTable``), checked a column at a time; a row is
    looked at on its own only to word the first error. A million rows take ~3 s, where a
    ``ClipRecord`` and four ``Path`` s per row took ~40 s (docs/benchmarks.md).

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
    table = _read_columns(path)
    header = [h.lower() for h in table.header]
    if "clip_id" not in header or not ({"audio", "video"} & set(header)):
        raise DatasetFormatError(table.path, 1, f"need a clip_id column and an audio and/or video column; "
                                                f"header is {table.header}")
    unknown = [h for h in header if h not in _KNOWN]
    if unknown:
        raise DatasetFormatError(table.path, 1, f"unknown column(s) {unknown}; known: {', '.join(_KNOWN)}")
    twice = sorted({h for h in header if header.count(h) > 1})
    if twice:  # the last one was used without a word (``clip_id,audio,video,clip_id``: the second ids)
        raise DatasetFormatError(table.path, 1, f"column(s) {twice} given more than once (names are read without "
                                                f"case: {table.header}); keep one of each")
    base = table.path.parent.absolute()
    cells = dict(zip(header, table.columns))
    _check_rows(table, cells, base, allow_outside_root)
    for column in ("label", "city", "location"):
        _check_unpadded(table, cells, column)
    labels = _labels(cells.get("label"), len(table.lines))
    classes = _classes(table, cells["clip_id"], labels, classes)
    audio_segments, video_frames = clip_counts([base], audio_segments, video_frames, default_segments=DEFAULT_SEGMENTS,
                                               default_frames=DEFAULT_FRAMES, segment_seconds=segment_seconds)
    return Manifest(name or table.path.stem, classes, _clip_table(cells, labels), base, audio_segments=audio_segments,
                    segment_seconds=segment_seconds, video_frames=video_frames)


# ---------------------------------------------------------------------------------------- checks
def _check_rows(table: _Columns, cells: dict[str, list[str]], base: Path, allow_outside_root: bool) -> None:
    """Each row's clip id (grammar, not listed before) and media paths (inside the root), as a loop
    over the rows checked them: the first row with any problem is reported, its id before its
    audio before its video. Each kind is asked of whole columns first; rows are looked at one by
    one only where a column fails, to find the first offending row, which :func:`_check_row` words."""
    ids = cells["clip_id"]
    media = [cells[m] for m in ("audio", "video") if m in cells]
    firsts = [_first_bad_id(ids), _first_repeat(ids)]
    if not allow_outside_root:
        firsts += [_first_outside(column) for column in media]
    bad = [i for i in firsts if i is not None]
    if bad:
        _check_row(table, cells, min(bad), base, allow_outside_root)


def _check_row(table: _Columns, cells: dict[str, list[str]], row: int, base: Path, allow_outside_root: bool) -> None:
    """Raise the error the row's checks raise, in their order (its id, a repeat of it, its audio and
    video paths), naming the row's line."""
    line, clip_id = table.lines[row], cells["clip_id"][row]
    checked_clip_id(table.path, line, clip_id)
    first = cells["clip_id"].index(clip_id)
    if first < row:
        raise DatasetFormatError(table.path, line, f"clip {clip_id!r} already listed on line {table.lines[first]}")
    for media in ("audio", "video"):
        listed = cells[media][row] if media in cells else ""
        check_inside_root(base, listed, table.path, line, clip_id, allow_outside_root)


def _check_unpadded(table: _Columns, cells: dict[str, list[str]], name: str) -> None:
    """No ``name`` cell (label, city, location) starts or ends with white space that the CSV reading
    kept: a no-break space (spreadsheets, text copied from the web), an em space, a vertical tab.

    ``"park\u00a0"`` was a class of its own beside ``"park"`` (a head with one class more, its
    clips counted apart), and such a location one of its own beside the real one (location-disjoint
    folds put the two on either side). The distinct cells are checked, so a million rows cost little.
    """
    column = cells.get(name)
    if column is None:
        return
    padded = {value for value in set(column) if value != value.strip()}
    if padded:
        row = next(i for i, value in enumerate(column) if value in padded)
        raise DatasetFormatError(table.path, table.lines[row], f"{name} {column[row]!r} of clip "
                                                               f"{cells['clip_id'][row]!r} starts or ends with "
                                                               f"white space; remove it")


def _first_bad_id(ids: list[str]) -> int | None:
    """The first id outside the grammar (None: all follow it); the ids are checked joined as one
    array of bytes where they are ASCII, one by one otherwise."""
    if all_plain_ids(ids):
        return None
    return next((i for i, clip_id in enumerate(ids) if clip_id_problem(clip_id)), None)


def _first_repeat(ids: list[str]) -> int | None:
    """The first row whose id an earlier row has (None: all differ)."""
    if len(set(ids)) == len(ids):
        return None
    seen: set[str] = set()
    for i, clip_id in enumerate(ids):
        if clip_id in seen:
            return i
        seen.add(clip_id)
    return None


#: In the cells joined by newlines (and framed by them): where some cell has a '..' component
#: (``check_inside_root``'s rule on a POSIX path; an absolute one is a '\n/'). A cell holding a
#: newline may match without having one: the rows are then checked one by one, which decides.
_DOTDOT_MARKS = ("/../", "\n../", "/..\n", "\n..\n")


def _first_outside(column: list[str]) -> int | None:
    """The first row whose path is absolute or has a '..' component (None: every path is inside)."""
    if os.name == "posix":
        joined = "\n" + "\n".join(column) + "\n"
        # '..' is rare in a path's text ('a..b.wav'): the four marks are searched for only then
        if "\n/" not in joined and (".." not in joined or not any(m in joined for m in _DOTDOT_MARKS)):
            return None
    return next((i for i, listed in enumerate(column) if listed and outside_root(listed)), None)


def _classes(table: _Columns, ids: list[str], labels: list[str | None],
             classes: Sequence[str] | None) -> list[str]:
    """The given classes (checked, and every label among them: else the first clip that is not, by
    its line), or the sorted labels."""
    given = set(labels)
    given.discard(None)
    if classes is None:
        return sorted(given)
    classes = check_classes(classes)
    known = set(classes)
    if not given <= known:
        row = next(i for i, label in enumerate(labels) if label is not None and label not in known)
        raise DatasetFormatError(table.path, table.lines[row], f"label {labels[row]!r} of clip {ids[row]!r} "
                                                               f"is not one of the classes {classes}")
    return classes


def _labels(column: list[str] | None, n: int) -> list[str | None]:
    """Each clip's label: its cell, None where the cell is empty or there is no label column."""
    if column is None:
        return [None] * n
    return column if "" not in set(column) else [label or None for label in column]


def _clip_table(cells: dict[str, list[str]], labels: list[str | None]) -> ClipTable:
    """The clips as columns. Every cell is a str (what ``ClipTable.from_columns`` checks entry by
    entry, ~2 s for a million rows, is known here), so the table is made from them directly."""
    n = len(labels)

    def texts(name: str) -> np.ndarray:
        return _objects(cells[name]) if name in cells else np.full(n, "", dtype=object)

    return ClipTable(_objects(cells["clip_id"]), _objects(labels), texts("city"), texts("location"),
                     _media(cells.get("audio")), _media(cells.get("video")), _split_masks(cells.get("split")))


def _objects(values: list) -> np.ndarray:
    return np.fromiter(values, dtype=object, count=len(values))


def _media(column: list[str] | None) -> np.ndarray | None:
    """A media column as ``ClipTable`` keeps it: the path texts, None for an empty cell, and None for a
    column without any path (as ``Path(cell) if cell else None`` per clip gave)."""
    if column is None:
        return None
    paths = _objects(column)
    empty = paths == ""
    if empty.all():
        return None
    paths[empty] = None
    return paths


def _split_masks(column: list[str] | None) -> dict[str, np.ndarray]:
    """Membership of each split the ``split`` cells name (``;``-separated, spaces around a name
    dropped). Clips share a few distinct cells: each is parsed once and a clip takes its cell's."""
    if column is None:
        return {}
    number = {cell: i for i, cell in enumerate(dict.fromkeys(column))}
    codes = np.fromiter(map(number.__getitem__, column), dtype=np.intp, count=len(column))
    sets = [frozenset(s.strip() for s in cell.split(";") if s.strip()) for cell in number]
    names = sorted(set().union(*sets))
    return {name: np.array([name in s for s in sets], dtype=bool)[codes] for name in names}


# ---------------------------------------------------------------------------------------- reading
@dataclass
class _Columns:
    """A CSV manifest as columns: the header as written, one list of cells per column, and each
    row's line in the file (for errors)."""

    path: Path
    header: list[str]
    columns: list[list[str]]
    lines: Sequence[int]


def _read_columns(path: PathLike) -> _Columns:
    """The file's columns: split directly where it is a plain file (:func:`_plain_columns`), else
    from ``read_table``, which parses any CSV (quotes, blank lines, spaces around cells) and words
    every error about its shape."""
    plain = _plain_columns(Path(path))
    if plain is not None:
        return plain
    table = read_table(path)
    header = table.header or []
    rows = list(map(itemgetter(1), table.rows))
    # a column at a time: zip(*rows) made an iterator per row, and the garbage collector walked the
    # million rows again and again (~2.4 s)
    columns = [list(map(itemgetter(j), rows)) for j in range(len(header))]
    return _Columns(table.path, header, columns, list(map(itemgetter(0), table.rows)))


#: Bytes that may start a line of a plain file: printable ASCII other than the space, the quote and
#: the comma (a line that starts so is not blank, which ``read_table`` would skip).
_LINE_START = np.zeros(256, dtype=bool)
_LINE_START[33:127] = True
_LINE_START[[ord('"'), ord(",")]] = False


def _plain_columns(path: Path) -> _Columns | None:
    """The columns of a plain file, or None where ``read_table`` must read it.

    Plain: UTF-8 with no quote, NUL or lone carriage return, no blank line but at the end, every line
    with the header's number of fields, no space or tab around a cell, no line longer than ``csv``'s
    field limit. Then ``csv`` would split each line at each delimiter, and so does this, on the whole
    text at once: a million rows in ~1.5 s where ``read_table``'s rows took ~6 s (a list per row,
    and the garbage collector walking them). Any other file, an empty or unreadable one included,
    goes to ``read_table``, which decides and words the errors as for every reader.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    if raw.startswith(codecs.BOM_UTF8):  # what "utf-8-sig" drops
        raw = raw[len(codecs.BOM_UTF8):]
    if b'"' in raw or b"\0" in raw:
        return None
    if b"\r" in raw:
        if raw.count(b"\r") != raw.count(b"\r\n"):
            return None
        raw = raw.replace(b"\r\n", b"\n")  # one line ending as csv reads it: the line numbers stay
    raw = raw.rstrip(b"\n")  # blank lines at the end: read_table skips them
    first_end = raw.find(b"\n")
    delimiter = b"\t" if b"\t" in (raw if first_end < 0 else raw[:first_end]) else b","  # as read_table picks it
    pads = _pads(delimiter)
    if not raw or raw[0] in pads or raw[-1] in pads or _spaced_cell(raw, delimiter):
        return None
    widths = _line_widths(raw, delimiter)
    if widths is None or (widths != widths[0]).any():
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    sep = delimiter.decode()
    cells = text.replace("\n", sep).split(sep)
    k = int(widths[0])
    return _Columns(path, cells[:k], [cells[k + j::k] for j in range(k)], range(2, len(widths) + 1))


def _spaced_cell(raw: bytes, delimiter: bytes) -> bool:
    """Whether a cell inside ``raw`` starts or ends with a space or tab (read_table strips them). Most
    files have neither byte (one scan each); the pairs around delimiters and line breaks are searched
    for only where one is there."""
    return any(pad in raw and any(pair in raw for pair in (pad + delimiter, delimiter + pad, pad + b"\n", b"\n" + pad))
               for pad in (bytes([b]) for b in _pads(delimiter)))


def _pads(delimiter: bytes) -> bytes:
    """What read_table strips around a cell, less the delimiter (a tab between cells is none)."""
    return b" \t".replace(delimiter, b"")


def _line_widths(raw: bytes, delimiter: bytes) -> np.ndarray | None:
    """Fields on each line of ``raw`` (None: a line is not surely a row: it starts with a space, a
    delimiter or a non-ASCII byte, which a blank line may, or it is longer than csv's field limit)."""
    data = np.frombuffer(raw, dtype=np.uint8)
    breaks = np.flatnonzero(data == ord("\n"))
    starts = np.r_[0, breaks + 1]
    ends = np.r_[breaks, len(data)]
    if not _LINE_START[data[starts]].all() or (ends - starts).max() > csv.field_size_limit():
        return None
    # the delimiters before each line's end, less those before its start (positions: 8 bytes a field,
    # where a running count would take 8 a byte)
    found = np.flatnonzero(data == ord(delimiter))
    return np.searchsorted(found, ends) - np.searchsorted(found, starts) + 1
