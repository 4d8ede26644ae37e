"""A store held open while another writer replaces a feature set: after ``refresh`` the reader
reads the set as it is now, whatever its new shape, dtype or chunking (its arrays' metadata is
read anew), never the new files through the old metadata (a false "damaged", or bytes read as
the wrong shape)."""
from __future__ import annotations

import numpy as np
import pytest

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store
from featurestore.store import open_store
from featurestore.errors import UnknownFeatureError

PROVENANCE = {"encoder": "test/hostile", "config": {}, "weights": {"kind": "random", "seed": 0},
              "segments": {"frames": 1}}
OTHER = dict(PROVENANCE, weights={"kind": "random", "seed": 1})
N = 200


@pytest.fixture
def store_path(tmp_path):
    ids = [f"{TAU_CLASSES[i % 10]}-city0-{i}-a" for i in range(N)]
    manifest = Manifest("hostile", list(TAU_CLASSES),
                        [ClipRecord(c, label=TAU_CLASSES[i % 10]) for i, c in enumerate(ids)])
    values = np.random.default_rng(0).standard_normal((N, 1, 64)).astype(np.float16)
    with create_store(tmp_path / "s.zarr", manifest) as store:
        store.create_feature_set("e", 1, (64,), PROVENANCE, chunk_clips=100)
        store.write_rows("e", 0, values)
    return tmp_path / "s.zarr", ids, values


@pytest.mark.parametrize("shape, dtype, chunk", [((2, 32), "float16", 100), ((1, 32), "float32", 50)])
def test_a_set_created_again_by_another_writer_is_read_as_it_is_after_refresh(store_path, shape, dtype, chunk):
    path, ids, values = store_path
    new = np.random.default_rng(1).standard_normal((N, *shape)).astype(dtype)
    with open_store(path) as reader:
        np.testing.assert_array_equal(reader.get_many("e", ids[::7]), values[::7])
        with open_store(path, "a") as writer:
            writer.create_feature_set("e", shape[0], shape[1:], OTHER, dtype=dtype, chunk_clips=chunk, overwrite=True)
            writer.write_rows("e", 0, new)
        reader.refresh()
        np.testing.assert_array_equal(reader.get_many("e", ids[::7]), new[::7])
        np.testing.assert_array_equal(reader.get("e", ids[3]), new[3])
        np.testing.assert_array_equal(reader.read_rows("e", 0, N), new)


def test_a_set_deleted_by_another_writer_is_unknown_after_refresh(store_path):
    path, ids, _ = store_path
    with open_store(path) as reader:
        reader.get("e", ids[0])
        with open_store(path, "a") as writer:
            writer.delete_feature_set("e")
        reader.refresh()
        with pytest.raises(UnknownFeatureError, match="no feature set named 'e'"):
            reader.get_many("e", ids[:5])


def test_clips_another_writer_appended_are_read_after_refresh(store_path):
    path, ids, values = store_path
    more = np.random.default_rng(2).standard_normal((N, 1, 64)).astype(np.float16)
    new_ids = [f"new-{i}" for i in range(N)]
    with open_store(path) as reader:
        reader.get_many("e", ids[:3])
        with open_store(path, "a") as writer:
            writer.append_clips(Manifest("hostile", list(TAU_CLASSES),
                                         [ClipRecord(c, label=TAU_CLASSES[0]) for c in new_ids]))
            writer.write_rows("e", N, more)
        reader.refresh()
        assert reader.n_clips == 2 * N
        np.testing.assert_array_equal(reader.get_many("e", [new_ids[5], ids[7]]), [more[5], values[7]])
        np.testing.assert_array_equal(reader.read_rows("e", N - 2, N + 2), np.concatenate([values[-2:], more[:2]]))


def test_rows_outside_the_store_are_refused_in_one_line(store_path):
    with open_store(store_path[0]) as store:
        for start, stop in ((-5, 3), (5, 2), (N - 2, N + 1)):
            with pytest.raises(ValueError, match=rf"rows {start}:{stop} are outside"):
                store.read_rows("e", start, stop)
