"""What every dataset reader shares: its errors, table reading, path handling and the file check."""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from featurestore.manifest import Manifest

PathLike = str | os.PathLike

#: Shown in full up to this many paths; the exception's ``paths`` always holds all of them.
_MAX_LISTED = 100

#: The parameters file the synthetic demo generator writes next to meta.csv; the TAU readers take
#: the clip duration (and so the number of audio segments) from it.
DEMO_CONFIG_FILE = "demo_config.json"


def check_count(name: str, value: int | None) -> None:
    """``value`` must be None (derive it) or an integer >= 1; raises ValueError naming ``name``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be an integer >= 1 (or None to derive it), got {value!r}")


class DatasetFormatError(ValueError):
    """A metadata file does not have the expected shape or content (names the file and line)."""

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

    Args:
        path: the file.
        delimiter: field separator; None picks tab when the first line has a tab, else comma.
        header_first: if given, the first line is a header only when its first field is one of
            these (DCASE fold files have been published with and without headers).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise DatasetFormatError(path, None, f"cannot read file ({exc})") from exc
    lines = text.splitlines()
    if delimiter is None:
        delimiter = "\t" if lines and "\t" in lines[0] else ","
    parsed = [(i + 1, [f.strip() for f in fields])
              for i, fields in enumerate(csv.reader(lines, delimiter=delimiter)) if any(f.strip() for f in fields)]
    if not parsed:
        raise DatasetFormatError(path, None, "file is empty")
    first = parsed[0][1]
    has_header = not header_first or first[0] in header_first
    return Table(path, first if has_header else None, parsed[1:] if has_header else parsed)


def resolve(base: Path, relative: str) -> Path:
    """``relative`` joined to ``base`` (absolute paths are kept), without resolving symlinks."""
    p = Path(relative)
    return p if p.is_absolute() else (base / p).absolute()


#: What an error about a path outside the dataset root tells the user to do when it is meant.
OUTSIDE_ROOT_HINT = ("if the files really live there, pass allow_outside_root=True "
                     "(featurestore extract --allow-outside-root)")


def check_inside_root(base: Path, relative: str, manifest: Path, line: int | None, clip_id: str,
                      allow_outside_root: bool = False) -> None:
    """Refuse a listed path that is absolute or leads outside the dataset root ``base``.

    The dataset root is a boundary: a manifest from elsewhere must not make extraction read (and
    the store record) files anywhere on the machine. ``..`` components and symlinks are resolved
    first, so a link under the root that points outside counts as outside.

    Raises:
        DatasetFormatError: naming the manifest, the line, the clip id and the path.
    """
    if allow_outside_root or not relative:
        return
    where = f"clip {clip_id!r}: path {relative!r}"
    if Path(relative).is_absolute():
        raise DatasetFormatError(manifest, line, f"{where} is absolute; paths must be relative to the dataset "
                                                 f"root {base}; {OUTSIDE_ROOT_HINT}")
    root = base.resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(root):
        raise DatasetFormatError(manifest, line, f"{where} leads outside the dataset root {root} (to {target}); "
                                                 f"{OUTSIDE_ROOT_HINT}")


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
