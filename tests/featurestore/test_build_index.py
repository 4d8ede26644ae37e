"""Building a store's index from a manifest: the fast paths a million-clip creation takes keep every check.

A manifest's ids are checked joined as one byte array, an append keys its ids once (the duplicate
check and the lookup share one sorted table), the lookup's keys are sorted by one value sort, cities
are checked for UTF-8 by their distinct values and splits by the clips' distinct split sets. Each
test pits the fast path against the plain rule it stands for, or shows the check still refusing.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store
from featurestore.manifest import MAX_CLIP_ID_LENGTH, all_plain_ids, clip_id_problem
from featurestore.store import index, open_store

LABEL = TAU_CLASSES[0]


def manifest(ids: list[str], **fields) -> Manifest:
    return Manifest("build", list(TAU_CLASSES), [ClipRecord(c, label=LABEL, **fields) for c in ids])


def ids(n: int, offset: int = 0) -> list[str]:
    return [f"{LABEL}-city0-{i}-a" for i in range(offset, offset + n)]


def test_the_joined_id_check_accepts_no_id_the_grammar_refuses():
    rng = random.Random(0)
    alphabet = "aZ9_.-+=@,\n /é\t"
    tricky = ["", ".a", "-a", "a..b", "a.b", "a-", "a\n", "\nb", "a\nb", "x" * MAX_CLIP_ID_LENGTH,
              "x" * (MAX_CLIP_ID_LENGTH + 1), "é", "a/b", "a b", "_", "a.-b", "a-.b", "..", "a\t"]
    tricky += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 5))) for _ in range(3000)]
    for cid in tricky:
        plain = clip_id_problem(cid) is None and cid.isascii()
        assert all_plain_ids(["ok-1", cid, "ok-2"]) == plain, repr(cid)
    assert not all_plain_ids(["ok", 5]) and not all_plain_ids([])


def test_a_manifest_still_names_the_first_wrong_id_and_accepts_unicode_ones():
    with pytest.raises(ValueError, match=r"clip 2: clip id 'a\.\.b' holds '\.\.'"):
        manifest(["a", "b", "a..b", "-c"])
    assert manifest(["Zürich-1", "東京-2"]).clip_ids == ["Zürich-1", "東京-2"]  # not ASCII: checked one by one


def test_key_order_sorts_keys_whose_high_halves_share_their_leading_bits():
    rng = np.random.default_rng(1)
    high = rng.integers(0, 2**63, 3000, dtype=np.uint64)
    high[:400] = np.uint64(2**62) + rng.integers(0, 8, 400).astype(np.uint64)  # ties in the packed prefix
    high[400:420] = high[420]  # equal high halves
    keys = np.stack([high, rng.integers(0, 2**63, 3000, dtype=np.uint64)], axis=1)
    order = index.key_order(keys)
    np.testing.assert_array_equal(keys[order], keys[np.lexsort((keys[:, 1], keys[:, 0]))])


def test_old_and_new_lookup_entries_merge_in_key_order():
    rng = np.random.default_rng(2)
    keys = rng.integers(0, 2**20, (700, 2), dtype=np.uint64)  # many equal high halves
    old = index.lookup_table(keys[:500], np.arange(500, dtype=np.uint64))
    new = index.lookup_table(keys[500:], np.arange(500, 700, dtype=np.uint64))
    merged = index._merge(old, new)
    expected = np.concatenate([old, new])
    np.testing.assert_array_equal(merged[:, :2], expected[np.lexsort((expected[:, 1], expected[:, 0])), :2])
    assert sorted(merged[:, 2].tolist()) == list(range(700))


def test_an_append_keys_each_new_id_once(tmp_path, monkeypatch):
    path = tmp_path / "s.zarr"
    create_store(path, manifest(ids(100))).close()
    keyed = []

    def counting(clip_ids, key=index.LOOKUP_KEY):
        clip_ids = list(clip_ids)
        keyed.extend(clip_ids)
        return original(clip_ids, key)

    original = index.id_keys
    monkeypatch.setattr(index, "id_keys", counting)
    with open_store(path, "a") as store:
        store.append_clips(manifest(ids(50, offset=100)))
        assert sorted(keyed) == sorted(ids(50, offset=100))  # the lookup's old entries are read, not keyed
        np.testing.assert_array_equal(store.rows(ids(150)[::7]), np.arange(150)[::7])


def test_a_repeat_among_ids_sharing_one_key_is_still_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(index._KEYS, index.LOOKUP_KEY, lambda b: bytes(16))  # every id the same key
    path = tmp_path / "s.zarr"
    create_store(path, manifest(ids(30))).close()
    with open_store(path, "a") as store, pytest.raises(ValueError, match=f"repeated: \\['{ids(1, 4)[0]}'\\]"):
        store.append_clips(manifest([*ids(5, offset=30), ids(1, offset=4)[0]]))  # a stored id, keys all equal
    with open_store(path) as store:
        assert store.n_clips == 30


@pytest.mark.parametrize("field", ["city", "location"])
def test_a_city_or_location_not_utf8_is_refused_naming_the_clip(tmp_path, field):
    clips = [ClipRecord(cid, label=LABEL, **{field: "caf\udce9" if i == 3 else "Zürich"})
             for i, cid in enumerate(ids(6))]
    with pytest.raises(ValueError, match=f"clip '{ids(6)[3]}': its {field} .* is not valid UTF-8"):
        create_store(tmp_path / "s.zarr", Manifest("build", list(TAU_CLASSES), clips))
    assert not (tmp_path / "s.zarr").exists()
    with create_store(tmp_path / "t.zarr", Manifest("build", list(TAU_CLASSES), clips[:3])) as store:
        assert store.column(field).tolist() == ["Zürich"] * 3 and store.index.distinct("city") == (
            ["Zürich"] if field == "city" else [])


def test_an_unknown_label_is_refused_before_anything_is_written(tmp_path):
    clips = [ClipRecord(c, label=LABEL) for c in ids(5)] + [ClipRecord("x-1", label="beach")]
    with pytest.raises(ValueError, match="label 'beach' is not one of the classes"):
        create_store(tmp_path / "s.zarr", Manifest("build", list(TAU_CLASSES), clips))
    assert not (tmp_path / "s.zarr").exists()


def test_split_membership_from_distinct_split_sets(tmp_path):
    first = [ClipRecord(c, label=LABEL, splits=frozenset({"a", "b"} if i % 2 else {"c"}))
             for i, c in enumerate(ids(6))]
    later = [ClipRecord(c, label=LABEL, splits={"d", "a"} if i % 3 == 0 else set())  # plain sets
             for i, c in enumerate(ids(4, offset=6))]
    path = tmp_path / "s.zarr"
    with create_store(path, Manifest("build", list(TAU_CLASSES), first)) as store:
        store.append_clips(Manifest("build", list(TAU_CLASSES), later))
        assert store.splits() == ["a", "b", "c", "d"]
        assert store.select(split="a") == [ids(6)[1], ids(6)[3], ids(6)[5], ids(4, 6)[0], ids(4, 6)[3]]
        assert store.select(split="b") == ids(6)[1::2]  # a stored split the new clips are not in
        assert store.select(split="c") == ids(6)[0::2]
        assert store.select(split="d") == [ids(4, 6)[0], ids(4, 6)[3]]  # a new split: earlier rows not in it
