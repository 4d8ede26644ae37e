"""Export a store's index (and, on request, its features) to other tools.

Everything written for another tool names files by **absolute paths** (the store's location, the
audio and video files joined to the dataset root their rows were added with), so an export written
in one directory loads from any other; ``to_pandas``/``index_columns`` show the index as stored
(media paths relative to the dataset root).

* ``to_pandas(store)``: one row per clip, indexed by ``clip_id``: ``label`` (class name, None when
  unknown), ``label_index`` (-1 when unknown), every index column (``city``, ``location``,
  ``audio_path``, ``video_path``), one bool column per split, and with ``done=True`` one bool column
  ``done:<feature set>`` per feature set.
* ``manifest_records(store, features=...)`` / ``write_manifest(store, path, ...)``: lhotse-style cut
  records (JSON lines, plain JSON), one per clip, each naming where its features are (store
  location, feature set, row, shape) instead of copying them.
* ``to_lhotse(store, features=...)``: a real ``lhotse.CutSet`` (recordings read from the WAV
  headers, one supervision with the label per clip, features as ``lhotse.Array`` references read
  through a ``featurestore`` storage type registered with lhotse).
* ``to_hf(store, features=...)``: a ``datasets.DatasetDict`` by split (``label`` a ``ClassLabel`` of
  the store's classes, each feature set a fixed-shape ``Array2D``..``Array5D`` column);
  ``write_parquet(store, path, features=...)``: the clip table plus one nested fixed-size-list
  column per feature set, written in row groups of chunk-sized reads, readable by pyarrow, pandas
  and polars without this library.

lhotse, ``datasets`` and pyarrow are the ``export`` extra (``pip install 'avscene[export]'``): each is
imported only by the function that needs it, and its absence is a one-line ``ImportError`` naming
the extra.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from featurestore.atomic_files import atomic_path, atomic_write
from featurestore.errors import MissingFeatureError
from featurestore.manifest import INDEX_COLUMN_NAMES

_STRING_COLUMNS = ("city", "location", "audio_path", "video_path")
_MEDIA_COLUMNS = ("audio_path", "video_path")
EXPORT_EXTRA = "pip install 'avscene[export]'"
#: Bound of one read of feature values while exporting: Parquet row groups and Hugging Face
#: batches are this many bytes of stored values at most (rounded to whole chunks when they fit).
BATCH_BYTES = 64 << 20
#: lhotse storage type of the feature references ``to_lhotse`` attaches to cuts.
LHOTSE_STORAGE_TYPE = "featurestore"


def _require(module: str, what: str) -> Any:
    """Import an optional dependency, or say in one line which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what} needs {module.split('.')[0]}, which is not installed: "
                          f"{EXPORT_EXTRA}") from None


# ------------------------------------------------------------------------------- paths, index
def store_location(store: Any) -> str:
    """The store's location as another process anywhere opens it: absolute for a local path."""
    location = str(store.location)
    return location if "://" in location else os.path.abspath(location)


def _row_roots(store: Any) -> list[str]:
    """The dataset root each row was added with (``datasets`` attribute; else the store's root)."""
    attrs = store.attrs
    roots = [str(attrs.get("dataset_root") or "")] * store.n_clips
    for added in attrs.get("datasets", []):
        start, stop = added.get("rows", (0, 0))
        stop = min(stop, len(roots))  # rows of an append killed before its commit are not there
        roots[start:stop] = [str(added.get("dataset_root") or "")] * (stop - start)
    return roots


def media_paths(store: Any, column: str) -> list[str | None]:
    """Absolute paths of ``audio_path`` or ``video_path`` (None where a clip has no such file).

    The index keeps media paths relative to the dataset root (so a moved dataset needs only a new
    root); exports join them to the root of the rows' dataset. A store made from a manifest without
    a root holds the paths as given, resolved here against the current directory.
    """
    roots = _row_roots(store)
    out: list[str | None] = []
    for row, value in enumerate(store.column(column)):
        value = str(value)
        out.append(os.path.abspath(os.path.join(roots[row] or ".", value)) if value else None)
    return out


def index_columns(store: Any, done: bool = False, absolute_paths: bool = False) -> dict[str, np.ndarray | list]:
    """The index as plain columns (what ``to_pandas`` wraps): clip_id, label, label_index, ...

    ``absolute_paths``: media paths joined to their dataset root (what exports write) instead of
    the stored relative paths (``''`` then becomes None).
    """
    clash = sorted(set(store.splits()) & set(INDEX_COLUMN_NAMES))  # (manifests refuse them; older stores may hold one)
    if clash:  # its column, named after it, would replace the index column's values in every table, silently
        raise ValueError(f"split(s) {', '.join(clash)} have the name of an index column, and the index's "
                         f"tables name a column after each split: its values would replace the column's")
    classes = store.classes
    labels = np.asarray(store.labels, dtype=np.int64)
    cols: dict[str, Any] = {
        "clip_id": list(store.clip_ids),
        "label": [classes[i] if i >= 0 else None for i in labels],
        "label_index": labels,
    }
    present = set(store.columns())
    for name in _STRING_COLUMNS:
        if name in present:
            absolute = absolute_paths and name in _MEDIA_COLUMNS
            cols[name] = media_paths(store, name) if absolute else [str(v) for v in store.column(name)]
    for split in store.splits():
        cols[split] = np.asarray(store.column(f"split/{split}"), dtype=bool)
    if done:
        for name in store.feature_sets():
            cols[f"done:{name}"] = store.done_mask(name)
    return cols


def to_pandas(store: Any, done: bool = False) -> Any:
    """The index as a ``pandas.DataFrame`` indexed by ``clip_id``.

    Args:
        store: an open `FeatureStore`.
        done: add a ``done:<feature set>`` bool column per feature set.
    """
    try:
        import pandas as pd
    except ImportError as err:  # pragma: no cover - pandas is a dependency
        raise ImportError("to_pandas needs pandas (pip install pandas)") from err
    cols = index_columns(store, done)
    frame = pd.DataFrame(cols).set_index("clip_id")
    frame["label"] = pd.Categorical(frame["label"], categories=store.classes)
    return frame


# ---------------------------------------------------------------------- lhotse-style manifests
def manifest_records(store: Any, features: Sequence[str] = (), split: str | None = None) -> Iterator[dict]:
    """lhotse-style cut records, one per clip (of ``split``, or all), in row order.

    Each record: ``id``, ``start`` 0, ``duration`` (segments x segment seconds, when the store
    knows them), ``recording`` (absolute audio/video paths), ``supervisions`` (one, with the label
    when known), ``splits``, and ``features``: per feature set ``{storage_type: "featurestore",
    storage_path (absolute), storage_key (the set), row, shape, done}``. Features are referenced,
    not copied.
    """
    cols = index_columns(store, absolute_paths=True)
    attrs = store.attrs
    seconds = attrs.get("segment_seconds")
    infos = {name: store.feature_info(name) for name in features}  # UnknownFeatureError for a bad name
    done = {name: store.done_mask(name) for name in features}
    wanted = None if split is None else set(store.select(split=split))
    n_seg = attrs.get("audio_segments")
    location = store_location(store)
    for row, clip_id in enumerate(cols["clip_id"]):
        if wanted is not None and clip_id not in wanted:
            continue
        label = cols["label"][row]
        duration = float(n_seg * seconds) if n_seg and seconds else None
        yield {
            "id": clip_id,
            "start": 0.0,
            "duration": duration,
            "recording": {k: cols[k][row] for k in _MEDIA_COLUMNS if k in cols},
            "supervisions": [{"id": clip_id, "start": 0.0, "duration": duration, "label": label,
                              "city": cols.get("city", [None] * (row + 1))[row],
                              "location": cols.get("location", [None] * (row + 1))[row]}],
            "splits": [s for s in store.splits() if cols[s][row]],
            "features": {name: {"storage_type": LHOTSE_STORAGE_TYPE, "storage_path": location,
                                "storage_key": name, "row": row, "shape": list(info.shape[1:]),
                                "dtype": info.dtype, "done": bool(done[name][row])}
                         for name, info in infos.items()},
        }


def write_manifest(store: Any, path: str | Path, features: Sequence[str] = (), split: str | None = None) -> int:
    """Write ``manifest_records`` as JSON lines (``.jsonl``); returns the number of records.

    Whole or not at all (temp name + rename): a full disk leaves the previous file as it was.
    """
    n = 0
    with atomic_write(path, "w", encoding="utf-8") as f:
        for record in manifest_records(store, features, split):
            f.write(json.dumps(record) + "\n")
            n += 1
    return n


# ----------------------------------------------------------------------------------- lhotse
_OPEN_FOR_LHOTSE: dict[str, Any] = {}


def register_lhotse_reader() -> None:
    """Teach lhotse the ``featurestore`` storage type, so ``cut.load_custom(<feature set>)`` reads.

    ``to_lhotse`` calls it; a process that only loads saved cuts (``CutSet.from_file``) calls it
    once before loading features. The storage key is ``<feature set>/<clip id>#<fingerprint>`` (a
    clip id holds no ``/`` or ``#``): a set extracted again with another configuration since the cuts
    were made is refused, never read as the features the cuts describe. Stores are opened read-only
    once per process and path.
    """
    lhotse_io = _require("lhotse.features.io", "to_lhotse")
    if lhotse_io.get_reader(LHOTSE_STORAGE_TYPE) is not None:
        return

    class FeatureStoreReader(lhotse_io.FeaturesReader):
        """Reads one clip's features of one feature set from a store (lhotse storage type)."""

        name = LHOTSE_STORAGE_TYPE

        def __init__(self, storage_path: str, *args: Any, **kwargs: Any):
            super().__init__()
            self.storage_path = storage_path

        def read(self, key: str, left_offset_frames: int = 0, right_offset_frames: int | None = None) -> np.ndarray:
            from featurestore.store.store import open_store

            store = _OPEN_FOR_LHOTSE.get(self.storage_path)
            if store is None:
                store = _OPEN_FOR_LHOTSE.setdefault(self.storage_path, open_store(self.storage_path))
            feature_set, clip_key = key.rsplit("/", 1)
            clip_id, _, made = clip_key.partition("#")
            found = store.feature_info(feature_set).fingerprint
            if made and found != made:
                raise ValueError(f"{self.storage_path}: feature set {feature_set!r} has fingerprint {found}, but the "
                                 f"cut of clip {clip_id!r} was made from {made} (the set was extracted again with "
                                 f"another configuration since): make the cuts again with to_lhotse")
            return store.get(feature_set, clip_id)[left_offset_frames:right_offset_frames]

    lhotse_io.register_reader(FeatureStoreReader)


def to_lhotse(store: Any, features: Sequence[str] = (), split: str | None = None) -> Any:
    """A ``lhotse.CutSet``: one ``MonoCut`` per clip (of ``split``, or all) with audio, in row order.

    Each cut's recording is ``Recording.from_file`` of the clip's audio (absolute path; duration,
    sampling rate and channels from the file's header), its one supervision spans the recording and
    carries ``label`` (None when unknown), ``label_index``, ``city`` and ``location`` as custom
    fields, and ``cut.custom`` holds ``splits``, ``video_path`` (video is not loaded by lhotse here)
    and, per feature set named and done for the clip, an ``lhotse.Array`` referencing the store
    (``cut.load_custom("clip/ViT-B-32")``). ``cuts.decompose()`` gives the ``RecordingSet``.

    Raises:
        ImportError: lhotse is not installed (one line naming the extra).
        ValueError: a selected clip has no audio file (lhotse cuts are built on audio).
        FileNotFoundError: a clip's audio file is not where the index says.
    """
    lhotse = _require("lhotse", "to_lhotse")
    lhotse_array = importlib.import_module("lhotse.array")
    register_lhotse_reader()
    cols = index_columns(store, absolute_paths=True)
    infos = {name: store.feature_info(name) for name in features}  # UnknownFeatureError for a bad name
    done = {name: store.done_mask(name) for name in features}
    rows = store.rows(store.select(split=split)) if split is not None else np.arange(store.n_clips)
    no_audio = [cols["clip_id"][r] for r in rows if not cols.get("audio_path", [None] * (r + 1))[r]]
    if no_audio:
        raise ValueError(f"to_lhotse builds cuts on audio, and {len(no_audio)} clip(s) have no audio file: "
                         f"{', '.join(no_audio[:5])}")
    location = store_location(store)
    cuts = []
    for row in rows:
        arrays = {name: lhotse_array.Array(storage_type=LHOTSE_STORAGE_TYPE, storage_path=location,
                                     storage_key=f"{name}/{cols['clip_id'][row]}#{info.fingerprint}",
                                     shape=list(info.shape[1:]))
                  for name, info in infos.items() if done[name][row]}
        cuts.append(_lhotse_cut(lhotse, store, cols, int(row), arrays))
    return lhotse.CutSet.from_cuts(cuts)


def _lhotse_cut(lhotse: Any, store: Any, cols: dict, row: int, arrays: dict) -> Any:
    clip_id, audio = cols["clip_id"][row], cols["audio_path"][row]
    if not os.path.isfile(audio):
        raise FileNotFoundError(f"clip {clip_id}: audio file {audio} not found (the store's dataset root "
                                f"joined to its audio_path)")
    recording = lhotse.Recording.from_file(audio, recording_id=clip_id)
    supervision = lhotse.SupervisionSegment(
        id=clip_id, recording_id=clip_id, start=0.0, duration=recording.duration,
        custom={"label": cols["label"][row], "label_index": int(cols["label_index"][row]),
                "city": cols.get("city", [None] * (row + 1))[row],
                "location": cols.get("location", [None] * (row + 1))[row]})
    custom = {"splits": [s for s in store.splits() if cols[s][row]], **arrays}
    if cols.get("video_path") and cols["video_path"][row]:
        custom["video_path"] = cols["video_path"][row]
    return lhotse.MonoCut(id=clip_id, start=0.0, duration=recording.duration, channel=recording.channel_ids[0],
                          recording=recording, supervisions=[supervision], custom=custom)


# ------------------------------------------------------------------- Parquet, Hugging Face
def export_clip_ids(store: Any, features: Sequence[str], split: str | None = None,
                    skip_missing: bool = False) -> list[str]:
    """The clips an export of ``features`` holds: those of ``split`` (or all), in row order.

    A clip not done in every named set raises ``MissingFeatureError`` before anything is written
    (an export never holds zeros), unless ``skip_missing`` leaves such clips out.
    """
    clash = sorted(set(features) & {"clip_id", "label", "label_index", *_STRING_COLUMNS, *store.splits()})
    if clash:
        raise ValueError(f"feature set(s) {', '.join(clash)} have the name of an index column, and an export "
                         f"names its columns after both; export the others")
    ids = store.select(split=split) if split is not None else list(store.clip_ids)
    rows = store.rows(ids)
    keep = np.ones(len(ids), dtype=bool)
    for name in features:
        done = store.done_mask(name)[rows]
        if not skip_missing and not done.all():
            raise MissingFeatureError(name, [c for c, d in zip(ids, done) if not d])
        keep &= done
    return [c for c, k in zip(ids, keep) if k]


def _feature_batches(store: Any, features: Sequence[str], ids: Sequence[str],
                     batch_bytes: int = BATCH_BYTES) -> Iterator[tuple[list[str], dict[str, np.ndarray]]]:
    """Consecutive batches of ``ids`` with their values: one bounded read per set and batch."""
    infos = [store.feature_info(name) for name in features]
    per_clip = sum(int(np.prod(i.shape[1:])) * np.dtype(i.dtype).itemsize for i in infos) or 1
    size = max(1, batch_bytes // per_clip)
    chunk = max((i.chunk_clips for i in infos), default=1)
    if size >= chunk:
        size -= size % chunk  # whole chunks when they fit: each chunk is decoded once
    for start in range(0, len(ids), size):
        part = list(ids[start:start + size])
        yield part, {name: store.get_many(name, part) for name in features}


def _fixed_size_lists(pa: Any, values: np.ndarray) -> Any:
    """``[n, *shape]`` values as nested fixed-size lists (one level per axis after the first)."""
    arr = pa.array(np.ascontiguousarray(values).reshape(-1))
    for size in reversed(values.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, int(size))
    return arr


def write_parquet(store: Any, path: str | Path, features: Sequence[str] = (), split: str | None = None,
                  skip_missing: bool = False, batch_bytes: int = BATCH_BYTES) -> int:
    """Write the clip table plus one column per feature set as one Parquet file; returns its rows.

    Columns: those of ``index_columns`` with absolute media paths (``clip_id``, ``label`` text or
    null, ``label_index``, ``city``, ``location``, ``audio_path``, ``video_path``, one bool per
    split), then per feature set a column of that name holding each clip's ``[n_segments,
    *feature_shape]`` values as nested fixed-size lists in the stored dtype. The schema metadata
    ``avscene`` (JSON) holds the classes and each set's shape, dtype and fingerprint. Written in row
    groups of at most ``batch_bytes`` of values, each read from the store once, so memory stays
    bounded; whole or not at all (temp name + rename).
    """
    _require("pyarrow", "write_parquet")
    pa, pq = importlib.import_module("pyarrow"), _require("pyarrow.parquet", "write_parquet")
    ids = export_clip_ids(store, features, split, skip_missing)
    index = index_columns(store, absolute_paths=True)
    schema = _parquet_schema(pa, store, index, features)
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(str(tmp), schema) as writer:
            for part, values in _feature_batches(store, features, ids, batch_bytes):
                rows = store.rows(part)
                cols = [_index_array(pa, index[f.name], rows, f.type) for f in schema if f.name in index]
                cols += [_fixed_size_lists(pa, values[name]) for name in features]
                writer.write_table(pa.Table.from_arrays(cols, schema=schema), row_group_size=len(part))
    return len(ids)


def _index_array(pa: Any, column: Any, rows: np.ndarray, typ: Any) -> Any:
    if isinstance(column, np.ndarray):
        return pa.array(column[rows], type=typ)
    return pa.array([column[r] for r in rows], type=typ)


def _parquet_schema(pa: Any, store: Any, index: dict, features: Sequence[str]) -> Any:
    fields = []
    for name, column in index.items():
        if name == "label_index":
            fields.append(pa.field(name, pa.int16()))
        elif isinstance(column, np.ndarray):
            fields.append(pa.field(name, pa.bool_()))
        else:
            fields.append(pa.field(name, pa.string()))
    meta: dict[str, Any] = {"classes": store.classes, "store": store_location(store), "features": {}}
    for name in features:
        info = store.feature_info(name)
        typ = pa.from_numpy_dtype(np.dtype(info.dtype))
        for size in reversed(info.shape[1:]):
            typ = pa.list_(typ, int(size))
        fields.append(pa.field(name, typ, nullable=False))
        meta["features"][name] = {"shape": list(info.shape[1:]), "dtype": info.dtype,
                                  "fingerprint": info.fingerprint}
    return pa.schema(fields, metadata={"avscene": json.dumps(meta)})


def _hf_features(datasets: Any, store: Any, features: Sequence[str]) -> Any:
    cols: dict[str, Any] = {"clip_id": datasets.Value("string")}
    if store.classes:
        cols["label"] = datasets.ClassLabel(names=list(store.classes))
    for name in ("city", "location", *_MEDIA_COLUMNS):
        if name in store.columns():
            cols[name] = datasets.Value("string")
    for name in features:
        info = store.feature_info(name)
        shape = tuple(int(s) for s in info.shape[1:])
        if not 2 <= len(shape) <= 5:
            raise ValueError(f"to_hf: feature set {name!r} has clips of shape {shape}; datasets' fixed-shape "
                             f"arrays (Array2D..Array5D) take 2 to 5 axes")
        cols[name] = getattr(datasets, f"Array{len(shape)}D")(shape=shape, dtype=info.dtype)
    return datasets.Features(cols)


def to_hf(store: Any, features: Sequence[str] = (), splits: Sequence[str] | None = None,
          skip_missing: bool = False, batch_bytes: int = BATCH_BYTES) -> Any:
    """A ``datasets.DatasetDict`` with one ``Dataset`` per split (``splits``, or every split).

    Columns: ``clip_id``, ``label`` (a ``ClassLabel`` of the store's classes, -1 when unknown; left
    out of a store without classes), ``city``, ``location``, ``audio_path``, ``video_path``
    (absolute), and per feature set a column of that name, a fixed-shape ``Array2D``..``Array5D``
    of ``[n_segments, *feature_shape]`` in the stored dtype. The datasets are in memory (built from
    bounded batches, one copy of the values in Arrow); for stores larger than memory, use
    ``write_parquet`` and ``datasets.load_dataset("parquet", ...)``, which memory-maps.
    A clip of a split not done in a named set raises ``MissingFeatureError`` (``skip_missing``
    leaves it out).
    """
    datasets = _require("datasets", "to_hf")
    feats = _hf_features(datasets, store, features)
    index = index_columns(store, absolute_paths=True)
    out = {}
    for split in (store.splits() if splits is None else list(splits)):
        ids = export_clip_ids(store, features, split, skip_missing)
        parts = [datasets.Dataset.from_dict(_hf_batch(store, index, feats, part, values), features=feats)
                 for part, values in _feature_batches(store, features, ids, batch_bytes)]
        empty = {name: [] for name in feats}
        out[split] = datasets.concatenate_datasets(parts) if parts else datasets.Dataset.from_dict(empty, features=feats)
    return datasets.DatasetDict(out)


def _hf_batch(store: Any, index: dict, feats: Any, part: list[str], values: dict[str, np.ndarray]) -> dict:
    rows = store.rows(part)
    batch: dict[str, Any] = {}
    for name in feats:
        if name in values:
            batch[name] = values[name]
        elif name == "label":
            batch[name] = [int(index["label_index"][r]) for r in rows]
        else:
            batch[name] = [index[name][r] for r in rows]
    return batch
