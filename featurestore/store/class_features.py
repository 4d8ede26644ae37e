"""Class features: per-class vectors (e.g. text embeddings of class prompts) with their provenance.

``FeatureStore.write_class_features``, ``has_class_features``, ``class_feature_sets`` and
``get_class_features`` delegate here. One array per set, ``class_features/<name>/data``, first axis
the store's classes, with the fingerprint rule of feature sets.

A write marks the group ``writing`` before it touches the values and clears the mark in the one
attribute update that records the new provenance and fingerprint. A writer killed in between (or
stopped by a full disk) leaves a set that is *unfinished*: not listed, refused by reads in one line,
and written again by the next write. Without the mark, an overwrite killed after its values leaves
the new (or, right after the array was made, zero) values under the old fingerprint, which the next
extraction of the old configuration accepted as "unchanged" and a zero-shot head then used.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from featurestore.checks import non_finite_rows
from featurestore.errors import FingerprintMismatchError, UnknownFeatureError
from featurestore.provenance import fingerprint, fingerprint_matches, runtime_info
from featurestore.store._backend import join
from featurestore.store.clips import require_classes
from featurestore.store.feature_sets import strip_runtime
from featurestore.store.layout import validate_name

if TYPE_CHECKING:
    from featurestore.store.store import FeatureStore

#: Attribute set while a class-feature set is written (see the module docstring).
WRITING = "writing"


def write_class_features(store: FeatureStore, name: str, data: np.ndarray, provenance: dict,
                         prompts: Sequence[str] | None = None, overwrite: bool = False) -> None:
    """See ``FeatureStore.write_class_features``."""
    arrays = store.arrays
    arrays.require_writable()
    validate_name("class feature set", name)
    require_classes(store, f"class feature set {name!r}")
    has_class_features(store, name, provenance, overwrite)
    data = np.asarray(data)
    if data.ndim < 1 or data.shape[0] != len(store.classes):
        raise ValueError(f"class features {name!r}: first axis must be the {len(store.classes)} classes, "
                         f"got shape {data.shape}")
    bad = np.flatnonzero(non_finite_rows(data)) if data.dtype.kind in "fc" else []
    if len(bad):  # as write_predictions: never stored, where nothing downstream would look for them
        named = ", ".join(store.classes[int(i)] for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise ValueError(f"class features {name!r}: {len(bad)} class(es) hold NaN or infinity ({named}); "
                         f"nothing was written")
    path = join("class_features", name)
    prov = dict(provenance)
    prov.setdefault("runtime", runtime_info())
    arrays.create_group(path)
    arrays.set_attrs(path, {WRITING: True})  # before the values: the old fingerprint no longer vouches for them
    arrays.create_array(join(path, "data"), data.shape, str(data.dtype), data.shape[0], 0)
    arrays.write(join(path, "data"), 0, data)
    arrays.set_attrs(path, {"provenance": prov, "fingerprint": fingerprint(prov),
                            "prompts": list(prompts or []), "classes": store.classes, WRITING: False})


def has_class_features(store: FeatureStore, name: str, provenance: dict, overwrite: bool = False) -> bool:
    """See ``FeatureStore.has_class_features``. An unfinished set is not there: it is written again."""
    path = join("class_features", name)
    if overwrite or not store.arrays.is_array(join(path, "data")):
        return False
    old = store.arrays.attrs(path)
    if old.get(WRITING):
        return False
    if fingerprint_matches(old.get("fingerprint"), provenance):
        return True
    raise FingerprintMismatchError(name, strip_runtime(old.get("provenance", {})), strip_runtime(provenance),
                                   kind="class feature set")


def class_feature_sets(store: FeatureStore) -> list[str]:
    """Names of the class feature sets stored (finished ones: an unfinished write is not there)."""
    names = store.arrays.groups_with("class_features", "data")
    return [name for name in names if not store.arrays.attrs(join("class_features", name)).get(WRITING)]


def get_class_features(store: FeatureStore, name: str) -> tuple[np.ndarray, dict]:
    """See ``FeatureStore.get_class_features``; an unfinished set is refused, never read."""
    arrays = store.arrays
    path = join("class_features", name)
    if not arrays.is_array(join(path, "data")):
        raise UnknownFeatureError("class feature set", name, class_feature_sets(store))
    attrs = arrays.attrs(path)
    if attrs.get(WRITING):
        raise _unfinished(store, name)
    data = arrays.read(join(path, "data"), 0, arrays.shape(join(path, "data"))[0])
    return data, attrs


def _unfinished(store: FeatureStore, name: str) -> UnknownFeatureError:
    """The error for a set whose write never finished: not there (a KeyError, like an unknown set),
    with a message that says why and how to get it back."""
    err = UnknownFeatureError("class feature set", name, class_feature_sets(store))
    err.args = (f"{store.location}: class feature set {name!r} is unfinished: its writer stopped (killed, or "
                f"the disk was full) before recording what made its values; write it again (featurestore "
                f"extract with its cliptext encoder)",)
    return err
