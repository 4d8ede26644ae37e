"""Appending clips refuses repeated ids, found through the id lookup's sorted keys.

An append sorts the new ids' 128-bit keys for the lookup anyway; a repeated id sits beside its twin
there, so the check costs no set of a million strings. Equal keys are confirmed on the ids
themselves: two different ids sharing a key (never seen with XXH3-128, made here with a key
function that maps every id to one value) are not a repeat, and the store then finds ids by its id
column instead of the lookup.
"""
from __future__ import annotations

import numpy as np
import pytest

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store
from featurestore.store import index, open_store


def manifest(ids: list[str]) -> Manifest:
    return Manifest("unique", list(TAU_CLASSES), [ClipRecord(c, label=TAU_CLASSES[0]) for c in ids])


def ids(n: int, offset: int = 0) -> list[str]:
    return [f"{TAU_CLASSES[0]}-city0-{i}-a" for i in range(offset, offset + n)]


def test_a_manifest_repeating_an_id_is_refused_naming_it(tmp_path):
    repeated = ids(300)
    repeated[250] = repeated[7]
    with pytest.raises(ValueError, match=f"repeated: \\['{repeated[7]}'\\]"):
        create_store(tmp_path / "s.zarr", manifest(repeated))


def test_an_append_repeating_a_stored_id_or_its_own_is_refused_and_leaves_the_store(tmp_path):
    path = tmp_path / "s.zarr"
    create_store(path, manifest(ids(100))).close()
    new = ids(50, offset=100)
    new[10] = new[20]
    with open_store(path, "a") as store, pytest.raises(ValueError) as refused:
        store.append_clips(manifest([*new, ids(1, offset=3)[0]]))
    assert f"'{new[20]}'" in str(refused.value) and f"'{ids(1, offset=3)[0]}'" in str(refused.value)
    with open_store(path) as store:
        assert store.clip_ids == ids(100)


def test_ids_sharing_a_key_are_not_a_repeat_and_are_still_found(tmp_path, monkeypatch):
    monkeypatch.setitem(index._KEYS, index.LOOKUP_KEY, lambda b: bytes(16))  # every id the same key
    path = tmp_path / "s.zarr"
    with create_store(path, manifest(ids(40))) as store:
        store.append_clips(manifest(ids(10, offset=40)))
    with open_store(path) as store:
        assert store.n_clips == 50
        np.testing.assert_array_equal(store.rows(ids(50)[::-1]), np.arange(50)[::-1])
