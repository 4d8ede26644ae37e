"""Export: the index as a pandas DataFrame, lhotse-style manifests and Hugging Face columns."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from featurestore import TAU_CLASSES, ClipRecord, Manifest, create_store, open_store
from featurestore.errors import UnknownFeatureError
from featurestore.store.export import hf_columns, manifest_records, write_manifest

FEAT = "clip/ViT-B-32"


@pytest.fixture
def store(tmp_path):
    clips = [ClipRecord(f"c{i}", label=TAU_CLASSES[i] if i < 5 else None, city="lyon", location=f"lyon-{i}",
                        audio=Path(f"audio/c{i}.wav"), splits=frozenset({"train"} if i < 4 else {"test"}))
             for i in range(6)]
    manifest = Manifest("toy", list(TAU_CLASSES), clips, audio_segments=10, segment_seconds=1.0)
    data = np.arange(6 * 2 * 3, dtype=np.float16).reshape(6, 2, 3)
    with create_store(tmp_path / "e.zarr", manifest) as s:
        s.create_feature_set(FEAT, 2, (3,), {"encoder": "clip/ViT-B-32@openai", "config": {},
                                             "weights": {"kind": "pretrained", "tag": "openai"}}, chunk_clips=2)
        s.write_rows(FEAT, 0, data[:4])
    with open_store(tmp_path / "e.zarr") as s:
        yield s


def test_to_pandas_has_the_index_labels_and_splits(store):
    df = store.to_pandas(done=True)
    assert list(df.index) == [f"c{i}" for i in range(6)] and df.index.name == "clip_id"
    assert list(df["label"].cat.categories) == list(TAU_CLASSES)
    assert df.loc["c2", "label"] == TAU_CLASSES[2] and df.loc["c2", "label_index"] == 2
    assert df["label"].isna().tolist() == [False] * 5 + [True] and df.loc["c5", "label_index"] == -1
    assert df["train"].tolist() == [True] * 4 + [False] * 2 and df["test"].sum() == 2
    assert df.loc["c1", "city"] == "lyon" and df.loc["c1", "audio_path"] == "audio/c1.wav"
    assert df[f"done:{FEAT}"].tolist() == [True] * 4 + [False] * 2
    assert f"done:{FEAT}" not in store.to_pandas().columns


def test_manifest_records_reference_features_without_copying_them(store, tmp_path):
    records = list(manifest_records(store, [FEAT], split="train"))
    assert [r["id"] for r in records] == ["c0", "c1", "c2", "c3"]
    first = records[0]
    assert first["duration"] == 10.0 and first["supervisions"][0]["label"] == TAU_CLASSES[0]
    assert first["recording"]["audio_path"] == "audio/c0.wav" and first["splits"] == ["train"]
    assert first["features"][FEAT] == {"storage_type": "featurestore", "storage_path": store.location,
                                       "storage_key": FEAT, "row": 0, "shape": [2, 3], "dtype": "float16",
                                       "done": True}
    path = tmp_path / "cuts.jsonl"
    assert write_manifest(store, path, [FEAT]) == 6
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[5]["supervisions"][0]["label"] is None and lines[5]["features"][FEAT]["done"] is False
    with pytest.raises(UnknownFeatureError, match="clip/RN101"):
        list(manifest_records(store, ["clip/RN101"]))


def test_hf_columns_hold_clip_means_or_segments_of_done_clips(store):
    cols = hf_columns(store, FEAT)
    assert cols["clip_id"] == ["c0", "c1", "c2", "c3"] and cols["label"][1] == TAU_CLASSES[1]
    np.testing.assert_allclose(cols["embedding"][1], [7.5, 8.5, 9.5])
    seg = hf_columns(store, FEAT, split="train", level="segment")
    assert seg["clip_id"][:3] == ["c0", "c0", "c1"] and seg["segment"][:3] == [0, 1, 0]
    np.testing.assert_allclose(seg["embedding"][2], [6, 7, 8])


def test_index_columns_are_plain_equal_length_columns_matching_to_pandas(store):
    """What docs/store.md hands to ``datasets.Dataset.from_dict``: lists and 1-d arrays of one length,
    labels as text (no pandas categorical), the same values as ``to_pandas``."""
    from featurestore.store.export import index_columns

    cols = index_columns(store)
    assert {len(v) for v in cols.values()} == {6}
    assert all(isinstance(v, list) or (isinstance(v, np.ndarray) and v.ndim == 1) for v in cols.values())
    assert cols["label"] == [TAU_CLASSES[i] for i in range(5)] + [None]
    df = store.to_pandas()
    assert list(df.index) == cols["clip_id"] and df["train"].tolist() == cols["train"].tolist()
