"""featurestore: read datasets, decode, encode once, and query features by clip id."""
from featurestore.clip_table import ClipRecord
from featurestore.errors import (
    CorruptChunkError, FeatureStoreError, FingerprintMismatchError, MissingChunkError, MissingFeatureError,
    ReadOnlyStoreError, StoreChangedError, StoreFormatError, UnknownClipError, UnknownFeatureError, UnknownValueError,
)
from featurestore.manifest import TAU_CLASSES, Manifest
from featurestore.store import FeatureInfo, FeatureStore, VerifyReport, convert_store, create_store, open_store
from featurestore.viewer import view  # the browser viewer (featurestore.view(store); the web stack loads on start)

__all__ = [
    "TAU_CLASSES", "ClipRecord", "CorruptChunkError", "FeatureInfo", "FeatureStore", "FeatureStoreError",
    "FingerprintMismatchError", "Manifest", "MissingChunkError", "MissingFeatureError", "ReadOnlyStoreError",
    "StoreChangedError", "StoreFormatError", "UnknownClipError", "UnknownFeatureError", "UnknownValueError", "VerifyReport", "convert_store", "create_store", "open_store",
    "view",
]
