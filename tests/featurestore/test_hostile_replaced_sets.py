"""A reader that never calls ``refresh()`` while another writer deletes a feature set and creates it
again (``--overwrite``): it reads the set as it is now, never the new files through the old
metadata. Before, bytes of a float32 set were read as the float16 set they replaced (every checksum
passes: NaN and 1e4 where the values were ~1), even for clips that were done all along."""
from __future__ import annotations

import numpy as np
import pytest

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store
from featurestore.errors import MissingFeatureError, StoreChangedError, UnknownFeatureError
from featurestore.store import open_store

PROVENANCE = {"encoder": "test/replaced", "config": {}, "weights": {"kind": "random", "seed": 0},
              "segments": {"frames": 1}}
OTHER = dict(PROVENANCE, weights={"kind": "random", "seed": 1})
N = 200
IDS = [f"{TAU_CLASSES[i % 10]}-city0-{i}-a" for i in range(N)]
OLD = np.random.default_rng(0).standard_normal((N, 1, 64)).astype(np.float16)

# (n_segments, feature shape, dtype, chunk clips, compressor) of the set created again
REPLACEMENTS = {
    "same bytes per clip, another dtype": (1, (32,), "float32", 100, None),
    "another chunking": (2, (16,), "float16", 40, None),
    "zstd-compressed (read without maps)": (1, (32,), "float32", 100, "zstd"),
    "the same layout, other values": (1, (64,), "float16", 100, None),
}


def _new_values(segments: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((N, segments, *shape)).astype(dtype)


def _store(path, done: int):
    """A store whose set ``e`` (shards of 100 clips) has its first ``done`` clips done."""
    manifest = Manifest("replaced", list(TAU_CLASSES),
                        [ClipRecord(c, label=TAU_CLASSES[i % 10]) for i, c in enumerate(IDS)])
    with create_store(path, manifest) as writer:
        writer.create_feature_set("e", 1, (64,), PROVENANCE, chunk_clips=100)
        writer.write_rows("e", 0, OLD[:done])
    return path


@pytest.fixture
def store(tmp_path):
    """The first 100 clips done (the rest not yet extracted)."""
    return _store(tmp_path / "s.zarr", 100)


@pytest.fixture
def full_store(tmp_path):
    """Every clip done: a reader that reads clips 0-4 has shard 0 mapped, shard 1 (clips 100-199) not."""
    return _store(tmp_path / "s.zarr", N)


def _replace(path, replacement) -> np.ndarray:
    """Another writer deletes ``e`` and creates it again, writing every clip; the new values."""
    segments, shape, dtype, chunk, compressor = replacement
    new = _new_values(segments, shape, dtype)
    with open_store(path, "a") as writer:
        writer.delete_feature_set("e")
        writer.create_feature_set("e", segments, shape, OTHER, dtype=dtype, chunk_clips=chunk,
                                  compressor=compressor)
        writer.write_rows("e", 0, new)
    return new


@pytest.mark.parametrize("replacement", REPLACEMENTS.values(), ids=REPLACEMENTS.keys())
def test_a_clip_finished_since_is_read_from_the_new_set_and_so_are_the_others(store, replacement):
    with open_store(store) as reader:
        np.testing.assert_array_equal(reader.get("e", IDS[3]), OLD[3])
        new = _replace(store, replacement)
        got = reader.get("e", IDS[150])  # not done when first looked: its done flags are read anew
        assert got.dtype == new.dtype
        np.testing.assert_array_equal(got, new[150])
        np.testing.assert_array_equal(reader.get("e", IDS[7]), new[7])  # done all along
        np.testing.assert_array_equal(reader.get_many("e", IDS[:5] + IDS[190:]), new[list(range(5)) + list(range(190, N))])
        np.testing.assert_array_equal(reader.read_rows("e", 0, 100), new[:100])


@pytest.mark.parametrize("replacement", REPLACEMENTS.values(), ids=REPLACEMENTS.keys())
def test_clips_done_all_along_in_shards_never_read_are_read_from_the_new_set(full_store, replacement):
    """The done mask is known and says "done": nothing re-reads it, but the clip's shard was never
    mapped, so its new file would be read through the old metadata."""
    with open_store(full_store) as reader:
        np.testing.assert_array_equal(reader.get_many("e", IDS[:5]), OLD[:5])  # the whole mask read and kept
        new = _replace(full_store, replacement)
        np.testing.assert_array_equal(reader.get("e", IDS[160]), new[160])
        np.testing.assert_array_equal(reader.get_many("e", IDS[140:145]), new[140:145])
        np.testing.assert_array_equal(reader.get("e", IDS[60]), new[60])  # shard 0 is read anew too now


def test_clips_of_shards_mapped_before_are_the_old_sets_values_until_something_is_read_anew(full_store):
    """What a reader mapped before a replacement it still serves, whole and consistent (the old
    set's values, as the decoded-chunk cache does, until ``refresh`` or a read that meets new files)."""
    with open_store(full_store) as reader:
        reader.get_many("e", IDS[:5])
        _replace(full_store, REPLACEMENTS["same bytes per clip, another dtype"])
        np.testing.assert_array_equal(reader.get("e", IDS[60]), OLD[60])
        reader.refresh()
        assert reader.get("e", IDS[60]).dtype == np.float32


def test_a_replacement_with_clips_not_done_yet_is_refused_for_them_never_zeros(full_store):
    """The new set has finished only some clips: a clip done in the old one is missing now."""
    with open_store(full_store) as reader:
        np.testing.assert_array_equal(reader.get_many("e", IDS[:5]), OLD[:5])
        with open_store(full_store, "a") as writer:
            writer.delete_feature_set("e")
            writer.create_feature_set("e", 1, (64,), OTHER, chunk_clips=100)
            writer.write_rows("e", 0, _new_values(1, (64,), "float16")[:100])
        with pytest.raises(MissingFeatureError, match="e"):
            reader.get("e", IDS[110])
        with pytest.raises(MissingFeatureError):
            reader.get_many("e", IDS[120:123])


def test_a_set_deleted_by_another_writer_is_unknown_to_a_reader_that_had_read_it(full_store):
    with open_store(full_store) as reader:
        reader.get_many("e", IDS[:5])
        with open_store(full_store, "a") as writer:
            writer.delete_feature_set("e")
        with pytest.raises(UnknownFeatureError, match="e"):
            reader.get_many("e", IDS[150:155])


def test_an_append_by_another_writer_forgets_nothing(store):
    """Appending clips rewrites each array's metadata file (its shape): the reader looks, finds the
    same data version and keeps what it holds."""
    with open_store(store) as reader:
        np.testing.assert_array_equal(reader.get_many("e", IDS[:5]), OLD[:5])
        held = reader._rows_cache
        with open_store(store, "a") as writer:
            writer.append_clips(Manifest("replaced", list(TAU_CLASSES),
                                         [ClipRecord(f"more-{i}", label=TAU_CLASSES[0]) for i in range(10)]))
        np.testing.assert_array_equal(reader.get_many("e", IDS[50:55]), OLD[50:55])
        assert held.replaced.get("features/e", 0) == 0
        assert "features/e" in held.done


def test_a_set_replaced_on_every_read_gives_up_in_one_line(full_store, monkeypatch):
    """A writer that replaces the set again during every try: three tries, then one clear error."""
    with open_store(full_store) as reader:
        reader.get_many("e", IDS[:5])
        backend = reader._arrays._backend
        versions = iter(range(10**6))
        monkeypatch.setattr(backend, "metadata_token", lambda path: ("moved", next(versions)))
        monkeypatch.setattr(backend, "read_attr", lambda path, key: f"v{next(versions)}")
        with pytest.raises(StoreChangedError, match=r"features/e: replaced by another writer on each of 3 reads"):
            reader.get_many("e", IDS[150:155])


def test_missing_clips_asked_twice_are_named_once(store):
    with open_store(store) as reader:
        with pytest.raises(MissingFeatureError) as caught:
            reader.get_many("e", [IDS[150], IDS[3], IDS[150], IDS[120], IDS[150]])
    assert caught.value.clip_ids == [IDS[150], IDS[120]]
    assert str(caught.value).count(IDS[150]) == 1
