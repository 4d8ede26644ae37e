"""A closed HDF5 store says it is closed: h5py answers a closed file's lookups as absent, so every
read said "no feature set named 'e'; the store has: (none)", as if the data were gone."""
from __future__ import annotations

import numpy as np
import pytest

from featurestore import ClipRecord, Manifest, create_store
from featurestore.store import open_store

PROVENANCE = {"encoder": "test/hostile", "config": {}, "weights": {"kind": "random", "seed": 0},
              "segments": {"frames": 1}}


def test_reads_of_a_closed_hdf5_store_say_it_is_closed(tmp_path):
    path = tmp_path / "s.h5"
    with create_store(path, Manifest("closed", ["a"], [ClipRecord(f"k{i}", label="a") for i in range(8)])) as store:
        store.create_feature_set("e", 1, (2,), PROVENANCE)
        store.write_rows("e", 0, np.ones((8, 1, 2)))
    store = open_store(path)
    store.get("e", "k1")
    store.close()
    for read in (lambda: store.get("e", "k2"), lambda: store.get_many("e", ["k1", "k3"]), store.feature_sets):
        with pytest.raises(ValueError, match=r"s\.h5: the store is closed"):
            read()
    store.close()  # twice: nothing to do
