"""An extraction that finishes a chunk holding rows done earlier reads those rows once.

The pipeline reads the chunk's stored rows to keep the done ones; the row group used to read them a
second time (``_same_values``) to decide whether the data version changes. The pipeline now says
which rows it took from the store (``unchanged``), so the second read is gone, and the version and
the stored bits of the earlier rows stay what they were. Reads are counted at ``RowGroup.gather``,
through which every read of a group's values goes.
"""
from __future__ import annotations

import numpy as np
import pytest
from tests.featurestore.test_extract_support import FAST, make_dataset

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store
from featurestore.extract import extract
from featurestore.store import FEATURE_SETS, RowGroup, open_store


@pytest.fixture
def gathers(monkeypatch) -> list[tuple[str, list[int]]]:
    """Every ``RowGroup.gather`` call from now on: (group path, rows)."""
    calls: list[tuple[str, list[int]]] = []
    real = RowGroup.gather

    def counting(self, rows, check_done=True):
        calls.append((self.path, np.asarray(rows).tolist()))
        return real(self, rows, check_done=check_done)

    monkeypatch.setattr(RowGroup, "gather", counting)
    return calls


def test_a_resumed_chunk_reads_its_done_rows_once(tmp_path, gathers):
    dataset = make_dataset(tmp_path / "data", 5)
    path = tmp_path / "store.zarr"
    extract(dataset, path, "logmel", limit=3, **FAST)  # rows 0-2 done; chunk 2:4 half done
    with open_store(path) as store:
        before, version = store.read_rows("logmel", 0, 3), store.data_version("logmel")
    gathers.clear()

    summary = extract(dataset, path, "logmel", **FAST)

    assert summary.clips_done == 2
    reads = [rows for group, rows in gathers if group.endswith("logmel")]
    assert reads == [[2]]  # the pipeline reads the row done before the run once (a3bf882), nothing again
    with open_store(path) as store:
        assert store.done_mask("logmel").all()
        assert store.data_version("logmel") == version  # row 2 was written again bit for bit
        np.testing.assert_array_equal(store.read_rows("logmel", 0, 3).view(np.uint16), before.view(np.uint16))


PROVENANCE = {"encoder": "test/rows", "config": {}, "weights": {"kind": "random", "seed": 0},
              "segments": {"frames": 1}}


def _store_with_done_rows(tmp_path):
    ids = [f"{TAU_CLASSES[0]}-city0-{i}-a" for i in range(4)]
    manifest = Manifest("reads", list(TAU_CLASSES), [ClipRecord(c, label=TAU_CLASSES[0], splits=frozenset({"all"})) for c in ids])
    store = create_store(tmp_path / "rows.zarr", manifest)
    store.create_feature_set("f", 1, (4,), PROVENANCE, chunk_clips=4)
    values = np.arange(16, dtype=np.float16).reshape(4, 1, 4)
    store.write_rows("f", 0, values, done=np.array([True, True, False, False]))
    return store, store.row_group(FEATURE_SETS, "f"), values


def test_without_the_mask_done_rows_are_compared_and_a_change_bumps_the_version(tmp_path, gathers):
    store, group, values = _store_with_done_rows(tmp_path)
    done = np.array([True, True, False, False])
    with store:
        version = group.data_version()
        gathers.clear()
        group.write_rows(0, values, done, unchanged=done)
        assert gathers == [] and group.data_version() == version  # told: nothing read, nothing changed

        group.write_rows(0, values, done)
        assert [rows for _, rows in gathers] == [[0, 1]] and group.data_version() == version  # compared

        changed = values.copy()
        changed[1] += 1
        group.write_rows(0, changed, done, unchanged=np.array([True, False, False, False]))
        assert group.data_version() != version  # row 1 was not declared unchanged: compared, differs

        with pytest.raises(ValueError, match="unchanged mask has shape"):
            group.write_rows(0, values, done, unchanged=np.ones(3, dtype=bool))
