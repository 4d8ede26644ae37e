"""Clip ids that are not strings, or strings no stored id can be, given to ``get`` / ``get_many`` /
``rows``: a one-line TypeError, or UnknownClipError, on every path the lookup takes (one id, a
few, many), never the row of the clip whose id is their text (5 meaning clip "5") and never a
bare AttributeError / UnicodeEncodeError."""
from __future__ import annotations

import json

import numpy as np
import pytest

from featurestore import ClipRecord, Manifest, create_store
from featurestore.errors import UnknownClipError
from featurestore.store import open_store

PROVENANCE = {"encoder": "test/hostile", "config": {}, "weights": {"kind": "random", "seed": 0},
              "segments": {"frames": 1}}
IDS = ["7", "5", "é-c-1", "日本-x", "Ω@z"] + [f"c{i}" for i in range(95)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    manifest = Manifest("hostile", ["a"], [ClipRecord(c, label="a") for c in IDS])
    with create_store(tmp_path_factory.mktemp("ids") / "s.zarr", manifest) as store:
        store.create_feature_set("e", 1, (2,), PROVENANCE)
        store.write_rows("e", 0, np.arange(len(IDS) * 2, dtype=np.float16).reshape(-1, 1, 2))
        yield store


@pytest.mark.parametrize("bad", [5, np.int64(5), b"5", None, 5.0, ["5"]])
def test_an_id_that_is_not_a_string_is_refused_on_every_lookup_path(store, bad):
    with pytest.raises(TypeError, match="clip ids are strings, got the"):
        store.get("e", bad)
    for ids in ([bad], ["c1", bad], IDS + [bad]):  # one id, a few, more than the bulk bound
        with pytest.raises(TypeError, match="clip ids are strings, got the"):
            store.get_many("e", ids)


def test_unicode_and_numpy_ids_are_found_and_a_lone_surrogate_is_unknown(store):
    np.testing.assert_array_equal(store.rows([np.str_("日本-x"), "Ω@z", "é-c-1"]), [3, 4, 2])
    assert store.get("e", np.str_("5")).ravel().tolist() == [2, 3]
    for ids in (["\ud800"], IDS + ["c\udfff"]):
        with pytest.raises(UnknownClipError):
            store.get_many("e", ids)
    with pytest.raises(UnknownClipError):
        store.get("e", "\ud800")


def test_a_lookup_named_outside_its_place_is_not_followed(tmp_path):
    """The root attribute naming the lookup is read from the store's files: a path out of the
    store ('..') made zarr refuse every lookup by id; the ids themselves serve instead."""
    path = tmp_path / "s.zarr"
    create_store(path, Manifest("hostile", ["a"], [ClipRecord(c, label="a") for c in IDS[:10]])).close()
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["index_lookup"]["path"] = "index/../../elsewhere/index/lookup/10"
    (path / "zarr.json").write_text(json.dumps(meta))
    with open_store(path) as store:
        assert store.rows(["c3", "7"]).tolist() == [8, 0]
        assert store.row("Ω@z") == 4
