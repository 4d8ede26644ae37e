"""Export: the index as a pandas DataFrame, lhotse manifests and cuts, Hugging Face and Parquet.

The store of these tests is made the way a user makes one: from a dataset folder of real WAV files
(each clip a different length), at a *relative* store path, in one working directory; every export
is then read from another directory, where only absolute paths resolve.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store, open_store
from featurestore.errors import MissingFeatureError, UnknownFeatureError
from featurestore.store.export import (index_columns, manifest_records, write_manifest,
                                       write_parquet)

FEAT = "clip/ViT-B-32"
MEL = "logmel"
RATE = 8000


def _seconds(i: int) -> float:
    return 0.5 + 0.125 * i  # every clip a different length, so durations come from the file


@pytest.fixture
def store(tmp_path, monkeypatch):
    """6 clips (c5 unlabelled), 4 done in FEAT [2, 3] float16 and all 6 in MEL [2, 2, 4] float32."""
    root = tmp_path / "data"
    (root / "audio").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        soundfile.write(root / "audio" / f"c{i}.wav", rng.uniform(-0.5, 0.5, int(_seconds(i) * RATE)), RATE)
    clips = [ClipRecord(f"c{i}", label=TAU_CLASSES[i] if i < 5 else None, city="lyon", location=f"lyon-{i}",
                        audio=root / "audio" / f"c{i}.wav", splits=frozenset({"train"} if i < 4 else {"test"}))
             for i in range(6)]
    manifest = Manifest("toy", list(TAU_CLASSES), clips, root=root, audio_segments=10, segment_seconds=1.0)
    data = np.arange(6 * 2 * 3, dtype=np.float16).reshape(6, 2, 3)
    mel = rng.normal(size=(6, 2, 2, 4)).astype(np.float32)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the store's path is relative to here, as `featurestore extract d e.zarr` makes it
    with create_store("e.zarr", manifest) as s:
        s.create_feature_set(FEAT, 2, (3,), {"encoder": "clip/ViT-B-32@openai", "config": {},
                                             "weights": {"kind": "pretrained", "tag": "openai"}}, chunk_clips=2)
        s.write_rows(FEAT, 0, data[:4])
        s.create_feature_set(MEL, 2, (2, 4), {"encoder": "logmel", "config": {}, "weights": {"kind": "none"}},
                             dtype="float32", chunk_clips=2)
        s.write_rows(MEL, 0, mel)
    with open_store("e.zarr") as s:
        yield s


def _absolute(tmp_path) -> object:
    """The test store opened by its absolute path: the fixture's handle, opened by a relative one,
    reads relative to the working directory, which these tests change."""
    return open_store(tmp_path / "work" / "e.zarr")


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """Another working directory, from which paths relative to the first resolve to nothing."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    return other


def test_to_pandas_has_the_index_labels_and_splits(store):
    df = store.to_pandas(done=True)
    assert list(df.index) == [f"c{i}" for i in range(6)] and df.index.name == "clip_id"
    assert list(df["label"].cat.categories) == list(TAU_CLASSES)
    assert df.loc["c2", "label"] == TAU_CLASSES[2] and df.loc["c2", "label_index"] == 2
    assert df["label"].isna().tolist() == [False] * 5 + [True] and df.loc["c5", "label_index"] == -1
    assert df["train"].tolist() == [True] * 4 + [False] * 2 and df["test"].sum() == 2
    assert df.loc["c1", "city"] == "lyon" and df.loc["c1", "audio_path"] == "audio/c1.wav"  # as stored
    assert df[f"done:{FEAT}"].tolist() == [True] * 4 + [False] * 2
    assert f"done:{FEAT}" not in store.to_pandas().columns


def test_index_columns_are_plain_equal_length_columns_matching_to_pandas(store):
    cols = index_columns(store)
    assert {len(v) for v in cols.values()} == {6}
    assert all(isinstance(v, list) or (isinstance(v, np.ndarray) and v.ndim == 1) for v in cols.values())
    assert cols["label"] == [TAU_CLASSES[i] for i in range(5)] + [None]
    df = store.to_pandas()
    assert list(df.index) == cols["clip_id"] and df["train"].tolist() == cols["train"].tolist()


def test_a_manifest_written_in_one_directory_resolves_from_another(store, tmp_path, elsewhere):
    """Item 9: the store path and the audio paths were relative to where it ran; now absolute."""
    os.chdir(tmp_path / "work")
    path = tmp_path / "cuts.jsonl"
    assert write_manifest(store, path, [FEAT]) == 6
    os.chdir(elsewhere)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    first = lines[0]
    assert first["recording"]["audio_path"] == str(tmp_path / "data" / "audio" / "c0.wav")
    assert all(Path(r["recording"]["audio_path"]).is_file() for r in lines)
    ref = first["features"][FEAT]
    assert ref == {"storage_type": "featurestore", "storage_path": str(tmp_path / "work" / "e.zarr"),
                   "storage_key": FEAT, "row": 0, "shape": [2, 3], "dtype": "float16", "done": True}
    with open_store(ref["storage_path"]) as again:
        np.testing.assert_array_equal(again.get(ref["storage_key"], first["id"]), _absolute(tmp_path).get(FEAT, "c0"))
    assert lines[5]["supervisions"][0]["label"] is None and lines[5]["features"][FEAT]["done"] is False
    store = _absolute(tmp_path)
    assert [r["id"] for r in manifest_records(store, [FEAT], split="train")] == ["c0", "c1", "c2", "c3"]
    with pytest.raises(UnknownFeatureError, match="clip/RN101"):
        list(manifest_records(store, ["clip/RN101"]))


# -------------------------------------------------------------------------------------- lhotse
def test_to_lhotse_cuts_load_audio_labels_and_features_from_another_directory(store, tmp_path, elsewhere):
    import lhotse

    os.chdir(tmp_path / "work")
    cuts = store.to_lhotse(features=[FEAT, MEL])
    assert isinstance(cuts, lhotse.CutSet)
    saved = tmp_path / "cuts.jsonl.gz"
    cuts.to_file(saved)
    os.chdir(elsewhere)
    store = _absolute(tmp_path)
    loaded = lhotse.CutSet.from_file(saved).to_eager()
    assert [c.id for c in loaded] == [f"c{i}" for i in range(6)]
    for i, cut in enumerate(loaded):
        info = soundfile.info(tmp_path / "data" / "audio" / f"c{i}.wav")
        assert cut.duration == pytest.approx(info.duration) == pytest.approx(_seconds(i))
        assert cut.recording.sampling_rate == RATE
        audio = cut.load_audio()
        assert audio.shape == (1, info.frames)
        np.testing.assert_allclose(audio[0], soundfile.read(tmp_path / "data" / "audio" / f"c{i}.wav")[0],
                                   atol=1e-4)
        sup = cut.supervisions[0]
        assert sup.label == (TAU_CLASSES[i] if i < 5 else None) and sup.city == "lyon"
        assert cut.splits == (["train"] if i < 4 else ["test"])
        np.testing.assert_array_equal(cut.load_custom(MEL), store.get(MEL, cut.id))
    recordings, supervisions, _ = loaded.decompose()
    assert isinstance(recordings, lhotse.RecordingSet) and len(recordings) == 6
    np.testing.assert_array_equal(recordings["c3"].load_audio()[0], loaded["c3"].load_audio()[0])
    assert loaded["c0"].load_custom(FEAT).dtype == np.float16
    np.testing.assert_array_equal(loaded["c2"].load_custom(FEAT), store.get(FEAT, "c2"))
    assert FEAT not in loaded["c5"].custom  # not done: not there, never zeros
    assert [c.id for c in store.to_lhotse(split="test")] == ["c4", "c5"]


def test_to_lhotse_names_a_missing_audio_file(store, tmp_path):
    (tmp_path / "data" / "audio" / "c3.wav").unlink()
    with pytest.raises(FileNotFoundError, match=r"clip c3: audio file .*data/audio/c3.wav not found"):
        store.to_lhotse()


def test_without_lhotse_to_lhotse_is_one_line_naming_the_extra(store, tmp_path):
    """A real interpreter in which ``import lhotse`` fails (a shadowing module that raises ImportError)."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "lhotse.py").write_text("raise ImportError('No module named lhotse')\n")
    script = f"from featurestore import open_store\nopen_store({str(store.location)!r}).to_lhotse()\n"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), str(Path(__file__).parents[2])])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    last = done.stderr.strip().splitlines()[-1]
    assert last == "ImportError: to_lhotse needs lhotse, which is not installed: pip install 'avscene[export]'"


# ----------------------------------------------------------------------- Hugging Face, Parquet
def test_to_hf_is_a_datasetdict_by_split_with_classlabel_and_fixed_shape_arrays(store, tmp_path):
    import datasets

    dd = store.to_hf(features=[MEL])
    assert isinstance(dd, datasets.DatasetDict) and sorted(dd) == ["test", "train"]
    train = dd["train"]
    assert train.features["label"] == datasets.ClassLabel(names=list(TAU_CLASSES))
    assert train.features[MEL] == datasets.Array3D(shape=(2, 2, 4), dtype="float32")
    assert train["clip_id"] == ["c0", "c1", "c2", "c3"] and dd["test"]["label"] == [4, -1]
    assert dd["test"]["audio_path"][0] == str(tmp_path / "data" / "audio" / "c4.wav")
    for split, ds in dd.items():
        got = ds.with_format("numpy")[:][MEL]
        want = store.get_many(MEL, ds["clip_id"])
        assert got.dtype == want.dtype and got.shape == want.shape == (len(ds), 2, 2, 4)
        np.testing.assert_array_equal(got, want)
    with pytest.raises(MissingFeatureError, match="c4, c5"):
        store.to_hf(features=[FEAT])
    small = store.to_hf(features=[FEAT, MEL], skip_missing=True, batch_bytes=1)  # one clip per batch
    assert small["train"].features[FEAT] == datasets.Array2D(shape=(2, 3), dtype="float16")
    assert len(small["test"]) == 0 and small["test"].features == small["train"].features
    assert small["train"].data.column(FEAT).chunk(0).to_numpy().dtype == np.float16  # stored as float16
    got = small["train"].select_columns([FEAT]).with_format("numpy", dtype=np.float16)[:][FEAT]
    assert got.dtype == np.float16 and got.shape == (4, 2, 3)
    np.testing.assert_array_equal(got, store.get_many(FEAT, ["c0", "c1", "c2", "c3"]))


#: Reads the Parquet file as a user without this library would: pyarrow, pandas and polars only.
_READ_WITHOUT_FEATURESTORE = textwrap.dedent("""
    import json, sys
    import numpy as np, pandas as pd, pyarrow.parquet as pq
    path, out = sys.argv[1], sys.argv[2]
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"avscene"])
    shapes = {name: [len(table)] + f["shape"] for name, f in meta["features"].items()}
    feats = {}
    for name in meta["features"]:
        values = table.column(name).combine_chunks()
        while hasattr(values, "flatten"):  # one level of fixed-size lists per axis
            values = values.flatten()
        feats[name] = values.to_numpy(zero_copy_only=False).reshape(shapes[name])
    df = pd.read_parquet(path)
    def deep(cell):  # pandas holds nested lists as object arrays of arrays
        return np.stack([deep(v) for v in cell]) if cell.dtype == object else cell
    mel_pd = np.stack([deep(row) for row in df["logmel"]])
    result = {"ids": df["clip_id"].tolist(), "labels": df["label"].tolist(), "label_index": df["label_index"].tolist(),
              "train": df["train"].tolist(), "audio": df["audio_path"].tolist(), "classes": meta["classes"],
              "row_groups": pq.ParquetFile(path).metadata.num_row_groups,
              "pandas_equal": bool(np.array_equal(mel_pd, feats["logmel"])), "dtypes": {}}
    import polars as pl
    frame = pl.read_parquet(path)
    result["polars_ids"] = frame["clip_id"].to_list()
    result["polars_equal"] = bool(np.array_equal(frame["logmel"].to_numpy(), feats["logmel"]))
    result["polars_f16"] = str(frame["clip/ViT-B-32"].to_numpy().dtype)
    for name, values in feats.items():
        np.save(f"{out}/{name.replace('/', '_')}.npy", values)
    result["featurestore_imported"] = "featurestore" in sys.modules
    print(json.dumps(result))
""")


def test_parquet_round_trip_read_without_featurestore(store, tmp_path, elsewhere):
    os.chdir(tmp_path / "work")
    path = tmp_path / "clips.parquet"
    assert write_parquet(store, path, features=[FEAT, MEL], skip_missing=True, batch_bytes=100) == 4
    out = tmp_path / "read"
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", _READ_WITHOUT_FEATURESTORE, str(path), str(out)], cwd=elsewhere,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    ids = ["c0", "c1", "c2", "c3"]
    assert got["ids"] == ids and got["labels"] == list(TAU_CLASSES[:4]) and got["label_index"] == [0, 1, 2, 3]
    assert got["train"] == [True] * 4 and got["classes"] == list(TAU_CLASSES)
    assert got["audio"] == [str(tmp_path / "data" / "audio" / f"c{i}.wav") for i in range(4)]
    assert got["row_groups"] == 4 and got["pandas_equal"] and not got["featurestore_imported"]
    assert got["polars_ids"] == ids and got["polars_equal"] and got["polars_f16"] == "float16"
    for name in (FEAT, MEL):
        values = np.load(out / f"{name.replace('/', '_')}.npy")
        want = store.get_many(name, ids)
        assert values.dtype == want.dtype and values.shape == want.shape
        np.testing.assert_array_equal(values, want)


def test_parquet_of_unfinished_clips_is_refused_before_anything_is_written(store, tmp_path):
    path = tmp_path / "clips.parquet"
    path.write_bytes(b"previous")
    with pytest.raises(MissingFeatureError, match="c4, c5"):
        write_parquet(store, path, features=[FEAT])
    assert path.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == [
        "clips.parquet", "data", "work"]
    assert write_parquet(store, path, features=[MEL], split="test") == 2


def test_to_hf_from_a_parquet_export_loads_with_datasets(store, tmp_path):
    """The path for stores larger than memory: Parquet, then ``datasets.load_dataset`` (memory-mapped)."""
    import datasets

    path = tmp_path / "clips.parquet"
    write_parquet(store, path, features=[MEL])
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    got = np.asarray(ds.with_format("numpy")[:][MEL])
    np.testing.assert_array_equal(got.astype(np.float32), store.get_many(MEL, ds["clip_id"]))


def test_parquet_on_a_full_disk_keeps_the_previous_file(store, tmp_path):
    """A real file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) in a child: one OutputWriteError, the
    previous file byte for byte, no temp file left."""
    out = tmp_path / "out"
    out.mkdir()
    target = out / "clips.parquet"
    target.write_bytes(b"previous good file\n" * 10)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    script = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        from featurestore import open_store
        from featurestore.store.export import write_parquet
        store = open_store({str(tmp_path / "work" / "e.zarr")!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))
        write_parquet(store, {str(target)!r}, features=["logmel"], batch_bytes=64)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"OutputWriteError: could not write {target}: file-size limit reached" in done.stderr, done.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_rows_appended_from_another_dataset_resolve_against_their_own_root(tmp_path):
    """``append_clips`` keeps each manifest's root (``datasets`` attribute): exports use the right one."""
    stores = []
    for name in ("one", "two"):
        root = tmp_path / name
        clip = ClipRecord(f"{name}-1", label="park", audio=root / "audio" / f"{name}-1.wav", splits=frozenset({"train"}))
        stores.append(Manifest(name, list(TAU_CLASSES), [clip], root=root, audio_segments=1, segment_seconds=1.0))
    with create_store(tmp_path / "s.zarr", stores[0]) as store:
        store.append_clips(stores[1])
        records = list(manifest_records(store))
    assert [r["recording"]["audio_path"] for r in records] == [
        str(tmp_path / "one" / "audio" / "one-1.wav"), str(tmp_path / "two" / "audio" / "two-1.wav")]
