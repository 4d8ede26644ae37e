"""Exports and converted stores, read back with the target format's own library (pyarrow, pandas,
h5py, zarr, datasets), hold exactly the store's committed data: each clip's id beside its own values,
labels as class names in the store's order, splits, cities, done/failed clips never exported as
values, dtypes and shapes as stored; a Zarr -> HDF5 -> Zarr conversion keeps every array and
attribute. A split named like an index column (``clip_id``, ``label``, ``city``) is refused (before:
its True/False replaced the clip ids or the labels of every table export without a word)."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import zarr

import featurestore.manifest as manifest_module
from featurestore import ClipRecord, Manifest, convert_store, create_store, open_store
from featurestore.errors import MissingFeatureError
from featurestore.store.export import index_columns, manifest_records, write_parquet

pq = pytest.importorskip("pyarrow.parquet")

CLASSES = ["bus", "çà", "park,\"x\""]
IDS = ["c0", "é,1", "cé2", "x=3", "ü4", "c5", "c6"]
EMB = np.arange(7 * 2 * 3, dtype=np.float16).reshape(7, 2, 3) / 8
FRAMES = (np.arange(7 * 4, dtype=np.uint8) * 9).reshape(7, 1, 2, 2)


def _clips() -> list[ClipRecord]:
    return [ClipRecord(cid, label=CLASSES[(i * 2) % 3] if i != 3 else None, city=["Zürich,\"q\"", "lyon"][i % 2],
                       location=f"l\t{i}", splits=frozenset({"train"} if i % 2 else {"test"}))
            for i, cid in enumerate(IDS)]


@pytest.fixture
def src(tmp_path):
    """7 clips; ``emb`` float16 with clip 2 failed (error text) in the middle of a chunk; ``frames``
    uint8 done for the first 3 clips only; an empty float32 set; a prediction run of clips 5 and 1;
    class features."""
    path = tmp_path / "s.zarr"
    with create_store(path, Manifest("toy", CLASSES, _clips(), audio_segments=2, segment_seconds=1.0)) as s:
        s.create_feature_set("emb", 2, (3,), {"encoder": "x", "config": {"é": 1}}, dtype="float16", chunk_clips=2)
        s.write_rows("emb", 0, EMB[:4], done=np.array([1, 1, 0, 1], bool), errors={2: "bád, \"decode\"\tfailed"})
        s.write_rows("emb", 4, EMB[4:])
        s.create_feature_set("frames", 1, (2, 2), {"encoder": "f"}, dtype="uint8", chunk_clips=3)
        s.write_rows("frames", 0, FRAMES[:3])
        s.create_feature_set("f32", 1, (2,), {"encoder": "g"}, dtype="float32")
        s.create_predictions("run1", 2, {"head": "lin"})
        s.write_predictions("run1", np.array([5, 1]), np.full((2, 2, 3), 0.25, np.float32))
        s.write_class_features("cf", np.arange(12, dtype=np.float32).reshape(3, 4), {"encoder": "t"},
                               prompts=["a", "b", "ç"])
    return path


def _nested(column) -> np.ndarray:
    """A nested fixed-size-list column as one numpy array, with pyarrow only."""
    arr, shape = column.combine_chunks(), []
    while hasattr(arr.type, "list_size"):
        shape.append(arr.type.list_size)
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False).reshape(-1, *shape)


# ---------------------------------------------------------------------------------- splits
@pytest.mark.parametrize("split", ["clip_id", "label", "city"])
def test_a_split_named_like_an_index_column_is_refused_not_written_over_it(tmp_path, split, monkeypatch):
    """A manifest refuses such a split; a store made before that rule (made here with it switched
    off) is refused by every table of its index, which would hold the split's flags as that column."""
    clips = [ClipRecord(f"c{i}", label=CLASSES[i % 2], city="lyon",
                        splits=frozenset({split} if i % 2 else {"other"})) for i in range(4)]
    with pytest.raises(ValueError, match=f"split name '{split}' is the name of an index column"):
        Manifest("toy", CLASSES, clips)
    monkeypatch.setattr(manifest_module, "INDEX_COLUMN_NAMES", ())
    with create_store(tmp_path / "s.zarr", Manifest("toy", CLASSES, clips)) as store:
        for export in (store.to_pandas, lambda: write_parquet(store, tmp_path / "o.parquet"),
                       lambda: next(manifest_records(store))):
            with pytest.raises(ValueError, match=f"split.*{split}.*name of an index column"):
                export()
    assert not (tmp_path / "o.parquet").exists()


# --------------------------------------------------------------------------------- Parquet
def test_parquet_refuses_a_failed_clip_in_the_middle_and_leaves_the_old_file(src, tmp_path):
    out = tmp_path / "x.parquet"
    out.write_text("old")
    with open_store(src) as store, pytest.raises(MissingFeatureError, match="cé2"):
        write_parquet(store, out, features=["emb"])
    assert out.read_text() == "old" and not list(tmp_path.glob("*.parquet.*"))


@pytest.mark.parametrize("split", [None, "train"])
def test_parquet_rows_hold_their_own_clip_values_index_and_dtypes(src, tmp_path, split):
    out = tmp_path / "x.parquet"
    with open_store(src) as store:  # batches of 1 clip: each row group a separate read
        n = write_parquet(store, out, features=["emb"], split=split, skip_missing=True, batch_bytes=13)
    table = pq.read_table(out)
    assert pq.ParquetFile(out).metadata.num_row_groups == n
    wanted = [i for i, c in enumerate(_clips()) if i != 2 and (split is None or split in c.splits)]
    got = table.column("clip_id").to_pylist()
    assert got == [IDS[i] for i in wanted] and n == len(wanted)
    emb = _nested(table.column("emb"))
    assert emb.dtype == np.float16 and emb.shape == (n, 2, 3)
    np.testing.assert_array_equal(emb, EMB[wanted])
    clips = _clips()
    assert table.column("label").to_pylist() == [clips[i].label for i in wanted]
    assert table.column("label_index").to_pylist() == [CLASSES.index(clips[i].label) if clips[i].label else -1
                                                       for i in wanted]
    assert table.column("city").to_pylist() == [clips[i].city for i in wanted]
    assert table.column("location").to_pylist() == [f"l\t{i}" for i in wanted]
    assert table.column("train").to_pylist() == [i % 2 == 1 for i in wanted]
    meta = json.loads(table.schema.metadata[b"avscene"])
    assert meta["classes"] == CLASSES and meta["features"]["emb"] == {
        "shape": [2, 3], "dtype": "float16", "fingerprint": meta["features"]["emb"]["fingerprint"]}


def test_parquet_of_two_sets_keeps_only_clips_done_in_both(src, tmp_path):
    out = tmp_path / "x.parquet"
    with open_store(src) as store:
        assert write_parquet(store, out, features=["emb", "frames"], skip_missing=True, batch_bytes=20) == 2
    table = pq.read_table(out)
    assert table.column("clip_id").to_pylist() == IDS[:2]
    frames = _nested(table.column("frames"))
    assert frames.dtype == np.uint8 and frames.shape == (2, 1, 2, 2)
    np.testing.assert_array_equal(frames, FRAMES[:2])
    np.testing.assert_array_equal(_nested(table.column("emb")), EMB[:2])


def test_an_unlabelled_store_exports_null_labels_and_no_classes(tmp_path):
    clips = [ClipRecord(f"u{i}", splits=frozenset({"all"})) for i in range(3)]
    with create_store(tmp_path / "u.zarr", Manifest("toy", [], clips)) as store:
        store.create_feature_set("emb", 1, (2,), {"encoder": "x"}, dtype="float32")
        store.write_rows("emb", 0, np.arange(6, dtype=np.float32).reshape(3, 1, 2))
        write_parquet(store, tmp_path / "u.parquet", features=["emb"])
        frame = store.to_pandas()
    table = pq.read_table(tmp_path / "u.parquet")
    assert table.column("label").to_pylist() == [None] * 3
    assert table.column("label_index").to_pylist() == [-1] * 3
    assert json.loads(table.schema.metadata[b"avscene"])["classes"] == []
    np.testing.assert_array_equal(_nested(table.column("emb")), np.arange(6, dtype=np.float32).reshape(3, 1, 2))
    assert list(frame.index) == ["u0", "u1", "u2"] and frame["label"].isna().all()


# ------------------------------------------------------------------------ pandas, select
def test_to_pandas_and_select_match_pandas_over_plain_zarr_columns(src):
    group = zarr.open_group(str(src), mode="r")
    raw = pd.DataFrame({"clip_id": [str(v) for v in group["index/clip_id"][:]],
                        "label_index": group["index/label"][:].astype(int),
                        "city": [str(v) for v in group["index/city"][:]],
                        "train": group["index/split/train"][:].astype(bool),
                        "done:emb": group["features/emb/done"][:].astype(bool)}).set_index("clip_id")
    with open_store(src) as store:
        frame = store.to_pandas(done=True)
        assert list(frame.index) == IDS == list(raw.index)
        assert frame["label_index"].tolist() == raw["label_index"].tolist()
        assert frame["label"].astype(object).where(frame["label"].notna(), None).tolist() == [
            CLASSES[i] if i >= 0 else None for i in raw["label_index"]]
        assert list(frame["label"].cat.categories) == CLASSES
        for col in ("city", "train", "done:emb"):
            assert frame[col].tolist() == raw[col].tolist(), col
        expected = raw[raw["train"] & (raw["city"] == "lyon") & raw["label_index"].isin([0, -1])].index.tolist()
        assert store.select(split="train", city="lyon", label=["bus", -1]) == expected and expected
        assert store.select(label=-1) == raw[raw["label_index"] == -1].index.tolist() == ["x=3"]
        records = list(manifest_records(store, features=["emb"], split="test"))
    assert [r["id"] for r in records] == raw[~raw["train"]].index.tolist()
    assert [r["features"]["emb"]["done"] for r in records] == [True, False, True, True]
    assert [r["features"]["emb"]["row"] for r in records] == [IDS.index(r["id"]) for r in records]


def test_hugging_face_rows_hold_their_own_values(src):
    pytest.importorskip("datasets")
    with open_store(src) as store:
        dd = store.to_hf(features=["emb"], skip_missing=True, batch_bytes=13)
        with pytest.raises(MissingFeatureError):
            store.to_hf(features=["emb"], splits=["train", "test"])
    for split, ds in dd.items():
        rows = ds.with_format("numpy", dtype="float16")[:]
        ids = [str(c) for c in rows["clip_id"]]
        assert ids == [c for i, c in enumerate(IDS) if i != 2 and (i % 2 == 1) == (split == "train")]
        np.testing.assert_array_equal(rows["emb"], EMB[[IDS.index(c) for c in ids]])
        assert ds.features["label"].names == CLASSES
        assert [int(v) for v in rows["label"]] == [CLASSES.index(_clips()[IDS.index(c)].label)
                                                   if _clips()[IDS.index(c)].label else -1 for c in ids]


# --------------------------------------------------------------------------------- convert
def _h5_arrays(path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def _zarr_arrays(path) -> dict[str, np.ndarray]:
    return _zarr_walk(zarr.open_group(str(path), mode="r"))


def _zarr_walk(group) -> dict[str, np.ndarray]:
    out = {name: arr[...] for name, arr in group.arrays()}
    for g, sub in group.groups():
        out.update({f"{g}/{k}": v for k, v in _zarr_walk(sub).items()})
    return out


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal values and dtype family; texts compared as text (HDF5 keeps UTF-8 bytes)."""
    if a.dtype.kind in "SUO" or b.dtype.kind in "SUO":
        text = lambda x: [v.decode() if isinstance(v, bytes) else str(v) for v in x.ravel()]  # noqa: E731
        return a.shape == b.shape and text(a) == text(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_zarr_to_hdf5_to_zarr_keeps_every_array_and_attribute(src, tmp_path):
    convert_store(src, tmp_path / "c.h5", progress=False)
    convert_store(tmp_path / "c.h5", tmp_path / "b.zarr", progress=False)
    first, h5, back = _zarr_arrays(src), _h5_arrays(tmp_path / "c.h5"), _zarr_arrays(tmp_path / "b.zarr")
    assert set(first) == set(h5) == set(back) and "features/emb/data" in first
    for name in first:
        assert _same(first[name], h5[name]), name
        assert _same(first[name], back[name]), name
    with open_store(src) as a, open_store(tmp_path / "c.h5") as b, open_store(tmp_path / "b.zarr") as c:
        for other in (b, c):
            paths = a.arrays.groups() + a.arrays.arrays()
            assert other.arrays.groups() + other.arrays.arrays() == paths
            for path in paths:
                assert other.arrays.attrs(path) == a.arrays.attrs(path), path
            assert {k: v for k, v in other.attrs.items() if k != "index_lookup"} == {
                k: v for k, v in a.attrs.items() if k != "index_lookup"}
            assert other.errors("emb") == {"cé2": "bád, \"decode\"\tfailed"}
            assert other.done_mask("emb").tolist() == a.done_mask("emb").tolist()
            assert other.prediction_done("run1").tolist() == [False, True, False, False, False, True, False]
            assert other.feature_info("emb").fingerprint == a.feature_info("emb").fingerprint
            values, attrs = other.get_class_features("cf")
            assert values.tolist() == np.arange(12).reshape(3, 4).tolist() and attrs["prompts"] == ["a", "b", "ç"]
            assert _index_equal(other, a)


def _index_equal(a, b) -> bool:
    ca, cb = index_columns(a), index_columns(b)
    return ca.keys() == cb.keys() and all(list(ca[k]) == list(cb[k]) for k in ca)
