"""``Manifest.from_columns``: a manifest of millions of clips without a ``ClipRecord`` each.

The contract is equivalence: the manifest made from columns behaves as the manifest of the equivalent
records, and the store made from it is the same file for file. Each test builds both and compares,
or shows a bad column refused in one line naming the column, row and clip.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from featurestore import ClipRecord, Manifest, create_store, open_store
from featurestore.clip_table import ClipTable
from featurestore.store.clips import _stored_path, _stored_paths

CLASSES = ["bus", "park", "tram"]
ROOT = Path("/data/tau")
# media paths of every kind the store has to write as Path would: clean relative ones (the fast path),
# absolute under and outside the root, and texts that Path rewrites ("./x", "a//b", "x/")
AUDIO = ["audio/a.wav", str(ROOT / "audio/b.wav"), "/elsewhere/c.wav", None, "", "./audio/e.wav",
         "audio//f.wav", "audio/g.wav"]
VIDEO = [f"video/{i}.mp4" for i in range(8)]


def columns() -> dict:
    """Eight clips' columns, with the unknowns a pandas reader hands over (None, NaN)."""
    return {"clip_id": [f"clip-{i}" for i in range(8)],
            "label": ["bus", "park", None, "tram", float("nan"), "bus", "park", "tram"],
            "city": ["lyon", "paris", "lyon", None, "paris", "lyon", "oslo", "oslo"],
            "location": [f"loc-{i % 3}" for i in range(8)],
            "audio": list(AUDIO), "video": list(VIDEO),
            "splits": {"train": np.array([1, 1, 0, 1, 0, 1, 1, 0], dtype=bool),
                       "test": np.array([0, 0, 1, 0, 1, 1, 0, 1], dtype=bool),
                       "unused": np.zeros(8, dtype=bool)}}


def records(cols: dict) -> list[ClipRecord]:
    """The records ``cols`` stand for, written out one by one (NaN and None as a record holds them)."""
    def given(value):
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else value

    out = []
    for i, cid in enumerate(cols["clip_id"]):
        out.append(ClipRecord(cid, audio=Path(cols["audio"][i]) if given(cols["audio"][i]) else None,
                              video=Path(cols["video"][i]) if given(cols["video"][i]) else None,
                              label=given(cols["label"][i]),
                              city=given(cols["city"][i]) or "", location=cols["location"][i],
                              splits=frozenset(s for s, m in cols["splits"].items() if m[i])))
    return out


def from_columns(cols: dict, **kwargs) -> Manifest:
    return Manifest.from_columns("cols", CLASSES, cols["clip_id"], label=cols["label"], city=cols["city"],
                                 location=cols["location"], audio=cols["audio"], video=cols["video"],
                                 splits=cols["splits"], root=ROOT, **kwargs)


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_store_made_from_columns_is_the_store_made_from_the_records(tmp_path):
    cols = columns()
    made = {}
    for name, manifest in (("columns", from_columns(cols)),
                           ("records", Manifest("cols", CLASSES, records(cols), ROOT))):
        create_store(tmp_path / name, manifest).close()
        made[name] = tree(tmp_path / name)
    assert made["columns"].keys() == made["records"].keys()
    differ = [p for p in made["columns"] if made["columns"][p] != made["records"][p]]
    assert not differ, differ
    with open_store(tmp_path / "columns") as store:  # and what it holds is what was given
        assert store.column("audio_path").tolist() == ["audio/a.wav", "audio/b.wav", "/elsewhere/c.wav", "", "",
                                                       "audio/e.wav", "audio/f.wav", "audio/g.wav"]
        assert store.labels.tolist() == [0, 1, -1, 2, -1, 0, 1, 2]
        assert store.splits() == ["test", "train"] and store.column("city")[3] == ""


def test_a_table_reads_as_the_list_of_its_records():
    cols = columns()
    table, expected = from_columns(cols).clips, records(cols)
    assert isinstance(table, ClipTable) and len(table) == 8
    assert list(table) == expected
    assert [table[i] for i in range(-8, 8)] == expected + expected
    assert list(table[2:7:2]) == expected[2:7:2] and isinstance(table[1:3], ClipTable)
    with pytest.raises(IndexError):
        table[8]


def test_the_manifest_of_a_table_answers_as_the_manifest_of_records():
    cols = columns()
    table, plain = from_columns(cols), Manifest("cols", CLASSES, records(cols), ROOT)
    assert table.clip_ids == plain.clip_ids and table.split_names == plain.split_names == ["test", "train"]
    wanted = ["clip-5", "clip-0", "clip-3"]
    assert list(table.subset(wanted).clips) == list(plain.subset(wanted).clips)
    assert isinstance(table.subset(wanted).clips, ClipTable)
    assert table.subset(["clip-2"]).split_names == ["test"]  # a split none of the kept clips is in is gone
    assert list(table.with_classes(["tram", "park", "bus"]).clips) == list(plain.clips)
    for manifest in (table, plain):
        with pytest.raises(ValueError, match=r"clip 'clip-0' has label 'bus', which is not one of"):
            manifest.with_classes(["park", "tram"])


def test_pandas_columns_make_the_same_manifest():
    cols = columns()
    frame = pd.DataFrame({k: v for k, v in cols.items() if k != "splits"})
    frame["city"] = frame["city"].astype("string")  # a nullable column: its missing value is pd.NA
    manifest = Manifest.from_columns("cols", CLASSES, frame["clip_id"], label=frame["label"], city=frame["city"],
                                     location=frame["location"], audio=frame["audio"], video=frame["video"],
                                     splits={s: frame.index.isin(np.flatnonzero(m)) for s, m in cols["splits"].items()},
                                     root=ROOT)
    assert list(manifest.clips) == records(cols) and manifest.clips[3].city == ""
    ids = (cid for cid in cols["clip_id"])  # any iterable, taken once
    assert Manifest.from_columns("cols", CLASSES, ids).clip_ids == cols["clip_id"]


@pytest.mark.parametrize("change, message", [
    (dict(city=["lyon"] * 7), r"column 'city' holds 7 values for 8 clip ids"),
    (dict(label=["bus"] * 7 + [3]), r"column 'label', row 7 \(clip 'clip-7'\): expected a str or None, got the int 3"),
    (dict(audio=["a.wav"] * 7 + [5.0]), r"column 'audio', row 7 \(clip 'clip-7'\): expected a path"),
    (dict(location="loc"), r"column 'location': expected one value per clip, got the str 'loc'"),
    (dict(splits={"train": np.ones(8)}), r"split 'train': expected 8 booleans \(one per clip\), got an array of float64"),
    (dict(clip_id=[f"clip-{i}" for i in range(7)] + ["a b"]), r"dataset 'cols', clip 7: clip id 'a b' holds ' '"),
    (dict(city=np.array([["lyon"] * 8])), r"column 'city': expected one value per clip \(a 1-d column\), got 2 dim"),
    (dict(splits={"train": pd.array([True] * 7 + [None], dtype="boolean")}),
     r"split 'train': expected 8 booleans .* got an array of object .*fill them first: mask.fillna\(False\)"),
    (dict(splits={"a/b": np.ones(8, dtype=bool)}), r"split name 'a/b' cannot be a store key"),
])
def test_a_bad_column_is_refused_in_one_line(change, message):
    cols = {**columns(), **change}
    with pytest.raises(ValueError, match=message):
        from_columns(cols)


def test_an_unknown_label_is_refused_before_anything_is_written(tmp_path):
    cols = {**columns(), "label": ["bus"] * 7 + ["boat"]}
    with pytest.raises(ValueError, match=r"label 'boat' is not one of the classes"):
        create_store(tmp_path / "s", from_columns(cols))
    index = tmp_path / "s" / "index"
    assert not index.exists() or not [f for f in index.rglob("*") if f.is_file() and f.name != "zarr.json"]


@pytest.mark.parametrize("root", [None, ROOT, Path("data"), Path("/")])
def test_stored_paths_take_the_fast_path_only_where_path_keeps_the_text(root):
    texts = ["a/b.wav", "/data/tau/x.wav", "/data/tau", "data/x.wav", "./a", "a/./b", "a//b", "a/", ".", "..",
             "../a", "a/..", "/x/.hidden", "//net/x", "/data/taux/y", "a\\b", "é/ü.wav", None]
    for text in texts:  # each alone (the fast path is taken or not per column) and all together
        for column in ([text], [text, "clean/x.wav"], texts):
            expected = ["" if t is None else _stored_path(Path(t), root) for t in column]
            assert _stored_paths(np.array(column, dtype=object), root).tolist() == expected, (column, root)


def test_a_manifest_from_columns_extracts_as_its_records(tiny_manifest, tmp_path):
    """Extraction reads a table's clips as records built on demand (decode paths, splits, labels):
    the store it fills is the one the records fill, features and all."""
    from featurestore.extract import extract

    m = tiny_manifest
    cols = ClipTable.of(m.clips)
    table = Manifest.from_columns(m.name, m.classes, cols.clip_id, label=cols.label, city=cols.city,
                                  location=cols.location, audio=[str(p) for p in cols.audio],
                                  video=[str(p) for p in cols.video], splits=cols.splits, root=m.root,
                                  audio_segments=m.audio_segments, segment_seconds=m.segment_seconds,
                                  video_frames=m.video_frames)
    assert isinstance(table.clips, ClipTable) and isinstance(m.clips, list)
    for name, manifest in (("records", m), ("columns", table)):
        summary = extract(manifest, tmp_path / f"{name}.zarr", "logmel", device="cpu", num_workers=0,
                          progress=False, limit=2)
        assert summary.clips_done == 2
    with open_store(tmp_path / "records.zarr") as a, open_store(tmp_path / "columns.zarr") as b:
        assert a.clip_ids == b.clip_ids and a.splits() == b.splits() and a.labels.tolist() == b.labels.tolist()
        for column in a.columns():
            assert a.column(column).tolist() == b.column(column).tolist(), column
        assert np.array_equal(a.read_rows("logmel", 0, 2), b.read_rows("logmel", 0, 2))


def test_a_table_says_which_media_it_has_as_its_records_do():
    cols = columns()
    no_video = {**cols, "video": [None, "", float("nan")] + [None] * 5}
    for given in (cols, no_video):
        table, plain = from_columns(given), Manifest("cols", CLASSES, records(given), ROOT)
        assert [table.has_media(k) for k in ("audio", "video")] == [plain.has_media(k) for k in ("audio", "video")]
    assert not from_columns(no_video).has_media("video") and from_columns(no_video).has_media("audio")


def test_clean_paths_are_stored_without_a_path_each(monkeypatch):
    """The fast path is taken for a column of clean relative texts (and for none other above): a
    ``Path`` per clip is ~5 us, 5 s a million clips."""
    from featurestore.store import clips as store_clips

    column = np.array(["audio/a.wav", None, "audio/b c.wav", "/elsewhere/d.wav"], dtype=object)
    expected = ["audio/a.wav", "", "audio/b c.wav", "/elsewhere/d.wav"]
    monkeypatch.setattr(store_clips, "_stored_path", lambda *a: pytest.fail("a Path per clip on clean texts"))
    for root in (None, ROOT):
        assert _stored_paths(column, root).tolist() == expected


def test_a_column_given_as_a_list_is_not_made_into_a_numpy_text_array(monkeypatch):
    """Checking that a list column is 1-d looks at its first item, not at ``np.ndim`` of the list
    (which builds a numpy string array of a million ids first); a list of lists is still refused."""
    from featurestore import clip_table

    calls = []
    real = np.ndim
    monkeypatch.setattr(clip_table.np, "ndim", lambda values: calls.append(type(values).__name__) or real(values))
    ClipTable.from_columns([f"c{i}" for i in range(100)], city=["x"] * 100)
    assert calls == []
    with pytest.raises(ValueError, match="2 dimensions"):
        ClipTable.from_columns(["a", "b"], city=[["x", "y"], ["z", "w"]])
