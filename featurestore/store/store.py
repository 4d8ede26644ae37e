"""The feature store: an index of clips plus feature sets and prediction runs keyed by clip and segment.

This module is the table of contents of the store: ``FeatureStore`` is a thin facade whose methods,
grouped by topic below, each delegate to the module that does the work:

- ``layout.py``: the groups of a new store, the schema version, names, chunk sizes
- ``index.py`` (``ClipIndex``): clip ids, the persisted id -> row lookup, the index columns, read lazily
- ``clips.py``: appending a manifest's clips (and rolling back a killed append), ``select``, classes
- ``row_group.py`` (``RowGroup``): the values, ``done`` flags and error texts of a feature set or a
  prediction run, read through a decoded-chunk cache and written in whole chunks with ``done``
  last, so a killed writer never leaves a clip that looks finished but holds fill values
- ``feature_sets.py``: creating (or reopening to resume) a feature set by fingerprint, ``FeatureInfo``,
  per-clip errors
- ``class_features.py``: per-class vectors with their provenance
- ``predictions.py``: prediction runs of heads, created or reopened by their settings
- ``search.py``, ``export.py``, ``verify.py``: nearest clips, pandas/lhotse/HF, checksums and consistency

Below all of them, ``StoreArrays`` (``arrays.py``) addresses arrays by path with checked reads, and
``backend_for`` (``_backend.py``) picks the storage engine. See docs/architecture.md for the layout.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from featurestore.checks import is_int_in
from featurestore.errors import UnknownFeatureError
from featurestore.manifest import Manifest
from featurestore.store import class_features, clips, feature_sets, predictions
from featurestore.store._backend import Backend, open_backend
from featurestore.store.arrays import StoreArrays
from featurestore.store.clips import check_id_sequence
from featurestore.store.feature_sets import FeatureInfo
from featurestore.store.index import NOT_COLUMNS, ClipIndex
from featurestore.store.layout import check_schema, init_layout
from featurestore.store.row_group import FEATURE_SETS, KINDS, PREDICTION_RUNS, RowCaches, RowGroup, RowGroupKind

DEFAULT_CACHE_BYTES = 256 * 2**20


class FeatureStore:
    """One store = one set of clips. Create with ``open_store`` or ``create_store``."""

    def __init__(self, backend: Backend, mode: str, cache_bytes: int, open_args: dict, repair: bool = True):
        self._b = backend  # the storage engine; everything here goes through self._arrays
        self._arrays = StoreArrays(backend)
        self.mode = mode
        self._open_args = open_args
        self._rows_cache = RowCaches(cache_bytes)
        self._index = ClipIndex(self._arrays)  # ids, the id -> row lookup, columns: read lazily
        self._runs: dict[str, dict] | None = None  # prediction run attrs, read once (refresh() drops them)
        # feature sets a ``get`` found (name -> group): the warm ``get`` skips the name check. A group
        # object holds names only; what it reads is in ``_rows_cache``, which deletes and refresh drop
        self._feature_groups: dict[str, RowGroup] = {}
        if mode == "w" or not self._arrays.exists("index"):
            init_layout(self._arrays)
        self._arrays.strict = check_schema(self._arrays) >= 2
        if repair and not self._arrays.read_only:
            clips.roll_back_partial_append(self)

    # ------------------------------------------------- what it is, its index (clips.py, index.py)
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
        return self._index.committed_rows()

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
        check_id_sequence("rows", clip_ids, "row(clip_id)")
        return self._index.rows(list(clip_ids))

    def row(self, clip_id: str) -> int:
        return self._index.row(clip_id)

    # ---------------------------------------------------------------------- adding, selecting (clips.py)
    def append_clips(self, manifest: Manifest) -> None:
        """Add the manifest's clips to the index and grow every feature and prediction array.

        The store's ``dataset``, ``dataset_root`` and segment attributes describe the dataset of
        its first clips and are kept; every manifest added is listed in the ``datasets``
        attribute with its root and rows, so the relative paths in the index of clips from
        another dataset stay resolvable.
        """
        clips.append_clips(self, manifest)

    def select(self, split: str | Sequence[str] | None = None, label: str | int | Sequence | None = None,
               city: str | Sequence[str] | None = None,
               location: str | Sequence[str] | None = None) -> list[str]:
        """Clip ids matching every given filter (a list means "any of"), in row order.

        ``label`` takes class names or indices (-1: clips without a label). A value no clip can
        match (an unknown split, class, city or location, an index outside the class list) raises
        ``UnknownValueError`` naming the column, the value and the values the store has, rather
        than selecting nothing, which a typo would otherwise do silently.
        """
        return clips.select(self, split, label, city, location)

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
        clips.set_classes(self, classes)

    # ------------------------------------------------------------------------ row groups (row_group.py)
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

    # --------------------------------------------------------------------- feature sets (feature_sets.py)
    def feature_sets(self) -> dict[str, FeatureInfo]:
        """Every feature set with its shape, dtype, provenance, fingerprint and done/error counts."""
        return {group.name: feature_sets.feature_info(group) for group in self.row_groups(FEATURE_SETS)}

    def feature_info(self, name: str) -> FeatureInfo:
        return feature_sets.feature_info(self.row_group(FEATURE_SETS, name))

    def create_feature_set(self, name: str, n_segments: int, feature_shape: Sequence[int],
                           provenance: dict, dtype: str = "float16", chunk_clips: int | None = None,
                           overwrite: bool = False, compressor: str | None = None) -> FeatureInfo:
        """Create (or, with the same fingerprint, reopen for resuming) a feature set.

        A different fingerprint raises ``FingerprintMismatchError`` naming both configurations;
        ``overwrite=True`` deletes the old set first (:meth:`check_feature_set` tells the rule).
        ``dtype``: a real number type (bool, integers, floats; float16 by default).
        ``compressor``: None stores chunks as they are (embeddings barely compress); ``"zstd"``
        compresses them losslessly (zstd in Zarr, gzip in HDF5), for data such as stored frames.
        The checksum is kept either way.
        """
        self._feature_groups.pop(name, None)  # (``get``'s group of the set this may replace)
        return feature_sets.create_feature_set(self, name, n_segments, feature_shape, provenance, dtype,
                                               chunk_clips, overwrite, compressor)

    def check_feature_set(self, name: str, n_segments: int, feature_shape: Sequence[int], provenance: dict,
                          overwrite: bool = False) -> bool:
        """What :meth:`create_feature_set` would do with these arguments, without writing anything.

        True: the set exists with this fingerprint and shape and would be reopened (resume).
        False: a set would be created (none there, ``overwrite``, or a creation killed before its
        attributes, which never marked anything done). Raises ``FingerprintMismatchError`` where
        it would refuse, so a caller can check every set before changing the store.
        """
        return feature_sets.check_feature_set(self, name, n_segments, feature_shape, provenance, overwrite)

    def delete_feature_set(self, name: str) -> None:
        self._arrays.require_writable()
        self._feature_groups.pop(name, None)  # a later ``get`` looks the set up again (and names it unknown)
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
                   errors: dict[int, str] | None = None, unchanged: np.ndarray | None = None) -> None:
        """Write rows ``start:start+len(data)`` of a feature set, then mark them done.

        The block must cover whole chunks (its end may be the last row), so that parallel writers
        never touch the same chunk. Errors recorded earlier for these rows are cleared. Rows that
        would not convert to the stored dtype as numbers (complex, text, floats into an integer set,
        integers out of its range) are refused before anything is written.

        A block may also hold rows that are not finished (a clip that failed to decode in the middle
        of a block): ``done`` (bool per row of the block, default all True) says which rows are
        finished, and ``errors`` (absolute row -> message) records the failures of this block. Rows
        neither done nor in ``errors`` keep their done flag false and their earlier error text.
        Data, then errors, then done flags are written, so a writer killed in between never leaves
        a row marked done whose data is not there. ``unchanged`` (bool per row) marks done rows the
        caller read from the store and writes back as they were (extraction's resumed chunks), so they
        are not read again to decide whether the data version changes; with it, only the inner chunks
        of the other done rows are written (a partial commit; rows not done are not written at all).
        """
        self._arrays.require_writable()
        self.row_group(FEATURE_SETS, name).write_rows(start, data, done, errors, unchanged=unchanged)

    def set_errors(self, name: str, errors: dict[int | str, str]) -> None:
        """Record per-clip failures (row or clip id -> message); those clips are marked not done."""
        feature_sets.set_errors(self, name, errors)

    def clear_errors(self, name: str, rows: Iterable[int | str]) -> None:
        """Forget the recorded failures of these clips (rows or clip ids), e.g. before a retry.

        Their done flags stay false: the clips are simply "not computed" again.
        """
        feature_sets.clear_errors(self, name, rows)

    def errors(self, name: str) -> dict[str, str]:
        """Clip id -> error message for every clip whose extraction failed."""
        return feature_sets.errors(self, name)

    # ------------------------------------------------------- reading features (row_group.py)
    def get(self, name: str, clip_id: str) -> np.ndarray:
        """Features of one clip, ``[n_segments, *feature_shape]`` in the stored dtype.

        A clip asked before (its row known, its chunk cached, finished by the done flags read) is a
        few dict lookups and a copy: about an h5py row read. A clip never asked is its id's lookup
        block and its inner chunk, each a view of a mapped shard checked once (see ``read_row``)."""
        group = self._feature_groups.get(name)
        try:
            row = self._index.known_row(clip_id)
        except TypeError:  # unhashable: not an id (``row`` below says so)
            row = None
        if group is not None and row is not None:
            hit = group.cached_row(row)
            if hit is not None:
                return hit.copy()
        if group is None:
            group = self.row_group(FEATURE_SETS, name)
        row = self.row(clip_id) if row is None else row
        self._feature_groups[name] = group
        return group.read_row(row).copy()

    def get_many(self, name: str, clip_ids: Sequence[str]) -> np.ndarray:
        """Features of many clips in the given order; each chunk is read and decoded once."""
        check_id_sequence("get_many", clip_ids, "get(name, clip_id)")
        group = self.row_group(FEATURE_SETS, name)
        return group.gather(self.rows(clip_ids))

    def read_rows(self, name: str, start: int, stop: int, check_done: bool = True) -> np.ndarray:
        """A contiguous block of rows (loaders read chunk-sized blocks through this)."""
        if not 0 <= start <= stop <= self.n_clips:
            raise ValueError(f"{self.location}: rows {start}:{stop} are outside the store's 0:{self.n_clips}")
        group = self.row_group(FEATURE_SETS, name)
        return group.gather(np.arange(start, stop), check_done=check_done)

    def refresh(self) -> None:
        """Drop cached chunks, done masks, the index and the arrays' metadata: see what other
        processes wrote since (a feature set created again with another shape is read as it is now)."""
        self._rows_cache.clear()
        self._arrays.forget()
        self._index.forget()
        self._runs = None
        self._feature_groups.clear()

    def torch_dataset(self, features: str | Sequence[str], **kwargs):
        """A ``featurestore.torchdata.StoreDataset`` over this store (see that class for arguments)."""
        from featurestore.torchdata import StoreDataset

        return StoreDataset(self, [features] if isinstance(features, str) else list(features), **kwargs)

    # ----------------------------------------------------------------- class features (class_features.py)
    def write_class_features(self, name: str, data: np.ndarray, provenance: dict,
                             prompts: Sequence[str] | None = None, overwrite: bool = False) -> None:
        """Per-class vectors (e.g. CLIP text embeddings of class prompts) with their provenance.

        Replacing a set made with another configuration needs ``overwrite=True``
        (:meth:`has_class_features` tells the rule).
        """
        class_features.write_class_features(self, name, data, provenance, prompts, overwrite)

    def has_class_features(self, name: str, provenance: dict, overwrite: bool = False) -> bool:
        """Whether class features ``name`` made with this provenance are stored already.

        The class-feature form of :meth:`create_feature_set`'s fingerprint rule, as a check of its
        own so that a caller can ask before computing anything: the same fingerprint -> True;
        none stored, or ``overwrite`` -> False; another fingerprint -> ``FingerprintMismatchError``
        naming both configurations.
        """
        return class_features.has_class_features(self, name, provenance, overwrite)

    def class_feature_sets(self) -> list[str]:
        return class_features.class_feature_sets(self)

    def get_class_features(self, name: str) -> tuple[np.ndarray, dict]:
        """``(array [n_classes, ...], attrs)`` where attrs hold provenance, fingerprint and prompts."""
        return class_features.get_class_features(self, name)

    # ---------------------------------------------------------------------- predictions (predictions.py)
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
        return predictions.create_predictions(self, run, n_segments, attrs, overwrite, chunk_clips)

    def write_predictions(self, run: str, rows: np.ndarray | slice | int, probs: np.ndarray) -> None:
        """Write probabilities for rows (any order; a single writer per run), then mark them done.

        Non-finite probabilities are refused (``ValueError`` naming the clips): a NaN must never be
        stored as a prediction, whatever produced it.
        """
        predictions.write_predictions(self, run, rows, probs)

    def prediction_runs(self) -> dict[str, dict]:
        """Run name -> its attributes (head config, feature fingerprints, ...).

        The run names are listed on every call, so a run written meanwhile (by ``heads.predict`` in
        this process, or by another process) is there as ``get_predictions`` sees it; each run's
        attributes are read once and kept (fusion asks many times per evaluation, and reading them is
        slow on object storage): ``refresh()`` rereads them. The dicts are copies: editing them
        changes nothing stored.
        """
        return predictions.prediction_runs(self)

    def prediction_done(self, run: str) -> np.ndarray:
        return self.row_group(PREDICTION_RUNS, run).done_mask(refresh=True)

    def get_predictions(self, run: str, clip_ids: Sequence[str] | None = None) -> np.ndarray:
        """Probabilities ``[n, n_segments, n_classes]``; clips never predicted raise an error."""
        return predictions.get_predictions(self, run, clip_ids)

    def delete_predictions(self, run: str) -> None:
        predictions.delete_predictions(self, run)

    # ------------------------------------------------------- search, export (search.py, export.py)
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
        self._feature_groups.clear()
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


def open_store(path: str | Path, mode: str = "r", backend: str | None = None,
               cache_bytes: int = DEFAULT_CACHE_BYTES, storage_options: dict | None = None,
               repair: bool = True) -> FeatureStore:
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
        repair: a writable open first cuts the rows an append killed before its commit left
            (``roll_back_partial_append``). A process that writes under another's writer lock (an
            extraction's Dask tasks and extra writers) passes False: the lock holder repaired the
            store when it opened it, and on object storage the check reads every array's metadata
            (about half of a small Dask task's time).
    """
    if mode not in ("r", "a", "w"):
        raise ValueError(f"mode must be 'r', 'a' or 'w', not {mode!r}")
    if not is_int_in(cache_bytes, 0):
        raise ValueError(f"cache_bytes must be a number of bytes >= 0 (0 disables the cache), not {cache_bytes!r}")
    location = str(path)
    if "://" not in location:  # a local path: absolute, so a later chdir cannot turn chunks "missing"
        location = os.path.abspath(location)
    args = dict(path=location, mode=mode, backend=backend, cache_bytes=cache_bytes,
                storage_options=storage_options, repair=repair)
    b = open_backend(location, mode, backend, storage_options)
    try:
        return FeatureStore(b, mode, cache_bytes, args, repair)
    except Exception:
        b.close()
        raise


def create_store(path: str | Path, manifest: Manifest, backend: str | None = None, **kwargs) -> FeatureStore:
    """Create a new store at ``path`` whose index holds the manifest's clips (mode ``"w"``).

    A manifest the append refuses (a repeated id, an unknown label) leaves no store behind where
    there was nothing before."""
    fresh = "://" not in str(path) and not os.path.lexists(path)
    store = open_store(path, "w", backend=backend, **kwargs)
    try:
        store.append_clips(manifest)
    except BaseException:
        store.close()
        if fresh and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif fresh:
            Path(path).unlink(missing_ok=True)
        raise
    return store
