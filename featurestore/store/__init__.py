"""The feature store: Zarr v3 (default) or HDF5 files keyed by clip id and segment."""
from featurestore.store._backend import backend_for
from featurestore.store._remote import RemoteStoreError
from featurestore.store.arrays import StoreArrays
from featurestore.store.convert import convert_store
from featurestore.store.row_group import FEATURE_SETS, PREDICTION_RUNS, RowGroup, RowGroupKind
from featurestore.store.shared import StoreWithPredictions, open_prediction_store, open_with_predictions
from featurestore.store.feature_sets import FeatureInfo
from featurestore.store.store import FeatureStore, create_store, open_store
from featurestore.store.verify import Problem, VerifyReport

__all__ = ["FEATURE_SETS", "PREDICTION_RUNS", "FeatureInfo", "FeatureStore", "Problem", "RemoteStoreError", "RowGroup",
           "RowGroupKind", "StoreArrays", "StoreWithPredictions", "VerifyReport", "backend_for", "convert_store",
           "create_store", "open_prediction_store", "open_store", "open_with_predictions"]
