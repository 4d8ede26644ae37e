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
