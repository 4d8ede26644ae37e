"""A prediction store's index is checked against the shared store's by the digests of their ids.

Opening a prediction store compared both stores' id lists on every open (decoding every id twice:
seconds at a million clips). Now each store's id lookup carries a digest of its ids in row order:
an open with equal digests decodes no id column, and a store whose ids differ (other ids, or the
same ids in another order, with the same count) is still refused in one line. A store whose lookup
predates the digests is compared by its ids, as before.
"""
from __future__ import annotations

import pytest

from featurestore import ClipRecord, Manifest, create_store, open_store
from featurestore.store import index as index_module
from featurestore.store.shared import open_prediction_store

CLASSES = ["a", "b"]


def _store(path, ids: list[str]) -> str:
    clips = [ClipRecord(c, label=CLASSES[i % 2], splits=frozenset({"val"})) for i, c in enumerate(ids)]
    create_store(path, Manifest("toy", CLASSES, clips)).close()
    return str(path)


def _count_id_decodes(monkeypatch) -> list[int]:
    """Each decode of a store's whole id column (``ClipIndex.clip_ids`` building its list)."""
    decoded: list[int] = []
    real = index_module.ClipIndex.clip_ids.fget

    def clip_ids(self):
        if self._ids is None:
            decoded.append(self.n_clips)
        return real(self)

    monkeypatch.setattr(index_module.ClipIndex, "clip_ids", property(clip_ids))
    return decoded


def test_an_open_with_equal_digests_decodes_no_ids(tmp_path, monkeypatch):
    ids = [f"c{i:04d}" for i in range(60)]
    shared = _store(tmp_path / "shared.zarr", ids)
    with open_store(shared, "r") as store:
        open_prediction_store(tmp_path / "mine.zarr", store, mode="a").close()  # copies the index
    decoded = _count_id_decodes(monkeypatch)
    with open_store(shared, "r") as store:
        with open_prediction_store(tmp_path / "mine.zarr", store, mode="r") as mine:
            assert mine.n_clips == 60 and mine.index.ids_digest() == store.index.ids_digest()
        open_prediction_store(tmp_path / "mine.zarr", store, mode="a").close()
    assert decoded == []


@pytest.mark.parametrize("other, what", [
    ([f"d{i:04d}" for i in range(60)], "60 clip ids against 60 (e.g. c0000, c0001, c0002 only in one of them)"),
    ([f"c{i:04d}" for i in reversed(range(60))], "the same clip ids in another order"),
])
def test_a_prediction_store_of_other_ids_with_the_same_count_is_refused_in_one_line(tmp_path, other, what):
    shared = _store(tmp_path / "shared.zarr", [f"c{i:04d}" for i in range(60)])
    mine = _store(tmp_path / "mine.zarr", other)
    with open_store(shared, "r") as store:
        with pytest.raises(ValueError) as err:
            open_prediction_store(mine, store, mode="r")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"prediction store {mine} does not hold the index of {shared}: ")
    assert what in message


def test_a_store_without_digests_is_compared_by_its_ids(tmp_path, monkeypatch):
    """A lookup written before the digests: the ids are decoded and compared, as before."""
    ids = [f"c{i:04d}" for i in range(50)]
    shared = _store(tmp_path / "shared.zarr", ids)
    with open_store(shared, "a") as store:
        meta = dict(store.attrs[index_module.LOOKUP_ATTR])
        del meta["digest"]
        store.arrays.set_attrs("", {index_module.LOOKUP_ATTR: meta})
    with open_store(shared, "r") as store:
        assert store.index.ids_digest() is None
        open_prediction_store(tmp_path / "mine.zarr", store, mode="a").close()
    decoded = _count_id_decodes(monkeypatch)
    with open_store(shared, "r") as store:
        open_prediction_store(tmp_path / "mine.zarr", store, mode="r").close()
    assert decoded == [50, 50]
    other = _store(tmp_path / "other.zarr", ids[::-1])
    with open_store(shared, "r") as store, pytest.raises(ValueError, match="the same clip ids in another order"):
        open_prediction_store(other, store, mode="r")


def test_a_digest_of_the_older_kind_is_compared_by_ids_and_both_kinds_are_named(tmp_path, monkeypatch):
    """Lookups written before XXH3 digests carry a bare BLAKE2b hex digest of the table: such a store
    and a new one never compare equal by digest (the new one's is prefixed with its kind), so their
    ids are decoded and compared, and equal ids still match."""
    import hashlib

    import numpy as np

    ids = [f"c{i:04d}" for i in range(40)]
    shared = _store(tmp_path / "shared.zarr", ids)
    with open_store(shared, "a") as store:
        meta = dict(store.attrs[index_module.LOOKUP_ATTR])
        assert meta["digest"].startswith("xxh3-128:") and len(meta["digest"]) == len("xxh3-128:") + 32
        table = store.arrays.read(meta["path"] + "/table", 0, 40)
        meta["digest"] = hashlib.blake2b(np.ascontiguousarray(table), digest_size=16).hexdigest()
        store.arrays.set_attrs("", {index_module.LOOKUP_ATTR: meta})
    mine = _store(tmp_path / "mine.zarr", ids)
    decoded = _count_id_decodes(monkeypatch)
    with open_store(shared, "r") as store, open_store(mine, "r") as new:
        assert store.index.ids_digest() != new.index.ids_digest()
        open_prediction_store(mine, store, mode="r").close()
    assert decoded == [40, 40]
