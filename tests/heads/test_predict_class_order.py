"""Prediction into a store whose class list is in another order: columns are mapped by class name."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import heads
from featurestore.store import create_store, open_store
from heads.config import TrainConfig

from tests.heads._store import CLASSES, provenance

FEATURE = "clip/ViT-B-32"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_store_path):
    out = tmp_path_factory.mktemp("order") / "lin"
    cfg = TrainConfig(head="linear", features=[FEATURE], train_split="train", val_split="val",
                      out=str(out), epochs=2, batch_size=16, progress=False)
    with open_store(tiny_store_path) as store:
        heads.train(cfg, store)
    return out


def _copy_with_classes(src, path, classes):
    """The same clips and features in a store whose class list is ``classes`` (labels kept by name)."""
    manifest = dataclasses.replace(_manifest_of(src), classes=list(classes))
    dst = create_store(path, manifest)
    info = src.feature_info(FEATURE)
    dst.create_feature_set(FEATURE, info.n_segments, info.feature_shape, provenance(FEATURE + "@openai", "video"),
                           chunk_clips=16)
    dst.write_rows(FEATURE, 0, src.get_many(FEATURE, src.clip_ids))
    return dst


def _manifest_of(store):
    from featurestore import ClipRecord, Manifest

    labels = [store.classes[i] for i in store.labels]
    clips = [ClipRecord(clip_id=c, label=lab, city="city", location="x",
                        splits=frozenset(s for s in store.splits() if store.column(f"split/{s}")[i]))
             for i, (c, lab) in enumerate(zip(store.clip_ids, labels))]
    return Manifest("tiny", list(store.classes), clips, audio_segments=4, video_frames=4)


def test_probabilities_land_under_their_class_names_in_a_reordered_store(tmp_path, tiny_store_path, run_dir):
    with open_store(tiny_store_path) as src:
        same = _copy_with_classes(src, tmp_path / "same.zarr", CLASSES)
        swapped = _copy_with_classes(src, tmp_path / "swapped.zarr", CLASSES[::-1])
    heads.predict(same, run_dir, progress=False)
    heads.predict(swapped, run_dir, progress=False)
    ref, got = same.get_predictions("lin"), swapped.get_predictions("lin")
    assert swapped.classes == CLASSES[::-1]
    np.testing.assert_allclose(got, ref[..., ::-1], atol=1e-6)
    # the argmax agrees with the labels by name in both stores
    names_ref = [same.classes[i] for i in ref.mean(1).argmax(1)]
    names_got = [swapped.classes[i] for i in got.mean(1).argmax(1)]
    assert names_ref == names_got
    assert np.mean(got.mean(1).argmax(1) == swapped.labels) > 0.8
    same.close()
    swapped.close()


def test_a_store_with_other_classes_is_refused_naming_them(tmp_path, tiny_store_path, run_dir):
    other = CLASSES[:-1] + ["metro"]
    with open_store(tiny_store_path) as src:
        manifest = _manifest_of(src)
        manifest = dataclasses.replace(manifest, classes=other, clips=[
            dataclasses.replace(c, label="metro" if c.label == CLASSES[-1] else c.label) for c in manifest.clips])
        dst = create_store(tmp_path / "other.zarr", manifest)
        dst.create_feature_set(FEATURE, 4, (16,), provenance(FEATURE + "@openai", "video"), chunk_clips=16)
        dst.write_rows(FEATURE, 0, src.get_many(FEATURE, src.clip_ids))
    with pytest.raises(ValueError, match=r"only in the run: \['tram'\]; only in the store: \['metro'\]"):
        heads.predict(dst, run_dir, progress=False)
    assert "lin" not in dst.prediction_runs()
    dst.close()
