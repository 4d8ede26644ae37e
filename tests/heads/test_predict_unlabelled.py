"""Prediction into a store made from a manifest without labels (no classes): it takes the run's classes."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import heads
from featurestore import ClipRecord, Manifest
from featurestore.store import create_store, open_store
from heads.config import TrainConfig

from tests.heads._store import CLASSES, provenance

FEATURE = "clip/ViT-B-32"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_store_path):
    out = tmp_path_factory.mktemp("unlabelled") / "lin"
    cfg = TrainConfig(head="linear", features=[FEATURE], train_split="train", val_split="val",
                      out=str(out), epochs=2, batch_size=16, progress=False)
    with open_store(tiny_store_path) as store:
        heads.train(cfg, store)
    return out


def _unlabelled_copy(src, path):
    """The same clips and features in a store whose manifest had no labels, so no classes."""
    clips = [ClipRecord(clip_id=c) for c in src.clip_ids]
    dst = create_store(path, Manifest("unlabelled", [], clips, audio_segments=4, video_frames=4))
    info = src.feature_info(FEATURE)
    dst.create_feature_set(FEATURE, info.n_segments, info.feature_shape, provenance(FEATURE + "@openai", "video"),
                           chunk_clips=16)
    dst.write_rows(FEATURE, 0, src.get_many(FEATURE, src.clip_ids))
    return dst


def test_a_store_without_classes_takes_the_runs_classes(tmp_path, tiny_store_path, run_dir):
    with open_store(tiny_store_path) as src:
        dst = _unlabelled_copy(src, tmp_path / "unlabelled.zarr")
        ref_path = shutil.copytree(tiny_store_path, tmp_path / "labelled.zarr")
    assert dst.classes == [] and (dst.labels == -1).all()
    result = heads.predict(dst, run_dir, progress=False)
    assert result.n_clips == dst.n_clips and dst.classes == CLASSES
    got = dst.get_predictions("lin")
    assert got.shape == (dst.n_clips, 4, len(CLASSES))
    with open_store(ref_path, "a") as ref:
        heads.predict(ref, run_dir, progress=False)
        np.testing.assert_allclose(got, ref.get_predictions("lin", dst.clip_ids), atol=1e-6)
    dst.close()
    with open_store(tmp_path / "unlabelled.zarr") as again:  # the classes were stored, not just set in memory
        assert again.classes == CLASSES


def test_no_classes_on_either_side_is_refused_naming_the_way_out(tmp_path, tiny_store_path, run_dir):
    old = tmp_path / "old_run"
    shutil.copytree(run_dir, old)
    info = json.loads((old / "run.json").read_text())
    info.pop("classes")  # a run too old to record its classes
    (old / "run.json").write_text(json.dumps(info))
    with open_store(tiny_store_path) as src:
        dst = _unlabelled_copy(src, tmp_path / "unlabelled.zarr")
    with pytest.raises(ValueError, match="no classes.*--classes"):
        heads.predict(dst, old, progress=False)
    assert dst.classes == [] and "old_run" not in dst.prediction_runs()
    dst.close()


def test_a_store_with_classes_keeps_refusing_another_class_set(tmp_path, tiny_store_path, run_dir):
    with open_store(tiny_store_path) as src:
        dst = _unlabelled_copy(src, tmp_path / "unlabelled.zarr")
    dst.set_classes(CLASSES[:-1] + ["metro"])
    with pytest.raises(ValueError, match=r"only in the run: \['tram'\]"):
        heads.predict(dst, run_dir, progress=False)
    assert dst.classes == CLASSES[:-1] + ["metro"] and "lin" not in dst.prediction_runs()
    dst.close()
