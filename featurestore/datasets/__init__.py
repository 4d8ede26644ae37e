"""Dataset readers: a dataset directory or CSV file in, a :class:`~featurestore.manifest.Manifest` out.

* :func:`read_tau` - TAU Urban Audio-Visual Scenes 2021 development set (10 s clips, labels, folds).
* :func:`read_tau_eval` - the evaluation layout (1 s clips ``0.wav``/``0.mp4``..., no labels).
* :func:`read_csv_manifest` - a plain CSV for any other dataset.
* :func:`open_dataset` - picks one of the above by looking at the path.
* :func:`check_files` - every listed file exists, or one error listing all that do not.

Every reader honours a ``dataset.json`` next to the dataset's metadata (:class:`DatasetSidecar`:
the clip length, or the segment and frame counts); an explicit argument wins over it.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from featurestore.datasets._common import (
    DATASET_FILE,
    DatasetFormatError,
    DatasetSidecar,
    MissingFilesError,
    PathLike,
    check_count,
    check_files,
    not_utf8,
)
from featurestore.datasets.csv_manifest import read_csv_manifest
from featurestore.datasets.tau import TauLayout, locate_tau, read_tau, read_tau_eval
from featurestore.manifest import Manifest

__all__ = [
    "DATASET_FILE", "DatasetFormatError", "DatasetSidecar", "MissingFilesError", "TauLayout", "check_files",
    "locate_tau", "open_dataset", "read_csv_manifest", "read_tau", "read_tau_eval",
]


def open_dataset(path: PathLike, *, audio_segments: int | None = None,
                 video_frames: int | None = None, allow_outside_root: bool = False,
                 classes: Sequence[str] | None = None) -> Manifest:
    """Read a dataset, recognising which kind it is.

    * a ``.csv`` file: ``meta.csv`` -> :func:`read_tau` on its directory; a file with a
      ``clip_id`` column -> :func:`read_csv_manifest`;
    * a directory with a ``meta.csv`` near it (itself, its ``.meta`` sibling or a subdirectory)
      -> :func:`read_tau`;
    * a directory with ``evaluation_setup/*.csv`` or ``audio/``/``video/`` but no meta.csv ->
      :func:`read_tau_eval`;
    * a directory holding exactly one CSV with a ``clip_id`` column -> :func:`read_csv_manifest`.

    Args:
        path: dataset directory or CSV file.
        audio_segments: 1 s audio segments per clip; None lets the reader decide (the dataset's
            ``dataset.json`` when it has one, else TAU: 10 for development, 1 for evaluation; CSV: 10).
        video_frames: frames sampled per clip; None lets the reader decide (``dataset.json``,
            else 12, 5 for evaluation).
        allow_outside_root: accept listed paths that are absolute or hold ``..`` (refused by
            default: the root is a boundary; symlinks placed under it are followed).
        classes: the class order (needed for a CSV without labels; TAU readers default to the
            DCASE order); a labelled clip whose label is not among them is an error.

    Raises:
        FileNotFoundError: the path does not exist or holds none of these.
        ValueError: ``audio_segments``/``video_frames`` not an integer >= 1.
    """
    check_count("audio_segments", audio_segments)
    check_count("video_frames", video_frames)
    shape = {"audio_segments": audio_segments, "video_frames": video_frames}
    path = Path(path)
    if path.is_file():
        return _open_file(path, shape, allow_outside_root, classes)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset path {path} does not exist")
    layout = locate_tau(path)
    if layout.meta_csv is not None:
        return read_tau(path, **shape, allow_outside_root=allow_outside_root, classes=classes)
    if layout.fold_files or layout.media_dir is not None:
        return read_tau_eval(path, **shape, allow_outside_root=allow_outside_root, classes=classes)
    manifests = [p for p in sorted(path.glob("*.csv")) if _has_clip_id(p)]
    if len(manifests) == 1:
        return read_csv_manifest(manifests[0], classes, **shape, allow_outside_root=allow_outside_root)
    raise FileNotFoundError(
        f"{path} is not a dataset this package reads: no meta.csv (TAU development), no "
        f"evaluation_setup/ or audio/ or video/ (TAU evaluation), and "
        f"{'several' if manifests else 'no'} CSV file(s) with a clip_id column "
        f"(looked in: {', '.join(str(d) for d in layout.searched)})")


def _open_file(path: Path, shape: dict[str, int | None], allow_outside_root: bool,
               classes: Sequence[str] | None) -> Manifest:
    if path.name == "meta.csv":
        return read_tau(path.parent, **shape, allow_outside_root=allow_outside_root, classes=classes)
    if _has_clip_id(path):
        return read_csv_manifest(path, classes, **shape, allow_outside_root=allow_outside_root)
    raise DatasetFormatError(path, 1, "not a dataset manifest: expected meta.csv or a CSV with a clip_id column")


def _has_clip_id(path: Path) -> bool:
    """Whether the CSV's header names a ``clip_id`` column. A file that is not UTF-8 is a
    DatasetFormatError naming it (it escaped as a bare UnicodeDecodeError, naming no file)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            first = f.readline()
    except UnicodeDecodeError as exc:
        raise not_utf8(path, exc) from exc
    return "clip_id" in [h.strip().lower() for h in first.replace("\t", ",").split(",")]
