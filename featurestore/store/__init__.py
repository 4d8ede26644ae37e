"""The feature store: Zarr v3 (default) or HDF5 files keyed by clip id and segment."""
from featurestore.store.convert import convert_store
from featurestore.store.store import FeatureInfo, FeatureStore, create_store, open_store
from featurestore.store.verify import Problem, VerifyReport

__all__ = ["FeatureInfo", "FeatureStore", "Problem", "VerifyReport", "convert_store", "create_store", "open_store"]
