"""Class features: per-class vectors (e.g. text embeddings of class prompts) with their provenance.

``FeatureStore.write_class_features``, ``has_class_features``, ``class_feature_sets`` and
``get_class_features`` delegate here. One array per set, ``class_features/<name>/data``, first axis
the store's classes, with the fingerprint rule of feature sets.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from featurestore.errors import FingerprintMismatchError, UnknownFeatureError
from featurestore.provenance import fingerprint, fingerprint_matches, runtime_info
from featurestore.store._backend import join
from featurestore.store.clips import require_classes
from featurestore.store.feature_sets import strip_runtime
from featurestore.store.layout import validate_name

if TYPE_CHECKING:
    from featurestore.store.store import FeatureStore


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
    path = join("class_features", name)
    arrays.create_group(path)
    arrays.create_array(join(path, "data"), data.shape, str(data.dtype), data.shape[0], 0)
    arrays.write(join(path, "data"), 0, data)
    prov = dict(provenance)
    prov.setdefault("runtime", runtime_info())
    arrays.set_attrs(path, {"provenance": prov, "fingerprint": fingerprint(prov),
                            "prompts": list(prompts or []), "classes": store.classes})


def has_class_features(store: FeatureStore, name: str, provenance: dict, overwrite: bool = False) -> bool:
    """See ``FeatureStore.has_class_features``."""
    path = join("class_features", name)
    if overwrite or not store.arrays.is_array(join(path, "data")):
        return False
    old = store.arrays.attrs(path)
    if fingerprint_matches(old.get("fingerprint"), provenance):
        return True
    raise FingerprintMismatchError(name, strip_runtime(old.get("provenance", {})), strip_runtime(provenance),
                                   kind="class feature set")


def class_feature_sets(store: FeatureStore) -> list[str]:
    """Names of the class feature sets stored."""
    return store.arrays.groups_with("class_features", "data")


def get_class_features(store: FeatureStore, name: str) -> tuple[np.ndarray, dict]:
    """See ``FeatureStore.get_class_features``."""
    arrays = store.arrays
    path = join("class_features", name)
    if not arrays.is_array(join(path, "data")):
        raise UnknownFeatureError("class feature set", name, class_feature_sets(store))
    data = arrays.read(join(path, "data"), 0, arrays.shape(join(path, "data"))[0])
    return data, arrays.attrs(path)
