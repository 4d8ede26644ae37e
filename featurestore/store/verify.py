"""Store verification: consistency of index and feature sets, and a read of every finished chunk.

Problems are returned as data (where, which rows, what is wrong) so that a user with 12,291 clips
learns *which* block to recompute, not just that something is off. Chunks holding no finished clip
are not read: a killed writer may have left them half-written, and they hold nothing yet.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featurestore.errors import CorruptChunkError, FeatureStoreError
from featurestore.provenance import fingerprint, fingerprint_matches
from featurestore.store._backend import join


@dataclass(frozen=True)
class Problem:
    """One inconsistency: ``where`` (array or group), ``rows`` (start, stop) or None, and ``what``."""

    where: str
    rows: tuple[int, int] | None
    what: str

    def __str__(self) -> str:
        span = f" rows {self.rows[0]}:{self.rows[1]}" if self.rows else ""
        return f"{self.where}{span}: {self.what}"


@dataclass
class VerifyReport:
    """The outcome of ``store.verify()``: problems plus counts of what was checked."""

    location: str
    problems: list[Problem] = field(default_factory=list)
    chunks_read: int = 0
    arrays_checked: int = 0
    leftovers: list[str] = field(default_factory=list)  # temp files of interrupted Zarr writes
    # arrays longer than the committed index: an append killed before its commit; not damage (the
    # rows are ignored, and the next writable open cuts them off)
    uncommitted: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        state = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        extra = (f"; {len(self.leftovers)} temp file(s) left by interrupted writes (harmless; "
                 f"'featurestore verify --remove-leftovers' deletes them when no writer runs)"
                 if self.leftovers else "")
        if self.uncommitted:
            extra += (f"; {len(self.uncommitted)} array(s) hold rows of an append that never committed "
                      f"(ignored; removed when the store is next opened for writing)")
        return (f"verify {self.location}: {state}; {self.arrays_checked} arrays checked, "
                f"{self.chunks_read} chunks read{extra}")

    def to_dict(self) -> dict:
        return {"location": self.location, "ok": self.ok, "chunks_read": self.chunks_read,
                "arrays_checked": self.arrays_checked, "leftovers": self.leftovers,
                "uncommitted": self.uncommitted,
                "problems": [{"where": p.where, "rows": p.rows, "what": p.what} for p in self.problems]}


def verify_store(store) -> VerifyReport:
    """Check ``store`` (a FeatureStore) and return a report; never raises for bad data.

    Every array is checked chunk by chunk, the index included: each chunk that holds written rows
    (every index row; feature and prediction rows marked done; anything stored for the rest) must
    be in storage and pass its checksum. Then the logical checks run on what could be read.
    """
    report = VerifyReport(store.location, leftovers=[str(p) for p in leftover_files(store.location)])
    store.refresh()
    damaged = _check_chunks(store, report)
    try:
        _check_index(store, report)
    except FeatureStoreError as err:
        if "index" not in damaged:
            report.problems.append(Problem("index", None, str(err)))
        return report
    for group in store.row_groups():
        _check_group(store, report, group, damaged)
    return report


def leftover_files(location: str) -> list[Path]:
    """Temp files (``*.partial``) that a killed Zarr writer left in a local store directory.

    Zarr writes every chunk to a temp file and renames it into place, so a kill leaves at most such
    files, never a torn chunk. They hold nothing the store reads; zarr warns about them when it
    lists a group. Deleting one while a writer runs would break that writer's rename.
    """
    root = Path(location)
    if "://" in location or not root.is_dir():
        return []
    return sorted(root.rglob("*.partial"))


def remove_leftovers(report: VerifyReport) -> int:
    """Delete the temp files a report found; only safe while no process writes to the store."""
    for path in report.leftovers:
        Path(path).unlink(missing_ok=True)
    return len(report.leftovers)


def _check_chunks(store, report: VerifyReport) -> set[str]:
    """Read every chunk of every array that should hold data; returns the damaged array paths."""
    arrays = store.arrays
    n = _rows_or_none(store)
    damaged: set[str] = set()
    for path in arrays.arrays():
        report.arrays_checked += 1
        rows = arrays.shape(path)[0] if n is None or not _is_row_array(path) else min(n, arrays.shape(path)[0])
        required = _required_rows(arrays, path, rows)
        per = arrays.chunk_rows(path)
        for start in range(0, rows, per):
            stop = min(rows, start + per)
            needed = required is None or required[start:stop].any()
            if not needed and path.endswith(("/data", "/probs")):
                continue  # no finished row: a killed writer may have left it half-written (HDF5)
            if not arrays.chunk_written(path, start // per):
                if needed and arrays.strict:
                    report.problems.append(Problem(path, (start, stop), "chunk missing from storage (deleted "
                                                   "or lost) although its rows were written"
                                                   + _clip_span(store, path, start, stop)))
                    damaged.add(path)
                continue
            report.chunks_read += 1
            try:
                block = arrays.read_unchecked(path, start, stop)
            except Exception as err:  # noqa: BLE001 - any decode failure is a finding
                report.problems.append(Problem(path, (start, stop), str(CorruptChunkError(path, start, stop, err))
                                               + _clip_span(store, path, start, stop)))
                damaged.add(path)
                continue
            leaf = path.rpartition("/")[2]
            if required is not None and leaf in ("data", "probs"):
                _check_values(report, path, start, block[required[start:stop]], leaf)
    if any(p.startswith("index/") for p in damaged):
        damaged.add("index")
    return damaged


def _clip_span(store, path: str, start: int, stop: int) -> str:
    """' (clips A .. B)' for a damaged chunk of a feature set or prediction run, when the index reads."""
    if not path.startswith(("features/", "predictions/")):
        return ""
    try:
        ids = store.clip_ids[start:stop]
    except Exception:  # noqa: BLE001 - the index's own damage is reported on its own
        return ""
    return f" (clips {ids[0]} .. {ids[-1]})" if ids else ""


def _rows_or_none(store) -> int | None:
    try:
        return store.committed_rows
    except Exception:  # noqa: BLE001 - reported by the index checks
        return None


def _is_row_array(path: str) -> bool:
    return path.startswith(("index/", "features/", "predictions/"))


def _required_rows(arrays, path: str, rows: int) -> np.ndarray | None:
    """Which rows of ``path`` must be in storage: None for all, else a mask (done rows).

    Feature data and prediction probabilities are required where their clip is done; done flags
    and error texts are not (a missing chunk there reads as "not done, no error": the rows are
    recomputed, nothing is served wrong). Index and class-feature arrays: every row.
    """
    group, _, leaf = path.rpartition("/")
    if path.startswith("index/") or path.startswith("class_features/"):
        return None
    if leaf in ("done", "errors"):
        return np.zeros(rows, dtype=bool)
    if leaf in ("data", "probs") and arrays.is_array(join(group, "done")):
        try:
            return arrays.read_unchecked(join(group, "done"), 0, rows).astype(bool)
        except Exception:  # noqa: BLE001 - the done array's own damage is reported on its own
            return None
    return None


def _check_index(store, report: VerifyReport) -> None:
    arrays, n = store.arrays, store.n_clips
    classes = store.classes
    for column in store.columns():
        _check_length(report, f"index/{column}", arrays.shape(f"index/{column}")[0], n)
    ids = store.clip_ids
    if len(set(ids)) != len(ids):
        report.problems.append(Problem("index/clip_id", None, "clip ids are not unique"))
    if any(not i for i in ids):
        report.problems.append(Problem("index/clip_id", None, "empty clip id(s)"))
    labels = store.labels
    bad = np.flatnonzero((labels < -1) | (labels >= len(classes)))
    if len(bad):
        report.problems.append(Problem("index/label", (int(bad[0]), int(bad[-1]) + 1),
                                       f"{len(bad)} label(s) outside -1..{len(classes) - 1}"))


def _check_group(store, report: VerifyReport, group, damaged: set[str]) -> None:
    """Logical checks of a feature set or prediction run (a ``RowGroup``): lengths, attributes,
    done/error overlap.

    (The values of finished rows are checked while their chunks are read, in ``_check_chunks``.)
    """
    arrays, n = store.arrays, store.n_clips
    absent = group.missing_arrays()
    if absent:
        report.problems.append(Problem(group.path, None, f"unfinished creation ({', '.join(absent)} missing); "
                                                         f"rerunning the extraction or prediction replaces it"))
        return
    parts = group.array_paths
    if not all([_check_length(report, part, arrays.shape(part)[0], n) for part in parts[:2]]):
        return
    if group.kind.with_errors:
        _check_feature_attrs(report, group)
    if {group.done_path, group.errors_path} & damaged:
        return
    done = arrays.read_unchecked(group.done_path, 0, n).astype(bool)
    if group.kind.with_errors:
        texts = arrays.read_unchecked(group.errors_path, 0, n)
        both = np.flatnonzero(done & (texts != ""))
        if len(both):
            report.problems.append(Problem(group.errors_path, (int(both[0]), int(both[-1]) + 1),
                                           f"{len(both)} clip(s) marked done but also failed"))


def _check_length(report: VerifyReport, path: str, length: int, n: int) -> bool:
    """Fewer rows than the index is damage; more are rows of an append that never committed."""
    if length < n:
        report.problems.append(Problem(path, None, f"has {length} rows, index has {n} clips"))
        return False
    if length > n:
        report.uncommitted.append(path)
    return True


def _check_feature_attrs(report: VerifyReport, group) -> None:
    attrs, where = group.attrs, group.path
    prov = attrs.get("provenance")
    if not isinstance(prov, dict):
        report.problems.append(Problem(where, None, "no provenance attribute"))
        return
    if not fingerprint_matches(attrs.get("fingerprint"), prov):
        report.problems.append(Problem(where, None, f"fingerprint {attrs.get('fingerprint')!r} does not "
                                                     f"match its provenance ({fingerprint(prov)!r})"))
    shape = group.shape
    if list(shape[2:]) != list(attrs.get("feature_shape", [])) or shape[1] != attrs.get("n_segments"):
        report.problems.append(Problem(where, None, f"data shape {shape} disagrees with attributes "
                                                     f"n_segments={attrs.get('n_segments')}, "
                                                     f"feature_shape={attrs.get('feature_shape')}"))


def _check_values(report: VerifyReport, array: str, start: int, values: np.ndarray, leaf: str) -> None:
    if values.dtype.kind != "f" or not values.size:
        return
    finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if not finite.all():
        report.problems.append(Problem(array, (start, start + len(values)),
                                       f"{int((~finite).sum())} finished clip(s) hold NaN or Inf"))
    if leaf == "probs" and ((values < 0) | (values > 1)).any():
        report.problems.append(Problem(array, (start, start + len(values)), "probabilities outside [0, 1]"))
