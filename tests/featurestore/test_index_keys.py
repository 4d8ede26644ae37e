"""The id lookup's key: new stores hash ids with XXH3-128; stores whose lookup was written with the key
before it (BLAKE2b-128) still resolve ids through it, append to it and verify, without decoding ids.

Also the manifest's columns as an append writes them (labels, relative media paths, splits), which
are built without a Python call per clip.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import pytest

from featurestore import ClipRecord, Manifest, create_store, open_store
from featurestore.store import index
from featurestore.store.index import LOOKUP_ATTR


def clips(first: int, n: int) -> list[ClipRecord]:
    return [ClipRecord(f"k{i}", label="a" if i % 2 else None, city=f"c{i % 3}",
                       splits=frozenset({"train"} if i % 3 else {"test", "extra"})) for i in range(first, first + n)]


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
def test_a_store_whose_lookup_has_the_old_key_reads_appends_and_verifies(tmp_path, monkeypatch, backend):
    path = tmp_path / f"old.{'zarr' if backend == 'zarr' else 'h5'}"
    with monkeypatch.context() as m:
        m.setattr(index, "LOOKUP_KEY", "blake2b-128")  # as stores were written before xxh3
        create_store(path, Manifest("keys", ["a", "b"], clips(0, 300)), backend=backend).close()
    with open_store(path, "a") as store:
        assert store.attrs[LOOKUP_ATTR]["key"] == "blake2b-128"
        assert store.rows(["k299", "k0"]).tolist() == [299, 0]
        assert store.index._ids is None  # resolved through the lookup, no id decoded
        store.append_clips(Manifest("keys", ["a", "b"], clips(300, 50)))  # keeps the store's key
    with open_store(path) as store:
        assert store.attrs[LOOKUP_ATTR]["key"] == "blake2b-128"
        assert store.rows(["k349", "k7", "k300"]).tolist() == [349, 7, 300]
        assert store.index.find(["k350"]).tolist() == [-1]
        assert store.index.lookup_problem() is None
        assert store.verify().ok


def test_a_new_store_keys_its_ids_with_xxh3_and_its_columns_match_the_manifest(tmp_path):
    root = tmp_path / "media"
    records = [ClipRecord("x0", label="b", audio=root / "a" / "x0.wav", video=Path("/elsewhere/x0.mp4"),
                          splits=frozenset({"s1", "s2"})),
               ClipRecord("x1", label=None, city="c", location="c-1", splits=frozenset({"s2"})),
               ClipRecord("x2", label="a")]
    with create_store(tmp_path / "new.zarr", Manifest("keys", ["a", "b"], records, root=root)) as store:
        assert store.attrs[LOOKUP_ATTR]["key"] == "xxh3-128"
        assert store.rows(["x2", "x0", "x1"]).tolist() == [2, 0, 1]
        assert store.column("label").tolist() == [1, -1, 0]
        assert store.column("audio_path").tolist() == ["a/x0.wav", "", ""]
        assert store.column("video_path").tolist() == ["/elsewhere/x0.mp4", "", ""]
        assert store.column("city").tolist() == ["", "c", ""]
        assert store.column("split/s1").tolist() == [True, False, False]
        assert store.column("split/s2").tolist() == [True, True, False]
        assert store.select(split="s2") == ["x0", "x1"]
        assert store.verify().ok


def test_an_unknown_label_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "s.zarr"
    create_store(path, Manifest("keys", ["a"], [ClipRecord("y0", label="a")])).close()
    with open_store(path, "a") as store:
        with pytest.raises(ValueError, match="label 'zz' is not one of the classes"):
            store.append_clips(Manifest("keys", ["a"], [ClipRecord("y1", label="zz")]))
        assert store.n_clips == 1 and store.arrays.shape("index/clip_id") == (1,)
        assert store.column("label").tolist() == [0]


def test_empty_texts_are_encoded_as_zarr_encodes_them():
    import numcodecs

    from featurestore.store._chunk_files import vlen_utf8

    for texts in ([""] * 7, ["", "é", ""], []):
        block = np.array(texts, dtype=object)
        assert vlen_utf8(block) == bytes(numcodecs.VLenUTF8().encode(block))


@pytest.mark.parametrize("values", [["city0", "city1", "Zürich"], [f"id{i}" for i in range(5000)], ["só"]])
def test_repeated_and_unique_texts_are_encoded_as_zarr_encodes_them(values):
    """A chunk whose first texts repeat is encoded value by value through a table; any other through
    numcodecs: both as zarr's vlen-utf8 codec, whatever texts follow the ones looked at."""
    import numcodecs

    from featurestore.store._chunk_files import vlen_utf8

    rng = np.random.default_rng(len(values))
    block = np.array([values[i] for i in rng.integers(0, len(values), 3000)] + ["a new text, late", "ü"], dtype=object)
    assert vlen_utf8(block) == bytes(numcodecs.VLenUTF8().encode(block))


def test_a_non_text_after_repeated_texts_is_refused_as_numcodecs_refuses_it():
    from featurestore.store._chunk_files import vlen_utf8

    block = np.array(["x", "y"] * 600 + [3], dtype=object)
    with pytest.raises(TypeError, match="int"):
        vlen_utf8(block)


def test_one_text_repeated_by_a_zero_stride_view_is_encoded_as_the_whole_column():
    import numcodecs

    from featurestore.store._chunk_files import vlen_utf8

    for text in ("", "audio/x.wav", "é"):
        view = np.broadcast_to(np.array(text, dtype=object), (1000,))
        assert vlen_utf8(view) == bytes(numcodecs.VLenUTF8().encode(np.full(1000, text, dtype=object)))
