"""DCASE submission files: one tab-separated row per evaluated clip with every class probability.

Format (header, then one row per clip; sources in docs/fusion.md)::

    filename<TAB>scene_label<TAB>airport<TAB>bus<TAB>...<TAB>tram
    audio/0.wav<TAB>bus<TAB>0.001<TAB>0.99<TAB>...

``filename`` defaults to ``audio/<clip_id>.wav``, the audio file's path relative to the dataset
root, as the organisers' baseline writes it (the ``filename_audio`` column of ``meta.csv``); their
evaluation compares base names, so ``<clip_id>.wav`` (``--filename-template '{clip_id}.wav'``) is
scored the same. ``scene_label`` is the arg-max class.
"""
from __future__ import annotations

import csv
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.atomic_files import atomic_write
from featurestore.clip_files import AUDIO_SUFFIXES, VIDEO_SUFFIXES
from featurestore.store.shared import StoreWithPredictions
from fusion._validate import as_probs

DEFAULT_FILENAME_TEMPLATE = "audio/{clip_id}.wav"
PROB_FORMAT = ".8g"  # keeps small calibrated values (1e-9 is not written as 0.000000)


@dataclass
class Submission:
    """A submission file read back: file names, decided labels, probabilities [n, n_classes]."""

    filenames: list[str]
    scene_labels: list[str]
    probs: np.ndarray
    classes: list[str]


def write_submission(path: str | Path, clip_ids: Sequence[str], probs: np.ndarray, classes: Sequence[str],
                     filename_template: str = DEFAULT_FILENAME_TEMPLATE) -> Path:
    """Write the tab-separated submission file and return its path.

    The file is written to a temp name beside ``path`` and renamed: a full disk or a kill leaves the
    previous submission as it was (``OutputWriteError`` naming the file), never one cut mid-row.

    Args:
        path: output file (parent directories are created; an existing directory is refused).
        clip_ids: one id per row of ``probs``.
        probs: [n, n_classes] final probabilities, written as given (no renormalisation).
        classes: class names in column order.
        filename_template: ``str.format`` template with ``{clip_id}``.
    """
    p = as_probs(probs, "submission probabilities")
    if p.shape != (len(clip_ids), len(classes)):
        raise ValueError(f"submission: expected probabilities of shape {(len(clip_ids), len(classes))}, found {p.shape}")
    check_filename_template(filename_template)
    out = check_output_file(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # UTF-8 whatever the locale: clip ids may hold non-ASCII letters ("café-1"), and a locale's
    # encoding would fail on them (C/POSIX) or write bytes an evaluator reads as other letters
    with atomic_write(out, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["filename", "scene_label", *classes])
        for clip_id, row in zip(clip_ids, p):
            writer.writerow([filename_template.format(clip_id=clip_id), classes[int(row.argmax())],
                             *(format(v, PROB_FORMAT) for v in row)])
    return out


def check_filename_template(template: str) -> None:
    """Refuse a filename template that is not ``str.format`` text whose only field is ``{clip_id}``
    (checked before any work: ``{x}`` or ``{clip_id:d}`` would otherwise fail on the first row).

    Raises:
        ValueError: naming the template and what is wrong with it.
    """
    try:
        parsed = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
        template.format(clip_id="airport-lisbon-1000-40000")
    except (ValueError, KeyError, IndexError, AttributeError) as err:
        raise ValueError(f"submission: filename template {template!r} is not a format string with only "
                         f"{{clip_id}} in braces ({type(err).__name__}: {err})") from None
    if not parsed or any(name != "clip_id" for name, _, _ in parsed):
        raise ValueError(f"submission: filename template must contain '{{clip_id}}' and no other field, "
                         f"found {template!r}")
    changed = [f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
               for name, spec, conversion in parsed if spec or conversion]
    if changed:  # '{clip_id:.3}' cuts every id to 3 letters: rows of different clips under one file name
        raise ValueError(f"submission: filename template {template!r} changes the clip id with "
                         f"{', '.join(changed)}; the evaluation matches rows by file name, so write "
                         f"'{{clip_id}}' as it is")


def check_output_file(path: str | Path, store: Any = None) -> Path:
    """``path`` as a file to write, refused before any work is done when it is an existing directory,
    has an audio or video ending, or is the local ``store`` itself or a file inside it (``--out store.h5`` would replace the store
    with a CSV, ``--out store.zarr/zarr.json`` its root metadata)."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"output file {str(out)!r} is a directory; expected a file name such as "
                         f"{str(out / 'submission.csv')!r}")
    if out.suffix.lower() in AUDIO_SUFFIXES + VIDEO_SUFFIXES:  # `--out a.wav b.wav`: a recording taken as the value
        raise ValueError(f"output file {str(out)!r} names an audio or video file; the output is a CSV: give a .csv "
                         f"name (was a recording meant as an input?)")
    check_outside_store(out, store, "output file")
    return out


def check_outside_store(path: Path, store: Any, what: str) -> None:
    """Refuse ``path`` when it is the local ``store`` or lies inside it (writing there would damage it).

    A store read with ``--predictions MINE`` (``StoreWithPredictions``) is two stores: the user's own
    prediction store is checked too (``--out mine.h5`` would replace every run predicted into it).
    """
    mine = store.predictions if isinstance(store, StoreWithPredictions) else None
    for held, name in ((store, "the store"), (mine, "the prediction store")):
        location = str(getattr(held, "location", "") or "") if held is not None else ""
        if location and ("://" not in location or location.startswith("file://")):
            kept, written = Path(location.removeprefix("file://")).resolve(), path.resolve()
            if written == kept or kept in written.parents:
                raise ValueError(f"{what} {str(path)!r} is {name if written == kept else 'inside ' + name} "
                                 f"{location}; writing it would damage the store: choose a path outside it")


def read_submission(path: str | Path, classes: Sequence[str] | None = None) -> Submission:
    """Parse a submission file, checking its header (against ``classes`` when given) and every row."""
    with Path(path).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t"))
    if not rows or rows[0][:2] != ["filename", "scene_label"]:
        raise ValueError(f"{path}: expected a header starting 'filename<TAB>scene_label', found {rows[:1]}")
    header_classes = rows[0][2:]
    if classes is not None and list(classes) != header_classes:
        raise ValueError(f"{path}: expected class columns {list(classes)}, found {header_classes}")
    filenames, labels, values = [], [], []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(rows[0]):
            raise ValueError(f"{path}:{number}: expected {len(rows[0])} tab-separated fields, found {len(row)}")
        if row[1] not in header_classes:
            raise ValueError(f"{path}:{number}: scene_label {row[1]!r} is not one of {header_classes}")
        filenames.append(row[0])
        labels.append(row[1])
        values.append([float(v) for v in row[2:]])
    probs = np.asarray(values, dtype=np.float64).reshape(len(values), len(header_classes))
    return Submission(filenames, labels, probs, header_classes)
