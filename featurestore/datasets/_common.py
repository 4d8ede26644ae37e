"""What every dataset reader shares: its errors, table reading, path handling, the dataset sidecar
(``dataset.json``) and the file check."""
from __future__ import annotations

import contextlib
import csv
import gc
import io
import json
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from featurestore.checks import is_int_in
from featurestore.errors import pickled_by_state
from featurestore.manifest import (
    MAX_AUDIO_SEGMENTS,
    MAX_CLIP_SECONDS,
    MAX_VIDEO_FRAMES,
    Manifest,
    clip_id_problem,
)

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

#: Shown in full up to this many paths; the exception's ``paths`` always holds all of them.
_MAX_LISTED = 100

#: The optional sidecar next to a dataset's metadata that says how long its clips are (see
#: :class:`DatasetSidecar`); every reader honours it.
DATASET_FILE = "dataset.json"
#: How far a clip may be from a whole number of segments (as ``decode.DEFAULT_TOLERANCE_SECONDS``).
_TOLERANCE_SECONDS = 0.1


#: The largest value each size a dataset may declare can take (``featurestore.manifest``'s maxima).
_MAXIMA = {"clip_seconds": MAX_CLIP_SECONDS, "audio_segments": MAX_AUDIO_SEGMENTS, "video_frames": MAX_VIDEO_FRAMES}


def check_count(name: str, value: int | None) -> None:
    """``value`` must be None (derive it) or an integer from 1 to the maximum for ``name``
    (``audio_segments``, ``video_frames``); raises ValueError naming ``name`` and the range."""
    most = _MAXIMA[name]
    if value is not None and not is_int_in(value, 1, most):
        raise ValueError(f"{name} must be an integer >= 1 and <= {most} (or None to derive it), got {value!r}")


def checked_clip_id(path: PathLike, line: int | None, clip_id: str) -> str:
    """``clip_id`` when it follows the clip id grammar (``featurestore.manifest.check_clip_id``),
    else a DatasetFormatError naming the file, the line and the id."""
    problem = clip_id_problem(clip_id)
    if problem:
        raise DatasetFormatError(path, line, problem)
    return clip_id


class DatasetFormatError(ValueError):
    """A metadata file does not have the expected shape or content (names the file and line)."""

    __reduce__ = pickled_by_state  # its __init__ takes other arguments than its message

    def __init__(self, path: PathLike, line: int | None, problem: str):
        self.path = Path(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}, line {line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {problem}")


class MissingFilesError(FileNotFoundError):
    """Some audio/video files a manifest lists do not exist.

    Raised once, with every missing path, before any work starts: a run that discovers a missing
    file after an hour of extraction, one file at a time, is what this prevents.

    Attributes:
        paths: every missing path, in manifest order.
        n_checked: how many paths were checked.
    """

    __reduce__ = pickled_by_state  # its __init__ takes other arguments than its message

    def __init__(self, paths: list[Path], n_checked: int, dataset: str = ""):
        self.paths = paths
        self.n_checked = n_checked
        n_audio = sum(1 for p in paths if p.parent.name == "audio")
        n_video = sum(1 for p in paths if p.parent.name == "video")
        kinds = f" ({n_audio} under audio/, {n_video} under video/)" if n_audio + n_video else ""
        shown = "\n".join(f"  {p}" for p in paths[:_MAX_LISTED])
        more = f"\n  ... and {len(paths) - _MAX_LISTED} more (all in .paths)" if len(paths) > _MAX_LISTED else ""
        name = f" of dataset {dataset!r}" if dataset else ""
        super().__init__(f"{len(paths)} of {n_checked} files{name} are missing{kinds}:\n{shown}{more}")

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class DatasetSidecar:
    """The clip shape a dataset's ``dataset.json`` records; every field is optional.

    ``{"clip_seconds": 3.0}`` says the clips last 3 s, so extraction cuts 3 audio segments of 1 s.
    A reader's explicit argument wins over the file, and the file wins over the reader's default.
    Give ``clip_seconds`` or ``audio_segments``, not both (one source for the segment count).
    """

    clip_seconds: float | None = None  # seconds per clip; segments = clip_seconds / segment_seconds
    audio_segments: int | None = None  # audio segments per clip, when the count is not derived
    video_frames: int | None = None  # frames sampled per clip

    @classmethod
    def read(cls, path: PathLike) -> DatasetSidecar:
        """Parse ``path``; DatasetFormatError naming it when it is not such an object."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DatasetFormatError(path, None, f"not readable JSON ({exc})") from exc
        known = [f.name for f in fields(cls)]
        if not isinstance(data, dict):
            raise DatasetFormatError(path, None, f"expected a JSON object, found {type(data).__name__}")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise DatasetFormatError(path, None, f"unknown key(s) {unknown}; known: {', '.join(known)}")
        _check_field(path, "clip_seconds", data.get("clip_seconds"), float)
        for name in ("audio_segments", "video_frames"):
            _check_field(path, name, data.get(name), int)
        if "clip_seconds" in data and "audio_segments" in data:
            raise DatasetFormatError(path, None, "give clip_seconds or audio_segments, not both")
        # json.loads reads Infinity, NaN and 1e400 as floats: _check_field refuses them
        return cls(**data)

    def write(self, directory: PathLike) -> Path:
        """Write the fields that are set to ``directory/dataset.json``; returns the file."""
        path = Path(directory) / DATASET_FILE
        path.write_text(json.dumps({k: v for k, v in asdict(self).items() if v is not None}, indent=2) + "\n")
        return path


def _check_field(path: Path, name: str, value: object, kind: type) -> None:
    """``value`` is None, or a finite number in (0, max] (``kind`` float) or an integer in [1, max]
    (``kind`` int), max being ``_MAXIMA[name]``: a size is bounded before anything is sized by it."""
    most = _MAXIMA[name]
    if value is None or isinstance(value, bool):
        ok = value is None
    elif kind is float:
        ok = isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= most
    else:
        ok = isinstance(value, int) and 1 <= value <= most
    if not ok:
        expected, allowed = (("a positive number of seconds", f"0 < {name} <= {most:g}") if kind is float
                             else ("an integer >= 1", f"1 <= {name} <= {most}"))
        raise DatasetFormatError(path, None, f"expected {expected} under {name!r}, found {value!r} "
                                             f"(allowed: {allowed})")


def clip_counts(directories: Iterable[Path], audio_segments: int | None, video_frames: int | None, *,
                default_segments: int, default_frames: int, segment_seconds: float = 1.0) -> tuple[int, int]:
    """Audio segments and video frames per clip, for every reader.

    Each is the explicit argument when given, else what the first ``dataset.json`` among
    ``directories`` says, else the reader's default. The sidecar is not read when both are given.

    Raises:
        DatasetFormatError: a malformed ``dataset.json`` (naming it).
    """
    if audio_segments is not None and video_frames is not None:
        return audio_segments, video_frames
    path = next((d / DATASET_FILE for d in dict.fromkeys(directories) if (d / DATASET_FILE).is_file()), None)
    if path is None:
        log.info("no %s next to the dataset: %s audio segment(s) and %s frame(s) per clip",
                 DATASET_FILE, audio_segments or default_segments, video_frames or default_frames)
        return audio_segments or default_segments, video_frames or default_frames
    sidecar = DatasetSidecar.read(path)
    if audio_segments is None and sidecar.clip_seconds is not None:
        audio_segments = segments_for(sidecar.clip_seconds, segment_seconds, path)
        if audio_segments > MAX_AUDIO_SEGMENTS:
            raise DatasetFormatError(path, None, f"'clip_seconds' {sidecar.clip_seconds!r} makes {audio_segments} "
                                                 f"segments of {segment_seconds:g} s; at most {MAX_AUDIO_SEGMENTS} "
                                                 f"are allowed")
    elif audio_segments is None:
        audio_segments = sidecar.audio_segments or default_segments
    return audio_segments, video_frames or sidecar.video_frames or default_frames


def segments_for(clip_seconds: float, segment_seconds: float, source: PathLike) -> int:
    """Whole segments in a clip of ``clip_seconds`` (within 0.1 s counts as whole).

    Any other length is rounded down (to at least 1) with a warning naming ``source``, because
    extraction will then find the clips too long (or, below one segment, too short).
    """
    segments = max(1, math.floor(clip_seconds / segment_seconds + _TOLERANCE_SECONDS / segment_seconds))
    if abs(segments * segment_seconds - clip_seconds) > _TOLERANCE_SECONDS:
        log.warning("%s: clips last %g s, not a whole number of %g s segments; using %d segment(s), so "
                    "extraction will report the clips as too %s", source, clip_seconds, segment_seconds,
                    segments, "short" if segments * segment_seconds > clip_seconds else "long")
    log.info("%s: clips of %g s -> %d audio segment(s) of %g s", source, clip_seconds, segments, segment_seconds)
    return segments


@dataclass
class Table:
    """A delimited text file: header (None when it has none) and rows with their line numbers."""

    path: Path
    header: list[str] | None
    rows: list[tuple[int, list[str]]]

    def column(self, names: tuple[str, ...]) -> int | None:
        """Index of the first of ``names`` present in the header (None: no such column)."""
        if self.header is None:
            return None
        for name in names:
            if name in self.header:
                return self.header.index(name)
        return None


def read_table(path: PathLike, delimiter: str | None = None, header_first: tuple[str, ...] = ()) -> Table:
    """Read a small CSV/TSV file, keeping 1-based line numbers for error messages.

    Every row must have as many fields as the header (without one: as the first row).

    Args:
        path: the file.
        delimiter: field separator; None picks tab when the first line has a tab, else comma.
        header_first: if given, the first line is a header only when its first field is one of
            these (DCASE fold files have been published with and without headers).

    Raises:
        DatasetFormatError: an unreadable or empty file, or a row with a missing or extra field
            (naming the file, the line and both counts).
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # csv sees every \r and \n as they are
            text = f.read()
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc) from exc
    except OSError as exc:
        raise DatasetFormatError(path, None, f"cannot read file ({exc})") from exc
    if delimiter is None:
        delimiter = "\t" if "\t" in io.StringIO(text, newline="").readline() else ","
    # Parsed as the file it is (newline=""), not line by line: a quoted cell holding a newline keeps it,
    # so the id checks see "new\nline" instead of a silently joined "newline".
    parsed: list[tuple[int, list[str]]] = []
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    start = 1
    with _no_cyclic_gc():  # two lists a row: the collector's passes were half of a million-row read
        for cells in reader:
            if any(f.strip() for f in cells):  # spaces and tabs around a cell go; the rest stays, to be judged
                parsed.append((start, [f.strip(" \t") for f in cells]))
            start = reader.line_num + 1
    if not parsed:
        raise DatasetFormatError(path, None, "file is empty")
    first = parsed[0][1]
    has_header = not header_first or first[0] in header_first
    _check_widths(path, parsed, delimiter, "from the header" if has_header else f"as on line {parsed[0][0]}")
    return Table(path, first if has_header else None, parsed[1:] if has_header else parsed)


def not_utf8(path: Path, exc: UnicodeDecodeError) -> DatasetFormatError:
    """The error for a metadata file that is not UTF-8, saying so and, for UTF-16 (a spreadsheet's
    "Unicode text" export, which starts with a byte-order mark), which encoding it is."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        head = b""
    kind = ("UTF-16 text (Unicode text as spreadsheets export it)" if head in (b"\xff\xfe", b"\xfe\xff")
            else "not UTF-8 text")
    return DatasetFormatError(path, None, f"{kind}: save it as UTF-8 (byte {exc.start}: {exc.reason})")


@contextlib.contextmanager
def _no_cyclic_gc():
    """The cyclic garbage collector paused (as it was before, after): building millions of small
    lists that hold no cycles triggers a collection every 700 of them, each walking everything
    tracked so far. Reference counting still frees what is dropped."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _check_widths(path: Path, parsed: list[tuple[int, list[str]]], delimiter: str, source: str) -> None:
    """Every row has as many fields as the first (the header, or the first row of a file without
    one): a missing or extra field would otherwise shift or drop cells silently."""
    expected = len(parsed[0][1])
    kind = {",": "comma", "\t": "tab"}.get(delimiter, repr(delimiter))
    for line, row in parsed[1:]:
        if len(row) != expected:
            raise DatasetFormatError(path, line, f"expected {expected} {kind}-separated fields ({source}), "
                                                 f"found {len(row)}")


def resolve(base: Path, relative: str) -> Path:
    """``relative`` joined to ``base`` (absolute paths are kept), without resolving symlinks."""
    p = Path(relative)
    return p if p.is_absolute() else (base / p).absolute()


#: What an error about a path outside the dataset root tells the user to do when it is meant.
OUTSIDE_ROOT_HINT = ("if the files really live there, pass allow_outside_root=True "
                     "(featurestore extract --allow-outside-root)")


def check_inside_root(base: Path, relative: str, manifest: Path, line: int | None, clip_id: str,
                      allow_outside_root: bool = False) -> None:
    """Refuse a listed path that is absolute or has a ``..`` component.

    The dataset root is a boundary for what a manifest *lists*: a manifest from elsewhere must not
    make extraction read (and the store record) files anywhere on the machine. The rule is lexical,
    on the path as written: relative and without ``..``. Symlinks are followed: a link placed under
    the root (``audio -> /data/tau/audio``, or one file) is the dataset owner's choice, the usual
    layout on shared machines. Any ``..`` is refused, even one that seems to come back inside
    (``audio/../x.wav``): after a symlinked ``audio`` it leads next to the link's target.

    Raises:
        DatasetFormatError: naming the manifest, the line, the clip id and the path.
    """
    if allow_outside_root or not relative or not outside_root(relative):
        return
    where = f"clip {clip_id!r}: path {relative!r}"
    if Path(relative).is_absolute():
        raise DatasetFormatError(manifest, line, f"{where} is absolute; paths must be relative to the dataset "
                                                 f"root {base}; {OUTSIDE_ROOT_HINT}")
    raise DatasetFormatError(manifest, line, f"{where} has a '..' component, which may lead outside the "
                                             f"dataset root {base}; {OUTSIDE_ROOT_HINT}")


def outside_root(relative: str) -> bool:
    """The lexical rule of ``check_inside_root``: an absolute path, or one with a ``..`` component."""
    path = Path(relative)
    return path.is_absolute() or ".." in path.parts


def check_files(manifest: Manifest) -> None:
    """Check that every audio and video file the manifest lists exists, all at once.

    Raises:
        MissingFilesError: with the count and every missing path.
    """
    root = Path(manifest.root) if manifest.root is not None else Path.cwd()
    checked = 0
    missing: list[Path] = []
    for clip in manifest.clips:
        for p in (clip.audio, clip.video):
            if p is None:
                continue
            checked += 1
            full = resolve(root, str(p))
            if not full.is_file():
                missing.append(full)
    if missing:
        raise MissingFilesError(missing, checked, manifest.name)
