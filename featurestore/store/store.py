"""The feature store: an index of clips plus feature sets and prediction runs keyed by clip and segment.

``FeatureStore`` is the facade: the index (ids, labels, splits, appends) lives here, and feature
sets and prediction runs are both ``RowGroup``s (``row_group.py``: values, ``done`` flags and, for
feature sets, error texts, read through a decoded-chunk cache and written in whole chunks with
``done`` last, so a killed writer never leaves a clip that looks finished but holds fill values).
Below both, ``StoreArrays`` (``arrays.py``) addresses arrays by path with checked reads, and
``backend_for`` (``_backend.py``) picks the storage engine. See docs/architecture.md for the layout.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from featurestore.errors import (
    FingerprintMismatchError, StoreFormatError, UnknownClipError, UnknownFeatureError, UnknownValueError,
)
from featurestore.manifest import Manifest, check_classes
from featurestore.provenance import (
    fingerprint, fingerprint_matches, is_random_weights, runtime_info, weights_identity,
)
from featurestore.store._backend import COMPRESSORS, STRING, Backend, join, open_backend
from featurestore.store.arrays import StoreArrays
from featurestore.store.index import NOT_COLUMNS, ClipIndex
from featurestore.store.row_group import (
    DATA_VERSION, FEATURE_SETS, KINDS, PREDICTION_RUNS, RowCaches, RowGroup, RowGroupKind,
)

# 2: every written chunk is stored (a missing one is damage) and ``n_clips`` in the root attributes
# is the commit point of an append. Version 1 stores are read as before (missing chunks = fill).
SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
DEFAULT_CACHE_BYTES = 256 * 2**20
TARGET_CHUNK_BYTES = 32 * 2**20  # a shard: see default_chunk_clips and docs/store.md (benchmark)
MAX_CHUNK_CLIPS = 4096  # extraction's block bound (extract.plan.MAX_BLOCK_CLIPS)
TARGET_INNER_BYTES = 8 * 2**10  # an inner chunk: see default_inner_clips and docs/store.md (benchmark)
INDEX_CHUNK_ROWS = 65536
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+@=-]+(/[A-Za-z0-9_.+@=-]+)*$")
_INDEX_STRINGS = ("clip_id", "city", "location", "audio_path", "video_path")
# what create_feature_set writes in its last step; a set missing any of them was never finished
_FEATURE_ATTRS = {"provenance", "fingerprint", "n_segments", "feature_shape", "chunk_clips"}


@dataclass(frozen=True)
class FeatureInfo:
    """What ``feature_sets()`` says about one feature set."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    chunk_clips: int
    provenance: dict = field(repr=False)
    fingerprint: str
    n_done: int
    n_errors: int

    @property
    def n_segments(self) -> int:
        return self.shape[1]

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return self.shape[2:]

    @property
    def random_weights(self) -> bool:
        return is_random_weights(self.provenance)

    @property
    def weights_identity(self) -> str:
        return weights_identity(self.provenance)


def default_chunk_clips(n_segments: int, feature_shape: Sequence[int], dtype: str) -> int:
    """Clips per chunk (a shard of a feature set) so that one is about 32 MiB, at most 4,096 clips.

    The chunk is what a writer writes whole (a Dask task owns whole chunks, a partial commit rewrites
    one); reads decode its inner chunks (:func:`default_inner_clips`), so its size no longer costs
    random reads, and big shards keep a store of millions of clips to a few hundred files. 4,096
    clips is extraction's block bound. See docs/store.md for the measurement.
    """
    per_clip = n_segments * int(np.prod(feature_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return int(min(MAX_CHUNK_CLIPS, max(1, TARGET_CHUNK_BYTES // max(1, per_clip))))


def default_inner_clips(n_segments: int, feature_shape: Sequence[int], dtype: str, chunk_clips: int) -> int:
    """Clips per inner chunk: the largest divisor of ``chunk_clips`` of at most ~8 KiB (at least 1).

    A random read decodes whole inner chunks, so their size bounds the bytes decoded per clip
    returned (8x at 1 KiB per clip: the scale floor is 16x); below a few KiB the index and the
    per-chunk checksum start to cost more than the bytes. Equal to ``chunk_clips`` (no sharding)
    where one chunk is that small already. See docs/store.md for the measurement.
    """
    per_clip = n_segments * int(np.prod(feature_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    target = max(1, min(int(chunk_clips), TARGET_INNER_BYTES // max(1, per_clip)))
    return max(d for d in range(1, target + 1) if chunk_clips % d == 0)


def validate_name(kind: str, name: str) -> str:
    """Feature set / run names become group paths: letters, digits, ``_.+@=-``, '/'-separated."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name.split("/"):
        raise ValueError(f"invalid {kind} name {name!r}: use letters, digits and _ . + @ = -, "
                         f"with '/' between parts (e.g. 'clip/ViT-B-32')")
    return name


class FeatureStore:
    """One store = one set of clips. Create with ``open_store`` or ``create_store``."""

    def __init__(self, backend: Backend, mode: str, cache_bytes: int, open_args: dict):
        self._b = backend  # the storage engine; everything here goes through self._arrays
        self._arrays = StoreArrays(backend)
        self.mode = mode
        self._open_args = open_args
        self._rows_cache = RowCaches(cache_bytes)
        self._index = ClipIndex(self._arrays)  # ids, the id -> row lookup, columns: read lazily
        self._runs: dict[str, dict] | None = None  # prediction run attrs, read once (refresh() drops them)
        if mode == "w" or not self._arrays.exists("index"):
            self._init_layout()
        self._arrays.strict = self._check_schema() >= 2
        if not self._arrays.read_only:
            self._roll_back_partial_append()

    # ----------------------------------------------------------------------------------- layout
    def _init_layout(self) -> None:
        if self._arrays.read_only:
            raise StoreFormatError(f"{self.location} is not a feature store (no index group)")
        for group in ("index", "index/split", "features", "predictions", "class_features"):
            self._arrays.create_group(group)
        attrs = self._arrays.attrs("")
        if "schema_version" not in attrs:
            from importlib.metadata import PackageNotFoundError, version

            try:
                created_by = f"avscene {version('avscene')}"
            except PackageNotFoundError:
                created_by = "avscene (not installed)"
            self._arrays.set_attrs("", {"schema_version": SCHEMA_VERSION, "classes": [], "dataset": "",
                                   "created_by": created_by, "n_clips": 0})
        for name in _INDEX_STRINGS:
            if not self._arrays.exists(f"index/{name}"):
                self._arrays.create_array(f"index/{name}", (0,), STRING, INDEX_CHUNK_ROWS, "")
        if not self._arrays.exists("index/label"):
            self._arrays.create_array("index/label", (0,), "int16", INDEX_CHUNK_ROWS, -1)

    def _check_schema(self) -> int:
        attrs = self._arrays.attrs("")
        found = attrs.get("schema_version")
        if found not in READABLE_SCHEMAS:
            raise StoreFormatError(f"{self.location}: schema version {found!r}, this library reads "
                                   f"versions {', '.join(map(str, READABLE_SCHEMAS))}")
        return int(found)

    def _committed_rows(self) -> int:
        """Rows of the index that a finished ``append_clips`` committed (its last write)."""
        return self._index.committed_rows()

    def _roll_back_partial_append(self) -> None:
        """Cut arrays that an append killed before its commit left longer than the index.

        ``append_clips`` grows every row array and writes the new index rows before it commits the
        new row count, so a killed append leaves only rows past ``n_clips``; dropping them restores
        the store as it was before, and rerunning the append then ends as a clean run would.
        """
        n = self._committed_rows()
        for path in self._row_arrays():
            if self._arrays.shape(path)[0] > n:
                self._arrays.resize(path, n)
        self._index.drop_unused()  # a lookup written for the rows cut off

    # ------------------------------------------------------------------------------ properties
    @property
    def location(self) -> str:
        return self._arrays.location

    @property
    def backend(self) -> str:
        """The storage engine of this store: ``"zarr"`` or ``"hdf5"`` (see ``backend_for``)."""
        return self._arrays.backend

    @property
    def arrays(self) -> StoreArrays:
        """The store's groups and arrays by path, below the clip/feature-set vocabulary.

        Read-only tools (``verify``, ``convert``) walk and read the layout through it; its writes
        bypass done flags and fingerprints, so prefer this class's methods for writing.
        """
        return self._arrays

    @property
    def committed_rows(self) -> int:
        """Rows of the index that a finished ``append_clips`` committed, from the root attributes.

        It does not read the index itself, so it answers for a store whose index is damaged.
        """
        return self._committed_rows()

    @property
    def open_args(self) -> dict[str, Any]:
        """The arguments this store was opened with: other processes reopen it from these."""
        return dict(self._open_args)

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes: schema_version, classes, dataset, created_by, segment scheme."""
        return self._arrays.attrs("")

    @property
    def classes(self) -> list[str]:
        return list(self.attrs.get("classes", []))

    @property
    def index(self) -> ClipIndex:
        """The clip index below the facade (``featurestore.store.index``): lookups, ids of rows."""
        return self._index

    @property
    def clip_ids(self) -> list[str]:
        """Every clip id in row order (decodes the id column: use ``row``/``rows`` to look ids up)."""
        return list(self._index.clip_ids)

    @property
    def n_clips(self) -> int:
        """Committed rows, from the root attributes: no column is read."""
        return self._index.n_clips

    @property
    def labels(self) -> np.ndarray:
        return self.column("label")

    def columns(self) -> list[str]:
        """Index column names: ``label``, ``city``, ..., ``split/<name>``."""
        plain = [c for c in self._arrays.children("index") if c not in NOT_COLUMNS]
        return plain + [f"split/{s}" for s in self.splits()]

    def splits(self) -> list[str]:
        return self._arrays.children("index/split")

    def column(self, name: str) -> np.ndarray:
        """One index column for every clip, in row order."""
        if name.split("/")[0] == "lookup" or not self._arrays.is_array(f"index/{name}"):
            raise UnknownFeatureError("index column", name, self.columns())
        return self._index.column(name)

    def rows(self, clip_ids: Iterable[str]) -> np.ndarray:
        """Row numbers of clip ids; an unknown id raises ``UnknownClipError`` with the nearest ids.

        Resolved through the persisted lookup (a few table chunks, no id decoded) when the store
        has one, else through a dict of the decoded ids (see ``featurestore.store.index``).
        """
        _check_id_sequence("rows", clip_ids, "row(clip_id)")
        return self._index.rows(list(clip_ids))

    def row(self, clip_id: str) -> int:
        return self._index.row(clip_id)

    # ------------------------------------------------------------------------------- the index
    def _require_writable(self) -> None:
        self._arrays.require_writable()

    def append_clips(self, manifest: Manifest) -> None:
        """Add the manifest's clips to the index and grow every feature and prediction array.

        The store's ``dataset``, ``dataset_root`` and segment attributes describe the dataset of
        its first clips and are kept; every manifest added is listed in the ``datasets``
        attribute with its root and rows, so the relative paths in the index of clips from
        another dataset stay resolvable.
        """
        self._require_writable()
        attrs = self.attrs
        classes = list(manifest.classes) or list(attrs.get("classes", []))  # unlabelled clips keep the store's
        if attrs.get("classes") and list(attrs["classes"]) != classes:
            raise ValueError(f"{self.location}: classes {attrs['classes']} differ from the manifest's "
                             f"{manifest.classes}")
        new_ids = manifest.clip_ids
        dup = {new_ids[i] for i in np.flatnonzero(self._index.find(new_ids) >= 0)}
        if dup or len(set(new_ids)) != len(manifest):
            raise ValueError(f"clip ids must be unique; already present or repeated: {sorted(dup)[:5]}")
        start, n_new = self.n_clips, len(manifest)
        end = start + n_new
        described = {"dataset": manifest.name, "dataset_root": str(manifest.root) if manifest.root else "",
                     "audio_segments": manifest.audio_segments, "segment_seconds": manifest.segment_seconds,
                     "video_frames": manifest.video_frames}
        first = described if start == 0 else {}
        added = {**described, "rows": [start, end]}
        new_splits = [s for s in manifest.split_names if not self._arrays.exists(f"index/split/{s}")]
        for split in new_splits:
            self._arrays.create_array(f"index/split/{split}", (start,), "bool", INDEX_CHUNK_ROWS, False)
        for path in self._row_arrays():
            self._arrays.resize(path, end)
        for name, values in _manifest_columns(manifest).items():
            self._arrays.write(f"index/{name}", start, values)
        for split in self.splits():
            member = np.array([split in c.splits for c in manifest.clips], dtype=bool)
            if split in new_splits and start:
                member = np.concatenate([np.zeros(start, dtype=bool), member])  # earlier rows: written too
            self._arrays.write(f"index/split/{split}", end - len(member), member)
        looked_up = self._index.prepare_append(new_ids, [c.city for c in manifest.clips], start)
        # the commit point, one attribute update (the lookup's name included): a kill before it leaves
        # rows past n_clips and an unnamed lookup, which the next writable open removes
        # (_roll_back_partial_append)
        self._arrays.set_attrs("", {"classes": classes, **first, "n_clips": end, **looked_up,
                               "datasets": [*attrs.get("datasets", []), added]})
        self._index.forget()
        self._index.drop_unused()
        self._rows_cache.done.clear()

    def _row_arrays(self) -> list[str]:
        """Every array whose first axis is the clip axis."""
        paths = [f"index/{c}" for c in self.columns()]
        for group in self.row_groups():
            paths += group.array_paths
        return [p for p in paths if self._arrays.is_array(p)]  # a creation killed midway has only some

    def select(self, split: str | Sequence[str] | None = None, label: str | int | Sequence | None = None,
               city: str | Sequence[str] | None = None,
               location: str | Sequence[str] | None = None) -> list[str]:
        """Clip ids matching every given filter (a list means "any of"), in row order.

        ``label`` takes class names or indices (-1: clips without a label). A value no clip can
        match (an unknown split, class, city or location, an index outside the class list) raises
        ``UnknownValueError`` naming the column, the value and the values the store has, rather
        than selecting nothing, which a typo would otherwise do silently.
        """
        keep = np.ones(self.n_clips, dtype=bool)
        if split is not None:
            any_split = np.zeros(self.n_clips, dtype=bool)
            for s in _as_list(split):
                if s not in self.splits():
                    raise UnknownValueError("split", s, self.splits())
                any_split |= self.column(f"split/{s}").astype(bool)
            keep &= any_split
        if label is not None:
            wanted = [self._label_index(v) for v in _as_list(label)]
            keep &= np.isin(self.labels, wanted)
        for name, value in (("city", city), ("location", location)):
            if value is not None:
                column = self.column(name)
                present = set(column.tolist())
                for v in _as_list(value):
                    if v not in present:
                        raise UnknownValueError(name, v, present - {""})
                keep &= np.isin(column, _as_list(value))
        return self._index.ids_at(np.flatnonzero(keep))

    def _label_index(self, label: str | int) -> int:
        classes = self.classes
        if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
            if not -1 <= int(label) < len(classes):
                raise UnknownValueError("label", int(label), classes,
                                        f"An integer label is an index 0..{len(classes) - 1} (-1: no label).")
            return int(label)
        if label not in classes:
            raise UnknownValueError("label", label, classes)
        return classes.index(label)

    def set_classes(self, classes: Sequence[str]) -> None:
        """Give a store without classes its class list.

        A store made from a manifest without labels (``clip_id,audio,video``) has no classes, and a
        head trained elsewhere predicts into it in its own class order (``heads predict`` calls
        this). Allowed only while the store has no classes (or with the very same list): labels,
        predictions and class features are laid out in that order, so changing it would relabel
        them.

        Prediction runs or class features that older versions let a store without classes create
        have no class axis, so they hold no values; they are removed.

        Raises:
            ValueError: other classes are already set, or bad class names.
        """
        self._require_writable()
        names = check_classes(classes)
        current = self.classes
        if current == names:
            return
        if current:
            raise ValueError(f"{self.location}: the store already has classes {current}; refusing to replace "
                             f"them with {names} (labels, predictions and class features use that order)")
        for group in self.row_groups(PREDICTION_RUNS):
            group.delete()
        for name in self.class_feature_sets():
            self._arrays.delete(join("class_features", name))
        self._runs = None
        self._arrays.set_attrs("", {"classes": names})

    def _require_classes(self, what: str) -> None:
        """Per-class arrays need a class list; a store made from unlabelled clips has none yet."""
        if not self.classes:
            raise ValueError(f"{self.location}: {what} needs the store's classes, and it has none (made from a "
                             f"manifest without labels); give them first: store.set_classes([...]) or "
                             f"featurestore extract --classes A,B,C")

    # ----------------------------------------------------------------------------- row groups
    def row_groups(self, kind: RowGroupKind | None = None) -> list[RowGroup]:
        """Every feature set and prediction run (or those of ``kind``) as a ``RowGroup``.

        A group is listed when it holds its value array, also when a killed creation left it
        without its other arrays or attributes (``RowGroup.missing_arrays`` tells).
        """
        return [self._group(k, name) for k in ([kind] if kind else KINDS)
                for name in self._arrays.groups_with(k.top, k.leaf)]

    def row_group(self, kind: RowGroupKind, name: str) -> RowGroup:
        """One feature set (``FEATURE_SETS``) or prediction run (``PREDICTION_RUNS``) by name.

        Raises:
            UnknownFeatureError: nothing of that kind and name is stored (it lists what is).
        """
        group = self._group(kind, name)
        if not group.exists():
            raise UnknownFeatureError(kind.noun, name, self._arrays.groups_with(kind.top, kind.leaf))
        return group

    def _group(self, kind: RowGroupKind, name: str) -> RowGroup:
        return RowGroup(kind, name, self._arrays, self._rows_cache, self._index)

    # --------------------------------------------------------------------------- feature sets
    def feature_sets(self) -> dict[str, FeatureInfo]:
        """Every feature set with its shape, dtype, provenance, fingerprint and done/error counts."""
        return {group.name: self._feature_info(group) for group in self.row_groups(FEATURE_SETS)}

    def feature_info(self, name: str) -> FeatureInfo:
        return self._feature_info(self.row_group(FEATURE_SETS, name))

    def _feature_info(self, group: RowGroup) -> FeatureInfo:
        attrs = group.attrs
        done = group.done_mask(refresh=True)
        n_errors = len(group.failed_rows(done))  # reads error texts only where rows are not done
        return FeatureInfo(group.name, group.shape, group.dtype, group.chunk_rows, attrs.get("provenance", {}),
                           attrs.get("fingerprint", ""), int(done.sum()), n_errors)

    def create_feature_set(self, name: str, n_segments: int, feature_shape: Sequence[int],
                           provenance: dict, dtype: str = "float16", chunk_clips: int | None = None,
                           overwrite: bool = False, compressor: str | None = None) -> FeatureInfo:
        """Create (or, with the same fingerprint, reopen for resuming) a feature set.

        A different fingerprint raises ``FingerprintMismatchError`` naming both configurations;
        ``overwrite=True`` deletes the old set first (:meth:`check_feature_set` tells the rule).
        ``compressor``: None stores chunks as they are (embeddings barely compress); ``"zstd"``
        compresses them losslessly (zstd in Zarr, gzip in HDF5), for data such as stored frames.
        The checksum is kept either way.
        """
        self._require_writable()
        validate_name("feature set", name)
        if compressor not in COMPRESSORS:
            raise ValueError(f"feature set {name!r}: unknown compressor {compressor!r}; use one of "
                             f"{', '.join(str(c) for c in COMPRESSORS)}")
        if self.check_feature_set(name, n_segments, feature_shape, provenance, overwrite):
            return self.feature_info(name)
        group = self._group(FEATURE_SETS, name)
        if group.exists():  # overwritten, or a creation that never finished
            group.delete()
        shape = (self.n_clips, int(n_segments)) + tuple(int(s) for s in feature_shape)
        rows = int(chunk_clips or default_chunk_clips(n_segments, feature_shape, dtype))
        inner = default_inner_clips(n_segments, feature_shape, dtype, rows)
        prov = dict(provenance)
        prov.setdefault("runtime", runtime_info())
        # the attributes are written last, in one update: a set without its fingerprint is an
        # unfinished creation, which check_feature_set replaces
        group.create(shape, str(np.dtype(dtype)), rows, compressor=compressor, inner_rows=inner, attrs={
            "provenance": prov, "fingerprint": fingerprint(provenance), "n_segments": int(n_segments),
            "feature_shape": list(shape[2:]), "chunk_clips": rows, "compressor": COMPRESSORS[compressor]})
        return self._feature_info(group)

    def check_feature_set(self, name: str, n_segments: int, feature_shape: Sequence[int], provenance: dict,
                          overwrite: bool = False) -> bool:
        """What :meth:`create_feature_set` would do with these arguments, without writing anything.

        True: the set exists with this fingerprint and shape and would be reopened (resume).
        False: a set would be created (none there, ``overwrite``, or a creation killed before its
        attributes, which never marked anything done). Raises ``FingerprintMismatchError`` where
        it would refuse, so a caller can check every set before changing the store.
        """
        path = join("features", name)
        if not self._arrays.exists(join(path, "data")):
            if self._arrays.exists(path) and self._arrays.children(path) and not overwrite:
                raise ValueError(f"{name!r} is a group of other feature sets "
                                 f"({', '.join(self._arrays.children(path))}); choose another name")
            return False
        old = self._arrays.attrs(path)
        if overwrite or not _FEATURE_ATTRS <= set(old):  # an unfinished creation: replace it
            return False
        if not fingerprint_matches(old["fingerprint"], provenance):
            raise FingerprintMismatchError(name, _strip_runtime(old.get("provenance", {})),
                                           _strip_runtime(provenance))
        stored = tuple(self._arrays.shape(join(path, "data"))[1:])
        wanted = (int(n_segments), *(int(s) for s in feature_shape))
        if stored != wanted:
            raise FingerprintMismatchError(
                name, {**_strip_runtime(old.get("provenance", {})), "shape": list(stored)},
                {**_strip_runtime(provenance), "shape": list(wanted)})
        return True

    def delete_feature_set(self, name: str) -> None:
        self._require_writable()
        self.row_group(FEATURE_SETS, name).delete()

    def done_mask(self, name: str, refresh: bool = False) -> np.ndarray:
        """Which clips of a feature set are computed (a copy; cached until ``refresh``)."""
        return self.row_group(FEATURE_SETS, name).done_mask(refresh)

    def data_version(self, name: str, refresh: bool = False) -> str | None:
        """A token that changes whenever values of finished clips of a feature set may have changed
        (a new set, an overwrite, done rows written again; cached until ``refresh``). With the done
        mask it keys caches built from the values, such as search's index (see ``RowGroup``)."""
        return self.row_group(FEATURE_SETS, name).data_version(refresh)

    def write_rows(self, name: str, start: int, data: np.ndarray, done: np.ndarray | None = None,
                   errors: dict[int, str] | None = None) -> None:
        """Write rows ``start:start+len(data)`` of a feature set, then mark them done.

        The block must cover whole chunks (its end may be the last row), so that parallel writers
        never touch the same chunk. Errors recorded earlier for these rows are cleared.

        A block may also hold rows that are not finished (a clip that failed to decode in the middle
        of a block): ``done`` (bool per row of the block, default all True) says which rows are
        finished, and ``errors`` (absolute row -> message) records the failures of this block. Rows
        neither done nor in ``errors`` keep their done flag false and their earlier error text.
        Data, then errors, then done flags are written, so a writer killed in between never leaves
        a row marked done whose data is not there.
        """
        self._require_writable()
        self.row_group(FEATURE_SETS, name).write_rows(start, data, done, errors)

    def set_errors(self, name: str, errors: dict[int | str, str]) -> None:
        """Record per-clip failures (row or clip id -> message); those clips are marked not done."""
        self._require_writable()
        group = self.row_group(FEATURE_SETS, name)
        group.set_errors({self._row_number(key): message for key, message in errors.items()})

    def clear_errors(self, name: str, rows: Iterable[int | str]) -> None:
        """Forget the recorded failures of these clips (rows or clip ids), e.g. before a retry.

        Their done flags stay false: the clips are simply "not computed" again.
        """
        _check_id_sequence("clear_errors", rows)
        self._require_writable()
        group = self.row_group(FEATURE_SETS, name)
        for key in rows:
            group.write_errors(self._row_number(key), np.array([""], dtype=object))

    def _row_number(self, key: int | str) -> int:
        return self.row(key) if isinstance(key, str) else int(key)

    def errors(self, name: str) -> dict[str, str]:
        """Clip id -> error message for every clip whose extraction failed."""
        failed = self.row_group(FEATURE_SETS, name).failed_rows()
        return dict(zip(self._index.ids_at(list(failed)), failed.values()))

    # ------------------------------------------------------------------------------- reading
    def get(self, name: str, clip_id: str) -> np.ndarray:
        """Features of one clip, ``[n_segments, *feature_shape]`` in the stored dtype."""
        group = self.row_group(FEATURE_SETS, name)
        row = self.row(clip_id)
        group.require_done(np.array([row]))
        return group.read_row(row)[0].copy()

    def get_many(self, name: str, clip_ids: Sequence[str]) -> np.ndarray:
        """Features of many clips in the given order; each chunk is read and decoded once."""
        _check_id_sequence("get_many", clip_ids, "get(name, clip_id)")
        group = self.row_group(FEATURE_SETS, name)
        return group.gather(self.rows(clip_ids))

    def read_rows(self, name: str, start: int, stop: int, check_done: bool = True) -> np.ndarray:
        """A contiguous block of rows (loaders read chunk-sized blocks through this)."""
        group = self.row_group(FEATURE_SETS, name)
        return group.gather(np.arange(start, stop), check_done=check_done)

    def refresh(self) -> None:
        """Drop cached chunks, done masks and the index: see what other processes wrote since."""
        self._rows_cache.clear()
        self._index.forget()
        self._runs = None

    def torch_dataset(self, features: str | Sequence[str], **kwargs):
        """A ``featurestore.torchdata.StoreDataset`` over this store (see that class for arguments)."""
        from featurestore.torchdata import StoreDataset

        return StoreDataset(self, [features] if isinstance(features, str) else list(features), **kwargs)

    # ------------------------------------------------------------------------ class features
    def write_class_features(self, name: str, data: np.ndarray, provenance: dict,
                             prompts: Sequence[str] | None = None, overwrite: bool = False) -> None:
        """Per-class vectors (e.g. CLIP text embeddings of class prompts) with their provenance.

        Replacing a set made with another configuration needs ``overwrite=True``
        (:meth:`has_class_features` tells the rule).
        """
        self._require_writable()
        validate_name("class feature set", name)
        self._require_classes(f"class feature set {name!r}")
        self.has_class_features(name, provenance, overwrite)
        data = np.asarray(data)
        if data.ndim < 1 or data.shape[0] != len(self.classes):
            raise ValueError(f"class features {name!r}: first axis must be the {len(self.classes)} classes, "
                             f"got shape {data.shape}")
        path = join("class_features", name)
        self._arrays.create_group(path)
        self._arrays.create_array(join(path, "data"), data.shape, str(data.dtype), data.shape[0], 0)
        self._arrays.write(join(path, "data"), 0, data)
        prov = dict(provenance)
        prov.setdefault("runtime", runtime_info())
        self._arrays.set_attrs(path, {"provenance": prov, "fingerprint": fingerprint(prov),
                                 "prompts": list(prompts or []), "classes": self.classes})

    def has_class_features(self, name: str, provenance: dict, overwrite: bool = False) -> bool:
        """Whether class features ``name`` made with this provenance are stored already.

        The class-feature form of :meth:`create_feature_set`'s fingerprint rule, as a check of its
        own so that a caller can ask before computing anything: the same fingerprint -> True;
        none stored, or ``overwrite`` -> False; another fingerprint -> ``FingerprintMismatchError``
        naming both configurations.
        """
        path = join("class_features", name)
        if overwrite or not self._arrays.is_array(join(path, "data")):
            return False
        old = self._arrays.attrs(path)
        if fingerprint_matches(old.get("fingerprint"), provenance):
            return True
        raise FingerprintMismatchError(name, _strip_runtime(old.get("provenance", {})), _strip_runtime(provenance),
                                       kind="class feature set")

    def class_feature_sets(self) -> list[str]:
        return self._arrays.groups_with("class_features", "data")

    def get_class_features(self, name: str) -> tuple[np.ndarray, dict]:
        """``(array [n_classes, ...], attrs)`` where attrs hold provenance, fingerprint and prompts."""
        path = join("class_features", name)
        if not self._arrays.is_array(join(path, "data")):
            raise UnknownFeatureError("class feature set", name, self.class_feature_sets())
        data = self._arrays.read(join(path, "data"), 0, self._arrays.shape(join(path, "data"))[0])
        return data, self._arrays.attrs(path)

    # ---------------------------------------------------------------------------- predictions
    def create_predictions(self, run: str, n_segments: int, attrs: dict, overwrite: bool = False,
                           chunk_clips: int | None = None) -> bool:
        """Create ``predictions/<run>`` for every clip, or reopen it to resume.

        An existing run whose attributes (``runtime`` aside) and shape are the ones given is the
        same run: it is reopened, its finished rows kept, and True is returned, so a killed
        ``heads predict`` continues where it stopped. A run with other attributes is refused
        (``FileExistsError`` naming what differs) unless ``overwrite=True``, which deletes it first.

        Returns:
            True when an existing run was reopened, False when one was created.
        """
        self._require_writable()
        validate_name("prediction run", run)
        self._require_classes(f"prediction run {run!r}")
        group = self._group(PREDICTION_RUNS, run)
        n_classes = len(self.classes)
        shape = (self.n_clips, int(n_segments), n_classes)
        if group.exists() and not overwrite:
            stored = group.attrs
            if stored:  # none: a creation killed before its attributes (written last), replaced below
                differs = _run_differences(stored, attrs) + (["shape"] if tuple(group.shape) != shape else [])
                if not differs:
                    self._runs = None
                    return True
                raise FileExistsError(f"{self.location}: prediction run {run!r} exists with other settings "
                                      f"(differing: {', '.join(differs[:8])}); use another name, or "
                                      f"overwrite=True (--overwrite) to replace it")
        if group.exists():
            group.delete()
        rows = int(chunk_clips or default_chunk_clips(n_segments, (n_classes,), "float32"))
        group.create(shape, "float32", rows, attrs={**attrs, "runtime": runtime_info()})
        self._runs = None
        return False

    def write_predictions(self, run: str, rows: np.ndarray | slice | int, probs: np.ndarray) -> None:
        """Write probabilities for rows (any order; a single writer per run), then mark them done.

        Non-finite probabilities are refused (``ValueError`` naming the clips): a NaN must never be
        stored as a prediction, whatever produced it.
        """
        self._require_writable()
        group = self.row_group(PREDICTION_RUNS, run)
        probs = np.asarray(probs, dtype=np.float32)
        if isinstance(rows, slice):
            rows = np.arange(self.n_clips)[rows]
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        if len(rows) != len(probs):
            raise ValueError(f"predictions {run!r}: {len(rows)} rows but {len(probs)} probability rows")
        expected = tuple(group.shape[1:])
        if probs.shape[1:] != expected:
            raise ValueError(f"predictions {run!r}: rows have shape {probs.shape[1:]}, expected {expected}")
        finite = np.isfinite(probs.reshape(len(probs), -1)).all(axis=1)
        if not finite.all():
            bad = self._index.ids_at(rows[~finite][:5])
            raise ValueError(f"predictions {run!r}: {int((~finite).sum())} clip(s) have non-finite probabilities "
                             f"(e.g. {', '.join(bad)}); nothing was written")
        group.write_scattered(rows, probs)

    def prediction_runs(self) -> dict[str, dict]:
        """Run name -> its attributes (head config, feature fingerprints, ...).

        The run names are listed on every call, so a run written meanwhile (by ``heads.predict`` in
        this process, or by another process) is there as ``get_predictions`` sees it; each run's
        attributes are read once and kept (fusion asks many times per evaluation, and reading them is
        slow on object storage): ``refresh()`` rereads them. The dicts are copies: editing them
        changes nothing stored.
        """
        kind = PREDICTION_RUNS
        names = self._arrays.groups_with(kind.top, kind.leaf)
        cached = self._runs or {}
        self._runs = {name: cached[name] if name in cached else self._group(kind, name).attrs for name in names}
        return {run: dict(attrs) for run, attrs in self._runs.items()}

    def prediction_done(self, run: str) -> np.ndarray:
        return self.row_group(PREDICTION_RUNS, run).done_mask(refresh=True)

    def get_predictions(self, run: str, clip_ids: Sequence[str] | None = None) -> np.ndarray:
        """Probabilities ``[n, n_segments, n_classes]``; clips never predicted raise an error."""
        _check_id_sequence("get_predictions", clip_ids)
        group = self.row_group(PREDICTION_RUNS, run)
        rows = np.arange(self.n_clips) if clip_ids is None else self.rows(clip_ids)
        return group.gather(rows)

    def delete_predictions(self, run: str) -> None:
        self._require_writable()
        self.row_group(PREDICTION_RUNS, run).delete()
        self._runs = None

    # ------------------------------------------------------------------------- search, export
    def search(self, feature_set: str, query: Any = None, k: int = 10, **kwargs: Any):
        """Nearest clips by cosine similarity of clip-mean embeddings; see ``featurestore.store.search``."""
        from featurestore.store.search import search

        return search(self, feature_set, query, k, **kwargs)

    def to_pandas(self, done: bool = False):
        """The index as a pandas DataFrame by clip id; see ``featurestore.store.export``."""
        from featurestore.store.export import to_pandas

        return to_pandas(self, done=done)

    def to_lhotse(self, features: Sequence[str] = (), split: str | None = None):
        """A lhotse ``CutSet`` of the clips with audio; see ``featurestore.store.export.to_lhotse``."""
        from featurestore.store.export import to_lhotse

        return to_lhotse(self, features, split)

    def to_hf(self, features: Sequence[str] = (), **kwargs: Any):
        """A Hugging Face ``DatasetDict`` by split; see ``featurestore.store.export.to_hf``."""
        from featurestore.store.export import to_hf

        return to_hf(self, features, **kwargs)

    # ------------------------------------------------------------------------------ lifecycle
    def verify(self):
        """Check consistency and every checksum; see ``featurestore.store.verify``."""
        from featurestore.store.verify import verify_store

        return verify_store(self)

    def close(self) -> None:
        self._rows_cache.clear()
        self._b.close()

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        """Pickles as its open arguments: worker processes reopen the store, never share handles."""
        if self.mode != "r":
            raise TypeError(f"only stores opened with mode='r' can be sent to other processes "
                            f"({self.location} is open with mode={self.mode!r})")
        return dict(self._open_args)

    def __setstate__(self, state: dict) -> None:
        other = open_store(**state)
        self.__dict__.update(other.__dict__)

    def __repr__(self) -> str:
        return (f"FeatureStore({self.location!r}, mode={self.mode!r}, clips={self.n_clips}, "
                f"features={self._arrays.groups_with('features', 'data')})")


def _check_id_sequence(method: str, clip_ids: Any, single: str = "") -> None:
    """A str or bytes where many clip ids are expected would be iterated character by character
    (and fail as "unknown clip 'o'", or worse, match one-letter ids): refuse it in one line."""
    if isinstance(clip_ids, (str, bytes)):
        shown = repr(clip_ids) if len(clip_ids) <= 60 else f"{clip_ids[:57]!r}..."
        instead = f", or use {single} for one clip" if single else ""
        raise TypeError(f"{method}: expected a list of clip ids, got the {type(clip_ids).__name__} {shown}; "
                        f"pass a list ([{shown}]){instead}")


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple, set, np.ndarray)) else [value]


def _run_differences(stored: dict, requested: dict) -> list[str]:
    """Top-level attributes of a prediction run that differ (``runtime`` and the data version aside).

    Both sides go through JSON first, as stored attributes did (tuples become lists, keys strings).
    """
    ignore = {"runtime", DATA_VERSION}
    old = json.loads(json.dumps({k: v for k, v in stored.items() if k not in ignore}, default=str))
    new = json.loads(json.dumps({k: v for k, v in requested.items() if k not in ignore}, default=str))
    return sorted(k for k in set(old) | set(new) if old.get(k, _MISSING) != new.get(k, _MISSING))


_MISSING = object()


def _strip_runtime(provenance: dict) -> dict:
    return {k: v for k, v in provenance.items() if k != "runtime"}


def _manifest_columns(manifest: Manifest) -> dict[str, np.ndarray]:
    def rel(p: Path | None) -> str:
        if p is None:
            return ""
        if manifest.root is not None and Path(p).is_relative_to(manifest.root):
            return Path(p).relative_to(manifest.root).as_posix()
        return Path(p).as_posix()

    clips = manifest.clips
    return {
        "clip_id": np.array([c.clip_id for c in clips], dtype=object),
        "label": np.array([manifest.label_index(c.label) for c in clips], dtype=np.int16),
        "city": np.array([c.city for c in clips], dtype=object),
        "location": np.array([c.location for c in clips], dtype=object),
        "audio_path": np.array([rel(c.audio) for c in clips], dtype=object),
        "video_path": np.array([rel(c.video) for c in clips], dtype=object),
    }


def open_store(path: str | Path, mode: str = "r", backend: str | None = None,
               cache_bytes: int = DEFAULT_CACHE_BYTES, storage_options: dict | None = None) -> FeatureStore:
    """Open a feature store.

    Args:
        path: a directory (Zarr v3), a ``.h5``/``.hdf5`` file (HDF5), or an fsspec URL
            (``s3://...``, ``gs://...``, ``memory://...``; Zarr only).
        mode: ``"r"`` read-only, ``"a"`` read/write (created when missing), ``"w"`` create anew
            (an existing store at that path is replaced).
        backend: ``"zarr"`` or ``"hdf5"`` for a new store whose name does not say (``backend_for``
            decides: an existing store is recognised by its contents, and a ``backend`` that
            contradicts them is refused; with ``"w"`` the new store is made with ``backend``).
        cache_bytes: bound of the decoded-chunk cache (0 disables it).
        storage_options: passed to fsspec for URLs (credentials, endpoints).
    """
    if mode not in ("r", "a", "w"):
        raise ValueError(f"mode must be 'r', 'a' or 'w', not {mode!r}")
    location = str(path)
    if "://" not in location:  # a local path: absolute, so a later chdir cannot turn chunks "missing"
        location = os.path.abspath(location)
    args = dict(path=location, mode=mode, backend=backend, cache_bytes=cache_bytes,
                storage_options=storage_options)
    b = open_backend(location, mode, backend, storage_options)
    try:
        return FeatureStore(b, mode, cache_bytes, args)
    except Exception:
        b.close()
        raise


def create_store(path: str | Path, manifest: Manifest, backend: str | None = None, **kwargs) -> FeatureStore:
    """Create a new store at ``path`` whose index holds the manifest's clips (mode ``"w"``)."""
    store = open_store(path, "w", backend=backend, **kwargs)
    store.append_clips(manifest)
    return store
