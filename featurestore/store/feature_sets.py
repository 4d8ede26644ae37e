"""Feature sets: creating one (or reopening it to resume) by its fingerprint, what it holds, its errors.

``FeatureStore.create_feature_set``, ``check_feature_set``, ``feature_sets``/``feature_info`` and the
per-clip error methods delegate here. The arrays of a set (values, ``done`` flags, error texts) are
a ``RowGroup`` (``row_group.py``); this module decides when a set is created, reopened or refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from featurestore.errors import FingerprintMismatchError
from featurestore.provenance import (
    fingerprint, fingerprint_matches, is_random_weights, runtime_info, weights_identity,
)
from featurestore.store._backend import COMPRESSORS, join
from featurestore.store.clips import check_id_sequence
from featurestore.store.layout import default_chunk_clips, default_inner_clips, validate_name
from featurestore.store.row_group import FEATURE_SETS, RowGroup

if TYPE_CHECKING:
    from featurestore.store.store import FeatureStore

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


def feature_info(group: RowGroup) -> FeatureInfo:
    """The ``FeatureInfo`` of a feature set's row group, its counts read anew on every call.

    The counts come from the done flags as stored now (never a count kept beside them, which a
    writer killed between the two would leave stale): one byte a clip, read from the local chunk
    files without zarr (~10-25 ms at a million clips, docs/benchmarks.md). Error texts are read only
    in chunks holding rows not done (a failed row is never done), so for a finished set not at all.
    """
    attrs = group.attrs
    done = group.done_mask(refresh=True)
    n_done = int(done.sum())
    n_errors = len(group.failed_rows(done)) if n_done < len(done) else 0
    return FeatureInfo(group.name, group.shape, group.dtype, group.chunk_rows, attrs.get("provenance", {}),
                       attrs.get("fingerprint", ""), n_done, n_errors)


def create_feature_set(store: FeatureStore, name: str, n_segments: int, feature_shape: Sequence[int],
                       provenance: dict, dtype: str = "float16", chunk_clips: int | None = None,
                       overwrite: bool = False, compressor: str | None = None) -> FeatureInfo:
    """See ``FeatureStore.create_feature_set``."""
    store.arrays.require_writable()
    validate_name("feature set", name)
    if compressor not in COMPRESSORS:
        raise ValueError(f"feature set {name!r}: unknown compressor {compressor!r}; use one of "
                         f"{', '.join(str(c) for c in COMPRESSORS)}")
    dtype = _feature_dtype(name, dtype)
    if check_feature_set(store, name, n_segments, feature_shape, provenance, overwrite):
        return store.feature_info(name)
    group = store._group(FEATURE_SETS, name)
    if group.exists():  # overwritten, or a creation that never finished
        group.delete()
    shape = (store.n_clips, int(n_segments)) + tuple(int(s) for s in feature_shape)
    rows = int(chunk_clips or default_chunk_clips(n_segments, feature_shape, dtype, store.n_clips))
    inner = default_inner_clips(n_segments, feature_shape, dtype, rows)
    prov = dict(provenance)
    prov.setdefault("runtime", runtime_info())
    # the attributes are written last, in one update: a set without its fingerprint is an
    # unfinished creation, which check_feature_set replaces
    group.create(shape, str(np.dtype(dtype)), rows, compressor=compressor, inner_rows=inner, attrs={
        "provenance": prov, "fingerprint": fingerprint(provenance), "n_segments": int(n_segments),
        "feature_shape": list(shape[2:]), "chunk_clips": rows, "compressor": COMPRESSORS[compressor]})
    return feature_info(group)


def _feature_dtype(name: str, dtype: Any) -> str:
    """``dtype`` as a numpy name when it is a real number type (bool, integers, floats): features are
    checked for finite values, searched and trained on as such; complex numbers, text and objects are
    refused in one line, before anything is created."""
    try:
        kind = np.dtype(dtype).kind
    except TypeError as err:
        raise ValueError(f"feature set {name!r}: {dtype!r} is not a numpy dtype ({err})") from None
    if kind not in "biuf":
        raise ValueError(f"feature set {name!r}: dtype {np.dtype(dtype)} is not a real number type; "
                         f"features are stored as bool, integers or floats (float16 by default)")
    return str(np.dtype(dtype))


def check_feature_set(store: FeatureStore, name: str, n_segments: int, feature_shape: Sequence[int],
                      provenance: dict, overwrite: bool = False) -> bool:
    """See ``FeatureStore.check_feature_set``."""
    arrays = store.arrays
    path = join("features", name)
    if not arrays.exists(join(path, "data")):
        if arrays.exists(path) and arrays.children(path) and not overwrite:
            raise ValueError(f"{name!r} is a group of other feature sets "
                             f"({', '.join(arrays.children(path))}); choose another name")
        return False
    old = arrays.attrs(path)
    if overwrite or not _FEATURE_ATTRS <= set(old):  # an unfinished creation: replace it
        return False
    if not fingerprint_matches(old["fingerprint"], provenance):
        raise FingerprintMismatchError(name, strip_runtime(old.get("provenance", {})),
                                       strip_runtime(provenance))
    stored = tuple(arrays.shape(join(path, "data"))[1:])
    wanted = (int(n_segments), *(int(s) for s in feature_shape))
    if stored != wanted:
        raise FingerprintMismatchError(
            name, {**strip_runtime(old.get("provenance", {})), "shape": list(stored)},
            {**strip_runtime(provenance), "shape": list(wanted)})
    return True


def set_errors(store: FeatureStore, name: str, errors: dict[int | str, str]) -> None:
    """See ``FeatureStore.set_errors``."""
    store.arrays.require_writable()
    group = store.row_group(FEATURE_SETS, name)
    group.set_errors({_row_number(store, key): message for key, message in errors.items()})


def clear_errors(store: FeatureStore, name: str, rows: Iterable[int | str]) -> None:
    """See ``FeatureStore.clear_errors``."""
    check_id_sequence("clear_errors", rows)
    store.arrays.require_writable()
    group = store.row_group(FEATURE_SETS, name)
    for key in rows:
        group.write_errors(_row_number(store, key), np.array([""], dtype=object))


def errors(store: FeatureStore, name: str) -> dict[str, str]:
    """See ``FeatureStore.errors``."""
    failed = store.row_group(FEATURE_SETS, name).failed_rows()
    return dict(zip(store.index.ids_at(list(failed)), failed.values()))


def _row_number(store: FeatureStore, key: int | str) -> int:
    return store.row(key) if isinstance(key, str) else int(key)


def strip_runtime(provenance: dict) -> dict:
    """Provenance without its ``runtime`` (versions, host): what a fingerprint mismatch compares."""
    return {k: v for k, v in provenance.items() if k != "runtime"}
