"""Refusals found by the hostile review of the store's scale paths that it left to the lead.

Each was either a bare traceback from deep inside numpy/zarr or a silent state: a feature set of
text or complex numbers (which the finite checks, search and training cannot take), a bad
``cache_bytes``, an empty store left behind by a refused ``create_store``, and a feature set whose
value array's metadata was deleted, which ``verify`` passed as if the set had never existed.
"""
from __future__ import annotations

import numpy as np
import pytest

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store
from featurestore.store import open_store
from tests.featurestore.chunk_paths import chunk_files

PROVENANCE = {"encoder": "test/refusals", "config": {}, "weights": {"kind": "random", "seed": 0},
              "segments": {"frames": 1}}


def manifest(n: int = 6) -> Manifest:
    return Manifest("refusals", list(TAU_CLASSES),
                    [ClipRecord(f"{TAU_CLASSES[0]}-city0-{i}-a", label=TAU_CLASSES[0]) for i in range(n)])


@pytest.mark.parametrize("dtype", ["complex64", "U8", "object", "not-a-dtype"])
def test_a_feature_set_of_other_than_real_numbers_is_refused_before_it_exists(tmp_path, dtype):
    with create_store(tmp_path / "s.zarr", manifest()) as store:
        with pytest.raises(ValueError, match="feature set 'e': .*(real number|not a numpy dtype)"):
            store.create_feature_set("e", 1, (4,), PROVENANCE, dtype=dtype)
        assert store.feature_sets() == {}


@pytest.mark.parametrize("cache_bytes", [None, -1, 1.5, "64MB", True])
def test_cache_bytes_must_be_a_byte_count(tmp_path, cache_bytes):
    create_store(tmp_path / "s.zarr", manifest()).close()
    with pytest.raises(ValueError, match=f"cache_bytes must be a number of bytes >= 0.*{cache_bytes!r}"):
        open_store(tmp_path / "s.zarr", cache_bytes=cache_bytes)


@pytest.mark.parametrize("name", ["s.zarr", "s.h5"])
def test_a_refused_create_store_leaves_no_store_behind(tmp_path, name):
    bad = manifest()
    bad.clips[3] = bad.clips[1]  # a repeated id
    with pytest.raises(ValueError, match="repeated"):
        create_store(tmp_path / name, bad)
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("chunks_too", [False, True])
def test_a_feature_set_whose_values_are_gone_is_a_verify_problem(tmp_path, chunks_too):
    path = tmp_path / "s.zarr"
    with create_store(path, manifest()) as store:
        store.create_feature_set("emb", 1, (4,), PROVENANCE)
        store.write_rows("emb", 0, np.ones((6, 1, 4), dtype=np.float16))
    data = path / "features" / "emb" / "data"
    chunks = chunk_files(path, "features/emb/data")  # found from its zarr.json, before that goes
    (data / "zarr.json").unlink()
    if chunks_too:
        assert chunks
        for chunk in chunks:
            chunk.unlink()
        assert not [p for p in data.rglob("*") if p.is_file()]  # nothing of the array is left
    with open_store(path) as store:
        assert "emb" not in store.feature_sets()
        report = store.verify()
    assert not report.ok
    assert any("'emb' has its done flags but no data array" in p.what for p in report.problems)
