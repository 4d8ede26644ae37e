"""A ``zarr.json`` that is not JSON (truncated, overwritten by a CSV) is one error naming that file;
before, every command said only ``Unterminated string starting at: line 1 column 2 (char 1)``."""
from __future__ import annotations

import numpy as np
import pytest

from featurestore import ClipRecord, Manifest, StoreFormatError, create_store, open_store
from featurestore.cli import main


@pytest.fixture()
def store_path(tmp_path):
    path = tmp_path / "s.zarr"
    clips = [ClipRecord(f"c{i}", label="a", splits=frozenset({"train"})) for i in range(3)]
    with create_store(path, Manifest("toy", ["a"], clips)) as store:
        store.create_feature_set("emb", 1, (2,), {"encoder": "x"}, dtype="float32")
        store.write_rows("emb", 0, np.ones((3, 1, 2), dtype=np.float32))
    return path


@pytest.mark.parametrize("damaged", ["zarr.json", "features/emb/data/zarr.json"])
def test_a_damaged_metadata_file_is_named(store_path, damaged, capsys):
    (store_path / damaged).write_text('{"zarr_form')
    with pytest.raises(StoreFormatError, match="is not valid JSON") as caught:
        with open_store(store_path) as store:
            store.get("emb", "c0")
    assert str(store_path / damaged) in str(caught.value)
    assert main(["show", str(store_path), "c0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(store_path / damaged) in err


WRONG_SHAPES = {
    "a JSON list": ("[]", "holds a JSON list, not an object"),
    "an array without its fields": ('{"zarr_format": 3, "node_type": "array"}', "not a valid Zarr v3 array"),
    "attributes that are not an object": ('{"zarr_format": 3, "node_type": "group", "attributes": 5}',
                                          "not a valid Zarr v3 group"),
}


@pytest.mark.parametrize("damaged, kind", [
    ("zarr.json", "a JSON list"), ("index/zarr.json", "an array without its fields"),
    ("features/emb/zarr.json", "attributes that are not an object"),
    ("features/emb/data/zarr.json", "an array without its fields")])
def test_a_metadata_file_of_the_wrong_shape_is_named_by_every_command(store_path, damaged, kind, capsys):
    """JSON that zarr cannot take as metadata surfaced as a TypeError traceback, zarr's "required key
    missing", "not a feature store", or (a feature set's array) a set that vanished from ``ls``."""
    text, wrong = WRONG_SHAPES[kind]
    (store_path / damaged).write_text(text)
    with pytest.raises(StoreFormatError, match=wrong) as caught:
        with open_store(store_path) as store:
            store.feature_sets()
            store.get("emb", "c0")
    assert str(caught.value).startswith(str(store_path / damaged))
    for command in (["ls", str(store_path)], ["show", str(store_path), "c0"]):
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(store_path / damaged) in err and wrong in err
